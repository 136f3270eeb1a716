"""Stream a plan: read row blocks ahead in worker threads, write them in order, never more than
``depth`` blocks alive. Buffers are allocated once and reused, so peak memory is the baseline plus
``depth x block`` whatever the model size."""
from __future__ import annotations

import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Protocol

from hfnemo.dtypes import BY_NAME
from hfnemo.exec.buffers import HostBuffer
from hfnemo.exec.sources import RowReader, SourceReadahead
from hfnemo.kernels import Backend, get_backend
from hfnemo.plan.plan import OutputItem, Plan, SourceTensor
from hfnemo.plan.planner import source_row_bytes, widest_row


class Sink(Protocol):
    """``write(item, data)``; a sink whose ``wants_crc`` is true (zip records: DCP chunks, torch.save
    rank files) gets ``write(item, data, crc)`` with the block's CRC-32, computed by the worker that
    produced it, so that the one thread writing does not also checksum every byte."""

    def begin(self, item: OutputItem) -> None: ...
    def write(self, item: OutputItem, data: memoryview) -> None: ...
    def skip(self, item: OutputItem, n: int, crc: int | None) -> None: ...
    def crc(self) -> int | None: ...
    def end(self, item: OutputItem) -> None: ...


class Journal(Protocol):
    """What the executor needs of hfnemo.exec.journal.Journal."""

    start: tuple[int, int]
    def item_crc(self, index: int) -> int | None: ...
    def after_block(self, index: int, r1: int, last: bool, crc: int | None, nbytes: int,
                    done: int) -> None: ...


Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class _Block:
    item: OutputItem
    index: int  # position of the item in the plan
    r0: int
    r1: int
    first: bool
    last: bool


class _Slot:
    """One in-flight block's buffers: output bytes, staging bytes (source dtype, or whole source
    rows a column window is cut from), and a second staging buffer to cut then cast. Plain host
    memory (no torch: a CPU conversion does not import it)."""

    def __init__(self, block_bytes: int, n_buffers: int) -> None:
        self.out = HostBuffer(block_bytes)
        self.out_mv = self.out.mv  # what the executor hands the sink (DeviceSlot has one too)
        self.stage = HostBuffer(block_bytes) if n_buffers > 1 else None
        self.stage2 = HostBuffer(block_bytes) if n_buffers > 2 else None


def _blocks(items: tuple[OutputItem, ...], sources: dict[str, SourceTensor], block_bytes: int,
            start: tuple[int, int] = (0, 0)) -> Iterator[_Block]:
    """Row blocks of every item from ``start`` = (item index, first row) on."""
    for idx in range(start[0], len(items)):
        it = items[idx]
        step = max(1, block_bytes // max(widest_row(it, sources), 1))
        if it.rows == 0:
            yield _Block(it, idx, 0, 0, True, True)
            continue
        for r0 in range(start[1] if idx == start[0] else 0, it.rows, step):
            r1 = min(it.rows, r0 + step)
            yield _Block(it, idx, r0, r1, r0 == 0, r1 == it.rows)


def _fill(block: _Block, slot: _Slot, reader: RowReader, sources: dict[str, SourceTensor], kernels: Backend) -> int:
    """Produce output rows [r0, r1) of the block's item into slot.out; returns the byte count.

    Whole-row segments are read straight into place (pread is the gather); a dtype change reads
    into staging and casts; a column window (row-parallel shard) is read in place row by row by
    the native core, else whole rows are staged and cut."""
    it = block.item
    out_dt = BY_NAME[it.dtype]
    row_bytes = it.row_elems * out_dt.itemsize
    out = slot.out.mv
    for seg in it.segments:
        a, b = max(block.r0, seg.out_row), min(block.r1, seg.out_row + seg.rows)
        if a >= b:
            continue
        lo, hi = (a - block.r0) * row_bytes, (b - block.r0) * row_bytes
        if seg.source is None:
            slot.out.zero(lo, hi)
            continue
        src = sources[seg.source]
        src_dt = BY_NAME[src.dtype]
        s0, n_rows = seg.src_row + a - seg.out_row, b - a
        if src.dtype == it.dtype and not seg.cols:
            reader.read_rows(src, s0, s0 + n_rows, out[lo:hi])
            continue
        n = n_rows * it.row_elems * src_dt.itemsize  # the block's bytes in the source dtype
        if seg.cols:
            # A column window read in place (one pread per row) costs the window's bytes only;
            # cutting it from whole staged rows costs TP times the tensor.
            target = out[lo:hi] if src.dtype == it.dtype else slot.stage.mv[:n]
            if reader.read_cols(src, s0, s0 + n_rows, seg.col, seg.cols, target):
                if src.dtype != it.dtype:
                    kernels.cast_buffers(out[lo:hi], out_dt.torch_name, slot.stage.mv[:n], src_dt.torch_name)
                continue
        full = n_rows * source_row_bytes(it, seg, sources)
        reader.read_rows(src, s0, s0 + n_rows, slot.stage.mv[:full])
        staged = slot.stage
        if seg.cols:
            width = seg.cols * src_dt.itemsize
            target = out[lo:hi] if src.dtype == it.dtype else slot.stage2.mv
            kernels.slice_cols_buffers(target, slot.stage.mv, n_rows, full // n_rows, seg.col * src_dt.itemsize, width)
            if src.dtype == it.dtype:
                continue
            staged = slot.stage2
        kernels.cast_buffers(out[lo:hi], out_dt.torch_name, staged.mv[:n], src_dt.torch_name)
    return (block.r1 - block.r0) * row_bytes


def _fill_crc(fill: Callable[..., int], block: _Block, slot: "_Slot", reader: RowReader,
              sources: dict[str, SourceTensor], kernels: Backend) -> tuple[int, int]:
    """fill, then the CRC-32 of the block's bytes (in the worker: zlib.crc32 releases the GIL)."""
    n = fill(block, slot, reader, sources, kernels)
    return n, zlib.crc32(slot.out_mv[:n])


def _replay(items: tuple[OutputItem, ...], sink: Sink, journal: Journal) -> int:
    """Walk the sink through the part of the plan a previous run finished (``journal.start``):
    the same begin/end calls, with skip() for the bytes already on disk. Returns those bytes."""
    idx, row = journal.start
    done = 0
    for i in range(idx):
        it = items[i]
        sink.begin(it)
        if it.nbytes:
            sink.skip(it, it.nbytes, journal.item_crc(i))
        sink.end(it)
        done += it.nbytes
    if row:
        it = items[idx]
        n = row * it.row_elems * BY_NAME[it.dtype].itemsize
        sink.begin(it)
        sink.skip(it, n, journal.item_crc(-1))
        done += n
    return done


def execute(plan: Plan, reader: RowReader, sink: Sink, *, progress: Progress | None = None,
            kernels: Backend | None = None, journal: Journal | None = None) -> dict[str, float]:
    """Run every item of the plan through ``sink``; returns timing counters.

    With a ``journal``, the part of the plan it says is on disk is replayed (no reads), the rest is
    produced, and the journal hears of every finished block (it commits progress now and then)."""
    kernels = kernels or get_backend("auto")
    sources = {s.name: s for s in plan.sources}
    block_bytes = int(plan.budget["block_bytes"])
    depth = int(plan.budget["depth"])
    fill = _fill
    if getattr(kernels, "device", None) is not None:  # hfnemo.exec.gpu.DeviceKernels: kernels on a GPU
        from hfnemo.exec.gpu import DeviceSlot, device_fill

        fill = device_fill
        slots = [DeviceSlot(block_bytes, int(plan.budget["buffers_per_slot"]), kernels) for _ in range(depth)]
    else:
        slots = [_Slot(block_bytes, int(plan.budget["buffers_per_slot"])) for _ in range(depth)]
    free = deque(range(depth))
    total = plan.write_bytes
    done = 0
    start = (0, 0)
    if journal is not None:
        start = journal.start
        done = _replay(plan.items, sink, journal)
    t0 = time.perf_counter()
    wait_s = 0.0
    inflight: deque[tuple[_Block, int, Future]] = deque()
    wants_crc = bool(getattr(sink, "wants_crc", False))
    task = partial(_fill_crc, fill) if wants_crc else fill

    def drain_one() -> None:
        nonlocal done, wait_s
        block, slot_id, fut = inflight.popleft()
        tw = time.perf_counter()
        res = fut.result()
        wait_s += time.perf_counter() - tw
        n, block_crc = res if wants_crc else (res, None)
        if block.first:
            sink.begin(block.item)
        if n:
            if wants_crc:
                sink.write(block.item, slots[slot_id].out_mv[:n], block_crc)
            else:
                sink.write(block.item, slots[slot_id].out_mv[:n])
        crc = sink.crc() if journal is not None else None
        if block.last:
            sink.end(block.item)
        free.append(slot_id)
        done += n
        if journal is not None:
            journal.after_block(block.index, block.r1, block.last, crc, n, done)
        if progress:
            progress(done, total)

    readahead = SourceReadahead.for_plan(plan.items, sources, start, reader=reader)
    submitted = 0
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="hfnemo-read") as pool:
        try:
            if readahead is not None:
                readahead.start()
            for block in _blocks(plan.items, sources, block_bytes, start):
                if not free:
                    drain_one()
                slot_id = free.popleft()
                inflight.append((block, slot_id, pool.submit(task, block, slots[slot_id], reader, sources, kernels)))
                if readahead is not None:
                    submitted += (block.r1 - block.r0) * block.item.row_elems * BY_NAME[block.item.dtype].itemsize
                    readahead.advance(submitted)
            while inflight:
                drain_one()
        finally:
            for _, _, fut in inflight:
                fut.cancel()
            if readahead is not None:
                readahead.stop()
    stats = {"seconds": time.perf_counter() - t0, "read_wait_seconds": wait_s, "bytes_written": float(done)}
    if readahead is not None:
        stats["readahead_bytes"] = float(readahead.issued)
    return stats
