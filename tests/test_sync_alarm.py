"""bf16 end to end on the CPU and the sync alarm: real Ray, one multiprocess vLLM engine serving
bf16, one FSDP2 learner rank computing in bf16 (float32 master weights), the one-step-off default.
The probe scores the same fixed sequences on both sides after a sync; a sync that silently moves
nothing must ring the alarm, bf16's own numerics must not."""

import logging

import pytest
import ray

from visualthinker_ray.config import load_config
from visualthinker_ray.tracking import read_scalars
from visualthinker_ray.trainer import Trainer, probe_threshold

WARN = 0.05  # logging.probe_mismatch_warn's bf16 default (trainer.probe_threshold)
BROKEN_FROM = 3  # the syncs to this version and later are acknowledged but never reach the engine


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(num_cpus=6, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def acknowledge_without_syncing(pool, from_version: int):
    """A sync that reports success and moves nothing (a receiver that acknowledged without loading):
    no check on the way sees it; only the probe can."""
    sync = pool.sync

    def broken(sender, version):
        if version < from_version:
            return sync(sender, version)
        pool.version = version
        return {}

    pool.sync = broken


def test_bf16_one_step_off_trains_and_the_probe_rings_on_a_partial_sync(
    tiny_model_dir, synthetic_dir, tmp_path, caplog
):
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            "model.dtype=bfloat16",
            f"data.train={synthetic_dir / 'SAT'}",
            f"data.eval={synthetic_dir / 'CV-Bench'}",
            f"logging.dir={tmp_path}",
            "logging.probe_every=1",
            "rollout.max_new_tokens=16",
            # a reward with variance, so that every step moves the weights
            "reward.plugins=[{name: parity, function: 'tests.e2e_plugins:length_parity'}]",
            "learner.lr=1e-2",
            "learner.lr_schedule=constant",
            "algorithm.group_size=4",
            "algorithm.prompts_per_step=3",
            "algorithm.max_steps=4",
            "algorithm.max_staleness=1",
            "checkpoint.every=4",
            "resources.collective_timeout_s=60",
            "eval.at_start=false",
            "eval.at_end=false",
        ],
    )
    trainer = Trainer(cfg)
    try:
        assert {info["compute_dtype"] for info in trainer.learner.rank_info} == {"bfloat16"}
        # the frozen reference is stored in bf16 (tests/learner/test_learner_plan.py: exactly as cast)
        assert {info["reference_dtype"] for info in trainer.learner.rank_info} == {"bfloat16"}
        assert probe_threshold(cfg) == WARN
        acknowledge_without_syncing(trainer.rollout, BROKEN_FROM)
        with caplog.at_level(logging.WARNING, logger="visualthinker_ray.trainer"):
            trainer.fit()
        assert trainer.rollout.policy_versions() == [BROKEN_FROM - 1]
    finally:
        trainer.shutdown()
    s = {k: [v for _, v in series] for k, series in read_scalars(tmp_path).items()}
    probe = s["sync/probe_mismatch_worst_engine_mean"]
    assert len(probe) == 4
    # the syncs to versions 1 and 2 were whole: the gap is bf16's numerics, small but not float32's
    # ~1e-6 (both sides really compute in bf16; the sync sent bf16)
    assert all(1e-5 < p < WARN for p in probe[: BROKEN_FROM - 1]), probe
    # from version 3 the engine kept version 2 while the learner moved on: the alarm rings
    assert all(p > WARN for p in probe[BROKEN_FROM - 1 :]), probe
    alarms = [r.getMessage() for r in caplog.records if "scores the probe" in r.getMessage()]
    assert [m.split(":")[0] for m in alarms] == [f"step {v}" for v in range(BROKEN_FROM, 5)], alarms
    assert all("not at version" in m for m in alarms)
    # the engine/proximal gap and the importance weights are logged in every mode
    for tag in ("learner/engine_kl_k3", "learner/engine_abs_log_ratio", "learner/is_weight_mean"):
        assert len(s[tag]) == 4, tag
    assert s["learner/engine_abs_log_ratio"][0] > 1e-5  # bf16 engine against a bf16 learner
