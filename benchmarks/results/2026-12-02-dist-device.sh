#!/usr/bin/env bash
# Issue 8 scaling (and issue 4 pass-6 prefetch A/B) on the lent 16-core GPU machine; run from the repo root.
# usage: bash benchmarks/results/2026-12-02-dist-device.sh scale|prefetch OUTDIR
set -u
what=$1; out=$2; mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
cache=${CACHE:-/tmp/hfcache}
if [ ! -f src/hfnemo/_C*.so ] && ! ls src/hfnemo/_C*.so >/dev/null 2>&1; then
  python3 setup.py build_ext --inplace > "$out/build.log" 2>&1 || { tail -20 "$out/build.log"; exit 1; }
fi
nproc; free -g | head -2; df -h /tmp | tail -1
case $what in
scale)
  python3 benchmarks/bench_convert.py --cache $cache --layers 4 --repeat 2 --max-memory 1GiB --device cpu \
    --only floor,import --no-kernel-floor --workers 1,2,4,8 > "$out/dist-scale.jsonl" 2> "$out/dist-scale.log"
  tail -n 5 "$out/dist-scale.log";;
prefetch|both)
  if [ "$what" = both ]; then
    python3 benchmarks/bench_convert.py --cache $cache --layers 4 --repeat 2 --max-memory 1GiB --device cpu \
      --only floor,import --no-kernel-floor --workers 1,2,4,8 > "$out/dist-scale.jsonl" 2> "$out/dist-scale.log"
  fi
  for tp in ${TPS:-1 8}; do for pf in 0 1; do
    HFNEMO_PREFETCH=$pf python3 benchmarks/bench_convert.py --cache $cache --layers 4 --repeat 2 --max-memory 1GiB \
      --device cpu --only import --no-kernel-floor --tp $tp --workers 1 \
      > "$out/prefetch-tp$tp-pf$pf.jsonl" 2> "$out/prefetch-tp$tp-pf$pf.log"
  done; done
  [ -n "${NOEXPORT:-}" ] || python3 benchmarks/bench_convert.py --cache $cache --layers 4 --repeat 2 --max-memory 1GiB \
      --device cpu --only export --no-kernel-floor --workers 1,4 > "$out/dist-export.jsonl" 2> "$out/dist-export.log"
  tail -n 3 "$out"/*.log;;
esac
python3 - "$out" <<'PY'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/*.jsonl")):
    for l in open(f):
        try: r = json.loads(l)
        except ValueError: continue
        print(f.split("/")[-1], r.get("bench"), "w=%s s=%s" % (r.get("workers"), r.get("streams")), r.get("wall_s_runs"),
              r.get("ratio_to_floor"), r.get("peak_pss_bytes"), r.get("error"))
PY
