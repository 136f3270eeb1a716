set -u
out=$1; mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
cache=/tmp/hfcache
t0=$(date +%s)
python3 setup.py build_ext --inplace > "$out/build.log" 2>&1
python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path; import bench_convert as b
b.ensure_checkpoint(Path('$cache'), b.SHAPES['full'], 2)" > "$out/gen.log" 2>&1 &
gen=$!
python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py tests/test_gpu_path.py tests/test_memory_source.py > "$out/gpu_tests.log" 2>&1
tail -3 "$out/gpu_tests.log"; echo "gpu tests done at $(( $(date +%s) - t0 )) s"
wait $gen
python3 benchmarks/bench_gpu.py --cache $cache --repeat 10 --pipeline-repeat ${REPEAT:-5} --skip-kernels --skip-pipeline \
  --skip-diag --skip-convert > "$out/memory.jsonl" 2> "$out/memory.log"
tail -3 "$out/memory.log"
echo "total $(( $(date +%s) - t0 )) s"
