#!/usr/bin/env python3
"""hfnemo's import against NVIDIA's own (NeMo 2.5.3 ``llm.import_ckpt``) on the same machine.

Not a test. Prints one JSON object per line on stdout (progress on stderr):

    python benchmarks/bench_vs_nemo.py                       # the ~1.1 GB Llama, then the 70B-shaped one
    python benchmarks/bench_vs_nemo.py --models small --repeat 3
    python benchmarks/bench_vs_nemo.py --models full --no-compare

Models: the checkpoints of benchmarks/bench_convert.py (``ensure_checkpoint``/``SHAPES``, cached
in benchmarks/.cache): ``small``, Llama-3-8B widths with a 16k vocab, 2 layers, 1.14 GB; ``full``,
Llama-3-70B-shaped, 2 layers, 7.63 GB. NVIDIA's importer also wants a tokenizer, which those
checkpoints lack: each runs from ``CACHE/vs_nemo/<name>/``, symlinks to the checkpoint's files
plus tests/tiny_models' small tokenizer (the Llama importer takes the vocabulary size from
config.json, so the tokenizer changes no tensor). Both tools read exactly that directory.

Per model and repeat, each a child process measured by ``hfnemo.memwatch.run_and_measure`` (peak
summed PSS of the process tree: NVIDIA's checkpoint writer forks workers, they are counted), the
inputs' page cache dropped first (fadvise DONTNEED) and ``os.sync()`` timed after:
  ``nemo_import``    ``.venv-peer/bin/python tools/peer/nemo_import.py SRC OUT`` (NVIDIA's converter,
                     CPU; ``converter_s`` is the time of its ``llm.import_ckpt`` call alone);
  ``hfnemo_import``  ``python -m hfnemo import SRC OUT --max-memory M --quiet --json --overwrite``;
  ``nemo_startup``   (once) the peer interpreter importing NeMo and nothing else.
Then ``vs_nemo``: the ratios (NVIDIA / hfnemo) of wall time and peak memory, and ``compare``: the
two outputs' tensors chunk by chunk (hfnemo.io.dcp.read_index, one chunk in memory at a time).
NVIDIA's import is skipped (a ``skipped`` line) when its expected peak does not fit in
MemAvailable less 1.5 GB (``NEMO_PEAK``, above what its process tree measured: 3.47 GB for the
1.14 GB model, 11.8 GB for the 7.63 GB one, 0.72 GB of it NeMo itself), and killed (an ``error`` line) if
MemAvailable falls under 0.5 GB while it runs, so that a box shared with others never swaps or
meets the OOM killer.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEER = REPO / "tools" / "peer"


def _load_bench_convert():
    spec = importlib.util.spec_from_file_location("_bench_convert", HERE / "bench_convert.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_bench_convert"] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


bc = _load_bench_convert()
log, emit = bc.log, bc.emit

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


NEMO_PEAK = (2.0e9, 1.6)  # NVIDIA's import, peak PSS of its tree <= a + b * model bytes (measured: see above)
MARGIN, FLOOR = 1.5e9, 0.5e9


def mem_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def source_view(cache: Path, src: Path) -> Path:
    """CACHE/vs_nemo/<name>/: the checkpoint's files (symlinks) plus a small tokenizer."""
    view = cache / "vs_nemo" / src.name
    tok = cache / "vs_nemo" / "_tokenizer"
    if not all((tok / f).exists() for f in TOKENIZER_FILES):
        tok.mkdir(parents=True, exist_ok=True)
        code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
                "from tiny_models import save_tokenizer; save_tokenizer(Path(sys.argv[2]))")
        subprocess.run([sys.executable, "-c", code, str(REPO / "tests"), str(tok)], check=True,
                       stdout=sys.stderr, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    view.mkdir(parents=True, exist_ok=True)
    for f in list(src.iterdir()) + [tok / f for f in TOKENIZER_FILES]:
        link = view / f.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(f.resolve())
    return view


def compare_outputs(a: Path, b: Path) -> dict:
    """Tensor chunks of two NeMo 2 checkpoints, byte for byte (a child on the hfnemo side)."""
    code = r'''
import json, os, sys
from hfnemo.io.dcp import read_index
from hfnemo.io.fileio import pread_into
from hfnemo.io.torchzip import locate_tensor
a, b = sys.argv[1], sys.argv[2]
ia, ib = read_index(a), read_index(b)
out = {"tensors": len(ia.tensors), "keys_equal": set(ia.tensors) == set(ib.tensors),
       "different": [], "bytes": 0}
def chunks(idx, w, fqn):
    g = idx.tensors[fqn]
    return g.dtype.name, tuple(g.shape), sorted(g.chunks, key=lambda c: c.offsets)
def read(w, c):
    fd = os.open(os.path.join(w, c.file), os.O_RDONLY)
    try:
        st = locate_tensor(fd, c.offset, c.length)
        buf = bytearray(st.nbytes)
        pread_into(fd, memoryview(buf), st.offset)
        return buf
    finally:
        os.close(fd)
for fqn in sorted(set(ia.tensors) & set(ib.tensors)):
    da, sa, ca = chunks(ia, a, fqn)
    db, sb, cb = chunks(ib, b, fqn)
    same = (da, sa, [(c.offsets, c.sizes) for c in ca]) == (db, sb, [(c.offsets, c.sizes) for c in cb])
    for x, y in zip(ca, cb):
        if not same:
            break
        bx = read(a, x)
        same = bx == read(b, y)
        out["bytes"] += len(bx)
        del bx
    if not same:
        out["different"].append(fqn)
out["equal"] = out["keys_equal"] and not out["different"]
print(json.dumps(out))
'''
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, "-c", code, str(a / "weights"), str(b / "weights")],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"equal": False, "error": r.stderr[-3000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


class Runner:
    def __init__(self, args, machine: dict):
        self.args = args
        self.machine = machine
        self.mw = bc._load_memwatch()
        self.failed = False
        self.peer_py = str(args.peer_venv / "bin" / "python")
        self.env_hfnemo = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        self.env_peer = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.env_peer.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def measure(self, argv, env, inputs, output: Path | None):
        import threading

        if output is not None and output.exists():
            shutil.rmtree(output)
        method = bc.evict(list(inputs), self.args.evict)
        cached = bc.cached_fraction(inputs) if self.args.evict != "none" else None
        done, low = threading.Event(), []

        def guard() -> None:  # the child tree is this process's descendants
            while not done.wait(0.1):
                if mem_available() < FLOOR:
                    low.append(mem_available())
                    for pid in reversed(self.mw._descendants(os.getpid())[1:]):  # not this process
                        try:
                            os.kill(pid, 9)
                        except OSError:
                            pass
                    return

        g = threading.Thread(target=guard, daemon=True)
        g.start()
        try:
            m = self.mw.run_and_measure(argv, interval=self.args.interval, env=env, cwd=str(REPO),
                                        timeout=self.args.timeout, max_duty=self.args.max_duty)
        finally:
            done.set()
            g.join()
        if low:
            why = f"\n[bench] killed: MemAvailable {low[0]} B"
            m = dataclasses.replace(m, returncode=-9, stderr=m.stderr + why)
        t0 = time.perf_counter()
        os.sync()
        return m, time.perf_counter() - t0, method, cached

    def record(self, bench: str, model: str, nbytes: int, runs: list, extra: dict | None = None) -> dict:
        ok = [r for r in runs if r[0].ok]
        last = runs[-1][0]
        rec = {"bench": bench, "model": model, "bytes": nbytes, "repeat": len(runs)}
        if len(ok) != len(runs):
            self.failed = True
            rec.update({"error": f"{bench} failed", "returncode": last.returncode,
                        "timed_out": last.timed_out, "stderr_tail": last.stderr[-4000:],
                        "stdout_tail": last.stdout[-2000:], "wall_s": last.wall_s,
                        "peak_pss_bytes": last.peak_pss_bytes, "machine": self.machine})
            emit(rec)
            return rec
        walls = [m.wall_s for m, *_ in runs]
        rec.update({
            "wall_s": round(min(walls), 3), "wall_s_median": round(statistics.median(walls), 3),
            "wall_s_runs": [round(w, 3) for w in walls],
            "gb_per_s": round(nbytes / min(walls) / 1e9, 4),
            "sync_s_median": round(statistics.median(s for _, s, _, _ in runs), 3),
            "peak_pss_bytes": max(m.peak_pss_bytes for m, *_ in runs),
            "peak_rss_hwm_bytes": max(m.peak_rss_hwm_bytes for m, *_ in runs),
            "peak_rss_sum_bytes": max(m.peak_rss_sum_bytes for m, *_ in runs),
            "peak_nprocs": max(m.peak_nprocs for m, *_ in runs),
            "peak_to_model": round(max(m.peak_pss_bytes for m, *_ in runs) / nbytes, 3) if nbytes else None,
            "page_cache": {"policy": "cold" if self.args.evict != "none" else "warm", "method": runs[-1][2],
                           "cached_fraction_before": [c for *_, c in runs]},
            "machine": self.machine, **(extra or {}),
        })
        emit(rec)
        return rec

    def nemo_startup(self) -> dict:
        code = (f"import sys, time; t = time.time(); sys.path.insert(0, {str(PEER)!r}); import cpu_compat; "
                "from nemo.collections import llm; print(round(time.time() - t, 3))")
        runs = [self.measure([self.peer_py, "-c", code], self.env_peer, [], None)]
        return self.record("nemo_startup", "-", 0, runs, {"import_s": float(runs[0][0].stdout.split()[-1])
                                                              if runs[0][0].ok else None})

    def one_model(self, key: str) -> None:
        args = self.args
        shape = bc.SHAPES[key]
        src = bc.ensure_checkpoint(args.cache, shape, args.layers)
        view = source_view(args.cache, src)
        nbytes = bc.dir_bytes(src)
        model = f"{shape['name']}-L{args.layers}"
        run = args.cache / "vs_nemo_run"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        ours, theirs = run / "hfnemo", run / "nemo"
        need = 2 * nbytes + (1 << 30)
        if shutil.disk_usage(run).free < need:
            emit({"bench": "setup", "model": model, "error": f"not enough disk: need {need / 1e9:.1f} GB"})
            self.failed = True
            return
        inputs = [src]
        nemo_runs, hf_runs = [], []
        avail = mem_available()
        expect = NEMO_PEAK[0] + NEMO_PEAK[1] * nbytes
        nemo_fits = args.force_nemo or expect < avail - MARGIN
        log(f"{model}: {nbytes / 1e9:.2f} GB; MemAvailable {avail / 1e9:.1f} GB; NVIDIA's import expected "
            f"to peak at {expect / 1e9:.1f} GB: {'runs' if nemo_fits else 'skipped'}")
        hf_argv = [sys.executable, "-m", "hfnemo", "import", str(view), str(ours),
                   "--max-memory", args.max_memory, "--quiet", "--json", "--overwrite"]
        nemo_argv = [self.peer_py, str(PEER / "nemo_import.py"), str(view), str(theirs)]
        try:
            for r in range(args.repeat):
                order = [("hfnemo", hf_argv), ("nemo", nemo_argv)]
                if r % 2:
                    order.reverse()  # alternate who goes first
                for who, argv in order:
                    if who == "nemo" and not nemo_fits:
                        continue
                    res = self.measure(argv, self.env_hfnemo if who == "hfnemo" else self.env_peer, inputs,
                                       ours if who == "hfnemo" else theirs)
                    m = res[0]
                    log(f"  {who} run {r + 1}/{args.repeat}: rc={m.returncode} wall={m.wall_s:.2f}s "
                        f"peak_pss={self.mw.format_size(m.peak_pss_bytes)} procs={m.peak_nprocs}")
                    (hf_runs if who == "hfnemo" else nemo_runs).append(res)
                    if not m.ok:
                        break
            report = bc.parse_report(hf_runs[-1][0].stdout)
            hf_rec = self.record("hfnemo_import", model, nbytes, hf_runs,
                                 {"max_memory": args.max_memory, "report": report})
            if not nemo_fits:
                emit({"bench": "nemo_import", "model": model, "bytes": nbytes, "skipped":
                      f"expected peak {expect / 1e9:.1f} GB > MemAvailable {avail / 1e9:.1f} GB less "
                      f"{MARGIN / 1e9:.1f} GB", "machine": self.machine})
                return
            conv = [float(x) for m, *_ in nemo_runs
                    for x in re.findall(r"IMPORT_DONE \S+ ([0-9.]+)s", m.stdout)]
            nv_rec = self.record("nemo_import", model, nbytes, nemo_runs,
                                 {"converter_s": min(conv) if conv else None, "converter_s_runs": conv})
            if "error" in hf_rec or "error" in nv_rec:
                return
            cmp = compare_outputs(theirs, ours) if args.compare else None
            emit({"bench": "vs_nemo", "model": model, "bytes": nbytes,
                  "wall_ratio": round(nv_rec["wall_s"] / hf_rec["wall_s"], 2),
                  "wall_ratio_median": round(nv_rec["wall_s_median"] / hf_rec["wall_s_median"], 2),
                  "peak_pss_ratio": round(nv_rec["peak_pss_bytes"] / hf_rec["peak_pss_bytes"], 2),
                  "nemo": {"wall_s": nv_rec["wall_s"], "converter_s": nv_rec["converter_s"],
                           "peak_pss_bytes": nv_rec["peak_pss_bytes"]},
                  "hfnemo": {"wall_s": hf_rec["wall_s"], "peak_pss_bytes": hf_rec["peak_pss_bytes"],
                             "max_memory": args.max_memory},
                  "compare": cmp, "machine": self.machine})
            if cmp is not None and not cmp.get("equal"):
                self.failed = True
        finally:
            if not args.keep:
                shutil.rmtree(run, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small,full", help="comma list of small, full (default both)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each tool per model (order alternates)")
    ap.add_argument("--max-memory", default="1GiB",
                    help="hfnemo's --max-memory (default 1GiB, as bench_convert)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="default $HFNEMO_BENCH_CACHE or benchmarks/.cache")
    ap.add_argument("--peer-venv", type=Path,
                    default=Path(os.environ.get("HFNEMO_PEER_VENV") or REPO / ".venv-peer"))
    ap.add_argument("--evict", choices=["fadvise", "drop_caches", "none"], default="fadvise")
    ap.add_argument("--no-compare", dest="compare", action="store_false", help="skip the output comparison")
    ap.add_argument("--force-nemo", action="store_true", help="run NVIDIA's import even if it may not fit")
    ap.add_argument("--keep", action="store_true", help="keep CACHE/vs_nemo_run")
    ap.add_argument("--interval", type=float, default=0.02)
    ap.add_argument("--max-duty", type=float, default=0.25)
    ap.add_argument("--timeout", type=float, default=3600.0)
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - set(bc.SHAPES):
        ap.error(f"--models: use {sorted(bc.SHAPES)}")
    if not (args.peer_venv / "bin" / "python").exists():
        emit({"bench": "setup", "error": f"no peer venv at {args.peer_venv} (make test-peer creates it)"})
        return 2
    args.cache = (args.cache or Path(os.environ.get("HFNEMO_BENCH_CACHE") or HERE / ".cache")).resolve()
    args.cache.mkdir(parents=True, exist_ok=True)
    machine = bc.machine_info(args.cache)
    r = Runner(args, machine)
    r.nemo_startup()
    for key in models:
        r.one_model(key)
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
