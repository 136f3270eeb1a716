#!/usr/bin/env bash
# Issue 4, pass 7 on the lent GPU machine (CUDA build of torch): the torch-free CPU streaming path
# against the previous code (HEAD 5d62fab, unpacked by the caller into _ab_old/), cold cache, same run.
# usage: [VARIANTS="thread late"] [TPS="1 8"] bash benchmarks/results/2026-12-02-torchfree-device.sh OUTDIR   (repo root)
set -u
out=$1; mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
cache=${CACHE:-/tmp/hfcache}
B="python3 benchmarks/bench_convert.py --cache $cache --layers 4 --repeat 2 --max-memory 1GiB --device cpu --no-kernel-floor"
OLD="env PYTHONPATH=$PWD/_ab_old/src python3 -m hfnemo"
t0=$(date +%s)
python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 &
(cd _ab_old && python3 setup.py build_ext --inplace > "$out/build_old.log" 2>&1) &
python3 benchmarks/bench_convert.py --cache $cache --layers 4 --build-only > "$out/gen.log" 2>&1 &
wait
echo "setup $(( $(date +%s) - t0 )) s"; nproc; free -g | head -2; df -h /tmp | tail -1
python3 -c "import torch; print(torch.__version__)"
for m in "import hfnemo.cli" "import torch" "import torch, torch.distributed.checkpoint.metadata, torch.distributed.checkpoint.filesystem"; do
  for i in 1 2; do python3 - "$m" <<'PY'
import re, sys, time
t = time.perf_counter(); exec(sys.argv[1]); dt = time.perf_counter() - t
s = open("/proc/self/smaps_rollup").read()
print("IMPORT", repr(sys.argv[1][:40]), "%.2f s" % dt, "pss %d MiB" % (int(re.search(r"^Pss:\s+(\d+)", s, re.M).group(1)) >> 10))
PY
  done
done | tee "$out/imports.txt"
for tp in ${TPS:-1 8}; do
  $B --only floor,import --tp $tp > "$out/new-tp$tp.jsonl" 2> "$out/new-tp$tp.log"
  $B --only import --tp $tp --cmd "$OLD" > "$out/old-tp$tp.jsonl" 2> "$out/old-tp$tp.log"
  # variants: torch imported in a thread of the converting process (no helper), or at the end
  for v in ${VARIANTS:-}; do case $v in
    thread) HFNEMO_TORCHSIDE=0 $B --only import --tp $tp > "$out/thread-tp$tp.jsonl" 2> "$out/thread-tp$tp.log";;
    late) HFNEMO_PREWARM=0 $B --only import --tp $tp > "$out/late-tp$tp.jsonl" 2> "$out/late-tp$tp.log";;
  esac; done
  echo "tp$tp done at $(( $(date +%s) - t0 )) s"
done
$B --only export > "$out/new-export.jsonl" 2> "$out/new-export.log"
$B --only export --cmd "$OLD" > "$out/old-export.jsonl" 2> "$out/old-export.log"
echo "all done at $(( $(date +%s) - t0 )) s"
python3 - "$out" <<'PY'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/*.jsonl")):
    for l in open(f):
        try: r = json.loads(l)
        except ValueError: continue
        rep = r.get("report") or {}
        print(f.split("/")[-1], r.get("bench"), r.get("wall_s_runs"), "ratio", r.get("ratio_to_floor"),
              "durable", r.get("ratio_to_floor_durable"), "in-proc", rep.get("seconds"),
              "pss", r.get("peak_pss_bytes"), r.get("error"))
PY
# one archive back (the device returns few files)
(cd "$out" && tar -czf ../results.tgz . && rm -rf ./* && mv ../results.tgz .)
