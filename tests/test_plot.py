import pytest
from PIL import Image

from visualthinker_ray.plot import _matching, plot_run
from visualthinker_ray.tracking import Tracker, read_scalars


def test_plot_run_writes_a_png_from_tensorboard_logs(tmp_path):
    tracker = Tracker(tmp_path / "run", total_steps=5, progress=False)
    for step in range(1, 6):
        tracker.log_scalars(
            step,
            {
                "reward/total": step / 5,
                "reward/accuracy": step / 10,
                "accuracy_by_type/count": 0.5,
                "response_length/mean": 30 + step,
                "response/self_reflection_rate": 0.0,
            },
        )
        if step % 2 == 0:
            tracker.log_scalars(step, {"eval/accuracy/overall": 0.4 + step / 20, "eval/accuracy/Count": 0.5})
    tracker.close()
    out = plot_run(tmp_path / "run", tmp_path / "out" / "plot.png", title="test run")
    img = Image.open(out)
    assert img.format == "PNG" and img.size[0] > 800
    assert len(set(img.convert("L").tobytes())) > 10  # something was drawn
    scalars = read_scalars(tmp_path / "run")
    # the held-out panel picks up the overall and every per-task series
    assert _matching(scalars, ["eval/accuracy/overall", "eval/accuracy/*"]) == [
        "eval/accuracy/overall",
        "eval/accuracy/Count",
    ]


def test_plot_run_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_run(tmp_path / "missing", tmp_path / "p.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no TensorBoard scalars"):
        plot_run(tmp_path / "empty", tmp_path / "p.png")
