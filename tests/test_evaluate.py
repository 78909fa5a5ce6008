import json

import pytest

from visualthinker_ray.evaluate import cvbench_correct, score_rows

CHOICES = ["left", "right", "above"]


@pytest.mark.parametrize(
    "completion, correct",
    [
        ("...</think><answer>B</answer>", True),
        ("...</think><answer>(B)</answer>", True),
        ("...</think><answer>(b)</answer>", True),
        ("...</think><answer>right</answer>", True),
        ("...</think><answer> Right. </answer>", True),
        ("...</think><answer>A</answer>", False),
        ("...</think><answer>left</answer>", False),
        ("...</think><answer></answer>", False),
        ("no tags at all, just B", False),  # the whole response is not a bare letter
        ("B", True),  # no tags: the whole response is the answer
        ("</think><answer>right</answer><answer>left</answer>", True),  # the first answer counts
    ],
)
def test_cvbench_correct(completion, correct):
    assert cvbench_correct(completion, "right", CHOICES) is correct


def test_score_rows_micro_average_and_official_score():
    rows = (
        [{"task": "Count", "source": "ADE20K", "correct": c} for c in (True, False)]  # 0.5
        + [{"task": "Relation", "source": "COCO", "correct": c} for c in (True, True, True, False)]  # 0.75
        + [{"task": "Depth", "source": "Omni3D", "correct": c} for c in (True, False, False, False)]  # 0.25
    )
    s = score_rows(rows)
    assert s["accuracy/Count"] == 0.5 and s["accuracy/Relation"] == 0.75 and s["accuracy/Depth"] == 0.25
    assert s["accuracy/overall"] == pytest.approx(5 / 10)  # micro: rows, not tasks
    assert s["cvbench_score"] == pytest.approx(((0.5 + 0.75) / 2 + 0.25) / 2)
    assert "cvbench_score" not in score_rows(rows[:2])  # needs all three sources


def test_eval_command_writes_per_task_results(tiny_model_dir, synthetic_dir, tmp_path, capsys):
    import ray

    from visualthinker_ray.cli import main

    out = tmp_path / "eval.json"
    try:
        rc = main(
            [
                "eval",
                "--model",
                tiny_model_dir,
                "--data",
                str(synthetic_dir / "CV-Bench"),
                "--out",
                str(out),
                "rollout.engine=hf",
                "rollout.eval_max_new_tokens=8",
                "eval.limit=12",
            ]
        )
    finally:
        ray.shutdown()
    assert rc == 0
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 12
    tasks = {r["task"] for r in result["rows"]}
    assert {f"accuracy/{t}" for t in tasks} <= set(result["scalars"])
    expected = sum(r["correct"] for r in result["rows"]) / 12
    assert result["scalars"]["accuracy/overall"] == pytest.approx(expected)
    assert "accuracy/overall" in capsys.readouterr().out


def test_format_progress_lists_every_evaluation_and_the_overall_change():
    from visualthinker_ray.evaluate import format_progress

    evals = [
        (0, {"accuracy/overall": 0.5, "accuracy/Depth": 0.5, "accuracy/Count": 0.25}),
        (120, {"accuracy/overall": 0.75, "accuracy/Depth": 0.875}),
    ]
    lines = format_progress(evals).splitlines()
    assert lines[1].split() == ["step", "overall", "Count", "Depth"]
    assert lines[2].split() == ["0", "0.500", "0.250", "0.500"]
    assert lines[3].split() == ["120", "0.750", "-", "0.875"]  # a task missing at a step shows as '-'
    assert lines[-1] == "step 0 -> 120: +25.0 points overall"
    assert "no held-out evaluation" in format_progress([])
