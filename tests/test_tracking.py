"""The optional trackers (W&B offline, MLflow local) get what TensorBoard gets: the same scalars at
the same steps and the same sample completions, and a resumed run continues the same runs."""

import importlib.util
import json

import pytest

from tests.tracker_readers import (
    mlflow_run,
    mlflow_scalars,
    wandb_runs,
    wandb_scalars,
    wandb_tables,
)
from visualthinker_ray.errors import InputError
from visualthinker_ray.tracking import Tracker, check_trackers, flat_params, read_scalars, samples_markdown

SAMPLES = [
    {
        "prompt_id": "sat-1",
        "gold": "A",
        "total": 2.0,
        "text": "<think>red is bigger</think>\n<answer>A</answer>",
    },
    {"prompt_id": "sat-2", "gold": "B", "total": 0.5, "text": "no <answer>"},
]
CONFIG = {"learner": {"lr": 5e-4, "cpu_threads": 2}, "logging": {"trackers": ["wandb", "mlflow"]}}


def log_steps(tracker, steps):
    for step in steps:
        tracker.log_scalars(step, {"reward/total": step / 4, "response_length/mean": 40 + step, "flag": True})
        if step % 2 == 0:
            tracker.log_scalars(
                step, {"eval/accuracy/overall": 0.5 + step / 100, "eval/accuracy/CV-Bench (2D)": 0.25}
            )
            tracker.log_samples(step, SAMPLES)


def tracker(log_dir, start_step=0):
    return Tracker(
        log_dir, total_steps=6, start_step=start_step, progress=False, trackers=["wandb", "mlflow"],
        project="tests", config=CONFIG,
    )  # fmt: skip


def test_wandb_and_mlflow_get_the_same_scalars_and_samples_as_tensorboard(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    t = tracker(run_dir)
    log_steps(t, range(1, 5))
    t.close()

    board = read_scalars(run_dir)
    assert set(board) == {
        "reward/total",
        "response_length/mean",
        "eval/accuracy/overall",
        "eval/accuracy/CV-Bench (2D)",
    }
    assert board["eval/accuracy/overall"] == [(2, pytest.approx(0.52)), (4, pytest.approx(0.54))]
    (wandb_dir,) = wandb_runs(run_dir)
    assert wandb_scalars(wandb_dir) == {
        k: [(s, pytest.approx(v)) for s, v in pts] for k, pts in board.items()
    }
    # MLflow names may not hold parentheses: the one key that has them is renamed, values kept
    expected = {k.replace("(", "_").replace(")", "_"): pts for k, pts in board.items()}
    assert mlflow_scalars(run_dir) == {
        k: [(s, pytest.approx(v)) for s, v in pts] for k, pts in expected.items()
    }

    # the samples: a table per logged step in W&B, a markdown file per step in MLflow
    tables = wandb_tables(wandb_dir)
    assert [step for step, _ in tables] == [2, 4]
    assert tables[0][1]["columns"] == ["step", "prompt_id", "gold", "reward", "completion"]
    assert tables[0][1]["data"] == [[2, s["prompt_id"], s["gold"], s["total"], s["text"]] for s in SAMPLES]
    client, run = mlflow_run(run_dir)
    stored = client.download_artifacts(run.info.run_id, "samples", str(tmp_path / "dl"))
    assert sorted(p.name for p in (tmp_path / "dl" / "samples").iterdir()) == [
        "step_000002.md",
        "step_000004.md",
    ]
    assert (tmp_path / "dl" / "samples" / "step_000004.md").read_text() == samples_markdown(SAMPLES)
    assert stored
    # the config as MLflow params, the run marked finished
    assert run.data.params["learner.lr"] == "0.0005"
    assert run.data.params["logging.trackers"] == '["wandb", "mlflow"]'
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run"


def test_a_resumed_run_continues_the_same_wandb_and_mlflow_runs(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    first = tracker(run_dir)
    log_steps(first, range(1, 4))
    first.close(failed=True)  # killed after step 3, last checkpoint at step 2
    ids = json.loads((run_dir / "trackers.json").read_text())
    client, run = mlflow_run(run_dir)
    assert run.info.status == "FAILED"

    resumed = tracker(run_dir, start_step=2)
    log_steps(resumed, range(3, 5))
    resumed.close()
    assert json.loads((run_dir / "trackers.json").read_text()) == ids
    client, run = mlflow_run(run_dir)
    assert run.info.status == "FINISHED"
    # step 3 was logged by both runs: MLflow keeps both points, the later ones follow
    assert [s for s, _ in mlflow_scalars(run_dir)["reward/total"]] == [1, 2, 3, 3, 4]
    # W&B writes one offline file per session; both carry the one run id
    sessions = wandb_runs(run_dir)
    assert len(sessions) == 2 and all(p.name.endswith(ids["wandb"]) for p in sessions)
    assert [s for s, _ in wandb_scalars(sessions[1])["reward/total"]] == [3, 4]

    # a new run from step 0 in the same folder starts new tracker runs
    fresh = tracker(run_dir)
    fresh.close()
    new_ids = json.loads((run_dir / "trackers.json").read_text())
    assert new_ids["wandb"] != ids["wandb"] and new_ids["mlflow"] != ids["mlflow"]


def test_a_missing_tracker_package_is_a_clear_error_before_anything_starts(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(
        InputError, match=r"'wandb' but wandb is not installed: pip install 'visualthinker-ray\[trackers\]'"
    ):
        check_trackers(["mlflow", "wandb"])
    check_trackers(["mlflow"])


def test_unknown_tracker_names_are_refused_by_the_config():
    from visualthinker_ray.config import ConfigError, load_config

    with pytest.raises(
        ConfigError, match="logging.trackers.0: Input should be 'tensorboard', 'wandb' or 'mlflow'"
    ):
        load_config(None, ["logging.trackers=[tensorbord]"])
    assert load_config(None, ["logging.trackers=[tensorboard, mlflow]"]).logging.trackers == [
        "tensorboard",
        "mlflow",
    ]


def test_flat_params_name_every_leaf_by_its_path():
    assert flat_params({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2], "f": None}) == {
        "a.b": "1", "a.c.d": "x", "e": "[1, 2]", "f": "null",
    }  # fmt: skip
