#!/usr/bin/env bash
# The README's main command: set up the CPU environment, build the tiny model and synthetic data
# (once), then train the embedded default job (GRPO on the tiny model, local Ray).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu_env.sh
PY=.venv/bin/python
[[ -f artifacts/tiny-model/config.json ]] || $PY -m visualthinker_ray make-tiny-model --out artifacts/tiny-model --seed 0
[[ -f artifacts/data/SAT/SAT_train.parquet ]] || $PY -m visualthinker_ray make-synthetic --out artifacts/data --train 512 --test 128 --seed 0
exec $PY -m visualthinker_ray train --config jobs/tiny_cpu.yaml "$@"
