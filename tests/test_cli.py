"""The command line: input errors are one line and exit code 2; a bug keeps its traceback."""

import pytest

from visualthinker_ray import cli, plot


def test_an_input_error_is_one_line_with_exit_code_2(tmp_path, capsys):
    assert cli.main(["plot", "--logdir", str(tmp_path)]) == 2  # a folder without a run's logs
    err = capsys.readouterr().err
    assert err.startswith("error: no TensorBoard scalars under") and "Traceback" not in err


def test_a_value_error_from_a_bug_is_not_taken_for_bad_input(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(plot, "plot_run", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        cli.main(["plot", "--logdir", str(tmp_path)])
