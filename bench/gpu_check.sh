#!/usr/bin/env bash
# The GPU checks, as one short run on a machine with a CUDA device: the CUDA
# tests, then the rollout benchmark on the ~10M model and where its time goes.
# Results go to $OUT (default bench-results/gpu). Python packages qckpt needs that the machine
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
    tests/qckpt/test_async.py tests/qckpt/test_live_fork.py tests/branch/test_rollouts.py tests/bench/test_rollout_bench.py \
    tests/qckpt/test_distributed.py tests/qckpt/test_restore_in_place.py 2>&1 | tee "$OUT/tests.log"
echo "tests rc=$?"
timeout "${BENCH_S:-300}" python3 -m bench rollout --device cuda --size "${SIZE:-10m}" --horizon "${HORIZON:-20}" --seeds 0 \
    --json "$OUT/rollout.json" 2>&1 | tee "$OUT/rollout.log"
echo "bench rc=$?"
# Where the futures' wall time goes: commits (staging, writing), restores, the training step alone; then one
# whole event per strategy (origin from storage, futures, join, continuing from it).
timeout "${PHASES_S:-120}" python3 -m bench.rollout_phases --k 8 --size "${SIZE:-10m}" --device cuda 2>&1 | tee "$OUT/phases.txt"
echo "phases rc=$?"
# Which CUDA attention kernels take a backward through vmap (the batched rollouts' stacked copies)?
python3 - <<'PY' 2>&1 | tee "$OUT/sdpa.txt"
import torch
from torch.func import vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
for dtype in (torch.float32, torch.bfloat16):
    for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        q = torch.randn(4, 8, 6, 128, 64, device="cuda", dtype=dtype, requires_grad=True)
        try:
            with sdpa_kernel([backend]):
                out = vmap(lambda x: torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True))(q)
            out.float().square().sum().backward()
            torch.cuda.synchronize()
            result = "ok"
        except RuntimeError as e:
            result = str(e).splitlines()[0][:90]
        print(f"vmap sdpa {str(dtype):15s} {backend.name:20s} {result}")
PY
