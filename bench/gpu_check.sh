#!/usr/bin/env bash
# The GPU checks, as one short run on a machine with a CUDA device: the CUDA
# tests, then the rollout benchmark on the ~10M model. Results go to $OUT
# (default bench-results/gpu). Python packages qckpt needs that the machine
# lacks may be carried as wheels in .whl/ (installed to /tmp/site, no index).
set -u -o pipefail
OUT=${OUT:-bench-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), torch.cuda.device_count(), 'device(s)')" | tee -a "$OUT/gpu.txt"
timeout "${TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider -k "cuda or gpu" \
    tests/qckpt/test_async.py tests/branch/test_rollouts.py tests/bench/test_rollout_bench.py 2>&1 | tee "$OUT/tests.log"
echo "tests rc=$?"
timeout "${BENCH_S:-300}" python3 -m bench rollout --device cuda --size "${SIZE:-10m}" --horizon "${HORIZON:-20}" --seeds 0 \
    --json "$OUT/rollout.json" 2>&1 | tee "$OUT/rollout.log"
echo "bench rc=$?"
