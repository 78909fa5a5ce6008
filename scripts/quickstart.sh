#!/usr/bin/env bash
# The README's main command: set up the CPU environment, build the tiny model, synthetic data and
# the warmed-up start model (rebuilt only when their code or options change), then train the
# embedded default job (GRPO, local Ray).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu_env.sh
bash scripts/build_artifacts.sh artifacts
exec .venv/bin/python -m visualthinker_ray train --config jobs/tiny_cpu.yaml "$@"
