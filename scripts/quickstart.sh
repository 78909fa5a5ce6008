#!/usr/bin/env bash
# The README's main command: set up the CPU environment, build the tiny model, synthetic data and
# the warmed-up start model (once), then train the embedded default job (GRPO, local Ray).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu_env.sh
PY=.venv/bin/python
[[ -f artifacts/tiny-model/config.json ]] || $PY -m visualthinker_ray make-tiny-model --out artifacts/tiny-model --seed 0
[[ -f artifacts/data/SAT/SAT_train.parquet ]] || $PY -m visualthinker_ray make-synthetic --out artifacts/data --train 512 --test 128 --seed 0
# The stand-in for a pretrained base model: a short supervised warm-up that teaches the R1-Zero
# format with RANDOM answers (it writes well-formed completions and answers at chance).
[[ -f artifacts/warm-model/config.json ]] || $PY -m visualthinker_ray warmup --model artifacts/tiny-model --data artifacts/data/SAT --out artifacts/warm-model --log-every 100
exec $PY -m visualthinker_ray train --config jobs/tiny_cpu.yaml "$@"
