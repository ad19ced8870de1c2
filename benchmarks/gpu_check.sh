#!/usr/bin/env bash
# The GPU fast path, measured in one short run: training images/s of sipa_baseline at 63 px
# with the paper's recipe (its augmentation policy, mixup, ghost BatchNorm, batch 128; the
# improving stage's final recipe of profiles/paper.yaml), bf16, channels_last,
#   1. eager,  2. torch.compile,  3. torch.compile mode reduce-overhead (CUDA graphs),
# and the same eager without the augmentation policy (what the policy costs).
#
#   bash benchmarks/gpu_check.sh            # on a GPU machine: a few minutes
#   bash benchmarks/gpu_check.sh --dry      # on the CPU: tiny sizes, every variant that runs there
#
# One JSON line per variant (benchmarks/train_speed.py), then a table. The first epoch of
# each is warm-up (and compilation); images/s is from the later ones.
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
