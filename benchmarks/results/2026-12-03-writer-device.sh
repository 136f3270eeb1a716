#!/usr/bin/env bash
# Issue 4, pass 8 on the lent GPU machine: block CRCs in the workers, hashing beside the write,
# column windows of a tensor written together with their source rows read ahead, against the
# previous code (HEAD e562974, unpacked by the caller into _ab_old/), cold cache, same run.
# usage: STAGE=a|b bash benchmarks/results/2026-12-03-writer-device.sh OUTDIR   (repo root)
#   a: the GPU test lanes, then TP 8 (floor, new, previous code, new without the read-ahead)
#   c: TP 1 interleaved: new, new + whole-row read-ahead, previous code; TP 8 (3 rounds)
#   d: final code: cold phase split (new, no start-up read-ahead, previous), TP 1 new/previous x3, TP 8
#   b: TP 1 (floor, new, previous code, new with the writer checksumming inline), export, phases
set -u
out=$1; mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
cache=${CACHE:-/tmp/hfcache}
B="python3 benchmarks/bench_convert.py --cache $cache --layers 4 --repeat 2 --max-memory 1GiB --device cpu --no-kernel-floor"
OLD="env PYTHONPATH=$PWD/_ab_old/src python3 -m hfnemo"
INLINE="python3 $PWD/_ab_variant.py"
t0=$(date +%s)
python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 &
(cd _ab_old && python3 setup.py build_ext --inplace > "$out/build_old.log" 2>&1) &
python3 benchmarks/bench_convert.py --cache $cache --layers 4 --build-only > "$out/gen.log" 2>&1 &
wait
echo "setup $(( $(date +%s) - t0 )) s"; nproc; free -g | head -2; df -h /tmp | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print(torch.__version__)"
if [ "${STAGE:-a}" = a ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py tests/test_gpu_path.py > "$out/gpu_tests.log" 2>&1
  tail -3 "$out/gpu_tests.log"; echo "gpu tests done at $(( $(date +%s) - t0 )) s"
  $B --only floor,import --tp 8 > "$out/new-tp8.jsonl" 2> "$out/new-tp8.log"
  $B --only import --tp 8 --cmd "$OLD" > "$out/old-tp8.jsonl" 2> "$out/old-tp8.log"
  HFNEMO_READAHEAD=0 $B --only import --tp 8 > "$out/nora-tp8.jsonl" 2> "$out/nora-tp8.log"
elif [ "${STAGE}" = c ]; then
  # TP 1 again, interleaved (run-to-run spread of stage b hid the difference), with the read-ahead
  # of whole-row segments too (HFNEMO_READAHEAD_ALL=1), and TP 8 for reference
  B1="${B/--repeat 2/--repeat 1}"
  $B --only floor > "$out/c-floor.jsonl" 2> "$out/c-floor.log"
  for i in 1 2 3; do
    $B1 --only import > "$out/c-new-tp1-$i.jsonl" 2>> "$out/c.log"
    HFNEMO_READAHEAD_ALL=1 $B1 --only import > "$out/c-raall-tp1-$i.jsonl" 2>> "$out/c.log"
    $B1 --only import --cmd "$OLD" > "$out/c-old-tp1-$i.jsonl" 2>> "$out/c.log"
    $B1 --only import --tp 8 > "$out/c-new-tp8-$i.jsonl" 2>> "$out/c.log"
  done
elif [ "${STAGE}" = d ]; then
  # the final code: cold start-up / conversion / exit split (new, new without the start-up
  # read-ahead, previous code), then TP 1 new against the previous code interleaved, TP 8
  M=$cache/llama3-70b-shape-L4
  P="benchmarks/bench_phases.py --evict $M -- import $M /tmp/phases-out --max-memory 1GiB --quiet --overwrite --device cpu"
  for i in 1 2 3; do
    python3 $P >> "$out/d-phases-new.jsonl" 2>&1
    HFNEMO_PREFETCH=0 python3 $P >> "$out/d-phases-noprefetch.jsonl" 2>&1
    PYTHONPATH=$PWD/_ab_old/src python3 $P >> "$out/d-phases-old.jsonl" 2>&1
  done
  rm -rf /tmp/phases-out
  cat "$out"/d-phases-*.jsonl
  B1="${B/--repeat 2/--repeat 1}"
  $B --only floor > "$out/d-floor.jsonl" 2> "$out/d-floor.log"
  for i in 1 2 3; do
    $B1 --only import > "$out/d-new-tp1-$i.jsonl" 2>> "$out/d.log"
    $B1 --only import --cmd "$OLD" > "$out/d-old-tp1-$i.jsonl" 2>> "$out/d.log"
  done
  $B --only import --tp 8 > "$out/d-new-tp8.jsonl" 2>> "$out/d.log"
else
  $B --only floor,import > "$out/new-tp1.jsonl" 2> "$out/new-tp1.log"
  $B --only import --cmd "$OLD" > "$out/old-tp1.jsonl" 2> "$out/old-tp1.log"
  $B --only import --cmd "$INLINE" > "$out/inline-tp1.jsonl" 2> "$out/inline-tp1.log"
  $B --only export > "$out/new-export.jsonl" 2> "$out/new-export.log"
  $B --only export --cmd "$OLD" > "$out/old-export.jsonl" 2> "$out/old-export.log"
  # where the seconds outside the conversion go (warm cache): new, then the previous code
  P="benchmarks/bench_phases.py --repeat 2 -- import $cache/llama3-70b-shape-L4 /tmp/phases-out --max-memory 1GiB --quiet --overwrite --device cpu"
  python3 $P > "$out/phases-new.jsonl" 2>&1
  PYTHONPATH=$PWD/_ab_old/src python3 $P > "$out/phases-old.jsonl" 2>&1
  cat "$out"/phases-*.jsonl
fi
echo "all done at $(( $(date +%s) - t0 )) s"
python3 - "$out" <<'PY'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/*.jsonl")):
    for l in open(f):
        try: r = json.loads(l)
        except ValueError: continue
        rep = r.get("report") or {}
        print(f.split("/")[-1], r.get("bench"), r.get("wall_s_runs"), "sync", r.get("sync_s_median"), "ratio",
              r.get("ratio_to_floor"), "durable", r.get("ratio_to_floor_durable"), "in-proc", rep.get("seconds"),
              "pss", r.get("peak_pss_bytes"), r.get("error"))
PY
(cd "$out" && tar -czf ../results.tgz . && rm -rf ./* && mv ../results.tgz .)
