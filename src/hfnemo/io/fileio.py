"""Positional I/O into buffers we own: what the process holds is what the budget says.

No mmap: mapped pages of the source would count towards the process's memory (PSS) and are
not under our control. Reads are pread into caller buffers; writes are plain write()s.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import xxhash

from hfnemo.errors import CorruptCheckpoint

# Fault injection for tests and benchmarks/bench_faults.py: called as hook(event, file, nbytes)
# before every OutFile write ("write") and at the journal's and publisher's named points (file
# None). It may raise (an injected OSError) or kill the process; None in normal runs.
FAULT_HOOK: Callable[[str, "OutFile | None", int], None] | None = None


def fault_point(event: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(event, None, 0)


def pread_into(fd: int, buf: memoryview, offset: int, *, path: str | Path = "?") -> None:
    """Fill ``buf`` completely from ``fd`` at ``offset``; a short file is a corrupt checkpoint."""
    done = 0
    total = len(buf)
    while done < total:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise CorruptCheckpoint(
                f"file ends {total - done} bytes early (wanted bytes {offset}..{offset + total})",
                file=path,
                fix="the file is truncated: re-download or re-copy it",
            )
        done += n


def write_all(fd: int, data: memoryview | bytes) -> int:
    """write() until everything is written; returns the byte count."""
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])
    return done


# A write of at least this many bytes hashes on another thread while the write() runs (both release
# the GIL): the one thread writing pays the slower of the two, not their sum.
HASH_BESIDE_BYTES = 1 << 20
_HASHER: ThreadPoolExecutor | None = None
_HASHER_LOCK = threading.Lock()


def _hasher() -> ThreadPoolExecutor:
    global _HASHER
    with _HASHER_LOCK:
        if _HASHER is None:
            _HASHER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hfnemo-hash")
        return _HASHER


class ReplayMismatch(Exception):
    """A resumed file's kept bytes do not match what the replay of the plan produces."""


class OutFile:
    """An output file written append-only, hashed (xxh3_64) as the bytes pass.

    ``keep`` bytes already on disk (a resumed file; ``hasher`` has hashed them) are not written
    again: while the position is below ``keep`` writes only advance it, so that a writer can
    replay its whole sequence of writes and continue where the file ends. Every write error
    carries the file's path in ``filename``.
    """

    def __init__(self, path: str | Path, rel: str | None = None, keep: int = 0,
                 hasher: "xxhash.xxh3_64 | None" = None,
                 on_write: Callable[["OutFile"], None] | None = None) -> None:
        self.path = str(path)
        self.rel = rel or Path(path).name
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | (0 if keep else os.O_TRUNC)
        self.fd = os.open(self.path, flags, 0o644)
        if keep:
            os.lseek(self.fd, keep, os.SEEK_SET)
        self.keep = keep
        self.size = 0
        self.h = hasher if hasher is not None else xxhash.xxh3_64()
        self.on_write = on_write
        self.closed = False
        self.dir_synced = bool(keep)  # a kept file's directory entry is already durable

    def write(self, data: memoryview | bytes) -> int:
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        n = len(view)
        if self.size < self.keep:
            return self.skip(n)
        if FAULT_HOOK is not None:
            FAULT_HOOK("write", self, n)
        hashed = _hasher().submit(self.h.update, view) if n >= HASH_BESIDE_BYTES else None
        try:
            write_all(self.fd, view)
        except OSError as e:
            e.filename = e.filename or self.path
            raise
        finally:
            if hashed is not None:
                hashed.result()  # the caller may reuse the buffer once write() returns
        if hashed is None:
            self.h.update(view)
        self.size += n
        if self.on_write is not None:
            self.on_write(self)
        return n

    def skip(self, n: int) -> int:
        """``n`` bytes that the file already holds (a replay)."""
        if self.size + n > self.keep:
            raise ReplayMismatch(f"{self.rel}: replay reaches byte {self.size + n}, {self.keep} were kept")
        self.size += n
        return n

    def digest(self) -> str:
        return f"{self.h.intdigest():016x}"

    def close(self, sync: bool = True) -> None:
        """fsync (by default) and close; idempotent."""
        if self.closed:
            return
        try:
            if sync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.closed = True

    def abort(self) -> None:
        """Close without syncing, ignoring errors (the error path)."""
        if not self.closed:
            self.closed = True
            try:
                os.close(self.fd)
            except OSError:
                pass


class FileCache:
    """Read-only file descriptors opened once per source file and closed together."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def fd(self, path: str | Path) -> int:
        key = str(path)
        fd = self._fds.get(key)
        if fd is None:
            fd = os.open(key, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._fds[key] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "FileCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def publish(partial: Path, dst: Path) -> None:
    """Atomically put the finished ``partial`` (a staging directory or a file) in place of ``dst``:
    an existing directory (or anything a directory replaces) is moved aside first and removed after
    the rename; a file over a file is one atomic rename. The parent directory is fsynced."""
    import shutil

    old = None
    if dst.exists() and (partial.is_dir() or (dst.is_dir() and not dst.is_symlink())):
        old = dst.with_name(f".{dst.name}.hfnemo-old")
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
        os.replace(dst, old)
    os.replace(partial, dst)
    dfd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
