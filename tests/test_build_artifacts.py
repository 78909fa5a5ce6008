"""scripts/build_artifacts.sh: the quickstart's inputs are reused while their stamps match and
rebuilt, with everything downstream, when they were made by other code or options; the shipped
start model is checked, and only rebuilt when asked."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(out: Path, data_args: str = "--train 48 --test 16", **env_vars) -> str:
    done = run_script(out, data_args, START_MODEL="rebuild", **env_vars)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def run_script(out: Path, data_args: str, **env_vars) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PY=sys.executable,
        WARMUP_ARGS="--steps 2 --check-prompts 0",
        DATA_ARGS=data_args,
        **env_vars,
    )
    return subprocess.run(
        ["bash", str(ROOT / "scripts/build_artifacts.sh"), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def mtimes(out: Path) -> dict[str, int]:
    files = {
        "tiny-model": "config.json",
        "data": "SAT/SAT_train.parquet",
        "warm-model": "config.json",
    }
    return {name: (out / name / f).stat().st_mtime_ns for name, f in files.items()}


def test_reuses_matching_stamps_and_rebuilds_stale_inputs_and_their_dependants(tmp_path):
    out = tmp_path / "artifacts"
    build(out)
    first = mtimes(out)
    assert all((out / name / ".stamp").is_file() for name in first)

    log = build(out)
    assert log.count("reusing") == 3, log
    assert mtimes(out) == first

    # Data made another way (here: other options): it and the warm-up trained on it are rebuilt.
    log = build(out, data_args="--train 48 --test 24")
    assert "rebuilding" in log and f"reusing {out / 'tiny-model'}" in log, log
    now = mtimes(out)
    assert now["tiny-model"] == first["tiny-model"]
    assert now["data"] != first["data"] and now["warm-model"] != first["warm-model"]

    # A model folder from an older checkout has no stamp at all: rebuilt, not trusted.
    (out / "warm-model" / ".stamp").unlink()
    build(out)
    assert mtimes(out)["warm-model"] != now["warm-model"]
    assert (out / "warm-model" / ".stamp").is_file()


def test_the_shipped_start_model_is_checked_not_rebuilt(tmp_path):
    shipped = ROOT / "start_models" / "tiny-depth-v1"
    done = run_script(tmp_path / "artifacts", "--train 48 --test 16")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "checksums match" in done.stdout
    assert (tmp_path / "artifacts" / "data" / ".stamp").is_file()
    assert not (tmp_path / "artifacts" / "warm-model").exists()  # no warm-up without START_MODEL=rebuild

    # a damaged copy (one changed byte) fails, naming the folder and both ways out
    copy = tmp_path / "start"
    copy.mkdir()
    for f in shipped.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(weights))
    done = run_script(tmp_path / "artifacts", "--train 48 --test 16", START_MODEL_DIR=str(copy))
    assert done.returncode == 1
    assert str(copy) in done.stderr and "START_MODEL=rebuild" in done.stderr
