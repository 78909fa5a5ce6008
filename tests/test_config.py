import pytest

from visualthinker_ray.config import Config, ConfigError, apply_override, dump_config, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_tiny_cpu_job():
    cfg = load_config()
    assert cfg.model.path == "artifacts/tiny-model"
    assert cfg.algorithm.beta == 0.04 and cfg.algorithm.group_size == 8


def test_file_then_overrides_take_precedence(tmp_path):
    p = write(tmp_path, "algorithm:\n  beta: 0.1\n  group_size: 4\nrollout:\n  engine: hf\n")
    cfg = load_config(p, ["algorithm.beta=0.0", "rollout.stop=[</answer>]", "data.train_limit=null"])
    assert cfg.algorithm.beta == 0.0  # override beats file
    assert cfg.algorithm.group_size == 4  # file beats default
    assert cfg.rollout.engine == "hf"
    assert cfg.rollout.stop == ["</answer>"]
    assert cfg.data.train_limit is None


def test_unknown_key_names_the_dotted_key_and_closest_valid_key(tmp_path):
    p = write(tmp_path, "algorithm:\n  betta: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "algorithm.betta" in msg and "did you mean beta" in msg


def test_unknown_section_suggests_section():
    with pytest.raises(ConfigError, match=r"unknown key 'rollut'.*did you mean rollout"):
        load_config(None, ["rollut.engine=hf"])


def test_unknown_key_in_list_item_names_valid_keys():
    with pytest.raises(ConfigError, match=r"reward\.plugins\.0\.wieght.*did you mean weight"):
        load_config(None, ["reward.plugins=[{name: x, function: 'm:f', wieght: 2}]"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("algorithm.beta=-1", "algorithm.beta"),
        ("rollout.engine=tensorrt", "rollout.engine"),
        ("rollout.temperature=hot", "rollout.temperature"),
        ("learner.lr_schedule=step", "learner.lr_schedule"),
        ("model.min_pixels=999999999", "model"),
        ("reward.plugins=[{name: x, function: nocolon}]", "reward.plugins.0.function"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["algorithm.beta"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_override({"a": 1}, "a.b=2")


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["algorithm.beta=0.5", "reward.plugins=[{name: x, function: 'm:f'}]"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg


def test_shipped_job_files_validate():
    from pathlib import Path

    jobs = sorted(Path(__file__).resolve().parents[1].joinpath("jobs").glob("*.yaml"))
    assert jobs, "no job files found"
    for job in jobs:
        assert isinstance(load_config(job), Config)
