"""Fixtures of the rollout tests."""

import pytest

from visualthinker_ray.data.sat import load_sat


@pytest.fixture(scope="module")
def records(synthetic_dir):
    """The first four SAT training prompts of the session's synthetic data."""
    return load_sat(str(synthetic_dir / "SAT"), split="train", seed=0).records[:4]
