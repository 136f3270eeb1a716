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

In-memory sources (an HF state dict, hfnemo.exec.memsource) whose tensors are in pinned memory skip
stage 1: their rows are copied to the device in place (column windows with one strided
cudaMemcpy2DAsync each), so no host copy competes with the DMA for host memory bandwidth, and no
pinned slots are allocated when every source is pinned.

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
from hfnemo.plan.planner import plan_has_kernel_work  # noqa: F401 - re-exported (its old home)

READ_PIECE = 32 << 20  # a slot is filled by sub-reads of about this many bytes, in parallel (32 MiB
# preads into pinned memory: 48 GB/s with 16 threads on the H100 machine, 8 MiB: 44, 2 MiB: 22)


@dataclass
class _Run:
    """A contiguous run of output rows [r0, r1) of one block with one kind of filling."""

    lo: int  # byte offset in the output tensor
    hi: int
    kind: str  # "copy" (same dtype), "cast" (source dtype -> item dtype), "zero", "cut" (column window),
    # "cut2d" (column window copied strided from pinned memory, then cast when the dtypes differ)
    p0: int = 0  # byte offset in the slot (pinned and staging)
    p1: int = 0
    src_dtype: str = ""
    rows: int = 0  # "cut": rows, bytes of one whole source row, the window's byte offset and width
    src_row: int = 0
    col_off: int = 0
    col_bytes: int = 0
    host: torch.Tensor | None = None  # the run's source bytes in the caller's pinned memory (no slot read)


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
                           stats: dict | None = None, source: str = "auto", window_bytes: int | None = None,
                           map_threads: int | None = None) -> Iterator[tuple[str, tuple[int, ...], torch.Tensor]]:
    """Yield ``(key, offsets, tensor)`` for every output item of ``plan``, in plan order, with the
    tensor on ``device`` (shape ``item.shape``, dtype ``item.dtype``), bit-identical to the bytes the
    CPU executor would write. ``offsets`` are the DCP chunk offsets (() for HF tensors).

    ``max_memory`` bounds pinned host slots + device staging slots (``depth`` of each, of
    ``block_bytes``, default the largest that fits, at most 64 MiB). ``stats``, if given, is filled
    with the buffer sizes and timings.

    ``source``: "mmap" copies straight out of registered mmap windows of the page cache (safetensors
    sources, no column cuts; windows of ``window_bytes`` registered by ``map_threads`` threads, the
    windows mapped at once + a device staging ring for casts within ``max_memory``); "pread" reads
    into pinned slots; "auto" (default) is pread: on the H100 machine the mmap path ran at 0.33-0.38 x
    pinned H2D against pread's 0.61, registration and copies serializing (benchmarks/RESULTS.md).
    ``stats['source_path']`` says which path ran."""
    from hfnemo.kernels import get_backend

    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"iter_tensors_to_device needs a CUDA device, not {dev}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    backend = backend or get_backend("auto", device="cuda")
    budget = parse_size(max_memory) if isinstance(max_memory, str) else int(max_memory)
    if source not in ("auto", "mmap", "pread"):
        raise ValueError(f"source must be auto, mmap or pread, not {source!r}")
    if source == "auto":  # the mmap path measured slower on the H100 machine (see benchmarks/RESULTS.md)
        source = "pread"
    if source != "pread":
        why = mmap_supported(plan)
        window = window_bytes
        if why is None:
            window, why = _mmap_window(plan, budget, window_bytes)
        if why is None:
            yield from _iter_mmap(plan, dev, budget, backend, window,
                                  map_threads or min(8, max(2, os.cpu_count() or 4)), stats)
            return
        if source == "mmap":
            if why.startswith("max_memory"):
                raise BudgetExceeded(why, fix="raise max_memory or pass a smaller window_bytes")
            raise ValueError(f"the mmap source path cannot run this plan: {why}")
        if stats is not None:
            stats["mmap_unavailable"] = why
    sources = {s.name: s for s in plan.sources}
    casting = any(sources[s.source].dtype != it.dtype for it in plan.items for s in it.segments if s.source)
    slicing = any(s.cols for it in plan.items for s in it.segments if s.source)
    host = pinned_sources(plan, reader, dev)  # in-memory sources pinned or on the device: copied in place
    copy2d = _strided_h2d() if host else None
    reading = any(s.source not in host for it in plan.items for s in it.segments if s.source)
    # pinned slots (unless every source is pinned already) + device staging when casting or cutting
    # columns, + a second one to cut then cast
    n_pinned = int(reading)
    per_slot = max(1, n_pinned + (casting or slicing) + (casting and slicing))
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

    slots = [_Slot(torch.empty(block_bytes if reading else 0, dtype=torch.uint8, pin_memory=reading),
                   torch.empty(block_bytes, dtype=torch.uint8, device=dev) if (casting or slicing) else None,
                   torch.empty(block_bytes, dtype=torch.uint8, device=dev) if (casting and slicing) else None)
             for _ in range(depth)]
    copy_stream = torch.cuda.Stream(dev)
    compute_stream = torch.cuda.Stream(dev)
    consumer = torch.cuda.current_stream(dev)
    if host:  # in-place sources: what the caller's stream has queued on them comes first
        copy_stream.wait_stream(consumer)
    if stats is not None:
        stats.update(source_path="in place" if host and not reading else "pread",
                     pinned_bytes=depth * block_bytes * n_pinned,
                     device_staging_bytes=depth * block_bytes * (per_slot - n_pinned),
                     sources_in_pinned_memory=sum(1 for t in host.values() if t.device.type == "cpu"),
                     sources_on_device=sum(1 for t in host.values() if t.device.type == "cuda"),
                     block_bytes=block_bytes, depth=depth, read_threads=threads, budget=budget,
                     backend=getattr(backend, "name", "?"))
    t0 = time.perf_counter()
    wait_read = 0.0
    moved = 0

    def read_into(pinned: torch.Tensor, src: SourceTensor, r0: int, r1: int, p0: int, p1: int) -> None:
        reader.read_rows(src, r0, r1, memoryview(pinned.numpy())[p0:p1])

    def cut_into(pinned: torch.Tensor, src: SourceTensor, r0: int, r1: int, col: int, cols: int, p0: int,
                 p1: int) -> None:
        if not reader.read_cols(src, r0, r1, col, cols, memoryview(pinned.numpy())[p0:p1]):
            raise RuntimeError(f"{src.name}: an in-memory host tensor gave no column read")

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
            mem = host.get(seg.source)
            view = None if mem is None else mem[s0 * src_row:s0 * src_row + nbytes]
            if kind == "cut" and mem is None and src.location[0] == "memory":
                # a pageable in-memory tensor: cut the window on the host (only its bytes are
                # copied, and moved), then copy or cast as a whole run
                win_row = seg.cols * src_item
                n_win = (b - a) * win_row
                runs.append(_Run(lo, hi, "copy" if src.dtype == it.dtype else "cast", pos, pos + n_win, src.dtype))
                step = max(1, READ_PIECE // max(src_row, 1))
                for k in range(0, b - a, step):
                    m = min(step, b - a - k)
                    p = pos + k * win_row
                    futs.append(pool.submit(cut_into, slot.pinned, src, s0 + k, s0 + k + m, seg.col, seg.cols, p,
                                            p + m * win_row))
                pos += n_win
                continue
            if kind == "cut":
                if view is not None and copy2d is not None:
                    kind = "cut2d"  # one strided H2D of the window's bytes only (no full rows)
                runs.append(_Run(lo, hi, kind, pos, pos + nbytes, src.dtype, b - a, src_row, seg.col * src_item,
                                 seg.cols * src_item, view))
            elif (view is None and prev and prev.host is None and prev.kind == kind and prev.hi == lo
                  and prev.p1 == pos and prev.src_dtype == src.dtype):
                prev.hi, prev.p1 = hi, pos + nbytes  # merge with the previous run: one H2D copy
            else:
                runs.append(_Run(lo, hi, kind, pos, pos + nbytes, src.dtype, host=view))
            if view is not None:  # straight from the caller's pinned tensor: nothing to read
                pos += nbytes
                continue
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
                if r.kind == "zero":
                    continue
                if r.kind == "cut2d":  # the window's columns of each row, straight from the caller's pinned rows
                    n = r.rows * r.col_bytes
                    same = r.src_dtype == pend.item.dtype
                    target = out[r.lo:r.hi] if same else slot.staging[r.p0:r.p0 + n]
                    copy2d(target, r.col_bytes, r.host, r.col_off, r.src_row, r.col_bytes, r.rows, copy_stream)
                    moved += n
                    continue
                src_bytes = r.host if r.host is not None else slot.pinned[r.p0:r.p1]
                if r.kind == "copy":
                    out[r.lo:r.hi].copy_(src_bytes, non_blocking=True)
                else:  # "cast", "cut"
                    slot.staging[r.p0:r.p1].copy_(src_bytes, non_blocking=True)
                moved += r.p1 - r.p0
            ev = torch.cuda.Event()
            ev.record(copy_stream)
        pend.events.append(ev)
        kernels = [r for r in pend.runs if r.kind != "copy" and not (r.kind == "cut2d" and r.src_dtype == pend.item.dtype)]
        if kernels:
            compute_stream.wait_event(ev)
            with torch.cuda.stream(compute_stream):
                dt_out = BY_NAME[pend.item.dtype].torch
                for r in kernels:
                    if r.kind == "zero":
                        out[r.lo:r.hi].zero_()
                    elif r.kind == "cut2d":
                        if r.src_dtype != pend.item.dtype:
                            n = r.rows * r.col_bytes
                            backend.cast(out[r.lo:r.hi].view(dt_out), slot.staging[r.p0:r.p0 + n].view(
                                BY_NAME[r.src_dtype].torch))
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
                if host and all(seg.source is None or (seg.source in host and not seg.cols
                                                       and sources[seg.source].dtype == it.dtype)
                                for seg in it.segments):
                    step = max(1, it.rows)  # copies from in-place sources use no slot bytes: one block
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
                    if not futs:  # nothing to read (pinned in-memory rows, zero fill): queue its copies
                        # now, so that the copy engine always has the blocks behind it (waiting for
                        # the slots to run out first let its queue drain every `depth` blocks)
                        while inflight and all(f.done() for f in inflight[0].reads):
                            yield from retire_one()
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


def _cudart_lib():
    """The CUDA runtime library torch has loaded, through ctypes (whose calls let go of the GIL),
    or None when it is not mapped in this process."""
    import ctypes

    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({ln.split()[-1] for ln in fh if "libcudart.so" in ln})
        return ctypes.CDLL(paths[0]) if paths else None
    except OSError:
        return None


def _strided_h2d():
    """``copy2d(dst, dpitch, src, src_off, spitch, width, height, stream)``: an async strided copy
    (cudaMemcpy2DAsync) of ``height`` rows of ``width`` bytes from pinned host ``src`` (byte offset
    ``src_off``, rows ``spitch`` apart) into device ``dst`` (rows ``dpitch`` apart); None when the
    CUDA runtime is not reachable through ctypes (the pipeline then copies whole rows and cuts)."""
    import ctypes

    lib = _cudart_lib()
    fn = getattr(lib, "cudaMemcpy2DAsync", None) if lib is not None else None
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                   ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    default_kind = 4  # cudaMemcpyDefault: the direction from the pointers (pinned host or device, UVA)

    def copy2d(dst: torch.Tensor, dpitch: int, src: torch.Tensor, src_off: int, spitch: int, width: int,
               height: int, stream: torch.cuda.Stream) -> None:
        if height == 0 or width == 0:
            return
        if src_off + (height - 1) * spitch + width > src.numel() or height * dpitch > dst.numel():
            raise ValueError("strided copy out of bounds")
        rc = fn(dst.data_ptr(), dpitch, src.data_ptr() + src_off, spitch, width, height, default_kind,
                stream.cuda_stream)
        if rc:
            raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {rc}")

    return copy2d


def pinned_sources(plan: Plan, reader: RowReader, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The plan's in-memory sources (hfnemo.exec.memsource) whose tensors are in pinned memory or
    already on ``device``, as flat byte views: the pipeline copies from them in place (H2D or
    D2D), with no host staging copy. Tensors on another CUDA device are refused."""
    tensors = getattr(reader, "tensors", None)
    if not tensors:
        return {}
    out: dict[str, torch.Tensor] = {}
    for s in plan.sources:
        if s.location[0] == "memory":
            reader._check(s)
            t = tensors[s.location[1]]
            if t.device.type == "cuda" and (device is None or t.device != device):
                from hfnemo.errors import UsageError
                from hfnemo.exec.memsource import WHERE

                raise UsageError(f"tensor is on {t.device}, the conversion runs on {device}", file=WHERE,
                                 tensor=s.name, fix=f"pass device='{t.device}' or move the tensor there")
            if t.numel() and (t.device.type == "cuda" or t.is_pinned()):
                out[s.name] = t.reshape(-1).view(torch.uint8)
    return out


# ----------------------------------------------------------------------------- mmap-window source path
#
# The pread path copies page cache -> pinned slot (2 bytes of host DRAM traffic a byte) and the DMA
# reads the slot again (a third): with the page cache warm the two stages share host memory bandwidth
# and meet at ~0.6 x pinned H2D. For safetensors sources the bytes of every segment lie contiguously
# in one file, so the DMA can read them straight out of the page cache: bounded windows of the file
# are mmap'ed, registered with cudaHostRegister (read-only) on worker threads, copied from with
# async H2D copies (into the output, or into a device staging ring for casts), then unregistered and
# unmapped by a releaser thread as soon as the event after their last copy has completed. Registered
# windows pin page-cache pages (they are the process's PSS): ``windows x window_bytes`` plus the
# staging ring are counted against ``max_memory``. The page cache itself is the user's and is left
# as it was (no fadvise).

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
WINDOW_BYTES = 128 << 20  # mmap window (registered, copied from, released); a multiple of PAGE
MAP_PIECE = 32 << 20  # an H2D copy (and cast) covers at most this many source bytes
STAGE_RING = 4  # device staging buffers of MAP_PIECE for casts, reused in turn
_HOST_REGISTER_PORTABLE, _HOST_REGISTER_MAPPED, _HOST_REGISTER_READONLY = 1, 2, 8


@dataclass
class _MapOp:
    """One H2D copy (or zero fill) of the mmap path: output bytes [lo, hi) of item ``item``."""

    item: int
    lo: int
    hi: int
    kind: str  # "copy", "cast", "zero"
    parts: list = field(default_factory=list)  # (window key, offset in window, nbytes): source bytes in order
    src_dtype: str = ""
    end: bool = False  # the last op of its item


def mmap_schedule(plan: Plan, window: int = WINDOW_BYTES, piece: int = MAP_PIECE,
                  sizes: dict[str, int] | None = None) -> tuple[list[_MapOp], list, dict, int]:
    """The mmap path's work list: ops in plan order, the windows ``(path, index)`` in order of first
    use, each window's last op, and the most windows any op needs mapped at once (those first used at
    or before it and last used at or after it). Raises ValueError if a source is not a safetensors
    tensor or a segment cuts columns (the pread path handles those)."""
    if window % PAGE or window <= 0:
        raise ValueError(f"window {window} is not a positive multiple of the page size {PAGE}")
    piece = max(8, piece - piece % 8)  # pieces start on element boundaries (itemsize <= 8)
    sources = {s.name: s for s in plan.sources}
    ops: list[_MapOp] = []
    for idx, it in enumerate(plan.items):
        out_item = BY_NAME[it.dtype].itemsize
        row_out = it.row_elems * out_item
        first = len(ops)
        for seg in it.segments:
            lo, hi = seg.out_row * row_out, (seg.out_row + seg.rows) * row_out
            if lo >= hi:
                continue
            if seg.source is None:
                ops.append(_MapOp(idx, lo, hi, "zero"))
                continue
            src = sources[seg.source]
            if src.location[0] != "safetensors" or seg.cols:
                raise ValueError(f"{src.name}: not a whole-row safetensors read")
            _, path, offset = src.location
            src_item = BY_NAME[src.dtype].itemsize
            rb = _row_bytes(src)
            if rb != it.row_elems * src_item:
                raise ValueError(f"{src.name}: row width differs from the item's")
            kind = "copy" if src.dtype == it.dtype else "cast"
            f0 = int(offset) + seg.src_row * rb
            n = seg.rows * rb
            if sizes is not None and f0 + n > sizes[str(path)]:
                raise ValueError(f"{src.name}: bytes past the end of {path}")
            for a in range(0, n, piece):
                b = min(n, a + piece)
                parts = []
                x = f0 + a
                while x < f0 + b:
                    w = x // window
                    y = min(f0 + b, (w + 1) * window)
                    parts.append(((str(path), w), x - w * window, y - x))
                    x = y
                o_lo = lo + a // src_item * out_item
                o_hi = lo + b // src_item * out_item
                prev = ops[-1] if len(ops) > first else None
                if (kind == "copy" and prev is not None and prev.kind == "copy" and prev.hi == o_lo
                        and len(parts) == 1 and len(prev.parts) == 1 and prev.parts[0][0] == parts[0][0]
                        and prev.parts[0][1] + prev.parts[0][2] == parts[0][1]
                        and prev.hi - prev.lo + parts[0][2] <= piece):
                    k, off, m = prev.parts[0]
                    prev.parts[0] = (k, off, m + parts[0][2])  # contiguous in file and output: one copy
                    prev.hi = o_hi
                    continue
                ops.append(_MapOp(idx, o_lo, o_hi, kind, parts, src.dtype))
        if len(ops) > first:
            ops[-1].end = True
        else:  # an item with no rows: one empty op carries its end
            ops.append(_MapOp(idx, 0, 0, "zero", end=True))
    order: list = []
    last: dict = {}
    first_use: dict = {}
    for i, op in enumerate(ops):
        for key, _, _ in op.parts:
            if key not in first_use:
                first_use[key] = i
                order.append(key)
            last[key] = i
    # windows live from their first to their last op; the schedule needs the most that overlap
    events = sorted([(first_use[k], 0) for k in order] + [(last[k], 1) for k in order])
    live = peak = 0
    for _, e in events:
        live += 1 if e == 0 else -1
        peak = max(peak, live)
    return ops, order, last, peak


class _Cudart:
    """cudaHostRegister / cudaHostUnregister through the CUDA runtime torch has loaded (ctypes,
    which lets go of the GIL during the call, so several threads register at once), else torch's
    own binding."""

    def __init__(self) -> None:
        import ctypes

        lib = self.lib = _cudart_lib()
        if lib is not None:
            lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            lib.cudaHostRegister.restype = ctypes.c_int
            lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
            lib.cudaHostUnregister.restype = ctypes.c_int
            lib.cudaGetLastError.restype = ctypes.c_int
        self.torch_rt = None if self.lib is not None else torch.cuda.cudart()
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mmap.restype = ctypes.c_void_p
        self.libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_long]
        self.libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.libc.munmap.restype = ctypes.c_int
        self.flags = None

    def register(self, addr: int, n: int) -> int:
        flag_sets = [self.flags] if self.flags is not None else [
            _HOST_REGISTER_READONLY | _HOST_REGISTER_PORTABLE, _HOST_REGISTER_READONLY]
        rc = -1
        for fl in flag_sets:
            if self.lib is not None:
                rc = self.lib.cudaHostRegister(addr, n, fl)
                if rc:
                    self.lib.cudaGetLastError()  # clear the sticky-free error for the next call
            else:
                rc = int(self.torch_rt.cudaHostRegister(addr, n, fl))
            if rc == 0:
                self.flags = fl
                return 0
        return rc

    def unregister(self, addr: int) -> int:
        if self.lib is not None:
            return self.lib.cudaHostUnregister(addr)
        return int(self.torch_rt.cudaHostUnregister(addr))


class _Window:
    __slots__ = ("addr", "n", "tensor")

    def __init__(self, addr: int, n: int, tensor: torch.Tensor) -> None:
        self.addr, self.n, self.tensor = addr, n, tensor


def mmap_supported(plan: Plan) -> str | None:
    """None when the mmap path can run ``plan``, else why not."""
    if os.name != "posix":
        return "not a POSIX system"
    if not torch.cuda.is_available():
        return "no CUDA"
    for s in plan.sources:
        if s.location[0] != "safetensors":
            return f"source {s.name} is not in a safetensors file"
    if any(seg.cols for it in plan.items for seg in it.segments if seg.source):
        return "the plan cuts column windows"
    return None


def _file_sizes(plan: Plan) -> dict[str, int]:
    return {str(s.location[1]): os.path.getsize(s.location[1]) for s in plan.sources}


def _mmap_window(plan: Plan, budget: int, window: int | None) -> tuple[int | None, str | None]:
    """The window size for the mmap path under ``budget`` (the given one, else the largest of
    128/64/32/16 MiB that leaves room for the windows in use at once + 2 being registered ahead),
    or (None, why not)."""
    try:
        sizes = _file_sizes(plan)
    except OSError as e:
        return None, f"cannot stat a source file: {e}"
    dtypes = {x.name: x.dtype for x in plan.sources}
    casting = any(dtypes[seg.source] != it.dtype for it in plan.items for seg in it.segments if seg.source)
    stage = STAGE_RING * MAP_PIECE if casting else 0
    for w in ([window] if window else [128 << 20, 64 << 20, 32 << 20, 16 << 20]):
        try:
            _, _, _, peak = mmap_schedule(plan, w, MAP_PIECE, sizes)
        except ValueError as e:
            return None, str(e)
        if (peak + (2 if window is None else 1)) * w + stage <= budget:
            return w, None
    return window, f"max_memory {budget} bytes is too small for the mmap windows"


def _iter_mmap(plan: Plan, dev: torch.device, budget: int, backend, window: int, threads: int,
               stats: dict | None) -> Iterator[tuple[str, tuple[int, ...], torch.Tensor]]:
    import ctypes
    import mmap as _mmap
    import threading

    rt = _Cudart()
    fds: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for s in plan.sources:
        p = str(s.location[1])
        if p not in fds:
            fds[p] = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            sizes[p] = os.fstat(fds[p]).st_size
    try:
        ops, order, last, peak = mmap_schedule(plan, window, MAP_PIECE, sizes)
        casting = any(op.kind == "cast" for op in ops)
        stage_bytes = STAGE_RING * MAP_PIECE if casting else 0
        max_windows = min(4096, (budget - stage_bytes) // window)
        need = peak + 1
        if max_windows < need:
            raise BudgetExceeded(
                f"max_memory {budget} bytes cannot hold {need} mapped windows of {window} bytes"
                + (f" + {stage_bytes} bytes of device staging" if stage_bytes else ""),
                fix=f"raise max_memory to at least {(need * window + stage_bytes) >> 20} MiB")
        last_of: dict[int, list] = {}
        for k in order:
            last_of.setdefault(last[k], []).append(k)
        stage = [torch.empty(MAP_PIECE, dtype=torch.uint8, device=dev) for _ in range(STAGE_RING)] if casting else []
        stage_free: list = [None] * len(stage)
        copy_stream = torch.cuda.Stream(dev)
        compute_stream = torch.cuda.Stream(dev)
        consumer = torch.cuda.current_stream(dev)
        if stats is not None:
            stats.update(source_path="mmap", window_bytes=window, max_windows=max_windows, windows=len(order),
                         windows_needed_at_once=peak, register_threads=threads, device_staging_bytes=stage_bytes,
                         pinned_bytes=0, budget=budget, backend=getattr(backend, "name", "?"))

        lock = threading.Condition()
        state = {"mapped": 0, "peak": 0, "reg_s": 0.0, "unreg_s": 0.0}

        def map_window(key) -> _Window:
            path, w = key
            torch.cuda.set_device(dev)
            start = w * window
            n = min(window, sizes[path] - start)
            n = -(-n // PAGE) * PAGE
            t = time.perf_counter()
            addr = rt.libc.mmap(None, n, _mmap.PROT_READ, _mmap.MAP_SHARED, fds[path], start)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                raise OSError(ctypes.get_errno(), f"mmap of {path} at {start} failed")
            rc = rt.register(addr, n)
            if rc:
                rt.libc.munmap(addr, n)
                raise RuntimeError(f"cudaHostRegister of a {n}-byte window of {path} failed (error {rc})")
            with lock:
                state["reg_s"] += time.perf_counter() - t
            buf = (ctypes.c_uint8 * n).from_address(addr)
            return _Window(addr, n, torch.frombuffer(buf, dtype=torch.uint8))

        def unmap(win: _Window) -> None:
            t = time.perf_counter()
            win.tensor = None
            rt.unregister(win.addr)
            rt.libc.munmap(win.addr, win.n)
            with lock:
                state["unreg_s"] += time.perf_counter() - t
                state["mapped"] -= 1
                lock.notify_all()

        def release(futs: list, ev) -> None:
            ev.synchronize()  # the copies out of these windows are over
            for f in futs:
                unmap(f.result())

        t0 = time.perf_counter()
        wait_s = 0.0
        enqueue_s = copy_call_s = 0.0  # main thread: whole copy ops (window waits included) / copy_ calls alone
        moved = 0
        futures: dict = {}
        nxt = 0  # next window (in first-use order) to map
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hfnemo-gpu-map")
        releaser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hfnemo-gpu-unmap")
        rel_futs: list[Future] = []
        pending_unmap: set = set()

        def top_up() -> None:
            nonlocal nxt
            with lock:
                while nxt < len(order) and state["mapped"] < max_windows:
                    state["mapped"] += 1
                    state["peak"] = max(state["peak"], state["mapped"])
                    futures[order[nxt]] = pool.submit(map_window, order[nxt])
                    nxt += 1

        def window_of(key) -> _Window:
            nonlocal wait_s
            top_up()
            tw = time.perf_counter()
            while key not in futures:  # every slot is taken by windows in use or being released
                with lock:
                    lock.wait(0.05)
                top_up()
            win = futures[key].result()
            wait_s += time.perf_counter() - tw
            return win

        items = plan.items
        out = None
        item_events: list = []
        sk = 0
        try:
            for i, op in enumerate(ops):
                it = items[op.item]
                if out is None:
                    out = torch.empty(it.nbytes, dtype=torch.uint8, device=dev)
                    out.record_stream(copy_stream)
                    out.record_stream(compute_stream)
                if op.kind == "zero":
                    if op.hi > op.lo:
                        with torch.cuda.stream(compute_stream):
                            out[op.lo:op.hi].zero_()
                            kev = torch.cuda.Event()
                            kev.record(compute_stream)
                        item_events.append(kev)
                elif op.kind == "copy":
                    te = time.perf_counter()
                    pos = op.lo
                    with torch.cuda.stream(copy_stream):
                        for key, off, m in op.parts:
                            win = window_of(key)
                            tc = time.perf_counter()
                            out[pos:pos + m].copy_(win.tensor[off:off + m], non_blocking=True)
                            copy_call_s += time.perf_counter() - tc
                            pos += m
                    moved += op.hi - op.lo
                    enqueue_s += time.perf_counter() - te
                else:  # cast: source bytes -> staging -> kernel into the output
                    k = sk
                    sk = (sk + 1) % len(stage)
                    buf = stage[k]
                    n = sum(m for _, _, m in op.parts)
                    with torch.cuda.stream(copy_stream):
                        if stage_free[k] is not None:
                            copy_stream.wait_event(stage_free[k])  # its last cast is over
                        pos = 0
                        for key, off, m in op.parts:
                            win = window_of(key)
                            buf[pos:pos + m].copy_(win.tensor[off:off + m], non_blocking=True)
                            pos += m
                        ev = torch.cuda.Event()
                        ev.record(copy_stream)
                    compute_stream.wait_event(ev)
                    with torch.cuda.stream(compute_stream):
                        backend.cast(out[op.lo:op.hi].view(BY_NAME[it.dtype].torch),
                                     buf[:n].view(BY_NAME[op.src_dtype].torch))
                        kev = torch.cuda.Event()
                        kev.record(compute_stream)
                    stage_free[k] = kev
                    item_events.append(kev)
                    moved += n
                done = last_of.get(i)
                if done:
                    ev = torch.cuda.Event()
                    ev.record(copy_stream)
                    futs = [futures.pop(key) for key in done]
                    rel_futs.append(releaser.submit(release, futs, ev))
                if op.end:
                    ev = torch.cuda.Event()
                    ev.record(copy_stream)
                    consumer.wait_event(ev)
                    for e in item_events:
                        consumer.wait_event(e)
                    item_events.clear()
                    t_out, out = out, None
                    yield it.key, tuple(it.offsets), t_out.view(BY_NAME[it.dtype].torch).view(it.shape)
        finally:
            torch.cuda.synchronize(dev)
            for f in rel_futs:
                try:
                    f.result()
                except Exception:
                    pass
            releaser.shutdown(wait=True)
            pool.shutdown(wait=True, cancel_futures=True)
            for f in futures.values():  # windows mapped but never released (an early exit)
                try:
                    unmap(f.result())
                except Exception:
                    pass
        if stats is not None:
            stats.update(seconds=time.perf_counter() - t0, window_wait_seconds=wait_s, bytes_h2d=moved,
                         copy_enqueue_seconds=enqueue_s, copy_call_seconds=copy_call_s,
                         bytes_out=plan.write_bytes, register_seconds=state["reg_s"],
                         unregister_seconds=state["unreg_s"], peak_mapped_windows=state["peak"],
                         peak_mapped_bytes=state["peak"] * window, register_flags=rt.flags)
    finally:
        for fd in fds.values():
            os.close(fd)


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
        self.out_mv = memoryview(self.out.numpy())  # what the executor hands the sink
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
