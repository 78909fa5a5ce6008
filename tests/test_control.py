"""Sizing the rollout pool: the target a step takes, and the config that asks to follow the cluster."""

import pytest

from visualthinker_ray.config import ConfigError, load_config
from visualthinker_ray.trainer import rollout_target


@pytest.mark.parametrize(
    "requested, units, expected",
    [
        (None, None, None),  # nothing asked, not following: unchanged
        (3, None, 3),  # a `scale --rollout 3` request
        (None, 4.0, 4),  # following a cluster with 4 rollout units
        (2, 4.0, 4),  # following the cluster wins over a request
        (None, 0.0, 1),  # every rollout node gone: keep one worker (pending until a node comes)
        (None, 2.5, 2),  # a fractional unit does not hold a worker
    ],
)
def test_rollout_target(requested, units, expected):
    assert rollout_target(requested, units) == expected


def test_following_the_cluster_needs_the_rollout_resource():
    with pytest.raises(ConfigError, match="resources.rollout_resource"):
        load_config(None, ["rollout.scale_with_cluster=true"])
    cfg = load_config(None, ["rollout.scale_with_cluster=true", "resources.rollout_resource=rollout_gpu"])
    assert cfg.rollout.scale_with_cluster
