#!/usr/bin/env bash
# Submit a visualthinker_ray job to a running Ray cluster with `ray job submit`.
# The repository (minus .venv, artifacts, runs, caches) is uploaded as the job's working dir.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: jobs/submit.sh [--no-wait] [--command CMD] [CONFIG] [ARG ...]

Submits `python -m visualthinker_ray CMD --config CONFIG ARG ...` to the Ray cluster at
$RAY_ADDRESS (default http://127.0.0.1:8265, e.g. the dashboard port-forwarded from KubeRay).

  CONFIG          a config file inside the repository (default: jobs/tiny_cpu.yaml)
  ARG ...         passed to the command unchanged: key=value overrides, --resume, ...
  --no-wait       return once the job is submitted (passed to `ray job submit`); follow it with
                  `ray job logs --follow ID` / `ray job status ID`
  --command CMD   the visualthinker_ray subcommand (default: train)
  -h, --help      this text

Script options come first; `--` ends them. The repository is uploaded without .venv, artifacts
and runs, so paths in the config are read on the cluster: use paths the cluster sees (hub ids,
/mnt/shared/...), or absolute paths when the head runs on this machine.

Environment:
  RAY_ADDRESS        the Ray dashboard / job server address (default http://127.0.0.1:8265)
  VTR_PYTHON         the python that runs the job on the cluster (default: python)
  VTR_RUNTIME_ENV    extra runtime-env env_vars as a JSON object, e.g. '{"HF_HUB_OFFLINE": "1"}'
  RAY_AUTH_TOKEN     the cluster's Ray authentication token (the KubeRay manifests in cluster/
                     turn token authentication on; cluster/README.md says how to read the token)
  RAY_AUTH_TOKEN_PATH  else a file holding the token; else `ray get-auth-token` (~/.ray/auth_token)
  RAY_AUTH_MODE      normally unset: a token found as above is sent; `token` insists on a token,
                     `disabled` sends none

Token authentication: the script first asks the head whether it requires a token
(GET /api/authentication_mode, which needs none). Unless the head says it does not, a token found
as above is sent with the submission (the script sets RAY_AUTH_MODE=token for `ray`; it never
prints the token). When the head requires a token and none was found, the script stops with an
error (exit 2) before uploading anything.

Examples:
  jobs/submit.sh                                           # tiny CPU job (local head)
  jobs/submit.sh jobs/sat_qwen2vl_2b.yaml --resume         # paper recipe, resumes if a checkpoint exists
  jobs/submit.sh --no-wait jobs/sat_qwen2vl_2b.yaml rollout.num_workers=8 --resume
EOF
}

command_name=train
config=""
wait_flag=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --no-wait) wait_flag=(--no-wait); shift ;;
    --command)
      (($# >= 2)) || { echo "error: --command needs a value" >&2; exit 2; }
      command_name="$2"; shift 2 ;;
    --command=*) command_name="${1#--command=}"; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
# The first remaining argument is the config file unless it is an option or an override.
if (($#)) && [[ "$1" != -* && "$1" != *=* ]]; then
  config="$1"
  shift
fi
config="${config:-jobs/tiny_cpu.yaml}"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
if [[ ! -f "$config" ]]; then
  echo "error: config file '$config' not found (paths are relative to the repository root $repo_root)" >&2
  exit 2
fi

ray_bin="$(command -v ray || true)"
if [[ -z "$ray_bin" && -x "$repo_root/.venv/bin/ray" ]]; then
  ray_bin="$repo_root/.venv/bin/ray"
fi
[[ -n "$ray_bin" ]] || { echo "error: the 'ray' CLI is not on PATH (pip install 'ray[default]')" >&2; exit 2; }

address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
python_bin="${VTR_PYTHON:-python}"
# A local python to build the runtime env JSON: the one next to `ray` (it always exists), else python3.
local_python="$(dirname "$ray_bin")/python"
[[ -x "$local_python" ]] || local_python="$(command -v python3 || true)"
[[ -n "$local_python" ]] || { echo "error: no local python found to build the runtime env" >&2; exit 2; }

# What the head requires: its /api/authentication_mode answers without a token. "unknown" when it
# cannot be asked (not reachable, not an http(s) address, a Ray without token authentication).
head_mode="$(
  "$local_python" - "$address" 2>/dev/null <<'PY' || echo unknown
import json
import sys
import urllib.request

address = sys.argv[1].rstrip("/")
mode = "unknown"
if address.startswith(("http://", "https://")):
    try:
        with urllib.request.urlopen(f"{address}/api/authentication_mode", timeout=3) as r:
            mode = json.loads(r.read()).get("authentication_mode") or "unknown"
    except Exception:
        pass
print(mode)
PY
)"

# Ray token authentication. The Ray CLI sends a token only when RAY_AUTH_MODE=token, and then takes
# it from RAY_AUTH_TOKEN, else from the file RAY_AUTH_TOKEN_PATH, else from ~/.ray/auth_token. Look
# for one in the same order and, when there is one, turn the mode on: a token given is a token sent.
auth_mode="${RAY_AUTH_MODE:-}"
token_source=""
# No look-up for a head without token authentication unless RAY_AUTH_MODE=token asks for one.
if [[ "$auth_mode" == token || ( "$auth_mode" != disabled && "$head_mode" != disabled ) ]]; then
  if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
    token_source="RAY_AUTH_TOKEN"
  elif [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    if [[ ! -f "$RAY_AUTH_TOKEN_PATH" || ! -r "$RAY_AUTH_TOKEN_PATH" || ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
      echo "error: RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is not a readable, non-empty token file" >&2
      exit 2
    fi
    token_source="RAY_AUTH_TOKEN_PATH ($RAY_AUTH_TOKEN_PATH)"
  elif "$ray_bin" get-auth-token >/dev/null 2>&1; then
    token_source="ray get-auth-token (~/.ray/auth_token)"
  fi
fi
if [[ -n "$token_source" ]]; then
  export RAY_AUTH_MODE=token
  echo "token authentication: sending the token from $token_source" >&2
elif [[ "$head_mode" == token || "$auth_mode" == token ]]; then
  if [[ "$head_mode" == token ]]; then
    echo "error: the Ray head at $address requires token authentication, and no token was given" >&2
  else
    echo "error: RAY_AUTH_MODE=token, and no token was given" >&2
  fi
  if [[ "$auth_mode" == disabled ]]; then
    echo "(RAY_AUTH_MODE=disabled sends no token: unset it)" >&2
  fi
  cat >&2 <<'EOF'
Give the cluster's token in RAY_AUTH_TOKEN, or in a file named by RAY_AUTH_TOKEN_PATH, or keep it in
~/.ray/auth_token. On KubeRay the token is in the Secret named after the Ray cluster, for example:
  export RAY_AUTH_TOKEN="$(kubectl get secret visualthinker -o jsonpath='{.data.auth_token}' | base64 -d)"
EOF
  exit 2
fi

# The runtime env: what the working-dir upload leaves out, and env vars for the job.
runtime_env="$(
  "$local_python" - "${VTR_RUNTIME_ENV:-}" <<'PY'
import json
import sys

try:
    extra = json.loads(sys.argv[1]) if sys.argv[1].strip() else {}
except json.JSONDecodeError as e:
    sys.exit(f"error: VTR_RUNTIME_ENV is not JSON: {e}")
if not isinstance(extra, dict):
    sys.exit("error: VTR_RUNTIME_ENV must be a JSON object of env vars")
env = {"PYTHONUNBUFFERED": "1"}
env.update({str(k): str(v) for k, v in extra.items()})
excludes = [".venv", "artifacts", "runs", ".git", "**/__pycache__", "*.egg-info",
            ".pytest_cache", ".ruff_cache", ".hypothesis", "build", "dist"]
print(json.dumps({"excludes": excludes, "env_vars": env}))
PY
)"

# The entrypoint goes as separate words: `ray job submit` shell-quotes each one (shlex.join) before
# the job runs it through /bin/sh, so an override like rollout.stop=[</answer>] arrives unchanged.
entrypoint=("$python_bin" -m visualthinker_ray "$command_name" --config "$config" "$@")
echo "submitting to $address: ${entrypoint[*]}" >&2
exec "$ray_bin" job submit \
  --address "$address" \
  --working-dir . \
  --runtime-env-json "$runtime_env" \
  "${wait_flag[@]}" \
  -- "${entrypoint[@]}"
