#!/usr/bin/env bash
# One prepared device check (run on a lent GPU machine from the repo root):
# the engine's tests on CUDA, a CUDA determinism check, and training throughput.
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_train.py tests/test_models.py tests/test_scoring.py \
  -k "not fit_learns_and_is_deterministic" 2>&1 | tail -15 | tee "$OUT/pytest.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/determinism.txt"
import sys, torch
sys.path.insert(0, "tests")
from helpers import tiny_data, tiny_model
from sipa_core.train import default_recipe, fit
data = tiny_data(n_train=256)
r = default_recipe(epochs=2, batch_size=32, augment="autoaugment", mixup_alpha=1.0, device="cuda")
a, b = tiny_model(), tiny_model()
ra, rb = fit(a, data, r, progress=False), fit(b, data, r, progress=False)
same = all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
print("cuda deterministic mode, same weights twice:", same, [h["train_loss"] for h in ra.history])
PY
for cfg in "--precision fp32" "--precision fp32 --channels-last --nondeterministic" \
           "--precision bf16 --channels-last --nondeterministic" "--precision bf16 --channels-last --nondeterministic --augment autoaugment"; do
  timeout 120 python3 benchmarks/train_speed.py --arch sipa_baseline --images 50000 --epochs 2 --batch 512 $cfg 2>&1 | tail -1 | tee -a "$OUT/speed.jsonl"
done
