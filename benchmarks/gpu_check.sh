#!/usr/bin/env bash
# The one prepared script for a GPU machine (at most about 8 minutes on one GPU):
#   1. the paper profile's whole pipeline at toy scale under `dvc repro` (every stage, the
#      quantizing stage and its integer ONNX export included; every epoch count 1, 48 images
#      per class of the shipped CIFAR-10 subset: benchmarks/toy_pipeline.py), one JSON line
#      per stage with the device it ran on;
#   2. training images/s of sipa_baseline at 63 px with the paper's recipe (its augmentation
#      policy, mixup, ghost BatchNorm, batch 128; the improving stage's final recipe of
#      profiles/paper.yaml), bf16, channels_last: eager, torch.compile, torch.compile mode
#      reduce-overhead (CUDA graphs), and eager without the augmentation policy.
#
#   bash benchmarks/gpu_check.sh            # on a GPU machine
#   bash benchmarks/gpu_check.sh --dry      # on the CPU: tiny sizes, every part that runs there
#   GPU_CHECK_PROCESSES=8 bash benchmarks/gpu_check.sh   # the pipeline on 8 devices
#
# One JSON line per result, then a table. The first epoch of each throughput variant is
# warm-up (and compilation); images/s is from the later ones.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
if [[ "${1:-}" == "--dry" ]]; then
  # The CPU has no bf16 speed and no CUDA graphs: check that every variant's command still
  # parses and runs end to end on a tiny data set, in fp32, eager only.
  COMMON=(--recipe-from profiles/paper.yaml --images 128 --epochs 2 --device cpu)
  VARIANTS=("eager::" "eager, no policy::--augment-off")
  COMPILED=("compile::--compile" "compile, CUDA graphs::--compile --compile-mode reduce-overhead")
else
  COMMON=(--recipe-from profiles/paper.yaml --images 20000 --epochs 3 --precision bf16 --nondeterministic)
  VARIANTS=("eager::" "eager, no policy::--augment-off" "compile::--compile"
            "compile, CUDA graphs::--compile --compile-mode reduce-overhead")
  COMPILED=()
fi
OUT=$(mktemp)
if [[ "${1:-}" == "--dry" ]]; then TOY=(--dry); else TOY=(--processes "${GPU_CHECK_PROCESSES:-1}"); fi
$PY benchmarks/toy_pipeline.py --workdir "$OUT.toy" "${TOY[@]}" || exit 1
rm -rf "$OUT.toy"
for v in "${VARIANTS[@]}"; do
  name=${v%%::*}; flags=${v#*::}
  # shellcheck disable=SC2086
  line=$($PY benchmarks/train_speed.py "${COMMON[@]}" $flags 2>"$OUT.err" | tail -1) || { cat "$OUT.err" >&2; exit 1; }
  echo "$line"
  echo "$name|$line" >> "$OUT"
done
for v in "${COMPILED[@]}"; do
  echo "dry run, not run on the CPU: ${v%%::*}: $PY benchmarks/train_speed.py ${COMMON[*]} ${v#*::}"
  $PY benchmarks/train_speed.py "${COMMON[@]}" ${v#*::} --parse-only
done
$PY - "$OUT" <<'PYEOF'
import json, sys
print("\n| variant | device | precision | augment | train images/s | eval images/s |\n|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    name, _, data = line.partition("|")
    r = json.loads(data)
    print(f"| {name} | {r['device']} | {r['precision']} | {r['augment']} | {r['train_images_per_sec']:,.0f} "
          f"| {r['eval_images_per_sec']:,.0f} |")
PYEOF
rm -f "$OUT" "$OUT.err"
