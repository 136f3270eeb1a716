#!/usr/bin/env python3
"""Interleaved A/B of the start-up read-ahead (issue 4, pass 6), for a noisy shared VM.

bench_convert.py runs floor x N, then import x N: with other jobs on the box coming and going, the
with/without series then see different machines. This runs rounds of [floor, import TP1 off/on,
import TP8 off/on] (the four imports in a rotated order each round), each run cold (the same
fadvise-DONTNEED eviction and mincore check as bench_convert.py, via hfnemo.memwatch), measured by
hfnemo.memwatch.run_and_measure (wall from spawn to exit, peak summed PSS), with the floor worker
and the hfnemo command line of bench_convert.py. Before each run it waits (up to --quiet-wait s)
until no python process outside this tree is running and records whether it got that.

    .venv/bin/python benchmarks/results/2026-12-02-prefetch-interleaved.py --rounds 4 \\
        > benchmarks/results/2026-12-02-prefetch-interleaved.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
from hfnemo import memwatch  # noqa: E402


def foreign_busy(mine: set[int]) -> list[str]:
    """python processes in state R or D that are not this script or its children."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in mine:
            continue
        try:
            stat = open(f"/proc/{pid}/stat").read()
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state = stat.rsplit(")", 1)[1].split()[0]
        if "python" in cmd and state in "RD":
            out.append(cmd[:80])
    return out


def wait_quiet(limit: float) -> bool:
    mine = {os.getpid(), os.getppid()}
    t0 = time.monotonic()
    calm = 0
    while time.monotonic() - t0 < limit:
        calm = calm + 1 if not foreign_busy(mine) else 0
        if calm >= 3:
            return True
        time.sleep(0.5)
    return False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--src", default=str(REPO / "benchmarks/.cache/llama3-70b-shape-L2"))
    ap.add_argument("--out", default=str(REPO / "benchmarks/.cache/ab"))
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--quiet-wait", type=float, default=60.0)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    src, out = Path(args.src), Path(args.out)
    inputs = memwatch.files_under(src)
    nbytes = sum(os.path.getsize(f) for f in inputs)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    variants = [("import", tp, pf) for tp in (1, 8) for pf in ("0", "1")]
    for rnd in range(args.rounds):
        k = rnd % len(variants)
        order = [("floor", 1, "-")] + variants[k:] + variants[:k]
        for name, tp, pf in order:
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            quiet = wait_quiet(args.quiet_wait)
            memwatch.evict_page_cache(inputs)
            cached = memwatch.cached_fraction(inputs)
            if name == "floor":
                argv = [sys.executable, str(REPO / "benchmarks/bench_convert.py"), "--_floor", str(src), str(out), "rw", "0"]
            else:
                argv = [sys.executable, "-m", "hfnemo", "import", str(src), str(out), "--max-memory", args.max_memory,
                        "--quiet", "--json", "--overwrite", "--tp", str(tp), "--device", args.device]
            e = {**env, "HFNEMO_PREFETCH": pf, "HFNEMO_PREFETCH_DEBUG": "1"} if name != "floor" else env
            m = memwatch.run_and_measure(argv, env=e, cwd=str(REPO))
            t = time.perf_counter()
            os.sync()
            sync_s = time.perf_counter() - t
            debug = [ln for ln in m.stderr.splitlines() if ln.startswith("hfnemo prefetch")]
            print(json.dumps({"round": rnd, "bench": name, "tp": tp, "prefetch": pf, "bytes": nbytes,
                              "wall_s": round(m.wall_s, 3), "sync_s": round(sync_s, 3),
                              "peak_pss_bytes": m.peak_pss_bytes, "returncode": m.returncode,
                              "quiet_before": quiet, "cached_fraction_before": cached,
                              "prefetch_debug": debug[-1] if debug else None,
                              "load": open("/proc/loadavg").read().split()[:3]}), flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
