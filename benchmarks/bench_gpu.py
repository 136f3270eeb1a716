#!/usr/bin/env python3
"""GPU benchmark: the Triton kernels against device-to-device copy, pinned H2D bandwidth, and the
plan -> GPU pipeline (``hfnemo.exec.gpu.iter_tensors_to_device``) against that H2D bandwidth.

Not a test. One JSON object per line on stdout (progress on stderr):

    PYTHONPATH=src python benchmarks/bench_gpu.py [--cache DIR] [--repeat N] [--skip-pipeline]

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


def kernels(repeat: int) -> None:
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
    for name, rw, fn in cases:
        row = {"bench": name, "bytes_rw": rw}
        for bname, b in backends.items():
            ms = best_ms(lambda: fn(b), repeat)
            gbps = rw / ms / 1e6
            row[f"{bname}_ms"] = round(ms, 3)
            row[f"{bname}_GBps"] = round(gbps, 1)
            row[f"{bname}_ratio_d2d"] = round(gbps / d2d, 3)
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
    for dtype in ("auto", "fp16"):
        plan = hfnemo.api.plan(src, to="nemo", dtype=dtype, max_memory="64GiB")
        results = []
        for _ in range(repeat if dtype == "auto" else 1):
            reader = RowReader()
            stats: dict = {}
            torch.cuda.synchronize()
            t = time.perf_counter()
            n = 0
            for _key, _off, tensor in iter_tensors_to_device(plan, reader, "cuda", max_memory=max_memory,
                                                             stats=stats):
                n += tensor.numel() * tensor.element_size()
                del tensor
            torch.cuda.synchronize()
            secs = time.perf_counter() - t
            reader.close()
            results.append((secs, stats))
        secs, stats = min(results, key=lambda r: r[0])
        read = plan.read_bytes
        gbps = read / secs / 1e9
        emit({"bench": f"pipeline_to_gpu_{dtype}", "read_bytes": read, "out_bytes": plan.write_bytes,
              "items": len(plan.items), "best_s": round(secs, 3), "all_s": [round(r[0], 3) for r in results],
              "GBps_read": round(gbps, 2), "ratio_h2d_pinned": round(gbps / h2d_gbps, 3),
              "max_memory": max_memory, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items()}})
    # sensitivity: read threads, slots and slot size under the same budget (2 runs each, best)
    plan = hfnemo.api.plan(src, to="nemo", dtype="auto", max_memory="64GiB")
    for threads, depth, block in ((8, 8, 64 << 20), (16, 16, 32 << 20), (16, 32, 16 << 20), (12, 4, 64 << 20)):
        best = float("inf")
        for _ in range(2):
            reader = RowReader()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _key, _off, tensor in iter_tensors_to_device(plan, reader, "cuda", max_memory=max_memory,
                                                             read_threads=threads, depth=depth, block_bytes=block):
                del tensor
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
            reader.close()
        gbps = plan.read_bytes / best / 1e9
        emit({"bench": "pipeline_to_gpu_variant", "read_threads": threads, "depth": depth, "block_bytes": block,
              "best_s": round(best, 3), "GBps_read": round(gbps, 2), "ratio_h2d_pinned": round(gbps / h2d_gbps, 3)})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--pipeline-repeat", type=int, default=3)
    ap.add_argument("--max-memory", default="2GiB", help="pipeline budget: pinned + device staging")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    args = ap.parse_args(argv)
    import triton

    p = torch.cuda.get_device_properties(0)
    emit({"bench": "machine", "device": torch.cuda.get_device_name(0), "sms": p.multi_processor_count,
          "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
          "cpus": os.cpu_count()})
    if not args.skip_kernels:
        kernels(args.repeat)
    gbps = h2d(args.repeat)
    if not args.skip_pipeline:
        args.cache.mkdir(parents=True, exist_ok=True)
        pipeline(args.cache, gbps, args.pipeline_repeat, args.max_memory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
