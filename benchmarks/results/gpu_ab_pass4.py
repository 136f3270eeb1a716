#!/usr/bin/env python3
"""Interleaved A/B of two Triton backends on one GPU: the committed one (A) and the pass-3 candidate
(B: `git show 6893866:src/hfnemo/kernels/triton_backend.py > benchmarks/results/triton_backend_candidate_pass3.py`). For every kernel case, repetitions rotate
copy / A / B so that clock and thermal drift hit all three alike; medians of the ratio to the copy
timed in the same repetition are reported. JSON lines on stdout.

    PYTHONPATH=src python3 benchmarks/results/gpu_ab_pass4.py --repeat 9
"""
import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ap = argparse.ArgumentParser()
ap.add_argument("--repeat", type=int, default=9)
args = ap.parse_args()

from hfnemo.kernels.triton_backend import TritonBackend as A  # noqa: E402

spec = importlib.util.spec_from_file_location("tb_candidate", HERE / "triton_backend_candidate_pass3.py")
cand = importlib.util.module_from_spec(spec)
sys.modules["tb_candidate"] = cand
spec.loader.exec_module(cand)
B = cand.TritonBackend

GiB = 1 << 30
dev = torch.device("cuda")
print(json.dumps({"bench": "machine", "device": torch.cuda.get_device_name(0), "torch": torch.__version__}), flush=True)


def ms(fn, n=3):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        best = min(best, s.elapsed_time(e))
    return best


src = torch.randint(0, 256, (GiB,), dtype=torch.uint8, device=dev)
dst = torch.empty_like(src)
a, b = A(), B()
cases = []
n = GiB // 4
f32 = torch.randn(n, device=dev)
for name, s, dt in (("cast_f32_to_bf16", f32, torch.bfloat16), ("cast_bf16_to_f32", f32.to(torch.bfloat16), torch.float32),
                    ("cast_f16_to_bf16", f32.to(torch.float16), torch.bfloat16),
                    ("cast_bf16_to_f16", f32.to(torch.bfloat16), torch.float16),
                    ("cast_f32_to_f16", f32, torch.float16)):
    out = torch.empty(n, dtype=dt, device=dev)
    cases.append((name, s.numel() * s.element_size() + out.numel() * out.element_size(),
                  lambda k, s=s, out=out: k.cast(out, s)))
for name, row, width in (("slice_16KiB_rows_half", 16384, 8192), ("slice_512B_rows_quarter", 512, 128)):
    rows = GiB // row
    sd = torch.empty(rows * width, dtype=torch.uint8, device=dev)
    cases.append((name, 2 * rows * width, lambda k, rows=rows, row=row, width=width, sd=sd:
                  k.slice_cols(sd, src, rows, row, row // 4, width)))
for name, kern_rw, fn in cases:
    copy_bytes = 2 * GiB
    ra, rb = [], []
    for rep in range(args.repeat):
        order = [("copy", lambda: dst.copy_(src)), ("A", lambda: fn(a)), ("B", lambda: fn(b))]
        order = order[rep % 3:] + order[:rep % 3]
        t = {tag: ms(f) for tag, f in order}
        copy_gbps = copy_bytes / t["copy"] / 1e6
        ra.append(kern_rw / t["A"] / 1e6 / copy_gbps)
        rb.append(kern_rw / t["B"] / 1e6 / copy_gbps)
    print(json.dumps({"bench": name, "ratio_A_median": round(statistics.median(ra), 3),
                      "ratio_B_median": round(statistics.median(rb), 3), "ratio_A_runs": [round(x, 3) for x in ra],
                      "ratio_B_runs": [round(x, 3) for x in rb]}), flush=True)
