"""``hfnemo backup SRC [--name N] [--to DIR]``: a verified copy of a checkpoint.

Every file is copied through one reused buffer while its checksum is computed from the bytes
read; the copy is fsynced, dropped from the page cache and read back from disk, and both
checksums must agree (and the source must not have changed meanwhile: size and mtime before and
after). The copy is built in ``DIR/.N.hfnemo-partial`` and renamed into place only when every
file checks out; an existing ``DIR/N`` is never replaced (the rename refuses to).
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import hashlib
import json
import os
import shutil
import stat
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from hfnemo.errors import CorruptCheckpoint, InsufficientDisk, OutputExists, UsageError

BUF_BYTES = 8 << 20


class BackupMismatch(CorruptCheckpoint):
    """A copied file reads back differently from its source (or the source changed while copied)."""


def _hasher() -> tuple[str, Callable[[], Any]]:
    try:
        import xxhash

        return "xxh3_128", xxhash.xxh3_128
    except ImportError:  # not a dependency: blake2b is in every Python
        return "blake2b", lambda: hashlib.blake2b(digest_size=16)


@dataclass(frozen=True)
class BackupReport:
    source: str
    backup: str
    files: int
    bytes: int
    seconds: float
    algorithm: str
    checksums: dict[str, str] = field(default_factory=dict)  # relative path -> hex digest (source == copy)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _files(src: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """(relative path, absolute path) of every file under src, and every directory; links to files
    and directories are followed (an HF cache snapshot is links into blobs/), loops refused."""
    if src.is_file():
        return [(src.name, src)], []
    out: list[tuple[str, Path]] = []
    dirs: list[str] = []
    seen: set[tuple[int, int]] = set()

    def walk(d: Path, rel: str) -> None:
        st = d.stat()
        if (st.st_dev, st.st_ino) in seen:
            raise UsageError(f"{d} links back to a directory above it", file=d,
                             fix="remove the looping link before backing up")
        seen.add((st.st_dev, st.st_ino))
        for e in sorted(os.scandir(d), key=lambda e: e.name):
            r = f"{rel}/{e.name}" if rel else e.name
            p = Path(e.path)
            if e.name.endswith(".hfnemo-partial"):
                continue  # an unfinished conversion or backup staged beside its output
            try:
                mode = p.stat().st_mode
            except OSError:
                raise UsageError(f"{p} is a broken link", file=p, fix="repair or remove it") from None
            if stat.S_ISDIR(mode):
                dirs.append(r)
                walk(p, r)
            elif stat.S_ISREG(mode):
                out.append((r, p))
            else:
                raise UsageError(f"{p} is not a regular file or directory", file=p,
                                 fix="remove it from the checkpoint")
        seen.discard((st.st_dev, st.st_ino))

    walk(src, "")
    return out, dirs


def _copy_one(src: Path, dst: Path, buf: bytearray, new_hash: Callable[[], Any]) -> str:
    """Copy src to dst through ``buf``; returns the checksum of the bytes read."""
    before = src.stat()
    h = new_hash()
    view = memoryview(buf)
    fi = os.open(src, os.O_RDONLY)
    try:
        fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            while True:
                n = os.readv(fi, [view])
                if n == 0:
                    break
                h.update(view[:n])
                done = 0
                while done < n:
                    done += os.write(fo, view[done:n])
            os.fsync(fo)
            os.posix_fadvise(fo, 0, 0, os.POSIX_FADV_DONTNEED)  # read-back comes from the disk
        finally:
            os.close(fo)
    finally:
        os.close(fi)
    after = src.stat()
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        raise BackupMismatch("the source changed while it was being copied", file=src,
                             fix="back up a checkpoint nothing is writing to (wait for the save to finish)")
    os.utime(dst, ns=(after.st_atime_ns, after.st_mtime_ns))
    return h.hexdigest()


def _digest(path: Path, buf: bytearray, new_hash: Callable[[], Any]) -> str:
    h = new_hash()
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [view]):
            h.update(view[:n])
    finally:
        os.close(fd)
    return h.hexdigest()


_RENAME_NOREPLACE = 1


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails when dst exists (renameat2 RENAME_NOREPLACE; else check, then rename)."""
    libc = None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        fn = None
    if fn is not None:
        at_fdcwd = -100
        rc = fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise OutputExists("the backup appeared while it was being made", file=dst,
                               fix="pick another --name; nothing was replaced")
        if err not in (errno.EINVAL, errno.ENOSYS):  # filesystems without RENAME_NOREPLACE fall through
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise OutputExists("the backup appeared while it was being made", file=dst,
                           fix="pick another --name; nothing was replaced")
    os.rename(src, dst)


def backup(src: str | Path, *, name: str | None = None, to: str | Path | None = None,
           progress: Callable[[int, int], None] | None = None) -> BackupReport:
    """Copy ``src`` (a checkpoint directory or file) to ``to/name``, verified by checksums.

    Args:
        src: what to copy (any directory or file; links are followed).
        name: the copy's name (default ``<src name>.backup-<YYYYmmdd-HHMMSS>``).
        to: the directory it goes in (default: beside src).
        progress: called with (bytes_done, bytes_total) after each file.

    Returns:
        A BackupReport with the checksum of every file (equal in source and copy).
    """
    t0 = time.perf_counter()
    s = Path(src).expanduser()
    if not s.exists():
        raise UsageError(f"{s} does not exist", file=s, fix="check the path")
    s = s.resolve()
    if s == Path(s.anchor):
        raise UsageError("refusing to back up a filesystem root", file=s, fix="pass a checkpoint")
    name = name or f"{s.name}.backup-{time.strftime('%Y%m%d-%H%M%S')}"
    if not name or "/" in name or name in (".", "..") or name.startswith("."):
        raise UsageError(f"--name {name!r} is not a plain file name",
                         fix="use a name without '/' or a leading '.'")
    out_dir = Path(to).expanduser() if to is not None else s.parent
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--to {out_dir} is not a directory", file=out_dir, fix="pass a directory")
    dst = out_dir.resolve() / name if out_dir.exists() else out_dir.absolute() / name
    if os.path.lexists(dst):
        raise OutputExists("the backup already exists; backup never overwrites", file=dst,
                           fix="pick another --name or --to")
    if s.is_dir() and (dst == s or s in dst.parents):
        raise UsageError("the backup would lie inside the source", file=dst,
                         fix="choose --to outside the source")
    files, dirs = _files(s)
    total = sum(p.stat().st_size for _, p in files)
    out_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir).free
    if free < total + (16 << 20):
        raise InsufficientDisk(f"the backup needs {total} bytes but only {free} are free", file=out_dir,
                               fix="free disk space or choose another --to")
    algo, new_hash = _hasher()
    staging = dst.with_name(f".{dst.name}.hfnemo-partial")
    if staging.exists():
        shutil.rmtree(staging) if staging.is_dir() and not staging.is_symlink() else staging.unlink()
    buf = bytearray(BUF_BYTES)
    sums: dict[str, str] = {}
    try:
        if s.is_dir():
            staging.mkdir()
            for d in dirs:
                (staging / d).mkdir()
            targets = [(rel, p, staging / rel) for rel, p in files]
        else:
            targets = [(files[0][0], files[0][1], staging)]
        done = 0
        for rel, p, q in targets:
            sums[rel] = _copy_one(p, q, buf, new_hash)
            done += q.stat().st_size
            if progress:
                progress(done, total)
        for rel, p, q in targets:  # read back after every file is on disk, not straight after writing it
            got = _digest(q, buf, new_hash)
            if got != sums[rel]:
                raise BackupMismatch(
                    f"the copy of {rel} reads back differently ({algo} {got} != {sums[rel]})", file=q,
                    fix="the target disk or memory returned other bytes than were written: check the disk, "
                        "then retry")
        if s.is_dir():
            for d in [""] + dirs:
                fd = os.open(staging / d if d else staging, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _rename_noreplace(staging, dst)
        fd = os.open(dst.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        if staging.is_dir() and not staging.is_symlink():
            shutil.rmtree(staging, ignore_errors=True)
        elif os.path.lexists(staging):
            staging.unlink()
        raise
    return BackupReport(str(s), str(dst), len(files), total, time.perf_counter() - t0, algo, sums)


def _cmd_backup(args: argparse.Namespace) -> int:
    r = backup(args.src, name=args.name, to=args.to)
    if args.json:
        print(json.dumps(r.to_json()))
    if not args.quiet:
        print(f"backup: {r.files} files, {r.bytes / 1e9:.3f} GB copied and read back ({r.algorithm} equal) "
              f"in {r.seconds:.1f} s -> {r.backup}", file=sys.stderr)
    return 0


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("backup", help="a verified copy of a checkpoint (checksums of source and copy "
                                      "compared; atomic; never overwrites)")
    p.add_argument("src")
    p.add_argument("--name", help="name of the copy (default <name>.backup-<date>-<time>)")
    p.add_argument("--to", help="directory to put it in (default: beside SRC)")
    p.add_argument("--json", action="store_true", help="a summary with every file's checksum on stdout")
    p.add_argument("--quiet", action="store_true", help="no summary on stderr")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(tool=_cmd_backup)


__all__ = ["backup", "BackupReport", "BackupMismatch"]
