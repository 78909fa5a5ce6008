"""Repair and resizing semantics of the rollout pool on HF workers (they start in seconds): the version
a completion carries is the version its weights had, even when every worker was lost between the
learner's update and the sync; and a resize never cancels the replacement of a lost worker."""

import logging

import pytest
import ray

from tests.conftest import MAX_PIXELS, MIN_PIXELS
from tests.rollout.test_rollout_worker import LOGPROB_TOL, TEMPERATURE, G, _recomputed_logprob_error
from tests.weight_source import ModelWeightSource
from visualthinker_ray.models import load_model, load_processor
from visualthinker_ray.rollout.engine import SamplingSpec
from visualthinker_ray.rollout.pool import RolloutPool, resize_plan


@pytest.fixture(scope="module")
def hf_pool(tiny_model_dir):
    ray.init(num_cpus=6, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    pool = RolloutPool(
        tiny_model_dir,
        engines=["hf", "hf"],
        engine_kwargs=dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        timeout_s=10.0,
        bucket_bytes=256 * 1024,
        max_restarts=100,
        hang_timeout_s=10.0,
    )
    source = ray.remote(num_cpus=0)(ModelWeightSource).remote(tiny_model_dir, 256 * 1024)
    yield pool, source
    pool.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def hf_reference(tiny_model_dir):
    return load_processor(tiny_model_dir, MIN_PIXELS, MAX_PIXELS), load_model(tiny_model_dir).eval()


def test_an_hf_pool_that_loses_every_worker_in_wait_done_labels_the_regenerated_prompts_truly(
    hf_pool, records, hf_reference
):
    """The trainer's HF path: the learner has updated (the sender holds version 2), then wait_done
    waits for the batch generated on version 1, and every worker dies. The prompts are generated
    again after the sync to version 2, and say so; none is labelled 1 with version 2's weights."""
    pool, source = hf_pool
    pool.settle()
    pool.sync(source, version=1)
    gen = pool.submit(records, SamplingSpec(n=G, temperature=TEMPERATURE, max_new_tokens=64, seed=0))
    ray.get(source.perturb.remote(seed=11))  # the learner's update
    new = ray.get(source.weights.remote())
    replaced = pool.replaced
    for m in list(pool.members):
        ray.kill(m.handle, no_restart=True)
    pool.wait_done([gen], timeout_s=120)
    assert pool.replaced == replaced + 2, "the generation finished before the kills: nothing tested"
    pool.sync(source, version=2)
    comps, _ = pool.collect(gen, timeout_s=120)
    assert [(c.prompt_id, c.sample_index) for c in comps] == [(r.id, k) for r in records for k in range(G)]
    assert {c.policy_version for c in comps} == {2}
    processor, model = hf_reference
    assert _recomputed_logprob_error(comps, records, processor, model, new) < LOGPROB_TOL


@pytest.mark.parametrize(
    "n, serving, pending, expected",
    [
        (3, 2, [], (1, [], 0)),
        (3, 1, [True], (1, [], 0)),  # a pending replacement counts towards growth
        (1, 1, [True], (0, [], 0)),  # the lost node's units are gone: its replacement stays
        (1, 1, [True, False], (0, [1], 0)),  # a scale-up is cancelled, the replacement kept
        (1, 2, [False, True, False], (0, [2, 0], 1)),
        (2, 2, [True, True], (0, [], 0)),
        (1, 3, [], (0, [], 2)),
    ],
)
def test_resize_plan_cancels_scale_ups_and_never_a_replacement(n, serving, pending, expected):
    assert resize_plan(n, serving, pending) == expected
    with pytest.raises(ValueError):
        resize_plan(0, serving, pending)


def test_a_resize_never_cancels_the_replacement_of_a_lost_worker(hf_pool, caplog):
    """A node is lost: the cluster's rollout units drop, so a pool that follows the cluster is asked
    to shrink, before or after it has seen the loss. Its live worker keeps serving, the lost one is
    replaced and the replacement stays pending (its resource request is what brings a node back);
    only a worker a scale-up started is cancelled."""
    pool, source = hf_pool
    pool.settle()
    pool.sync(source, version=3)
    assert len(pool.members) == 2 and pool.joining == 0
    lost, survivor = pool.members
    replaced = pool.replaced
    ray.kill(lost.handle, no_restart=True)  # the pool has not noticed yet
    with caplog.at_level(logging.INFO, logger="visualthinker_ray.rollout.pool"):
        pool.scale_to(1)
    assert pool.members == [survivor], "a resize retired a live worker and kept a dead one"
    assert pool.replaced == replaced + 1
    (replacement,) = [m for m, _ in pool._joining]
    assert pool.pending == [f"{replacement.label}: replaces {lost.label}"]
    assert "kept pending" in caplog.text and replacement.label in caplog.text

    pool.scale_to(3)  # a scale-up starts one more
    assert pool.joining == 2
    pool.scale_to(1)  # and a shrink cancels that one only
    assert pool.members == [survivor]
    assert pool.pending == [f"{replacement.label}: replaces {lost.label}"]
    pool.scale_to(1)  # nothing to do: the replacement is kept, not restarted
    assert [m for m, _ in pool._joining] == [replacement]

    pool.settle()
    pool.sync(source, version=4)  # the replacement joins with the weights
    assert pool.members == [survivor, replacement] and pool.policy_versions() == [4, 4]
