#!/usr/bin/env python3
"""Kernel benchmark, before vs after in one process (2026-11-28 pass): runs bench_gpu.kernels() with
the previous Triton backend (triton_backend_before_gpu_pass3.py beside this file, the backend defaults
only) and then with src/hfnemo/kernels/triton_backend.py (defaults + launch-shape sweep). Each pass
measures its own D2D copy. JSON lines on stdout, each tagged with "version".

    PYTHONPATH=src python3 benchmarks/results/gpu_kernels_pass3.py --repeat 5
"""
import argparse
import builtins
import importlib
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent / "src"))
import bench_gpu  # noqa: E402
import torch  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--repeat", type=int, default=5)
ap.add_argument("--skip-before", action="store_true")
args = ap.parse_args()
tag = {"version": None}
_emit = bench_gpu.emit
bench_gpu.emit = lambda obj: _emit({"version": tag["version"], **obj})
_emit({"bench": "machine", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
       "triton": importlib.import_module("triton").__version__})
if not args.skip_before:
    spec = importlib.util.spec_from_file_location("hfnemo.kernels.triton_backend",
                                                  HERE / "triton_backend_before_gpu_pass3.py")
    old = importlib.util.module_from_spec(spec)
    sys.modules["hfnemo.kernels.triton_backend"] = old
    spec.loader.exec_module(old)
    tag["version"] = "before"
    bench_gpu.kernels(args.repeat, sweep=False)
    del sys.modules["hfnemo.kernels.triton_backend"]
    torch.cuda.empty_cache()
tag["version"] = "after"
importlib.import_module("hfnemo.kernels.triton_backend")
bench_gpu.kernels(args.repeat, sweep=True)
