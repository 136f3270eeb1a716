"""The resume journal of a staging directory (docs/formats.md, "Staging, journal and manifest").

``<staging>/hfnemo-journal.jsonl`` is append-only JSON lines. The first line says which
conversion the directory belongs to (a fingerprint of the plan and of the source files); every
later line is a commit: the position in the plan up to which every output byte is on disk and
fsynced, and the size and xxh3_64 of each file written since the previous commit. Data is fsynced
before the line that claims it, and the line before anything relies on it, so after a crash, a
kill -9 or a power loss the last complete line is true.

A re-run verifies each file's journaled prefix (re-reading it, which also rebuilds the running
hash), truncates the files there, deletes everything else, replays the finished part of the plan
through the sinks without reading the source (:func:`hfnemo.exec.executor.execute`), and goes on.
Anything that does not verify sends the whole staging directory back to zero, never into the
output.

Commits happen on a background thread every ``COMMIT_BYTES`` of output (``HFNEMO_COMMIT_BYTES``
overrides it), at the end of the tensor data, and on the error/interrupt path for the last block
that was completely written.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import stat
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from hfnemo.errors import ResumeMismatch
from hfnemo.io.fileio import OutFile, ReplayMismatch, fault_point
from hfnemo.manifest import hash_file
from hfnemo.plan.plan import Plan, json_default

JOURNAL = "hfnemo-journal.jsonl"
VERSION = 1
COMMIT_BYTES = 256 << 20


def commit_bytes() -> int:
    env = os.environ.get("HFNEMO_COMMIT_BYTES")
    return max(1, int(env)) if env else COMMIT_BYTES


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ fingerprint

def _canonical(obj: Any, cache: dict[str, str]) -> Any:
    """Plan data with every path to an existing file spelled as its real path (a re-run may name
    the same source differently)."""
    if isinstance(obj, dict):
        return {k: _canonical(v, cache) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v, cache) for v in obj]
    if isinstance(obj, str) and os.sep in obj:
        if obj not in cache:
            cache[obj] = os.path.realpath(obj) if os.path.exists(obj) else obj
        return cache[obj]
    return obj


def plan_digest(plan: Plan) -> str:
    """sha256 of the plan without its memory budget (block sizes follow the resident size at start,
    which differs between runs; the bytes written do not)."""
    d = asdict(plan)
    d.pop("budget", None)
    d.pop("notes", None)
    d["source"] = os.path.realpath(d["source"])
    text = json.dumps(_canonical(d, {}), sort_keys=True, default=json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def sources_digest(files: Iterable[Path]) -> str:
    """sha256 over the real path, size and mtime of every source file the plan reads."""
    rows = []
    for p in sorted({os.path.realpath(f) for f in files}):
        st = os.stat(p)
        rows.append([p, st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def fingerprint(plan: Plan, source_files: Iterable[Path], plan_sha: str | None = None) -> dict[str, Any]:
    from importlib import metadata

    try:
        version = metadata.version("hfnemo")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare source tree
        version = "unknown"
    return {"journal": VERSION, "hfnemo": version, "plan": plan_sha or plan_digest(plan),
            "sources": sources_digest(source_files)}


_WHAT = {"plan": "plan (other options, another source, or another output format)",
         "sources": "source files (they changed since)", "hfnemo": "hfnemo version",
         "journal": "journal format"}


# ------------------------------------------------------------------------------ the journal

@dataclass
class _Prior:
    """What an existing journal says (nothing verified yet)."""

    header: dict[str, Any]
    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    start: tuple[int, int] = (0, 0)
    crcs: dict[int, int] = field(default_factory=dict)
    partial_crc: int | None = None
    done: int = 0
    good_end: int = 0  # journal bytes up to the end of the last complete line


def _parse(path: Path) -> _Prior | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    lines = data.split(b"\n")
    try:
        header = json.loads(lines[0])
    except ValueError:
        return None
    if len(lines) < 2 or not isinstance(header, dict) or "fingerprint" not in header:
        return None  # no complete header line
    prior = _Prior(header, good_end=len(lines[0]) + 1)
    for raw in lines[1:-1]:  # the last piece follows the last newline: empty, or a torn line
        try:
            rec = json.loads(raw)
            at = (int(rec["at"][0]), int(rec["at"][1]))
            files = {str(k): (int(v[0]), str(v[1])) for k, v in rec["files"].items()}
            crcs = {int(k): int(v) for k, v in rec["crcs"].items()}
            done = int(rec["done"])
            crc = None if rec.get("crc") is None else int(rec["crc"])
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            break
        prior.files.update(files)
        prior.crcs.update(crcs)
        prior.start, prior.partial_crc, prior.done = at, crc, done
        prior.good_end += len(raw) + 1
    return prior


class Journal:
    """The journal of one staging directory, and the opener of its output files.

    Use: ``j = Journal(staging, fp)``; ``j.inspect()`` (reads an existing journal, refuses a
    different conversion); preflight with ``j.resumable_bytes``; ``j.begin()`` (verify and keep,
    or start afresh); the sinks open files with ``j.open``; ``execute(..., journal=j)``;
    ``j.flush()`` after the last block; ``j.stop(save=...)`` always.
    """

    def __init__(self, root: Path, fp: dict[str, Any], commit_every: int | None = None, *,
                 name: str = JOURNAL, scope: Callable[[str], bool] | None = None,
                 siblings: tuple[str, ...] = (JOURNAL,)) -> None:
        self.root = Path(root)
        self.path = self.root / name
        # Several processes may write one staging directory (hfnemo.dist), each with a journal of its
        # own: ``scope(rel)`` says which files are this journal's to keep or delete (default: all,
        # and the directory itself). Empty directories are pruned only by a journal of that scope or
        # of the first writer (``prune``).
        self.scope = scope
        self.prune = scope is None
        self.siblings = siblings  # the journals of every writer of this conversion
        self.fingerprint = fp
        self.commit_every = commit_every or commit_bytes()
        self.prior: _Prior | None = None
        self.notes: list[str] = []  # what happened to a previous run's work, for the user
        self.start: tuple[int, int] = (0, 0)
        self.crcs: dict[int, int] = {}
        self.partial_crc: int | None = None
        self.resumed_bytes = 0
        self.done = 0  # tensor bytes written, resumed ones included, up to the last finished block
        self.kept: dict[str, tuple[int, Any]] = {}  # verified files not yet reopened: rel -> (size, hasher)
        self.files: dict[str, OutFile] = {}  # every file opened through the journal, by relative path
        self.fresh = True
        self._jfd: int | None = None
        self._jsize = 0
        self._dirty: dict[str, OutFile] = {}
        self._new_crcs: list[tuple[int, int]] = []
        self._since = 0
        self._pending: tuple[list[int], int, int, int | None, dict[str, list], list[OutFile]] | None = None
        self._queue: queue.Queue = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- before any byte

    def inspect(self) -> None:
        """Read an existing journal (no data). Raises ResumeMismatch when it belongs to another
        conversion; a directory without a readable journal is simply started afresh by begin()."""
        if not self.root.is_dir():
            return
        foreign = sorted(p.name for p in self.root.glob("hfnemo-journal*.jsonl") if p.name not in self.siblings)
        if foreign and not self.path.is_file():
            by = "one process" if foreign == [JOURNAL] else f"{len(foreign)} or more ranks"
            raise ResumeMismatch(
                f"{self.root} holds an interrupted conversion written by {by} ({', '.join(foreign)})",
                file=self.root, fix="re-run it with the same number of processes (--workers / torchrun) to resume "
                                    "it, or pass --restart to discard it")
        if not self.path.is_file():
            return
        prior = _parse(self.path)
        if prior is None:
            return
        theirs = prior.header.get("fingerprint") or {}
        differ = [k for k in ("journal", "hfnemo", "plan", "sources")
                  if theirs.get(k) != self.fingerprint.get(k)]
        if differ:
            raise ResumeMismatch(
                f"{self.root} holds an interrupted conversion with a different {_WHAT[differ[0]]}",
                file=self.root,
                fix="re-run the interrupted command to resume it, or pass --restart to discard it")
        self.prior = prior

    @property
    def resumable_bytes(self) -> int:
        """Tensor bytes the journal says are on disk (before verification)."""
        return self.prior.done if self.prior is not None else 0

    def begin(self) -> None:
        """Verify and keep what the journal claims, or start a fresh staging directory."""
        if self.prior is not None:
            problem = self._verify(self.prior)
            if problem is None:
                self._keep(self.prior)
            else:
                self.notes.append(f"the interrupted run's output does not verify ({problem}); starting over")
                self.kept.clear()
                self.prior = None
        if self.prior is None:
            self._fresh()
        self._thread = threading.Thread(target=self._commit_loop, name="hfnemo-journal", daemon=True)
        self._thread.start()

    def _verify(self, prior: _Prior) -> str | None:
        for rel, (size, hexd) in sorted(prior.files.items()):
            p = self.root / rel
            try:
                st = os.lstat(p)
                if not stat.S_ISREG(st.st_mode) or st.st_size < size:
                    return f"{rel} holds {st.st_size} bytes, the journal says {size}"
                n, h = hash_file(p, size)
            except OSError as e:
                return f"{rel}: {e.strerror}"
            if n != size or f"{h.intdigest():016x}" != hexd:
                return f"{rel} differs from what the journal recorded"
            self.kept[rel] = (size, h)
        return None

    def _keep(self, prior: _Prior) -> None:
        for rel, (size, _) in self.kept.items():
            os.truncate(self.root / rel, size)
        # Everything the journal does not vouch for is rewritten: later files, side files.
        self._clear(keep=set(self.kept))
        self._jfd = os.open(self.path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        os.ftruncate(self._jfd, prior.good_end)
        self._jsize = prior.good_end
        self.start, self.crcs, self.partial_crc = prior.start, prior.crcs, prior.partial_crc
        self.resumed_bytes = self.done = prior.done
        self.fresh = False

    def _clear(self, keep: set[str]) -> None:
        """Delete every file of this journal's scope but ``keep`` and the journal itself."""
        own = self.path.relative_to(self.root).as_posix()
        for d, dirs, names in os.walk(self.root, topdown=False):
            for name in names:
                rel = Path(d, name).relative_to(self.root).as_posix()
                if rel not in keep and rel != own and (self.scope is None or self.scope(rel)):
                    os.unlink(Path(d, name))
            for name in dirs if self.prune else ():
                p = Path(d, name)
                if p.is_symlink():
                    p.unlink()
                elif not any(p.iterdir()):
                    p.rmdir()

    def _fresh(self) -> None:
        if self.scope is not None and self.root.is_dir() and not self.root.is_symlink():
            self._clear(keep=set())  # the other writers' files stay
        elif self.root.exists() or self.root.is_symlink():
            if self.root.is_dir() and not self.root.is_symlink():
                shutil.rmtree(self.root)
            else:
                self.root.unlink()
        self.root.mkdir(exist_ok=self.scope is not None)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self._jfd = os.open(self.path, flags, 0o644)
        self._jsize = 0
        self._append({"hfnemo_journal": VERSION, "fingerprint": self.fingerprint})
        fsync_dir(self.root)
        fsync_dir(self.root.parent)

    # ---------------------------------------------------------------- while writing

    def open(self, path: Path) -> OutFile:
        """The sinks' opener: a kept file reopens at its verified end, anything else is created."""
        rel = Path(path).relative_to(self.root).as_posix()
        size, hasher = self.kept.pop(rel, (0, None))
        f = OutFile(path, rel, size, hasher, on_write=self._on_write)
        self.files[rel] = f
        return f

    def _on_write(self, f: OutFile) -> None:
        self._dirty[f.rel] = f

    def item_crc(self, index: int) -> int | None:
        """CRC of a finished item's record, or (index -1) of the partly written one."""
        return self.partial_crc if index < 0 else self.crcs.get(index)

    def replayed(self) -> None:
        """After the replay every kept file must have been reopened and reached its kept end."""
        if self.kept:
            raise ReplayMismatch(f"kept files the plan does not reach: {', '.join(sorted(self.kept))}")
        for f in self.files.values():
            if f.size != f.keep:
                raise ReplayMismatch(f"{f.rel}: the replay ends at byte {f.size}, {f.keep} were kept")

    def after_block(self, index: int, r1: int, last: bool, crc: int | None, nbytes: int, done: int) -> None:
        """A block is in the files (item ``index`` up to row ``r1``; ``last``: the item is done)."""
        if self._error is not None:
            raise self._error
        if last:
            if crc is not None:
                self._new_crcs.append((index, crc))
            at, part = [index + 1, 0], None
        else:
            at, part = [index, r1], crc
        files = {rel: [f.size, f.digest()] for rel, f in self._dirty.items()}
        self._pending = (at, done, len(self._new_crcs), part, files, list(self._dirty.values()))
        self.done = done
        self._since += nbytes
        if self._since >= self.commit_every and self._idle.is_set():
            self._hand_over()

    def _record(self) -> tuple[dict[str, Any], list[OutFile]]:
        at, done, n_crcs, part, files, outs = self._pending
        crcs = {str(i): c for i, c in self._new_crcs[:n_crcs]}
        rec = {"at": at, "done": done, "files": files, "crcs": crcs, "crc": part}
        return rec, outs

    def _hand_over(self) -> None:
        rec, outs = self._record()
        fds, dirs = [], set()
        for f in outs:
            if not f.closed:
                fds.append(os.dup(f.fd))  # the sink may close its fd while the commit runs
            if not f.dir_synced:  # its directory entry, and those of the directories up to the root
                dirs.update(self._ancestors(f.path))
                f.dir_synced = True
        del self._new_crcs[:self._pending[2]]
        self._dirty.clear()
        self._since = 0
        self._pending = None
        self._idle.clear()
        self._queue.put((rec, fds, dirs))

    def _ancestors(self, path: str) -> list[str]:
        out, d = [], Path(path).parent
        while d != self.root and self.root in d.parents:
            out.append(str(d))
            d = d.parent
        return [*out, str(self.root)]

    def _commit_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            rec, fds, dirs = job
            try:
                for fd in fds:
                    os.fsync(fd)
                for d in dirs:
                    fsync_dir(d)
                fault_point("commit")
                self._append(rec)
            except BaseException as e:  # noqa: BLE001 - handed to the writer thread
                self._error = e
            finally:
                for fd in fds:
                    os.close(fd)
                self._idle.set()

    def _append(self, rec: dict[str, Any]) -> None:
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        at = 0
        while at < len(line):
            at += os.pwrite(self._jfd, line[at:], self._jsize + at)
        os.fsync(self._jfd)
        self._jsize += len(line)

    def flush(self) -> None:
        """Commit the last block now and wait for it (the end of the tensor data)."""
        self._idle.wait()
        if self._error is None and self._pending is not None:
            self._hand_over()
            self._idle.wait()
        if self._error is not None:
            raise self._error

    def stop(self, save: bool = False) -> None:
        """End the commit thread. ``save`` (the error and interrupt path): also commit the last
        block that was completely written, best effort."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if save and self._pending is not None and self._jfd is not None:
            try:
                rec, outs = self._record()
                for f in outs:
                    if not f.closed:
                        os.fsync(f.fd)
                    if not f.dir_synced:
                        for d in self._ancestors(f.path):
                            fsync_dir(d)
                self._append(rec)
                self._pending = None
            except OSError:
                pass  # the previous commit stands
        if self._jfd is not None:
            os.close(self._jfd)
            self._jfd = None

    def digests(self) -> dict[str, tuple[int, str]]:
        """Size and xxh3_64 of every file written through the journal and closed (for the manifest)."""
        return {rel: (f.size, f.digest()) for rel, f in self.files.items() if f.closed}
