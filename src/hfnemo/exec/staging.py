"""Preflight, the resumable staging directory, the manifest and the publish step of a conversion.

``run_staged`` is what ``hfnemo.api`` calls once a plan exists: every check that can fail before a
byte is written, then the journal (hfnemo.exec.journal) around the writing, then the manifest
(hfnemo.manifest) and the atomic rename. Errors keep or drop the staging directory by what they
mean: bad input (a ConversionError while writing) drops it; I/O errors and interrupts keep it,
journal consistent, with a message saying how to resume.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

from hfnemo.errors import ConversionError, CorruptCheckpoint, InsufficientDisk, OutputNotWritable, WriteFailed
from hfnemo.exec.journal import JOURNAL, Journal, fingerprint, fsync_dir, plan_digest
from hfnemo.io.fileio import ReplayMismatch, fault_point
from hfnemo.manifest import (MANIFEST, ManifestError, check_manifest, hash_file, read_manifest, walk_files,
                             write_manifest)
from hfnemo.plan.plan import Plan

DISK_MARGIN = 64 << 20  # side files, .metadata, filesystem slack
RESUME_HINT = "re-run the same command to resume, or pass --restart to start over"


def staging_dir(dst: Path) -> Path:
    """Where ``dst`` is written before it is renamed into place."""
    return dst.with_name(f".{dst.name}.hfnemo-partial")


def discard(staging: Path) -> None:
    """--restart: throw away what an interrupted run left (a directory, or anything in its place)."""
    if staging.exists() or staging.is_symlink():
        shutil.rmtree(staging) if staging.is_dir() and not staging.is_symlink() else staging.unlink()


# ------------------------------------------------------------------------------ preflight

def source_files(plan: Plan, index: Any = None) -> list[Path]:
    """Every source file the plan reads (HF shards, DCP chunk files and .metadata, legacy rank files)."""
    out: set[str] = set()
    for s in plan.sources:
        kind = s.location[0]
        if kind == "safetensors":
            out.add(str(s.location[1]))
        elif kind == "legacy":
            out.update(str(piece[0]) for piece in s.location[1])
        elif kind == "dcp" and index is not None:
            g = index.tensors.get(s.location[1])
            if g is not None:
                out.update(str(index.root / c.file) for c in g.chunks)
    if index is not None:
        out.add(str(index.root / ".metadata"))
    return sorted(Path(p) for p in out)


def check_sources(files: list[Path]) -> None:
    """Every source file is present, a regular file and readable (an unreadable shard found mid-run
    would look like an I/O error worth resuming)."""
    for p in files:
        try:
            fd = os.open(p, os.O_RDONLY)
            os.close(fd)
        except OSError as e:
            raise CorruptCheckpoint(
                f"cannot read a source file: {e.strerror}", file=p,
                fix="make it readable (chmod a+r, or run as its owner) or re-copy the checkpoint") from e


def check_writable(dst: Path) -> None:
    """The output's directory exists (created if needed) and accepts new files."""
    parent = dst.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{dst.name}.hfnemo-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputNotWritable(
            f"cannot write in the output's directory: {e.strerror}", file=parent,
            fix="choose an output directory you can write to, or fix its permissions") from e


def check_disk(where: Path, need: int, planned: int) -> None:
    free = shutil.disk_usage(where).free
    if free < need + DISK_MARGIN:
        more = f" more (of {planned} planned)" if need != planned else ""
        raise InsufficientDisk(
            f"the output needs {need} bytes{more} but only {free} are free", file=where,
            fix=f"free at least {need + DISK_MARGIN - free} bytes or choose another output disk")


# ------------------------------------------------------------------------------ finishing

def write_final_manifest(staging: Path, streamed: dict[str, tuple[int, str]], plan: Plan, plan_sha: str,
                         journals: tuple[str, ...] = (JOURNAL,)) -> None:
    """Hash (and fsync) the side files, take the streamed hashes of the tensor files (``streamed``:
    the journals' digests), fsync every directory, write the manifest, then drop the journals: the
    staging directory is the output."""
    entries: dict[str, tuple[int, str]] = {}
    dirs = {staging}
    for rel in walk_files(staging, skip=(MANIFEST, *journals)):
        p = staging / rel
        dirs.add(p.parent)
        size = p.stat().st_size
        if rel in streamed and streamed[rel][0] == size:
            entries[rel] = streamed[rel]
            continue
        n, h = hash_file(p)
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        entries[rel] = (n, f"{h.intdigest():016x}")
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(d)
    fault_point("manifest")
    write_manifest(staging, entries, {"plan_sha256": plan_sha, "direction": plan.direction, "arch": plan.arch,
                                      "total_bytes": sum(s for s, _ in entries.values())})
    fault_point("journal-unlink")
    for name in journals:
        (staging / name).unlink(missing_ok=True)
    fsync_dir(staging)


def complete(staging: Path, plan_sha: str, journals: tuple[str, ...] = (JOURNAL,)) -> bool:
    """A staging directory whose manifest is for this plan and checks out (a run that died between
    the manifest and the rename)."""
    if not (staging / MANIFEST).is_file():
        return False
    try:
        if read_manifest(staging).meta.get("plan_sha256") != plan_sha:
            return False
    except ManifestError:
        return False
    return not check_manifest(staging, skip=journals)


# ------------------------------------------------------------------------------ the run

def _write_error(e: OSError, plan: Plan, done: int, staging: Path) -> ConversionError:
    left = max(plan.write_bytes - done, 0)
    where = e.filename or staging
    try:
        free = shutil.disk_usage(staging if staging.exists() else staging.parent).free
    except OSError:
        free = 0
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        need = max(left + DISK_MARGIN - free, 1)
        return InsufficientDisk(
            f"the disk filled up: {left} more bytes of tensor data are needed to finish, {free} are free; "
            f"the work done so far is kept in {staging}", file=where,
            fix=f"free at least {need} bytes, then {RESUME_HINT}")
    what = ("file size limit reached (ulimit -f or the filesystem's maximum)" if e.errno == errno.EFBIG
            else e.strerror)
    return WriteFailed(
        f"I/O error: {what}; {left} bytes still to write; the work done so far is kept in {staging}",
        file=where, fix=f"fix the cause, then {RESUME_HINT}")


def run_staged(plan: Plan, src: Path, dst: Path, index: Any, restart: bool,
               execute_into: Callable[[Path, Journal], None], publish: Callable[[Path, Path], None]) -> int:
    """Preflight, write through the journal, manifest, publish. Returns the tensor bytes a previous
    run had already written (0 for a fresh run). ``execute_into(staging, journal)`` writes
    everything; ``publish(staging, dst)`` renames."""
    staging = staging_dir(dst)
    check_writable(dst)
    files = source_files(plan, index)
    check_sources(files)
    plan_sha = plan_digest(plan)
    fp = fingerprint(plan, files, plan_sha)
    if restart:
        discard(staging)
    journal = Journal(staging, fp)
    journal.inspect()
    if staging.is_dir() and complete(staging, plan_sha):
        if (staging / JOURNAL).exists():
            (staging / JOURNAL).unlink()
        publish(staging, dst)
        return plan.write_bytes
    check_disk(dst.parent, plan.write_bytes - journal.resumable_bytes, plan.write_bytes)
    for attempt in (0, 1):
        try:
            journal.begin()
            for note in journal.notes:
                warnings.warn(note, stacklevel=3)
            execute_into(staging, journal)
            journal.stop()
            write_final_manifest(staging, journal.digests(), plan, plan_sha)
            fault_point("publish")
            publish(staging, dst)
            return journal.resumed_bytes
        except ReplayMismatch as e:  # the journal's files do not replay: start over once
            journal.stop()
            if attempt:
                raise
            warnings.warn(f"the interrupted run's output cannot be resumed ({e}); starting over",
                          stacklevel=3)
            journal = Journal(staging, fp)
        except ConversionError:
            # Bad input found while writing: nothing of it is worth keeping.
            journal.stop()
            shutil.rmtree(staging, ignore_errors=True)
            raise
        except OSError as e:
            journal.stop(save=True)
            raise _write_error(e, plan, journal.done, staging) from e
        except BaseException as e:
            journal.stop(save=True)
            if isinstance(e, Exception):  # a bug: keep nothing we cannot vouch for
                shutil.rmtree(staging, ignore_errors=True)
            else:  # KeyboardInterrupt, SystemExit: the journal is consistent, say how to resume
                e.hfnemo_staging = staging  # type: ignore[attr-defined]
            raise
    raise AssertionError("unreachable")
