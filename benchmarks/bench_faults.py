#!/usr/bin/env python3
"""The long kill -9 run: many more trials than tests/test_faults.py, same machinery.

Not a test. Prints one JSON object per trial and one summary per scenario on stdout; exits 1 if
any resumed output differs from the uninterrupted run's.

    python benchmarks/bench_faults.py                       # 200 trials per scenario
    python benchmarks/bench_faults.py --trials 50 --only import,export
    python benchmarks/bench_faults.py --layers 4 --seed 7

Each trial (tests/faults.py): fork this process, convert with a fault hook that SIGKILLs the child
at a random event (an output write, a journal commit, a step of manifest/publish), with a random
journal commit interval and row-block size; then re-run the same conversion in-process (another
random block size) and compare every output byte with an uninterrupted run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SCENARIOS = {  # name -> (source kind, convert kwargs)
    "import": ("hf", {}),
    "import_tp2": ("hf", {"tp": 2}),
    "export": ("nemo", {"max_shard_size": "300KB"}),
    "nemo1": ("hf", {"format": "nemo1", "tp": 2}),
    "megatron": ("hf", {"format": "megatron", "pp": 2}),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=200, help="trials per scenario (default 200)")
    ap.add_argument("--only", default=",".join(SCENARIOS),
                    help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    ap.add_argument("--shape", default="llama3_gqa", help="tests/tiny_models.py shape (default llama3_gqa)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet-trials", action="store_true", help="print only the summaries")
    args = ap.parse_args()

    import hfnemo
    from faults import kill_trials
    from tiny_models import make_tiny_hf

    failed = 0
    with tempfile.TemporaryDirectory(prefix="hfnemo-faults-") as tmp:
        root = Path(tmp)
        hf = make_tiny_hf(root / "hf", args.shape, num_layers=args.layers)
        nemo = root / "nemo-src"
        hfnemo.convert(hf, nemo)
        for i, name in enumerate(n for n in args.only.split(",") if n):
            kind, kw = SCENARIOS[name]
            src, dst = (hf if kind == "hf" else nemo), root / f"out-{name}"
            t0 = time.perf_counter()
            convert = lambda: hfnemo.convert(src, dst, **kw)  # noqa: B023, E731
            trials, events = kill_trials(convert, dst, args.trials, seed=args.seed * 100 + i)
            for n, t in enumerate(trials):
                if not args.quiet_trials:
                    print(json.dumps({"bench": "fault_trial", "scenario": name, "trial": n, **t.to_json()}),
                          flush=True)
            bad = sum(not t.identical for t in trials)
            failed += bad
            print(json.dumps({
                "bench": "faults", "scenario": name, "shape": args.shape, "layers": args.layers, "kwargs": kw,
                "trials": len(trials), "events_per_run": events, "killed": sum(t.killed for t in trials),
                "published_before_kill": sum(t.published for t in trials),
                "resumed": sum(t.resumed_bytes > 0 for t in trials),
                "resumed_mid_item": sum(bool(t.journal_at and t.journal_at[1] and t.resumed_bytes)
                                        for t in trials),
                "identical": len(trials) - bad, "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
