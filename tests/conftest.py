"""Shared fixtures: one tiny model and one synthetic data set per test session (built locally, no hub)."""

import os

import pytest

# vLLM runs as on GPUs: AsyncLLM, its engine core and workers in their own processes; a small KV
# cache on the CPU, and quiet logs in test output.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 16


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from visualthinker_ray.toy.tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0))


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    from visualthinker_ray.toy.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(out, n_train=48, n_test=24, seed=0)
    return out


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """W&B without network or any file outside tmp_path."""
    for var, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
        "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
        "WANDB_DATA_DIR": tmp_path / "wandb-data",
    }.items():
        monkeypatch.setenv(var, str(value))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
