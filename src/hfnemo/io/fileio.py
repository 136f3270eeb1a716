"""Positional I/O into buffers we own: what the process holds is what the budget says.

No mmap: mapped pages of the source would count towards the process's memory (PSS) and are
not under our control. Reads are pread into caller buffers; writes are plain write()s.
"""
from __future__ import annotations

import os
from pathlib import Path

from hfnemo.errors import CorruptCheckpoint


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
