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

CUDA records (``"section": "cuda"``, --device cuda|all): every kernel of the Triton backend and of
the torch reference against a device-to-device ``copy_`` of the same number of bytes, timed in the
same repetition (batches of --batch launches behind a sleep kernel, CUDA events; the order rotates
each repetition); median and best of the per-repetition ratios:
  {"kind": "kernel", "kernel": k, "backend": b, "gbps": ..., "d2d_gbps": ..., "ratio_to_copy": ..., "ratio_best": ...}
GPU cases (scale 4 x --size-mib): the six float casts, the 70B fused-QKV gather, gathers of 64 KiB
and of 2-byte-aligned 65534-byte pieces, and row-parallel column cuts of 56/16/8 KiB and 512 B rows.

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

def _cuda_batch_ms(fn: Callable[[], None], batch: int) -> float:
    """Milliseconds per launch of ``batch`` back-to-back launches, timed with CUDA events. A
    sleep kernel queued first keeps the GPU busy while the host enqueues the launches, so host
    launch overhead (Python, argument checks) is hidden and the number is device time."""
    torch.cuda._sleep(2_000_000)  # ~1 ms at H100 clocks
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(batch):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / batch


def cuda_kernels(scale: int):
    """(name, bytes read + written, setup) for the GPU cases; setup() -> run(backend) and the
    number of bytes the same-bytes D2D copy moves (= bytes read + written)."""
    dev = torch.device("cuda")
    cases = []
    n = scale // 4
    pairs = (("cast_f32_bf16", torch.float32, torch.bfloat16), ("cast_bf16_f32", torch.bfloat16, torch.float32),
             ("cast_f16_bf16", torch.float16, torch.bfloat16), ("cast_bf16_f16", torch.bfloat16, torch.float16),
             ("cast_f32_f16", torch.float32, torch.float16), ("cast_f16_f32", torch.float16, torch.float32))
    for name, sd, dd in pairs:
        def setup(sd=sd, dd=dd):
            src = torch.randn(n, device=dev).to(sd)
            out = torch.empty(n, dtype=dd, device=dev)
            return lambda be: be.cast(out, src)
        cases.append((name, n * (sd.itemsize + dd.itemsize), setup))
    # NeMo's fused QKV of a 70B layer (8 groups of 8 q heads + 1 k + 1 v, head_dim 128, hidden 8192, bf16)
    # repeated to the scale: pieces of 16 MiB and 2 MiB
    hd_rows = 128 * 8192 * 2
    per_layer = 8 * (8 + 2) * hd_rows
    layers = max(1, scale // per_layer)

    def setup_qkv():
        q = torch.randint(0, 256, (layers * 64 * hd_rows,), dtype=torch.uint8, device=dev)
        k = torch.randint(0, 256, (layers * 8 * hd_rows,), dtype=torch.uint8, device=dev)
        v = torch.randint(0, 256, (layers * 8 * hd_rows,), dtype=torch.uint8, device=dev)
        out = torch.empty(layers * per_layer, dtype=torch.uint8, device=dev)
        pieces, pos = [], 0
        for g in range(layers * 8):
            pieces += [(pos, q, g * 8 * hd_rows, 8 * hd_rows), (pos + 8 * hd_rows, k, g * hd_rows, hd_rows),
                       (pos + 9 * hd_rows, v, g * hd_rows, hd_rows)]
            pos += 10 * hd_rows
        return _gather_run(out, pieces)
    cases.append(("gather_qkv", 2 * layers * per_layer, setup_qkv))
    for name, piece, skew in (("gather_64KiB_pieces", 1 << 16, 0), ("gather_65534B_pieces_2B_aligned", 65534, 2)):
        count = scale // (1 << 16)

        def setup_pieces(piece=piece, skew=skew, count=count):
            src = torch.randint(0, 256, (count * (1 << 16) + 64,), dtype=torch.uint8, device=dev)
            out = torch.empty(count * piece, dtype=torch.uint8, device=dev)
            pieces = [(i * piece, src, ((i * 7919) % count << 16) + skew, piece) for i in range(count)]
            return _gather_run(out, pieces)
        cases.append((name, 2 * count * piece, setup_pieces))
    # row-parallel column cuts of bf16 weights: (row bytes, window bytes)
    for name, row, col in (("slice_cols_tp2_56KiB_rows", 57344, 28672), ("slice_cols_tp8_56KiB_rows", 57344, 7168),
                           ("slice_cols_tp2_16KiB_rows", 16384, 8192), ("slice_cols_tp8_8KiB_rows", 8192, 1024),
                           ("slice_cols_512B_rows_quarter", 512, 128)):
        rows = max(1, scale // col)

        def setup_slice(row=row, col=col, rows=rows):
            src = torch.randint(0, 256, (rows * row,), dtype=torch.uint8, device=dev)
            out = torch.empty(rows * col, dtype=torch.uint8, device=dev)
            off = row // 2 if row >= 2 * col else 0  # a window from the middle of each row
            return lambda be: be.slice_cols(out, src, rows, row, off, col)
        cases.append((name, 2 * rows * col, setup_slice))
    return cases


def _gather_run(out, pieces):
    def run(be):
        if hasattr(be, "gather_prepare"):  # the Triton backend: the table is built once (host side)
            preps = run.__dict__.setdefault("preps", {})
            if be.name not in preps:
                preps[be.name] = be.gather_prepare(out, pieces)
            be.gather_launch(preps[be.name])
        else:
            be.gather(out, pieces)
    return run


class _Configured:
    """The Triton backend with launch-shape overrides (--sweep)."""

    def __init__(self, be, cfg: dict) -> None:
        self.be, self.cfg = be, cfg
        self.name = "triton_" + "_".join(f"{k.replace('gather_', 'g')}{v}" for k, v in cfg.items())

    def _with(self, fn, *a):
        from hfnemo.kernels import triton_backend as tb
        old, old_split = dict(tb.CONFIG), tb.GATHER_SPLIT
        tb.CONFIG.update({k: v for k, v in self.cfg.items() if k != "split"})
        tb.GATHER_SPLIT = self.cfg.get("split", old_split)
        try:
            return fn(*a)
        finally:
            tb.CONFIG.clear()
            tb.CONFIG.update(old)
            tb.GATHER_SPLIT = old_split

    def slice_cols(self, *a) -> None:
        self._with(self.be.slice_cols, *a)

    def gather_prepare(self, *a):
        return self._with(self.be.gather_prepare, *a)

    def gather_launch(self, prep) -> None:
        self.be.gather_launch(prep)


def bench_cuda(args) -> list[dict]:
    """Each GPU kernel against a device-to-device copy of the same number of bytes, measured in
    the same repetition (the order rotates each repetition so drift hits all alike); the median
    and best of the per-repetition ratios are reported. Triton backend and the torch reference."""
    import statistics

    from hfnemo.kernels import get_backend
    from hfnemo.kernels.torch_ref import TorchBackend

    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels --device cuda: no CUDA device")
    import triton

    backends = [get_backend("triton", device="cuda"), TorchBackend()]
    scale = args.size_mib * MiB * 4  # 1 GiB of bf16 at the default 256
    emit({"section": "cuda", "kind": "meta", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
          "triton": triton.__version__, "scale_bytes": scale, "repeat": args.repeat, "batch": args.batch,
          "bytes": "read + written, copy and kernels alike; GB = 1e9 bytes; ratio to a D2D copy_ of the same bytes"})
    only = set(args.only.split(",")) if args.only else None
    records = []
    for name, nbytes, setup in cuda_kernels(scale):
        if only and name not in only:
            continue
        run = setup()
        half = nbytes // 2
        csrc = torch.randint(0, 256, (half,), dtype=torch.uint8, device="cuda")
        cdst = torch.empty_like(csrc)
        bes = list(backends)
        if args.sweep and name.startswith("slice_cols"):
            bes += [_Configured(backends[0], {"tile_bytes": t, "copy_warps": w}) for t, w in
                    ((8192, 4), (16384, 8), (16384, 4), (32768, 8), (32768, 16))]
        if args.sweep and name.startswith("gather"):
            bes += [_Configured(backends[0], {"gather_tile_bytes": t, "gather_warps": w, "gather_warps_unaligned": w,
                                              "split": sp}) for t, w, sp in
                    ((8192, 4, 1 << 20), (8192, 8, 1 << 20), (16384, 4, 1 << 20), (32768, 8, 1 << 20),
                     (16384, 8, 4 << 20), (16384, 8, 256 << 10), (65536, 8, 1 << 20))]
        fns = [("d2d", lambda: cdst.copy_(csrc))] + [(be.name, (lambda be=be: run(be))) for be in bes]
        for _, f in fns:
            f()
        torch.cuda.synchronize()
        ratios: dict[str, list[float]] = {tag: [] for tag, _ in fns[1:]}
        gbps: dict[str, list[float]] = {tag: [] for tag, _ in fns}
        for rep in range(args.repeat):
            order = fns[rep % len(fns):] + fns[:rep % len(fns)]
            ms = {tag: _cuda_batch_ms(f, args.batch) for tag, f in order}
            d2d = 2 * half / ms["d2d"] / 1e6
            gbps["d2d"].append(d2d)
            for tag in ratios:
                g = nbytes / ms[tag] / 1e6
                gbps[tag].append(g)
                ratios[tag].append(g / d2d)
        for tag in ratios:
            rec = {"section": "cuda", "kind": "kernel", "kernel": name, "backend": tag, "bytes": nbytes,
                   "gbps": round(statistics.median(gbps[tag]), 1),
                   "d2d_gbps": round(statistics.median(gbps["d2d"]), 1),
                   "ratio_to_copy": round(statistics.median(ratios[tag]), 3),
                   "ratio_best": round(max(ratios[tag]), 3)}
            emit(rec)
            records.append(rec)
        del run, csrc, cdst, fns
        torch.cuda.empty_cache()
    lines = ["", "GPU: GB/s (read + written), median ratio to a D2D copy of the same bytes",
             f"{'kernel':<34}{'d2d':>9}" + "".join(f"{b.name:>22}" for b in backends)]
    by = {(r["kernel"], r["backend"]): r for r in records}
    for name in dict.fromkeys(r["kernel"] for r in records):
        d2d = next(r["d2d_gbps"] for r in records if r["kernel"] == name)
        cells = "".join(f"{by[(name, b.name)]['gbps']:>13.1f} ({by[(name, b.name)]['ratio_to_copy']:.3f})"
                        for b in backends)
        lines.append(f"{name:<34}{d2d:>9.1f}{cells}")
    print("\n".join(lines), file=sys.stderr)
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="cpu")
    ap.add_argument("--threads", default="", help="comma-separated CPU thread counts (default 1..cores)")
    ap.add_argument("--size-mib", type=int, default=256, help="copy_ buffer and kernel scale (default 256)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per number, best kept (default 5)")
    ap.add_argument("--backends", default="cpp,torch", help="CPU backends (default cpp,torch)")
    ap.add_argument("--only", default="", help="comma-separated kernel names")
    ap.add_argument("--batch", type=int, default=10, help="CUDA: launches per timed batch (default 10)")
    ap.add_argument("--sweep", action="store_true", help="CUDA: also time slice_cols launch shapes")
    ap.add_argument("--cast-stream-min", type=int, default=None,
                    help="C++ casts: outputs of at least this many bytes use streamed stores (default: the "
                         "build's 8 MiB; a huge value turns streaming off, for A/B runs)")
    args = ap.parse_args(argv)
    if args.cast_stream_min is not None:
        from hfnemo import _C
        _C._set_cast_stream_min_bytes(args.cast_stream_min)
    if args.device in ("cpu", "all"):
        bench_cpu(args)
    if args.device in ("cuda", "all"):
        bench_cuda(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
