#!/usr/bin/env python3
"""Throughput of the kernel backends (hfnemo.kernels) next to the machine's copy bandwidth.

Not a test. Prints one JSON object per line on stdout and a readable table on stderr.

    python benchmarks/bench_kernels.py                       # --device cpu, threads 1..cores
    python benchmarks/bench_kernels.py --threads 1,4 --size-mib 64 --repeat 3
    python benchmarks/bench_kernels.py --device all          # CPU, then the CUDA section

Bytes are counted as bytes read + bytes written, for the copy_ reference and for every kernel
alike (a 256 MiB copy_ moves 512 MiB; a bf16->fp32 cast of n elements moves 6n bytes), so
``ratio_to_copy`` = kernel GB/s / copy_ GB/s at the same thread count is a fraction of the memory
bandwidth the machine shows in this very run. GB/s is 1e9 bytes per second; every number is
the best of --repeat timed runs after one warm-up run.

CPU records (``"section": "cpu"``):
  {"kind": "meta", ...}                                     machine, versions, build flags
  {"kind": "copy", "threads": t, "gbps": ...}               torch uint8 copy_ of --size-mib MiB
  {"kind": "kernel", "kernel": k, "backend": b, "threads": t, "gbps": ..., "ratio_to_copy": ...}

Kernels (Llama-3-70B shapes, bf16 weights, scaled by --size-mib / 256):
  cast_bf16_fp32, cast_fp32_bf16, cast_fp16_fp32, cast_fp32_fp16  n = size / 4 elements
  gather_qkv       NeMo's fused QKV from q, k, v: 8 groups of (8 q heads, 1 k, 1 v), head_dim 128
  slice_cols_tp{2,4,8}  one row-parallel shard of down_proj rows (ffn 28672 bf16 per row)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

MiB = 1 << 20


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def best_of(fn: Callable[[], None], repeat: int) -> float:
    fn()  # warm-up: page faults, caches, thread start-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------- CPU

def cpu_kernels(size: int):
    """(name, bytes moved, setup) where setup() returns run(backend) -> None; buffers are built
    (and faulted in) by setup so that only the kernel is timed."""
    g = torch.Generator().manual_seed(0)
    n = size // 4
    scale = size / (256 * MiB)

    def cast_case(src_dt, dst_dt):
        def setup():
            src = (torch.randn(n, generator=g) * 0.02).to(src_dt)
            dst = torch.zeros(n, dtype=dst_dt)
            return lambda be: be.cast(dst, src)
        return setup, n * (torch.finfo(src_dt).bits + torch.finfo(dst_dt).bits) // 8

    cases = []
    for name, s, d in (("cast_bf16_fp32", torch.bfloat16, torch.float32),
                       ("cast_fp32_bf16", torch.float32, torch.bfloat16),
                       ("cast_fp16_fp32", torch.float16, torch.float32),
                       ("cast_fp32_fp16", torch.float32, torch.float16)):
        setup, nbytes = cast_case(s, d)
        cases.append((name, nbytes, setup))

    # QKV: hidden 8192 (scaled), 64 q heads, 8 kv groups, head_dim 128, bf16 rows of `hidden`.
    hidden = max(128, int(8192 * scale) // 64 * 64)
    head = 128 * hidden * 2
    q_bytes, kv_bytes = 8 * 8 * head, 8 * head

    def setup_qkv():
        q = torch.randint(0, 256, (q_bytes,), dtype=torch.uint8, generator=g)
        k = torch.randint(0, 256, (kv_bytes,), dtype=torch.uint8, generator=g)
        v = torch.randint(0, 256, (kv_bytes,), dtype=torch.uint8, generator=g)
        fused = torch.zeros(q_bytes + 2 * kv_bytes, dtype=torch.uint8)
        pieces, pos = [], 0
        for grp in range(8):
            for src, off, nb in ((q, grp * 8 * head, 8 * head), (k, grp * head, head), (v, grp * head, head)):
                pieces.append((pos, src, off, nb))
                pos += nb
        return lambda be: be.gather(fused, pieces)

    cases.append(("gather_qkv", 2 * (q_bytes + 2 * kv_bytes), setup_qkv))

    row_bytes = 28672 * 2
    rows = max(1, size // row_bytes)
    for tp in (2, 4, 8):
        col = row_bytes // tp

        def setup_slice(col=col, tp=tp):
            src = torch.randint(0, 256, (rows * row_bytes,), dtype=torch.uint8, generator=g)
            dst = torch.zeros(rows * col, dtype=torch.uint8)
            off = (tp // 2) * col  # a middle shard
            return lambda be: be.slice_cols(dst, src, rows, row_bytes, off, col)

        cases.append((f"slice_cols_tp{tp}", 2 * rows * col, setup_slice))
    return cases


def bench_cpu(args) -> list[dict]:
    from hfnemo.kernels import get_backend

    backends = []
    for name in args.backends.split(","):
        try:
            backends.append(get_backend(name))
        except ImportError as e:
            print(f"bench_kernels: backend {name!r} unavailable ({e}); skipped", file=sys.stderr)
    try:
        from hfnemo import _C
        build = _C.build_info()
    except ImportError:
        build = None
    threads = [int(t) for t in args.threads.split(",")] if args.threads else list(range(1, usable_cores() + 1))
    size = args.size_mib * MiB
    emit({"section": "cpu", "kind": "meta", "cpu": cpu_name(), "cores": usable_cores(), "torch": torch.__version__,
          "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "hfnemo_C_build": build,
          "size_mib": args.size_mib, "repeat": args.repeat, "threads": threads,
          "bytes": "read + written, copy_ and kernels alike; GB = 1e9 bytes"})

    src = torch.randint(0, 256, (size,), dtype=torch.uint8)
    dst = torch.zeros(size, dtype=torch.uint8)
    copy_gbps: dict[int, float] = {}
    for t in threads:
        torch.set_num_threads(t)
        sec = best_of(lambda: dst.copy_(src), args.repeat)
        copy_gbps[t] = 2 * size / sec / 1e9
        emit({"section": "cpu", "kind": "copy", "what": f"torch uint8 copy_ of {args.size_mib} MiB", "threads": t,
              "bytes": 2 * size, "seconds": sec, "gbps": round(copy_gbps[t], 3)})
    del src, dst

    records = []
    only = set(args.only.split(",")) if args.only else None
    for name, nbytes, setup in cpu_kernels(size):
        if only and name not in only:
            continue
        run = setup()
        for be in backends:
            for t in threads:
                be.set_threads(t)
                sec = best_of(lambda: run(be), args.repeat)
                gbps = nbytes / sec / 1e9
                rec = {"section": "cpu", "kind": "kernel", "kernel": name, "backend": be.name, "threads": t,
                       "bytes": nbytes, "seconds": sec, "gbps": round(gbps, 3),
                       "copy_gbps": round(copy_gbps[t], 3), "ratio_to_copy": round(gbps / copy_gbps[t], 3)}
                emit(rec)
                records.append(rec)
        del run
    torch.set_num_threads(usable_cores())

    # readable table on stderr
    cols = [(be.name, t) for be in backends for t in threads]
    head = f"{'kernel':<16}" + "".join(f"{b + ' t=' + str(t):>18}" for b, t in cols)
    lines = ["", "GB/s (read + written) and ratio to copy_ at the same thread count", head,
             f"{'copy_':<16}" + "".join(f"{copy_gbps[t]:>11.2f}       " for _, t in cols)]
    by = {(r["kernel"], r["backend"], r["threads"]): r for r in records}
    for name in dict.fromkeys(r["kernel"] for r in records):
        cells = []
        for b, t in cols:
            r = by.get((name, b, t))
            cells.append(f"{r['gbps']:>11.2f} ({r['ratio_to_copy']:.2f})" if r else f"{'-':>18}")
        lines.append(f"{name:<16}" + "".join(cells))
    print("\n".join(lines), file=sys.stderr)
    return records


# --------------------------------------------------------------------------------------- CUDA

def bench_cuda(args) -> list[dict]:
    # ===================================================================================
    # GPU SECTION -- NOT IMPLEMENTED YET (to be added with the Triton backend).
    # Same contract as bench_cpu: emit {"section": "cuda", ...} JSON lines, the device copy_
    # bandwidth measured in the same run, bytes = read + written, ratio_to_copy per kernel.
    # ===================================================================================
    raise NotImplementedError("bench_kernels: the CUDA section is not written yet")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="cpu")
    ap.add_argument("--threads", default="", help="comma-separated CPU thread counts (default 1..cores)")
    ap.add_argument("--size-mib", type=int, default=256, help="copy_ buffer and kernel scale (default 256)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per number, best kept (default 5)")
    ap.add_argument("--backends", default="cpp,torch", help="CPU backends (default cpp,torch)")
    ap.add_argument("--only", default="", help="comma-separated kernel names")
    args = ap.parse_args(argv)
    if args.device in ("cpu", "all"):
        bench_cpu(args)
    if args.device in ("cuda", "all"):
        bench_cuda(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
