#!/usr/bin/env python3
"""GPU benchmark: the Triton kernels against device-to-device copy, pinned H2D bandwidth, and the
plan -> GPU pipeline (``hfnemo.exec.gpu.iter_tensors_to_device``) against that H2D bandwidth.

Not a test. One JSON object per line on stdout (progress on stderr):

    PYTHONPATH=src python benchmarks/bench_gpu.py [--cache DIR] [--repeat N] [--skip-pipeline] [--skip-diag]
        [--skip-convert] [--skip-memory] [--deadline-s S]

Kernels: each Triton case is swept over launch shapes (``sweep``, ``best_cfg``) and timed with the
backend defaults (``triton_default_*``); gathers report host (piece table) and kernel time apart.
In-memory (``pipeline_memory_to_gpu``): the checkpoint as an HF state dict in pinned and in
pageable host memory, converted onto the GPU. Pipeline diagnosis (``diag_*``): preads into pinned memory alone, H2D alone, both overlapped, and
mmap windows registered with cudaHostRegister (needs cupy). ``convert_device``: hfnemo.convert with
--device cpu vs cuda on the 70B-shaped checkpoint.

Bandwidth counts bytes read + bytes written for D2D copy and every kernel (so a kernel as fast as
copy_ has ratio 1.0); H2D and the pipeline count bytes moved once (host -> device).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

GiB = 1 << 30


def log(msg: str) -> None:
    print(f"[bench_gpu] {msg}", file=sys.stderr, flush=True)


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def best_ms(fn, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b))
    return best


def kernels(repeat: int, sweep: bool = True) -> None:
    """sweep=False: time the backend defaults only (e.g. an earlier version of the module)."""
    from hfnemo.kernels.torch_ref import TorchBackend
    from hfnemo.kernels.triton_backend import TritonBackend

    dev = torch.device("cuda")
    src = torch.randint(0, 256, (GiB,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    d2d_ms = best_ms(lambda: dst.copy_(src), repeat)
    d2d = 2 * GiB / d2d_ms / 1e6
    emit({"bench": "d2d_copy", "bytes": GiB, "best_ms": round(d2d_ms, 3), "GBps_rw": round(d2d, 1)})
    backends = {"triton": TritonBackend(), "torch": TorchBackend()}

    cases = []
    n = GiB // 4  # elements: 1 GiB of fp32
    f32 = torch.randn(n, device=dev)
    bf16 = f32.to(torch.bfloat16)
    f16 = f32.to(torch.float16)
    for name, s, dt in (("cast_f32_to_bf16", f32, torch.bfloat16), ("cast_bf16_to_f32", bf16, torch.float32),
                        ("cast_f16_to_bf16", f16, torch.bfloat16), ("cast_bf16_to_f16", bf16, torch.float16),
                        ("cast_f32_to_f16", f32, torch.float16)):
        out = torch.empty(n, dtype=dt, device=dev)
        rw = s.numel() * s.element_size() + out.numel() * out.element_size()
        cases.append((name, rw, lambda b, s=s, out=out: b.cast(out, s)))
    # gather: a QKV-interleave-shaped assembly of 1 GiB (16 MiB q + 2 MiB k + 2 MiB v per group),
    # and the same bytes as 64 KiB pieces
    q, k, v = (torch.randint(0, 256, (m,), dtype=torch.uint8, device=dev) for m in (GiB * 8 // 10, GiB // 10,
                                                                                   GiB // 10))
    pieces, pos = [], 0
    qs, ks = 16 << 20, 2 << 20
    for g in range(GiB // (qs + 2 * ks)):
        for t, sz in ((q, qs), (k, ks), (v, ks)):
            pieces.append((pos, t, g * sz, sz))
            pos += sz
    gdst = torch.empty(pos, dtype=torch.uint8, device=dev)
    cases.append(("gather_qkv_16MiB_pieces", 2 * pos, lambda b: b.gather(gdst, pieces)))
    small = [(i * 65536, src, (i * 7919 % 16384) * 65536, 65536) for i in range(GiB // 65536)]
    cases.append(("gather_64KiB_pieces", 2 * GiB, lambda b: b.gather(dst, small)))
    odd = [(i * 65533, src, (i * 7919 % 16384) * 65536 + 3, 65533) for i in range(GiB // 65536)]
    cases.append(("gather_64KiB_unaligned", 2 * 65533 * len(odd), lambda b: b.gather(dst, odd)))
    # slice_cols: half the columns of 16 KiB rows (a row-parallel TP=2 shard), 1 GiB out
    rows = GiB // 8192
    big = torch.randint(0, 256, (rows * 16384,), dtype=torch.uint8, device=dev)
    cases.append(("slice_cols_16KiB_rows_half", 2 * rows * 8192,
                  lambda b: b.slice_cols(dst, big, rows, 16384, 8192, 8192)))
    cases.append(("slice_cols_512B_rows_quarter", 2 * (GiB // 4),
                  lambda b: b.slice_cols(dst, big, GiB // 512, 512, 256, 128)))
    import hfnemo.kernels.triton_backend as tb
    default = dict(tb.CONFIG)
    tuned = dict(tb.CAST_TUNED)  # the per-pair table is the "default"; the sweep runs without it
    cast_cfgs = [dict(cast_block=bl, cast_warps=w, evict=e) for bl, w, e in
                 ((4096, 8, True), (4096, 8, False), (8192, 8, True), (16384, 8, True), (2048, 4, True),
                  (4096, 4, True))]
    copy_cfgs = [dict(tile_bytes=t, copy_warps=w, evict=e) for t, w, e in
                 ((8192, 8, True), (16384, 8, True), (16384, 8, False), (32768, 8, True), (8192, 4, True))]
    if not sweep:
        cast_cfgs, copy_cfgs = cast_cfgs[:1], copy_cfgs[:1]
    for name, rw, fn in cases:
        row = {"bench": name, "bytes_rw": rw}
        for bname, b in backends.items():
            if bname == "triton":
                cfgs = cast_cfgs if name.startswith("cast") else copy_cfgs
                sweep = []
                tb.CAST_TUNED.clear()
                for cfg in cfgs:
                    tb.CONFIG.update(default)
                    tb.CONFIG.update(cfg)
                    ms = best_ms(lambda: fn(b), repeat)
                    sweep.append((ms, cfg))
                tb.CONFIG.update(default)
                tb.CAST_TUNED.update(tuned)
                ms_def = best_ms(lambda: fn(b), repeat)
                row["triton_default_cfg_ms"] = round(ms_def, 3)
                row["triton_default_ratio_d2d"] = round(rw / ms_def / 1e6 / d2d, 3)
                row["sweep"] = [{**c, "ms": round(m, 3), "ratio_d2d": round(rw / m / 1e6 / d2d, 3)} for m, c in sweep]
                ms, cfg = min(sweep, key=lambda x: x[0])
                row["best_cfg"] = cfg
            else:
                ms = best_ms(lambda: fn(b), repeat)
            gbps = rw / ms / 1e6
            row[f"{bname}_ms"] = round(ms, 3)
            row[f"{bname}_GBps"] = round(gbps, 1)
            row[f"{bname}_ratio_d2d"] = round(gbps / d2d, 3)
        if name.startswith("gather"):  # host side (piece table) and the kernel alone
            tb_b = backends["triton"]
            pcs = {"gather_qkv_16MiB_pieces": pieces, "gather_64KiB_pieces": small,
                   "gather_64KiB_unaligned": odd}[name]
            gd = gdst if name.startswith("gather_qkv") else dst
            host = []
            for _ in range(repeat):
                torch.cuda.synchronize()
                t = time.perf_counter()
                prep = tb_b.gather_prepare(gd, pcs)
                torch.cuda.synchronize()
                host.append(time.perf_counter() - t)
            kms = best_ms(lambda: tb_b.gather_launch(prep), repeat)
            row.update(pieces=len(pcs), host_prepare_ms=round(min(host) * 1e3, 3),
                       host_us_per_piece=round(min(host) * 1e6 / len(pcs), 3), kernel_ms=round(kms, 3),
                       kernel_GBps=round(rw / kms / 1e6, 1), kernel_ratio_d2d=round(rw / kms / 1e6 / d2d, 3))
        emit(row)
    del src, dst, f32, bf16, f16, q, k, v, gdst, big
    torch.cuda.empty_cache()


def h2d(repeat: int) -> float:
    host = torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
    host.fill_(7)
    dev = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    ms = best_ms(lambda: dev.copy_(host, non_blocking=True), repeat)
    gbps = GiB / ms / 1e6
    emit({"bench": "h2d_pinned", "bytes": GiB, "best_ms": round(ms, 3), "GBps": round(gbps, 2)})
    pageable = torch.empty(GiB, dtype=torch.uint8)
    pageable.fill_(7)
    ms2 = best_ms(lambda: dev.copy_(pageable), max(2, repeat // 3), warmup=1)
    emit({"bench": "h2d_pageable", "bytes": GiB, "best_ms": round(ms2, 3), "GBps": round(GiB / ms2 / 1e6, 2)})
    return gbps


def pipeline(cache: Path, h2d_gbps: float, repeat: int, max_memory: str) -> None:
    import bench_convert
    import hfnemo
    from hfnemo.exec.gpu import iter_tensors_to_device
    from hfnemo.exec.sources import RowReader

    t0 = time.perf_counter()
    src = bench_convert.ensure_checkpoint(cache, bench_convert.SHAPES["full"], 2)
    log(f"checkpoint {src} ready in {time.perf_counter() - t0:.1f} s")
    files = sorted(src.glob("*.safetensors"))
    t0 = time.perf_counter()
    total = 0
    for f in files:  # into the page cache
        with open(f, "rb", buffering=0) as fh:
            while True:
                b = fh.read(64 << 20)
                if not b:
                    break
                total += len(b)
    log(f"page cache warm: {total / 1e9:.2f} GB read in {time.perf_counter() - t0:.1f} s")
    def run_once(plan, mm=None, **kw):
        reader = RowReader()
        stats: dict = {}
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _key, _off, tensor in iter_tensors_to_device(plan, reader, "cuda", max_memory=mm or max_memory,
                                                         stats=stats, **kw):
            del tensor
        torch.cuda.synchronize()
        secs = time.perf_counter() - t
        reader.close()
        return secs, stats

    def rnd(stats):
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items()}

    for dtype in ("auto", "fp16"):
        plan = hfnemo.api.plan(src, to="nemo", dtype=dtype, max_memory="64GiB")
        results: dict = {"pread": [], "mmap": []}
        for _ in range(repeat):  # the two source paths alternate, same page cache
            for source in results:
                results[source].append(run_once(plan, source=source))
        for source, res in results.items():
            secs, stats = min(res, key=lambda r: r[0])
            gbps = plan.read_bytes / secs / 1e9
            emit({"bench": f"pipeline_to_gpu_{dtype}", "source": source, "read_bytes": plan.read_bytes,
                  "out_bytes": plan.write_bytes, "items": len(plan.items), "best_s": round(secs, 3),
                  "all_s": [round(r[0], 3) for r in res], "GBps_read": round(gbps, 2),
                  "ratio_h2d_pinned": round(gbps / h2d_gbps, 3), "max_memory": max_memory, **rnd(stats)})
    # sensitivity of the mmap path: window size and registration threads under the same budget
    plan = hfnemo.api.plan(src, to="nemo", dtype="auto", max_memory="64GiB")
    for window, threads in ((128 << 20, 1), (128 << 20, 2), (128 << 20, 4), (256 << 20, 4)):
        try:
            res = [run_once(plan, source="mmap", window_bytes=window, map_threads=threads) for _ in range(2)]
        except Exception as e:  # noqa: BLE001 - e.g. a window that does not fit the budget
            emit({"bench": "pipeline_to_gpu_mmap_variant", "window_bytes": window, "map_threads": threads,
                  "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        secs, stats = min(res, key=lambda r: r[0])
        gbps = plan.read_bytes / secs / 1e9
        emit({"bench": "pipeline_to_gpu_mmap_variant", "window_bytes": window, "map_threads": threads,
              "best_s": round(secs, 3), "GBps_read": round(gbps, 2), "ratio_h2d_pinned": round(gbps / h2d_gbps, 3),
              **rnd(stats)})
    # the budget still bounds what is resident: the mmap path at 1 GiB
    try:
        res = [run_once(plan, mm="1GiB", source="mmap") for _ in range(2)]
        secs, stats = min(res, key=lambda r: r[0])
        gbps = plan.read_bytes / secs / 1e9
        emit({"bench": "pipeline_to_gpu_mmap_variant", "max_memory_override": "1GiB", "best_s": round(secs, 3),
              "GBps_read": round(gbps, 2), "ratio_h2d_pinned": round(gbps / h2d_gbps, 3), **rnd(stats)})
    except Exception as e:  # noqa: BLE001
        emit({"bench": "pipeline_to_gpu_mmap_variant", "error": f"{type(e).__name__}: {e}"[:300]})
    # the pread path's sensitivity (as before)
    for threads, depth, block in ((16, 16, 32 << 20),):
        best = float("inf")
        for _ in range(2):
            reader = RowReader()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _key, _off, tensor in iter_tensors_to_device(plan, reader, "cuda", max_memory=max_memory,
                                                             read_threads=threads, depth=depth, block_bytes=block,
                                                             source="pread"):
                del tensor
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
            reader.close()
        gbps = plan.read_bytes / best / 1e9
        emit({"bench": "pipeline_to_gpu_variant", "source": "pread", "read_threads": threads, "depth": depth,
              "block_bytes": block, "best_s": round(best, 3), "GBps_read": round(gbps, 2),
              "ratio_h2d_pinned": round(gbps / h2d_gbps, 3)})


def pipeline_memory(cache: Path, h2d_gbps: float, repeat: int, max_memory: str) -> None:
    """An HF state dict already in host memory onto the GPU (the refit path of a training job):
    the tensors pinned (copied to the device in place, strided copies for TP column windows) and
    pageable (through the pinned slots), against the pinned H2D bandwidth of the same run."""
    import bench_convert
    import hfnemo
    import hfnemo.api
    from hfnemo.exec.gpu import iter_tensors_to_device
    from safetensors.torch import load_file

    src = bench_convert.ensure_checkpoint(cache, bench_convert.SHAPES["full"], 2)
    t0 = time.perf_counter()
    pageable: dict = {}
    for f in sorted(src.glob("*.safetensors")):  # anonymous memory (load_file maps the file)
        pageable.update({k: v.clone() for k, v in load_file(str(f)).items()})
    t1 = time.perf_counter()
    pinned = {k: v.pin_memory() for k, v in pageable.items()}
    t2 = time.perf_counter()
    total = sum(v.nbytes for v in pageable.values())
    log(f"state dict: {total / 1e9:.2f} GB loaded in {t1 - t0:.1f} s, pinned copy in {t2 - t1:.1f} s")
    emit({"bench": "memory_state_dict", "bytes": total, "tensors": len(pageable), "load_s": round(t1 - t0, 2),
          "pin_s": round(t2 - t1, 2)})

    def run_once(job, **kw):
        stats: dict = {}
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _key, _off, tensor in iter_tensors_to_device(job.plan, job.reader, "cuda", max_memory=max_memory,
                                                         stats=stats, **kw):
            del tensor
        torch.cuda.synchronize()
        return time.perf_counter() - t, stats

    ondev = {k: v.cuda() for k, v in pageable.items()}  # a state dict already on the GPU
    a = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    d2d_gbps = GiB / best_ms(lambda: b.copy_(a), 10) / 1e6  # bytes copied a second (each read once, written once)
    del a, b
    emit({"bench": "d2d_copy", "bytes": GiB, "GBps_copied": round(d2d_gbps, 1)})
    for dtype, tp in (("auto", 1), ("fp16", 1), ("auto", 8), ("fp16", 8)):
        for name, sd in (("pinned", pinned), ("pageable", pageable), ("device", ondev)):
            job = hfnemo.api._memory_job(sd, src, dtype, "64GiB", tp, allow_cuda=True)
            res = [run_once(job) for _ in range(repeat)]
            secs, stats = min(res, key=lambda r: r[0])
            gbps = job.plan.read_bytes / secs / 1e9
            ratio = ({"ratio_d2d_copy": round(gbps / d2d_gbps, 3)} if name == "device"
                     else {"ratio_h2d_pinned": round(gbps / h2d_gbps, 3)})
            emit({"bench": "pipeline_memory_to_gpu", "memory": name, "dtype": dtype, "tp": tp,
                  "read_bytes": job.plan.read_bytes, "out_bytes": job.plan.write_bytes, "items": len(job.plan.items),
                  "best_s": round(secs, 4), "all_s": [round(r[0], 4) for r in res], "GBps_read": round(gbps, 2),
                  **ratio, "max_memory": max_memory,
                  **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()}})
    del ondev
    # the public call, planning included
    best = float("inf")
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _name, tensor in hfnemo.iter_tensors(pinned, to="nemo", config=src, device="cuda", max_memory=max_memory):
            del tensor
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    gbps = total / best / 1e9
    emit({"bench": "iter_tensors_state_dict_cuda", "memory": "pinned", "best_s": round(best, 4),
          "GBps_read": round(gbps, 2), "ratio_h2d_pinned": round(gbps / h2d_gbps, 3)})
    del pinned, pageable


def _plan_reads(plan, piece: int):
    """Every (source, r0, r1, nbytes) read of the plan, cut into about ``piece`` bytes."""
    from hfnemo.dtypes import BY_NAME
    from hfnemo.plan.planner import source_row_bytes

    sources = {x.name: x for x in plan.sources}
    out = []
    for it in plan.items:
        for seg in it.segments:
            if seg.source is None:
                continue
            src = sources[seg.source]
            rb = source_row_bytes(it, seg, sources)
            step = max(1, piece // max(rb, 1))
            for k in range(0, seg.rows, step):
                m = min(step, seg.rows - k)
                out.append((src, seg.src_row + k, seg.src_row + k + m, m * rb))
    return out


def pipeline_diag(src_dir: Path, h2d_gbps: float) -> None:
    """What limits iter_tensors_to_device: preads into pinned slots alone (no GPU), H2D of the
    same bytes alone, and mmap windows registered with cudaHostRegister then copied (no pread)."""
    import hfnemo
    from concurrent.futures import ThreadPoolExecutor
    from hfnemo.exec.sources import RowReader

    plan = hfnemo.api.plan(src_dir, to="nemo", dtype="auto", max_memory="64GiB")
    total = plan.read_bytes
    slots = [torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True) for _ in range(16)]
    for threads, piece in ((4, 8 << 20), (8, 8 << 20), (16, 8 << 20), (16, 2 << 20), (16, 32 << 20), (32, 8 << 20)):
        reads = _plan_reads(plan, piece)
        reader = RowReader()
        views = [memoryview(x.numpy()) for x in slots]

        def job(i, r):
            src, r0, r1, n = r
            v = views[i % len(views)]
            off = (i * piece) % ((64 << 20) - n + 1) if n < (64 << 20) else 0
            reader.read_rows(src, r0, r1, v[off:off + n]) if n <= (64 << 20) else None
            return n
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                moved = sum(pool.map(job, range(len(reads)), reads))
            best = min(best, time.perf_counter() - t)
        reader.close()
        emit({"bench": "diag_pread_to_pinned", "threads": threads, "piece": piece, "bytes": moved,
              "best_s": round(best, 3), "GBps": round(moved / best / 1e9, 2),
              "ratio_h2d_pinned": round(moved / best / 1e9 / h2d_gbps, 3)})
    # H2D alone: the same byte count from 16 pinned 64 MiB slots, back to back on one stream
    dev = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    nblk = -(-total // (64 << 20))

    def h2d_all():
        for i in range(nblk):
            dev.copy_(slots[i % 16], non_blocking=True)
    ms = best_ms(h2d_all, 3, warmup=1)
    emit({"bench": "diag_h2d_64MiB_slots", "bytes": nblk << 26, "best_ms": round(ms, 3),
          "GBps": round((nblk << 26) / ms / 1e6, 2)})
    # read + H2D overlapped without the pipeline's bookkeeping: each thread preads a 64 MiB slot
    # and queues its copy on its own stream
    reads = _plan_reads(plan, 64 << 20)
    big = [r for r in reads if r[3] <= (64 << 20)]
    reader = RowReader()
    streams = [torch.cuda.Stream() for _ in range(16)]
    devs = [torch.empty(64 << 20, dtype=torch.uint8, device="cuda") for _ in range(16)]

    def rw(i, r):
        src, r0, r1, n = r
        k = i % 16
        streams[k].synchronize()
        reader.read_rows(src, r0, r1, memoryview(slots[k].numpy())[:n])
        with torch.cuda.stream(streams[k]):
            devs[k][:n].copy_(slots[k][:n], non_blocking=True)
        return n
    for threads in (8, 16):
        best = float("inf")
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                # thread i owns slots i, i+threads, ...: no two threads share a slot
                moved = 0
                futs = []
                for j in range(threads):
                    futs.append(pool.submit(lambda j=j: sum(rw(i, big[i]) for i in range(j, len(big), threads)
                                                            if i % 16 % threads == j % threads or threads == 16)))
                moved = sum(f.result() for f in futs)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        emit({"bench": "diag_pread_plus_h2d", "threads": threads, "bytes": moved, "best_s": round(best, 3),
              "GBps": round(moved / best / 1e9, 2), "ratio_h2d_pinned": round(moved / best / 1e9 / h2d_gbps, 3)})
    reader.close()
    # mmap + cudaHostRegister (read-only) windows of the page-cached files, then H2D from them
    try:
        import ctypes
        import mmap as _mmap
        import cupy

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        rt = cupy.cuda.runtime
        for window in (64 << 20, 256 << 20):
            reg_s = copy_s = 0.0
            moved = 0
            t_all = time.perf_counter()
            dbuf = torch.empty(window, dtype=torch.uint8, device="cuda")
            stream = torch.cuda.current_stream().cuda_stream
            for f in sorted(src_dir.glob("*.safetensors")):
                size = f.stat().st_size
                fd = os.open(f, os.O_RDONLY)
                for off in range(0, size - window + 1, window):
                    addr = libc.mmap(None, window, _mmap.PROT_READ, _mmap.MAP_SHARED, fd, off)
                    t = time.perf_counter()
                    rt.hostRegister(addr, window, 8 | 2)  # ReadOnly | Mapped
                    reg_s += time.perf_counter() - t
                    t = time.perf_counter()
                    rt.memcpyAsync(dbuf.data_ptr(), addr, window, 1, stream)
                    torch.cuda.synchronize()
                    copy_s += time.perf_counter() - t
                    t = time.perf_counter()
                    rt.hostUnregister(addr)
                    reg_s += time.perf_counter() - t
                    libc.munmap(addr, window)
                    moved += window
                os.close(fd)
            wall = time.perf_counter() - t_all
            emit({"bench": "diag_mmap_hostregister", "window": window, "bytes": moved,
                  "register_unregister_s": round(reg_s, 3), "copy_s": round(copy_s, 3), "wall_s": round(wall, 3),
                  "GBps_wall": round(moved / wall / 1e9, 2), "GBps_copy_only": round(moved / copy_s / 1e9, 2),
                  "GBps_register_only": round(moved / reg_s / 1e9, 2)})
    except Exception as e:  # noqa: BLE001
        emit({"bench": "diag_mmap_hostregister", "error": f"{type(e).__name__}: {e}"[:300]})
    del slots, dev, devs
    torch.cuda.empty_cache()


def convert_device(src_dir: Path, out_root: Path, deadline: float) -> None:
    """File conversion with the kernels on the CPU vs on the GPU (--device cpu/cuda), same plan."""
    import shutil
    import hfnemo
    from hfnemo.kernels import get_backend

    cpu_backend = get_backend("auto").name
    for dtype, tp in (("fp16", 1), ("auto", 2), ("fp16", 2)):
        row = {"bench": "convert_device", "dtype": dtype, "tp": tp, "cpu_backend": cpu_backend}
        for device in ("cpu", "cuda"):
            if time.perf_counter() > deadline:
                row[f"{device}_s"] = "skipped (time)"
                continue
            out = out_root / f"conv_{device}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            r = hfnemo.convert(src_dir, out, to="nemo", dtype=dtype, tp=tp, device=device, max_memory="8GiB",
                               overwrite=True)
            secs = time.perf_counter() - t
            row[f"{device}_s"] = round(secs, 3)
            row[f"{device}_GBps_written"] = round(r.bytes_written / secs / 1e9, 2)
            row["bytes_written"] = r.bytes_written
            shutil.rmtree(out, ignore_errors=True)
        emit(row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--pipeline-repeat", type=int, default=3)
    ap.add_argument("--max-memory", default="2GiB", help="pipeline budget: pinned + device staging")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-diag", action="store_true")
    ap.add_argument("--skip-convert", action="store_true")
    ap.add_argument("--skip-memory", action="store_true", help="skip the in-memory state dict pipeline")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="skip later convert runs past this many s")
    args = ap.parse_args(argv)
    import triton

    p = torch.cuda.get_device_properties(0)
    emit({"bench": "machine", "device": torch.cuda.get_device_name(0), "sms": p.multi_processor_count,
          "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
          "cpus": os.cpu_count()})
    if not args.skip_kernels:
        kernels(args.repeat)
    gbps = h2d(args.repeat)
    t_start = time.perf_counter()
    if not args.skip_pipeline:
        args.cache.mkdir(parents=True, exist_ok=True)
        pipeline(args.cache, gbps, args.pipeline_repeat, args.max_memory)
    if not args.skip_memory:
        args.cache.mkdir(parents=True, exist_ok=True)
        pipeline_memory(args.cache, gbps, max(3, args.pipeline_repeat), args.max_memory)
    if not (args.skip_diag and args.skip_convert):
        import bench_convert
        src = bench_convert.ensure_checkpoint(args.cache, bench_convert.SHAPES["full"], 2)
        if not args.skip_diag:
            pipeline_diag(src, gbps)
        if not args.skip_convert:
            convert_device(src, args.cache, t_start + args.deadline_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
