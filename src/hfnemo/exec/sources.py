"""Logical source tensors and the row reads behind them (pread into caller buffers)."""
from __future__ import annotations

import functools
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from hfnemo import prefetch
from hfnemo.errors import CorruptCheckpoint
from hfnemo.exec.buffers import address
from hfnemo.io.dcp import ChunkLocator, DcpIndex, GlobalTensor
from hfnemo.io.fileio import FileCache, pread_into
from hfnemo.io.safetensors import StTensor
from hfnemo.plan.plan import SourceTensor
from hfnemo.dtypes import BY_NAME

if TYPE_CHECKING:
    import torch

try:  # the native core reads column windows in place; without it the executor stages and cuts
    from hfnemo import _C
except ImportError:  # pragma: no cover - exercised when the extension is not built
    _C = None

# Megatron global keys with stacked leading axes (spec §3.2, §3.5) -> logical per-layer names.
_STACKED = (
    (re.compile(r"^decoder\.layers\.mlp\.experts\.experts\.(.+)$"), "decoder.layers.{l}.mlp.experts.local_experts.{e}.", 2),
    (re.compile(r"^decoder\.layers\.(?!\d+\.)(.+)$"), "decoder.layers.{l}.", 1),
)
NEMO_PREFIXES = ("module.", "model.")


def hf_sources(tensors: dict[str, StTensor]) -> dict[str, SourceTensor]:
    return {name: SourceTensor(name, t.dtype.name, t.shape, ("safetensors", t.file, t.offset))
            for name, t in tensors.items()}


def strip_prefix(keys: list[str]) -> str:
    """The key prefix the producer used: 'module.' (NeMo 2), 'model.' (NeMo 1) or '' (Megatron)."""
    for p in NEMO_PREFIXES:
        if keys and all(k.startswith(p) for k in keys):
            return p
    return ""


def dcp_sources(index: DcpIndex) -> tuple[dict[str, SourceTensor], str]:
    """Expand stacked global tensors into one logical tensor per layer (and expert)."""
    prefix = strip_prefix(list(index.tensors))
    out: dict[str, SourceTensor] = {}
    for fqn, g in index.tensors.items():
        key = fqn[len(prefix):]
        for pattern, template, axes in _STACKED:
            m = pattern.match(key)
            if m:
                if len(g.shape) < axes:
                    raise CorruptCheckpoint(f"stacked tensor has shape {g.shape}", file=index.root / ".metadata",
                                            tensor=fqn, fix="the checkpoint is corrupt: re-create it")
                for idx in _indices(g.shape[:axes]):
                    name = template.format(l=idx[0], e=idx[-1]) + m.group(1)
                    out[name] = SourceTensor(name, g.dtype.name, g.shape[axes:], ("dcp", fqn, idx))
                break
        else:
            out[key] = SourceTensor(key, g.dtype.name, g.shape, ("dcp", fqn, ()))
    return out, prefix


def _indices(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    if not shape:
        return [()]
    return [(i, *rest) for i in range(shape[0]) for rest in _indices(shape[1:])]


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return tuple(reversed(out))


def _scatter_chunk_rows(fd: int, path: str, start: int, rows: int, chunk_row_bytes: int, offs: tuple[int, ...],
                        sizes: tuple[int, ...], full: tuple[int, ...], itemsize: int, dest: memoryview) -> int:
    """Read ``rows`` rows of a chunk that covers the window ``offs``/``sizes`` of each row's trailing
    dims ``full`` and put them in place in ``dest`` (whole rows of ``full``); returns the bytes.

    Every row of the chunk is a set of contiguous runs in the destination row: after the last
    dim the chunk cuts, it covers whole sub-rows. The native core copies the runs (one table,
    one call, no torch); without it, memoryview slices do."""
    buf = bytearray(rows * chunk_row_bytes)
    pread_into(fd, memoryview(buf), start, path=path)
    nd = len(full)
    k = max((j for j in range(nd) if sizes[j] != full[j] or offs[j] != 0), default=0)
    inner = itemsize
    for j in range(k + 1, nd):
        inner *= full[j]
    run = sizes[k] * inner  # bytes of one contiguous run
    dst_strides = [itemsize] * nd  # bytes per step of each trailing dim in the destination row
    for j in range(nd - 2, -1, -1):
        dst_strides[j] = dst_strides[j + 1] * full[j + 1]
    row_bytes = dst_strides[0] * full[0] if nd else itemsize
    # destination byte offsets (within one row) of every run, in the chunk's storage order
    offsets = [offs[k] * dst_strides[k]]
    for j in range(k - 1, -1, -1):
        offsets = [(offs[j] + i) * dst_strides[j] + x for i in range(sizes[j]) for x in offsets]
    n_runs = len(offsets)
    if _C is not None and rows * n_runs:
        from array import array

        base, sp = address(dest), address(buf)
        table = array("q")
        for r in range(rows):
            d0, s0 = base + r * row_bytes, sp + r * chunk_row_bytes
            for i, off in enumerate(offsets):
                table.extend((d0 + off, s0 + i * run, run))
        _C.gather(address(table), rows * n_runs)
    else:
        src = memoryview(buf)
        for r in range(rows):
            d0, s0 = r * row_bytes, r * chunk_row_bytes
            for i, off in enumerate(offsets):
                dest[d0 + off:d0 + off + run] = src[s0 + i * run:s0 + (i + 1) * run]
    return rows * chunk_row_bytes


READAHEAD_ENV = "HFNEMO_READAHEAD"  # output bytes to read ahead by; 0/off: no read-ahead
READAHEAD_DEFAULT = 1 << 30
READAHEAD_CHUNK = 8 << 20


def readahead_distance(environ: "os._Environ[str] | dict[str, str] | None" = None) -> int:
    """How far ahead (in output bytes) :class:`SourceReadahead` runs: ``HFNEMO_READAHEAD`` (a size,
    or 0/off), else 1 GiB, at most a quarter of MemAvailable (it fills page cache, never the process)."""
    env = os.environ if environ is None else environ
    text = env.get(READAHEAD_ENV, "").strip().lower()
    if text in ("0", "off", "no", "false"):
        return 0
    if text:
        from hfnemo.memwatch import parse_size

        return parse_size(text)
    avail = prefetch.mem_available()
    return min(READAHEAD_DEFAULT, avail // 4) if avail else READAHEAD_DEFAULT


class SourceReadahead:
    """Brings the source rows the executor will need next into the page cache, ahead of it, on one
    thread: the workers' own reads (``depth`` blocks in flight) then find them there, and the disk
    queue stays full while the one writing thread writes.

    It matters most for a row-parallel chunk (linear_proj, linear_fc2 at TP > 1), which reads a
    narrow window of every source row: from a cold file that is a read of the whole tensor while the
    writer has only 1/TP of it to write, and without read-ahead the output side idled meanwhile
    (H200 machine: TP 8 import 13.99-18.83 s without, 10.86-11.41 s with). Whole-row segments gain
    from the deeper queue too (TP 1: 9.55-11.86 s against 10.22-13.92 s, interleaved runs).

    ``entries``: (ranges, at, pace) in plan order: ``ranges`` the (path, start, length) byte ranges
    of one segment's source rows (or a callable giving them: DCP chunks are located when due),
    ``at`` the output position (bytes the executor has handed to its workers) where they are first
    needed, ``pace`` the output bytes per source byte of whole rows (0 for a window, read whole). The
    thread reads a range once the executor is within ``ahead`` bytes of it, follows a whole-row
    range at most ``ahead`` in front of the executor and never behind it, skips a window range the
    executor reached first, and keeps at most two 8 MiB requests in flight
    (``posix_fadvise(WILLNEED)`` on the next, then a one-byte read of the last to wait for it).
    Nothing is mapped or buffered in the process; any error ends the thread quietly (the executor
    reads the rows itself, as it would anyway).
    """

    def __init__(self, entries: list[tuple[object, int, float]], ahead: int) -> None:
        self.entries = entries
        self.ahead = ahead
        self.submitted = 0
        self.issued = 0  # bytes asked for
        self.skipped = 0  # ranges the executor reached first
        self.reason: str | None = None
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="hfnemo-readahead", daemon=True)

    @classmethod
    def for_plan(cls, items, sources: dict[str, SourceTensor], start: tuple[int, int] = (0, 0),
                 ahead: int | None = None, whole_rows: bool | None = None,
                 reader: "RowReader | None" = None) -> "SourceReadahead | None":
        """The read-ahead of a plan's column-window segments from ``start`` on (``whole_rows``: of
        every safetensors segment, and with ``reader`` of every DCP segment too: their chunks are
        located when due, by the thread); None when there is nothing to read ahead."""
        ahead = readahead_distance() if ahead is None else ahead
        if ahead <= 0:
            return None
        if whole_rows is None:  # HFNEMO_READAHEAD_ALL=0: column windows only (for A/B runs)
            whole_rows = os.environ.get("HFNEMO_READAHEAD_ALL", "1") != "0"
        entries: list = []
        seen: set = set()
        at = 0
        for idx in range(start[0], len(items)):
            it = items[idx]
            row_bytes = it.row_elems * BY_NAME[it.dtype].itemsize
            first = start[1] if idx == start[0] else 0
            for seg in it.segments:
                if (not seg.cols and not whole_rows) or seg.source is None or seg.out_row + seg.rows <= first:
                    continue
                src = sources[seg.source]
                kind = src.location[0]
                if not (kind == "safetensors" and (not seg.cols or len(src.shape) == 2)
                        or kind == "dcp" and reader is not None and reader.index is not None and src.shape):
                    continue
                src_row = BY_NAME[src.dtype].itemsize
                for d in src.shape[1:]:
                    src_row *= d
                r0 = seg.src_row + max(0, first - seg.out_row)
                r1 = seg.src_row + seg.rows
                if kind == "safetensors":
                    _, path, offset = src.location
                    key: tuple = (str(path), int(offset) + r0 * src_row, (r1 - r0) * src_row)
                    ranges: object = (key,)
                else:
                    key = (src.name, r0, r1)
                    ranges = functools.partial(reader.byte_ranges, src, r0, r1)
                if key in seen:
                    continue
                seen.add(key)
                # pace: output bytes per source byte of a whole-row segment (followed within the
                # range); a window range is read whole once started (its TP windows follow it)
                pace = 0.0 if seg.cols else it.row_elems * BY_NAME[it.dtype].itemsize / src_row
                entries.append((ranges, at + max(0, seg.out_row - first) * row_bytes, pace))
            at += (it.rows - first) * row_bytes
        return cls(entries, ahead) if entries else None

    def start(self) -> "SourceReadahead":
        self._thread.start()
        return self

    def advance(self, submitted: int) -> None:
        """The executor has handed ``submitted`` output bytes to its workers."""
        with self._cv:
            self.submitted = submitted
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join()

    def _run(self) -> None:
        try:
            self.reason = self._read()
        except Exception as e:  # never let the read-ahead disturb the conversion
            self.reason = f"error: {type(e).__name__}: {e}"

    def _read(self) -> str:
        one = bytearray(1)
        fds: dict[str, int] = {}
        try:
            for ranges, at, pace in self.entries:
                with self._cv:
                    while not self._stop and self.submitted + self.ahead < at:
                        self._cv.wait()
                    if self._stop:
                        return "stopped"
                    if self.submitted > at and not pace:
                        self.skipped += 1
                        continue
                done = 0  # source bytes of this entry behind us
                for path, start, length in (ranges() if callable(ranges) else ranges):
                    fd = fds.get(path)
                    if fd is None:
                        fd = fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                    end, off, last = start + length, start, None
                    while off < end:
                        if pace:  # stay within ``ahead`` of the executor, and behind nothing it has read
                            here = done + off - start
                            with self._cv:
                                while not self._stop and self.submitted + self.ahead < at + here * pace:
                                    self._cv.wait()
                                passed = int((self.submitted - at) / pace)
                            if passed > here:
                                off = min(end, off + -(-(passed - here) // 4096) * 4096)
                                last = None
                                continue
                        if self._stop:
                            return "stopped"
                        n = min(READAHEAD_CHUNK, end - off)
                        os.posix_fadvise(fd, off, n, os.POSIX_FADV_WILLNEED)
                        if last is not None:
                            os.preadv(fd, [one], last)  # wait for the previous request
                        last = off + n - 1
                        off += n
                        self.issued += n
                    if last is not None:
                        os.preadv(fd, [one], last)
                    done += length
            return "done"
        finally:
            for fd in fds.values():
                os.close(fd)


class RowReader:
    """Reads rows ``[r0, r1)`` of a logical source tensor into a caller-owned byte buffer."""

    def __init__(self, root: Path | None = None, index: DcpIndex | None = None) -> None:
        self.files = FileCache()
        self.index = index
        self.locator = ChunkLocator(index) if index is not None else None
        self._started = False

    def _first_read(self) -> None:
        # The conversion reads now: the start-up read-ahead (hfnemo.prefetch) has done its part.
        self._started = True
        prefetch.stop()

    def close(self) -> None:
        self.files.close()

    def read_cols(self, src: SourceTensor, r0: int, r1: int, col: int, cols: int,
                  dest: "torch.Tensor | memoryview") -> bool:
        """Columns [col, col+cols) of rows [r0, r1) straight into ``dest`` (a uint8 tensor or a
        writable memoryview of at least (r1 - r0) x cols elements' bytes), one pread per
        row, when the native core is built and the rows lie contiguously in one file (safetensors).
        False when not possible: the caller then reads whole rows and cuts."""
        if src.location[0] != "safetensors" or len(src.shape) != 2 or _C is None:
            return False
        if not self._started:
            self._first_read()
        _, path, offset = src.location
        itemsize = BY_NAME[src.dtype].itemsize
        row_bytes, width = src.shape[1] * itemsize, cols * itemsize
        fd, start = self.files.fd(path), int(offset) + r0 * row_bytes
        # Strided small reads defeat the kernel's readahead on a cold file: ask for the rows'
        # whole range sequentially first (a no-op when cached); the TP siblings then hit the cache.
        os.posix_fadvise(fd, start, (r1 - r0) * row_bytes, os.POSIX_FADV_WILLNEED)
        rc = _C.pread_cols(fd, address(dest), r1 - r0, start, row_bytes, col * itemsize, width)
        if rc:
            raise CorruptCheckpoint(f"reading rows {r0}..{r1} failed ({'end of file' if rc < 0 else os.strerror(rc)})",
                                    file=path, tensor=src.name, fix="the file is truncated or unreadable: re-copy it")
        return True

    def _chunk_rows(self, g: GlobalTensor, prefix: tuple[int, ...], src: SourceTensor, r0: int, r1: int):
        """The stored chunks holding rows [r0, r1) of ``src`` at ``prefix``, each as (chunk, path, fd,
        located chunk, a, b, start, chunk_row_bytes): its rows [a, b) begin at byte ``start`` of
        ``path`` and lie contiguously, ``chunk_row_bytes`` a row, whatever it cuts of the trailing
        dims. A 0-d logical tensor is one element (a, b = 0, 1)."""
        p = len(prefix)
        itemsize = g.dtype.itemsize
        for chunk in g.chunks:
            o, s = chunk.offsets, chunk.sizes
            if any(not (o[i] <= prefix[i] < o[i] + s[i]) for i in range(p)):
                continue
            if not src.shape:
                a, b = 0, 1
            else:
                a, b = max(r0, o[p]), min(r1, o[p] + s[p])
                if a >= b:
                    continue
            path = str(self.index.root / chunk.file)
            fd = self.files.fd(path)
            st = self.locator.locate(fd, g.fqn, chunk)
            strides = _strides(s)
            base = sum((prefix[i] - o[i]) * strides[i] for i in range(p))
            row, first = (strides[p], a - o[p]) if src.shape else (1, 0)
            yield chunk, path, fd, st, a, b, st.offset + (base + first * row) * itemsize, row * itemsize

    def byte_ranges(self, src: SourceTensor, r0: int, r1: int) -> list[tuple[str, int, int]]:
        """Where rows [r0, r1) of a DCP source lie: (path, start, length) per chunk, in the order
        the chunks are stored. For the read-ahead (it locates chunks as read_rows does)."""
        _, fqn, prefix = src.location
        return [(path, start, (b - a) * chunk_row)
                for _, path, _, _, a, b, start, chunk_row in self._chunk_rows(self.index.tensors[fqn], tuple(prefix),
                                                                               src, r0, r1)]

    def read_rows(self, src: SourceTensor, r0: int, r1: int, dest: memoryview) -> None:
        if not self._started:
            self._first_read()
        kind = src.location[0]
        itemsize = BY_NAME[src.dtype].itemsize
        row_bytes = itemsize
        for s in src.shape[1:]:
            row_bytes *= s
        if kind == "safetensors":
            _, path, offset = src.location
            pread_into(self.files.fd(path), dest, int(offset) + r0 * row_bytes, path=path)
            return
        if kind == "legacy":  # rows and column windows of several rank files' local shards
            from hfnemo.io.legacy import read_legacy_rows

            read_legacy_rows(self.files, src, r0, r1, dest)
            return
        _, fqn, prefix = src.location
        self._read_dcp(self.index.tensors[fqn], tuple(prefix), src, r0, r1, row_bytes, dest)

    def _read_dcp(self, g: GlobalTensor, prefix: tuple[int, ...], src: SourceTensor, r0: int, r1: int,
                  row_bytes: int, dest: memoryview) -> None:
        p = len(prefix)
        covered = 0
        itemsize = g.dtype.itemsize
        for chunk, path, fd, st, a, b, start, chunk_row_bytes in self._chunk_rows(g, prefix, src, r0, r1):
            if st.dtype.name != g.dtype.name:
                raise CorruptCheckpoint(f"chunk stores {st.dtype.name}, .metadata says {g.dtype.name}", file=path,
                                        tensor=g.fqn, fix="the checkpoint is corrupt: re-create it")
            o, s = chunk.offsets, chunk.sizes
            full_trailing = all(o[j] == 0 and s[j] == g.shape[j] for j in range(p + 1, len(g.shape)))
            if not src.shape or full_trailing:
                pread_into(fd, dest[(a - r0) * row_bytes:(b - r0) * row_bytes], start, path=path)
                covered += (b - a) * row_bytes
                continue
            # The chunk splits the trailing dims (tensor-parallel row-parallel layout): read its
            # rows whole and scatter them into the right columns.
            covered += _scatter_chunk_rows(fd, path, start, b - a, chunk_row_bytes, o[p + 1:], s[p + 1:],
                                           g.shape[p + 1:], itemsize, dest[(a - r0) * row_bytes:(b - r0) * row_bytes])
        want = (r1 - r0) * row_bytes if src.shape else row_bytes
        if covered != want:
            raise CorruptCheckpoint(
                f"stored chunks cover {covered} of the {want} bytes of rows {r0}..{r1} at index {prefix}",
                file=self.index.root / ".metadata", tensor=g.fqn,
                fix="the checkpoint is incomplete or its chunks overlap: re-create it")
