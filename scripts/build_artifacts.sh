#!/usr/bin/env bash
# Build the main job's inputs under ROOT (default: artifacts): the synthetic data, and check the
# start model that ships with the repository (START_MODEL_DIR, default start_models/tiny-depth-v1:
# the stand-in for a downloaded base model, its provenance in PROVENANCE.md there) against its
# SHA256SUMS. START_MODEL=rebuild also makes the start model again, into ROOT/warm-model: the tiny
# model, then the grounded warm-up (about 31 minutes on 2 cores); never triggered by an edit.
# Each folder built gets a .stamp: a hash of the command that made it, the code that made it and the
# stamps of its inputs. A folder whose stamp matches is reused; one built by other code or options
# (or by an older checkout, with no stamp) is rebuilt, so a code change never trains on stale
# inputs. DATA_ARGS and WARMUP_ARGS add options to make-synthetic and to the warm-up.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-artifacts}
PY=${PY:-.venv/bin/python}

# key CMD FILE...: a hash of a command line and the contents of the files it depends on.
key() {
    local cmd=$1
    shift
    { echo "$cmd"; cat "$@"; } | sha256sum | cut -c1-16
}

# build DIR KEY CMD...: run CMD unless DIR holds a stamp equal to KEY; then stamp DIR.
build() {
    local dir=$1 want=$2
    shift 2
    if [[ -f $dir/.stamp && $(cat "$dir/.stamp") == "$want" ]]; then
        echo "reusing $dir (stamp $want)"
        return
    fi
    if [[ -e $dir ]]; then
        echo "rebuilding $dir: it was built by other code or options"
        rm -rf "$dir"
    fi
    "$@"
    echo "$want" >"$dir/.stamp"
}

M=visualthinker_ray
# The embedded default (docs/README.md): a fan-in tiny model with text M-RoPE base 10 (so image
# columns get distinct rotations); SAT "depth" and CV-Bench Depth questions about two objects of ONE
# shape (only the image says which is closer); 8,192 SAT rows, so the RL run sees every prompt once;
# a grounded warm-up of 10,000 steps on the first 4,096 of them (about 31 minutes on 2 cores, once:
# the folder is reused afterwards). Rows are made one by one from (seed, split, row), so the first
# 4,096 rows, and the held-out set, are those of the 4,096-row data the start model was built on.
model_cmd="$PY -m $M make-tiny-model --out $ROOT/tiny-model --seed 0 --init fan_in --rope-theta 10"
data_cmd="$PY -m $M make-synthetic --out $ROOT/data --train 8192 --test 256 --seed 0 --question-types depth --cvbench-tasks Depth --same-shape-sizes ${DATA_ARGS:-}"
warm_cmd="$PY -m $M warmup --model $ROOT/tiny-model --data $ROOT/data/SAT --out $ROOT/warm-model --limit 4096 --reasoning grounded --steps 10000 --lr 1e-3 --log-every 500 --max-new-tokens 96 ${WARMUP_ARGS:-}"

# shellcheck disable=SC2086  # the commands are word-split on purpose
build "$ROOT/data" "$(key "$data_cmd" $M/toy/synthetic.py $M/data/cvbench.py)" $data_cmd

if [[ ${START_MODEL:-shipped} != rebuild ]]; then
    START=${START_MODEL_DIR:-start_models/tiny-depth-v1}
    if ! (cd "$START" && sha256sum --quiet -c SHA256SUMS); then
        echo "error: the start model in $START does not match its SHA256SUMS (a partial clone, a" \
            "Git LFS pointer or an edit?); restore it with git checkout -- $START, or rebuild it:" \
            "START_MODEL=rebuild bash scripts/build_artifacts.sh (see $START/PROVENANCE.md)" >&2
        exit 1
    fi
    echo "start model $START: checksums match"
    exit 0
fi
# shellcheck disable=SC2086
build "$ROOT/tiny-model" "$(key "$model_cmd" $M/toy/tiny_model.py)" $model_cmd
# The stand-in for a pretrained base model: a supervised warm-up that teaches the R1-Zero format,
# with reasoning that says where the asked-about objects are and how big, and a RANDOM answer (it
# writes well-formed completions and answers at chance).
warm_key=$(key "$warm_cmd" $M/toy/warmup.py $M/toy/synthetic.py $M/sequences.py $M/data/*.py "$ROOT/tiny-model/.stamp" "$ROOT/data/.stamp")
# shellcheck disable=SC2086
build "$ROOT/warm-model" "$warm_key" $warm_cmd
