#!/usr/bin/env bash
# The README's main command: set up the CPU environment, build the synthetic data (rebuilt only when
# its code or options change) and check the shipped start model, then train the embedded default
# job (GRPO, local Ray).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu_env.sh
bash scripts/build_artifacts.sh artifacts
exec .venv/bin/python -m visualthinker_ray train --config jobs/tiny_cpu.yaml "$@"
