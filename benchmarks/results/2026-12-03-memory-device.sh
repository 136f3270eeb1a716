#!/usr/bin/env bash
# Issue 4, pass 9 on the lent GPU machine: an HF state dict in host memory onto the GPU (pinned:
# copied in place; pageable: through the pinned slots), the GPU test lanes, then (time allowing)
# the export with and without the source read-ahead (DCP chunks, commit 8d606ae), cold cache.
# usage: bash benchmarks/results/2026-12-03-memory-device.sh OUTDIR   (repo root)
set -u
out=$1; mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
cache=${CACHE:-/tmp/hfcache}
t0=$(date +%s)
python3 setup.py build_ext --inplace > "$out/build.log" 2>&1
python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path; import bench_convert as b
b.ensure_checkpoint(Path('$cache'), b.SHAPES['full'], 2)" > "$out/gen.log" 2>&1 &
gen=$!
echo "build $(( $(date +%s) - t0 )) s"; nproc; free -g | head -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py tests/test_gpu_path.py tests/test_memory_source.py > "$out/gpu_tests.log" 2>&1
tail -3 "$out/gpu_tests.log"; echo "gpu tests done at $(( $(date +%s) - t0 )) s"
wait $gen; echo "checkpoint ready at $(( $(date +%s) - t0 )) s"
python3 benchmarks/bench_gpu.py --cache $cache --repeat 10 --pipeline-repeat 5 --skip-kernels --skip-pipeline \
  --skip-diag --skip-convert > "$out/memory.jsonl" 2> "$out/memory.log"
echo "memory bench done at $(( $(date +%s) - t0 )) s"
if [ $(( $(date +%s) - t0 )) -lt ${EXPORT_BEFORE_S:-330} ]; then
  B="python3 benchmarks/bench_convert.py --cache $cache --layers 4 --repeat 1 --max-memory 1GiB --device cpu --no-kernel-floor"
  $B --build-only > "$out/gen4.log" 2>&1
  echo "4-layer checkpoint at $(( $(date +%s) - t0 )) s"
  for i in 1 2; do
    $B --only export > "$out/export-ra-$i.jsonl" 2>> "$out/export.log"
    HFNEMO_READAHEAD=0 $B --only export > "$out/export-nora-$i.jsonl" 2>> "$out/export.log"
    echo "export round $i at $(( $(date +%s) - t0 )) s"
    [ $(( $(date +%s) - t0 )) -gt ${STOP_S:-520} ] && break
  done
fi
echo "total $(( $(date +%s) - t0 )) s"
