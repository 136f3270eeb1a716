"""Stream a plan straight onto a GPU: for a training job that embeds hfnemo and wants the converted
tensors in device memory rather than in files.

    from hfnemo.exec.gpu import iter_tensors_to_device
    for key, offsets, t in iter_tensors_to_device(plan, reader, device="cuda", max_memory="2GiB"):
        ...  # t: a CUDA tensor of item.shape / item.dtype, ready on the current stream

Pipeline (three stages overlapping, as the CPU executor's read-ahead does):
  1. read: a thread pool preads source rows (RowReader semantics) into PINNED host slots, each row
     block laid out in output row order, in the source dtype; large reads are cut into sub-reads
     so that several threads fill one slot;
  2. copy: each filled slot goes to the device with one async H2D copy per run on a copy stream:
     straight into the output tensor when no cast is needed, else into a device staging slot;
  3. kernels: on a compute stream (waiting on the copy's event), the backend's cast kernel turns
     the staging bytes into the output dtype; zero fill (vocab padding) is a device memset.
A slot is refilled only after the events of its copy (and cast) have completed.

Memory: ``max_memory`` covers the pinned slots plus the device staging slots (only allocated when
some item casts); ``stats`` reports both. The yielded output tensors belong to the caller (they
are the product) and are not counted: a caller that keeps every tensor holds the whole model.
"""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import torch

from hfnemo.dtypes import BY_NAME
from hfnemo.errors import BudgetExceeded
from hfnemo.exec.sources import RowReader
from hfnemo.memwatch import parse_size
from hfnemo.plan.plan import OutputItem, Plan, SourceTensor

READ_PIECE = 32 << 20  # a slot is filled by sub-reads of about this many bytes, in parallel (32 MiB
# preads into pinned memory: 48 GB/s with 16 threads on the H100 machine, 8 MiB: 44, 2 MiB: 22)


@dataclass
class _Run:
    """A contiguous run of output rows [r0, r1) of one block with one kind of filling."""

    lo: int  # byte offset in the output tensor
    hi: int
    kind: str  # "copy" (same dtype), "cast" (source dtype -> item dtype), "zero", "cut" (column window)
    p0: int = 0  # byte offset in the slot (pinned and staging)
    p1: int = 0
    src_dtype: str = ""
    rows: int = 0  # "cut": rows, bytes of one whole source row, the window's byte offset and width
    src_row: int = 0
    col_off: int = 0
    col_bytes: int = 0


@dataclass
class _Slot:
    pinned: torch.Tensor
    staging: torch.Tensor | None
    staging2: torch.Tensor | None = None  # cut then cast
    done: list = field(default_factory=list)  # CUDA events to wait for before refilling


@dataclass
class _Pending:
    item: OutputItem
    out: torch.Tensor
    runs: list[_Run]
    slot: int
    reads: list[Future]
    last: bool
    events: list = field(default_factory=list)


def _row_bytes(src: SourceTensor) -> int:
    n = BY_NAME[src.dtype].itemsize
    for s in src.shape[1:]:
        n *= s
    return n


def _widest(it: OutputItem, sources: dict[str, SourceTensor]) -> int:
    from hfnemo.plan.planner import widest_row

    return widest_row(it, sources)


def iter_tensors_to_device(plan: Plan, reader: RowReader, device: str | torch.device = "cuda",
                           max_memory: int | str = "2GiB", *, backend=None, depth: int = 8,
                           read_threads: int | None = None, block_bytes: int | None = None,
                           stats: dict | None = None) -> Iterator[tuple[str, tuple[int, ...], torch.Tensor]]:
    """Yield ``(key, offsets, tensor)`` for every output item of ``plan``, in plan order, with the
    tensor on ``device`` (shape ``item.shape``, dtype ``item.dtype``), bit-identical to the bytes the
    CPU executor would write. ``offsets`` are the DCP chunk offsets (() for HF tensors).

    ``max_memory`` bounds pinned host slots + device staging slots (``depth`` of each, of
    ``block_bytes``, default the largest that fits, at most 64 MiB). ``stats``, if given, is filled
    with the buffer sizes and timings."""
    from hfnemo.kernels import get_backend

    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"iter_tensors_to_device needs a CUDA device, not {dev}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    backend = backend or get_backend("auto", device="cuda")
    budget = parse_size(max_memory) if isinstance(max_memory, str) else int(max_memory)
    sources = {s.name: s for s in plan.sources}
    casting = any(sources[s.source].dtype != it.dtype for it in plan.items for s in it.segments if s.source)
    slicing = any(s.cols for it in plan.items for s in it.segments if s.source)
    # pinned (+ device staging when casting or cutting columns, + a second one to cut then cast)
    per_slot = 1 + (casting or slicing) + (casting and slicing)
    widest = max((_widest(it, sources) for it in plan.items), default=1)
    depth = max(2, depth)
    if block_bytes is None:
        block_bytes = min(64 << 20, budget // (depth * per_slot))
        largest = max((it.rows * _widest(it, sources) for it in plan.items), default=0)
        block_bytes = min(block_bytes, max(4096, -(-largest // 4096) * 4096))
    block_bytes -= block_bytes % 4096
    if block_bytes < widest or depth * per_slot * block_bytes > budget:
        raise BudgetExceeded(
            f"max_memory {budget} bytes cannot hold {depth} x {per_slot} buffers of one {widest}-byte row",
            fix=f"raise max_memory to at least {depth * per_slot * max(widest, 4096) >> 20} MiB")
    threads = read_threads or min(16, max(2, (os.cpu_count() or 4)))

    slots = [_Slot(torch.empty(block_bytes, dtype=torch.uint8, pin_memory=True),
                   torch.empty(block_bytes, dtype=torch.uint8, device=dev) if (casting or slicing) else None,
                   torch.empty(block_bytes, dtype=torch.uint8, device=dev) if (casting and slicing) else None)
             for _ in range(depth)]
    copy_stream = torch.cuda.Stream(dev)
    compute_stream = torch.cuda.Stream(dev)
    consumer = torch.cuda.current_stream(dev)
    if stats is not None:
        stats.update(pinned_bytes=depth * block_bytes, device_staging_bytes=depth * block_bytes * (per_slot - 1),
                     block_bytes=block_bytes, depth=depth, read_threads=threads, budget=budget,
                     backend=getattr(backend, "name", "?"))
    t0 = time.perf_counter()
    wait_read = 0.0
    moved = 0

    def read_into(pinned: torch.Tensor, src: SourceTensor, r0: int, r1: int, p0: int, p1: int) -> None:
        reader.read_rows(src, r0, r1, memoryview(pinned.numpy())[p0:p1])

    def plan_block(it: OutputItem, r0: int, r1: int, slot: _Slot, pool: ThreadPoolExecutor) -> tuple[list[_Run], list]:
        out_item = BY_NAME[it.dtype].itemsize
        row_out = it.row_elems * out_item
        runs: list[_Run] = []
        futs: list[Future] = []
        pos = 0
        for seg in it.segments:
            a, b = max(r0, seg.out_row), min(r1, seg.out_row + seg.rows)
            if a >= b:
                continue
            lo, hi = a * row_out, b * row_out
            if seg.source is None:
                runs.append(_Run(lo, hi, "zero"))
                continue
            src = sources[seg.source]
            s0 = seg.src_row + a - seg.out_row
            src_item = BY_NAME[src.dtype].itemsize
            src_row = _row_bytes(src) if seg.cols else it.row_elems * src_item
            nbytes = (b - a) * src_row
            kind = "cut" if seg.cols else ("copy" if src.dtype == it.dtype else "cast")
            prev = runs[-1] if runs else None
            if kind == "cut":
                runs.append(_Run(lo, hi, kind, pos, pos + nbytes, src.dtype, b - a, src_row, seg.col * src_item,
                                 seg.cols * src_item))
            elif prev and prev.kind == kind and prev.hi == lo and prev.p1 == pos and prev.src_dtype == src.dtype:
                prev.hi, prev.p1 = hi, pos + nbytes  # merge with the previous run: one H2D copy
            else:
                runs.append(_Run(lo, hi, kind, pos, pos + nbytes, src.dtype))
            # cut the read in pieces of whole rows so several threads fill the slot
            step = max(1, READ_PIECE // max(src_row, 1))
            for k in range(0, b - a, step):
                m = min(step, b - a - k)
                p = pos + k * src_row
                futs.append(pool.submit(read_into, slot.pinned, src, s0 + k, s0 + k + m, p, p + m * src_row))
            pos += nbytes
        return runs, futs

    def launch(pend: _Pending) -> None:
        """Wait for the slot's reads, then queue its H2D copies and kernels; record their events."""
        nonlocal wait_read, moved
        tw = time.perf_counter()
        for f in pend.reads:
            f.result()
        wait_read += time.perf_counter() - tw
        slot = slots[pend.slot]
        out = pend.out
        with torch.cuda.stream(copy_stream):
            for r in pend.runs:
                if r.kind == "copy":
                    out[r.lo:r.hi].copy_(slot.pinned[r.p0:r.p1], non_blocking=True)
                elif r.kind in ("cast", "cut"):
                    slot.staging[r.p0:r.p1].copy_(slot.pinned[r.p0:r.p1], non_blocking=True)
                moved += r.p1 - r.p0
            ev = torch.cuda.Event()
            ev.record(copy_stream)
        pend.events.append(ev)
        kernels = [r for r in pend.runs if r.kind != "copy"]
        if kernels:
            compute_stream.wait_event(ev)
            with torch.cuda.stream(compute_stream):
                dt_out = BY_NAME[pend.item.dtype].torch
                for r in kernels:
                    if r.kind == "zero":
                        out[r.lo:r.hi].zero_()
                    elif r.kind == "cut":
                        same = r.src_dtype == pend.item.dtype
                        n = r.rows * r.col_bytes
                        target = out[r.lo:r.hi] if same else slot.staging2[r.p0:r.p0 + n]
                        backend.slice_cols(target, slot.staging[r.p0:r.p1], r.rows, r.src_row, r.col_off,
                                           r.col_bytes)
                        if not same:
                            backend.cast(out[r.lo:r.hi].view(dt_out), target.view(BY_NAME[r.src_dtype].torch))
                    else:
                        src_t = slot.staging[r.p0:r.p1].view(BY_NAME[r.src_dtype].torch)
                        backend.cast(out[r.lo:r.hi].view(dt_out), src_t)
                kev = torch.cuda.Event()
                kev.record(compute_stream)
            pend.events.append(kev)
        slot.done = pend.events  # the slot is refilled only once these have completed

    inflight: deque[_Pending] = deque()  # reads submitted, copies not yet queued
    free: deque[int] = deque(range(depth))
    item_events: list = []  # events of the blocks of the item being assembled

    def retire_one() -> Iterator[tuple[str, tuple[int, ...], torch.Tensor]]:
        pend = inflight.popleft()
        launch(pend)
        free.append(pend.slot)
        item_events.extend(pend.events)
        if pend.last:
            for e in item_events:  # the consumer's stream sees the finished tensor
                consumer.wait_event(e)
            item_events.clear()
            it = pend.item
            yield it.key, tuple(it.offsets), pend.out.view(BY_NAME[it.dtype].torch).view(it.shape)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hfnemo-gpu-read") as pool:
        try:
            for it in plan.items:
                out = torch.empty(it.nbytes, dtype=torch.uint8, device=dev)
                out.record_stream(copy_stream)
                out.record_stream(compute_stream)
                step = max(1, block_bytes // max(_widest(it, sources), 1))
                starts = list(range(0, it.rows, step)) or [0]
                for r0 in starts:
                    r1 = min(it.rows, r0 + step)
                    if not free:
                        yield from retire_one()
                        # queue every further slot whose reads are done too, so copies run back to back
                        while inflight and all(f.done() for f in inflight[0].reads):
                            yield from retire_one()
                    i = free.popleft()
                    for e in slots[i].done:  # its previous copy / cast must be over
                        e.synchronize()
                    slots[i].done = []
                    runs, futs = plan_block(it, r0, r1, slots[i], pool)
                    inflight.append(_Pending(it, out, runs, i, futs, r1 >= it.rows))
            while inflight:
                yield from retire_one()
        finally:
            for p in inflight:
                for f in p.reads:
                    f.cancel()
            for p in inflight:
                for f in p.reads:
                    if not f.cancelled():
                        try:
                            f.result()
                        except Exception:
                            pass
            torch.cuda.synchronize(dev)
    if stats is not None:
        stats.update(seconds=time.perf_counter() - t0, read_wait_seconds=wait_read, bytes_h2d=moved,
                     bytes_out=plan.write_bytes)


# ----------------------------------------------------------------------------- file conversion on a GPU
#
# ``hfnemo convert --device cuda``: the streaming executor (hfnemo.exec.executor) keeps its shape
# (depth slots, one worker thread per slot, blocks written in order), but a slot's host buffers are
# pinned and each slot owns a CUDA stream and device buffers. A block whose segments need kernels
# (casts, column cuts) is filled as
#     pread -> pinned staging -> H2D -> cut/cast kernels -> D2H into the pinned output -> write,
# the whole chain queued on the slot's stream, so the blocks of the depth slots overlap each
# other's reads, copies, kernels and writes. Whole-row same-dtype segments never leave the host
# (pread straight into the output, as on the CPU path); zero fill is a host memset.
# Memory: the host buffers are the CPU path's (same count and size, now pinned: the plan's budget
# covers them); the device buffers (3 x block_bytes a slot at most) are GPU memory.

import threading

_SUBMIT = threading.Lock()  # one thread at a time queues GPU work (Triton's first-call compile)


class DeviceKernels:
    """Kernels on a CUDA device for the streaming executor: wraps a GPU backend and marks the
    executor's device path (``device``). Calls on CPU tensors go to ``cpu`` (the CPU backend)."""

    def __init__(self, backend, device: str | torch.device = "cuda", cpu=None) -> None:
        dev = torch.device(device)
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.backend = backend
        self.cpu = cpu
        self.device = dev
        self.name = f"{getattr(backend, 'name', '?')}@{dev}"
        self.stats = {"device_buffer_bytes": 0, "blocks_on_device": 0, "blocks_on_host": 0}

    def set_threads(self, n: int) -> None:
        if self.cpu is not None:
            self.cpu.set_threads(n)

    def _pick(self, *ts: torch.Tensor):
        return self.backend if all(t.is_cuda for t in ts) else (self.cpu or self.backend)

    def cast(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self._pick(dst, src).cast(dst, src)

    def gather(self, dst: torch.Tensor, pieces) -> None:
        self._pick(dst, *(p[1] for p in pieces)).gather(dst, pieces)

    def slice_cols(self, dst, src, rows, src_row_bytes, col_offset, col_bytes) -> None:
        self._pick(dst, src).slice_cols(dst, src, rows, src_row_bytes, col_offset, col_bytes)


class DeviceSlot:
    """One executor slot on the device path: pinned host buffers + a stream + device buffers."""

    def __init__(self, block_bytes: int, n_buffers: int, kernels: DeviceKernels) -> None:
        dev = kernels.device
        self.out = torch.empty(block_bytes, dtype=torch.uint8, pin_memory=True)
        self.stage = torch.empty(block_bytes, dtype=torch.uint8, pin_memory=True) if n_buffers > 1 else None
        self.stage2 = None  # the CPU path's cut-then-cast buffer lives on the device here
        self.stream = torch.cuda.Stream(dev)
        self.d_stage = torch.empty(block_bytes, dtype=torch.uint8, device=dev) if n_buffers > 1 else None
        self.d_stage2 = torch.empty(block_bytes, dtype=torch.uint8, device=dev) if n_buffers > 2 else None
        self.d_out = torch.empty(block_bytes, dtype=torch.uint8, device=dev) if n_buffers > 1 else None
        kernels.stats["device_buffer_bytes"] += sum(t.numel() for t in (self.d_stage, self.d_stage2, self.d_out)
                                                    if t is not None)


def device_fill(block, slot: DeviceSlot, reader: RowReader, sources: dict[str, SourceTensor],
                kernels: DeviceKernels) -> int:
    """The executor's ``_fill`` for a DeviceSlot: output rows [r0, r1) of the block's item into
    slot.out (pinned), kernels on the GPU. Same bytes as the CPU path."""
    from hfnemo.plan.planner import source_row_bytes

    it = block.item
    out_dt = BY_NAME[it.dtype]
    row_bytes = it.row_elems * out_dt.itemsize
    out = slot.out.numpy()
    work = []  # (lo, hi, seg, n_rows, pos, full): segments that go through the GPU
    pos = 0
    for seg in it.segments:
        a, b = max(block.r0, seg.out_row), min(block.r1, seg.out_row + seg.rows)
        if a >= b:
            continue
        lo, hi = (a - block.r0) * row_bytes, (b - block.r0) * row_bytes
        if seg.source is None:
            slot.out[lo:hi].zero_()
            continue
        src = sources[seg.source]
        s0, n_rows = seg.src_row + a - seg.out_row, b - a
        if src.dtype == it.dtype and not seg.cols:
            reader.read_rows(src, s0, s0 + n_rows, memoryview(out)[lo:hi])
            continue
        # segments of one block never need more staging than the block's rows x widest row
        full = n_rows * source_row_bytes(it, seg, sources)
        reader.read_rows(src, s0, s0 + n_rows, memoryview(slot.stage.numpy())[pos:pos + full])
        work.append((lo, hi, seg, n_rows, pos, full))
        pos += full
    if not work:
        kernels.stats["blocks_on_host"] += 1
        return (block.r1 - block.r0) * row_bytes
    kernels.stats["blocks_on_device"] += 1
    be = kernels.backend
    with _SUBMIT, torch.cuda.stream(slot.stream):
        for lo, hi, seg, n_rows, p, full in work:
            src_dt = BY_NAME[sources[seg.source].dtype]
            slot.d_stage[p:p + full].copy_(slot.stage[p:p + full], non_blocking=True)
            staged = slot.d_stage[p:p + full]
            if seg.cols:
                width = seg.cols * src_dt.itemsize
                same = src_dt.name == out_dt.name
                target = slot.d_out[lo:hi] if same else slot.d_stage2[p:p + n_rows * width]
                be.slice_cols(target, staged, n_rows, full // n_rows, seg.col * src_dt.itemsize, width)
                staged = target
            if src_dt.name != out_dt.name:
                n = n_rows * it.row_elems * src_dt.itemsize
                be.cast(slot.d_out[lo:hi].view(out_dt.torch), staged[:n].view(src_dt.torch))
            slot.out[lo:hi].copy_(slot.d_out[lo:hi], non_blocking=True)
    slot.stream.synchronize()
    return (block.r1 - block.r0) * row_bytes


def plan_has_kernel_work(plan: Plan, casts_only: bool = False) -> bool:
    """Whether some segment of the plan casts or (unless ``casts_only``) cuts columns."""
    sources = {s.name: s for s in plan.sources}
    return any((s.cols and not casts_only) or sources[s.source].dtype != it.dtype
               for it in plan.items for s in it.segments if s.source)
