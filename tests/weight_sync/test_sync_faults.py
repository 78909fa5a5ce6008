"""Weight-sync faults with the real sender: the FSDP2 learner (rank 0 of the sync group) and bare
receiver actors over gloo. A peer that never joins, one that dies in the middle of a sync: each
fails the sync within its bound, the learner rank survives, and a new group on a fresh port works."""

import os
import time

import pytest
import ray
import torch

from visualthinker_ray.config import load_config
from visualthinker_ray.learner.group import LearnerError, LearnerGroup
from visualthinker_ray.ray_calls import free_port, wait_all
from visualthinker_ray.weight_sync import Handshake, WeightSyncError, params_digest, plan_buckets
from visualthinker_ray.weight_sync.transport import SyncGroup, receive_buckets

TIMEOUT_S = 4.0
BOUND_S = TIMEOUT_S + 10.0  # the collective timeout plus Ray's call overhead on a busy 2-core machine


@ray.remote(num_cpus=1)
class Receiver:
    def __init__(self):
        self.group = None

    def join(self, port: int, handshake: str, rank: int) -> bool:
        self.group = SyncGroup("127.0.0.1", port, Handshake.from_json(handshake), rank, TIMEOUT_S, "cpu")
        return True

    def join_then_die(self, port: int, handshake: str, rank: int) -> None:
        """Checks in at the group's store with a matching handshake, then dies before connecting."""
        import datetime

        import torch.distributed as dist

        store = dist.TCPStore(
            "127.0.0.1", port, 2, is_master=False, timeout=datetime.timedelta(seconds=TIMEOUT_S)
        )
        store.set(f"joined/{rank}", handshake)
        time.sleep(0.2)
        os._exit(1)

    def receive(self, metas, plan, die_after_buckets: int | None = None) -> dict:
        got = {}
        for k, bucket in enumerate(receive_buckets(self.group, metas, plan)):
            if die_after_buckets is not None and k == die_after_buckets:
                os._exit(1)  # dies in the middle of the sync, as a crashed GPU worker would
            got.update({n: t.clone() for n, t in bucket})
        return got


@pytest.fixture(scope="module")
def learner(tiny_model_dir):
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    cfg = load_config(
        None, [f"model.path={tiny_model_dir}", "resources.collective_timeout_s=60", "algorithm.beta=0"]
    )
    group = LearnerGroup(cfg, total_optimizer_steps=1)
    yield group
    group.shutdown()
    ray.shutdown()


def _handshake(learner, world: int) -> str:
    metas = learner.weight_metas()
    return Handshake("gloo", world, "float32", params_digest({m.name: m.shape for m in metas}), 0).to_json()


def _open(learner, port: int, handshake: str):
    # The handshake is computed BEFORE this call: the learner rank answers nothing else while it
    # waits inside init_sync_group for its peers.
    return learner.init_sync_group("127.0.0.1", port, handshake, TIMEOUT_S)


def _assert_alive(learner) -> dict:
    weights = learner.full_state_dict()  # a collective over the learner's own group: it still works
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    return weights


def test_a_peer_dead_before_it_joins_fails_group_creation_in_bound_and_the_learner_survives(learner):
    dead = Receiver.remote()
    ray.kill(dead, no_restart=True)
    t0 = time.monotonic()
    with pytest.raises(
        WeightSyncError, match=r"rank\(s\) \[1\] of 2 did not join within 4s \(seen from rank 0\)"
    ):
        wait_all(
            _open(learner, free_port(), _handshake(learner, 2)),
            BOUND_S,
            "building the group",
            WeightSyncError,
        )
    assert time.monotonic() - t0 < BOUND_S
    _assert_alive(learner)


def test_a_peer_that_joins_then_dies_fails_group_creation_in_bound_and_the_learner_survives(learner):
    handshake = _handshake(learner, 2)
    port = free_port()
    refs = _open(learner, port, handshake)
    Receiver.remote().join_then_die.remote(port, handshake, 1)
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"rank 0 could not connect the gloo group within 4s"):
        wait_all(refs, BOUND_S, "building the group", WeightSyncError)
    assert time.monotonic() - t0 < BOUND_S
    _assert_alive(learner)


def test_a_peer_dead_mid_sync_fails_the_send_in_bound_then_a_fresh_group_delivers(learner):
    metas = learner.weight_metas()
    plan = plan_buckets(metas, 64 * 1024)  # many buckets: the peer dies after the first
    assert len(plan) > 3
    peer = Receiver.remote()
    port = free_port()
    handshake = _handshake(learner, 2)
    refs = _open(learner, port, handshake)
    refs["peer"] = peer.join.remote(port, handshake, 1)
    wait_all(refs, BOUND_S, "building the group", WeightSyncError)

    dying = peer.receive.remote(metas, plan, die_after_buckets=1)
    t0 = time.monotonic()
    with pytest.raises(
        WeightSyncError, match=r"learner rank 0: WeightSyncError: weight-sync@127\.0\.0\.1:\d+: bucket"
    ):
        wait_all(learner.send_weights(metas, plan), BOUND_S, "the sync", WeightSyncError)
    assert time.monotonic() - t0 < BOUND_S
    with pytest.raises(ray.exceptions.RayError):
        ray.get(dying, timeout=30)
    expected = _assert_alive(learner)

    # the learner builds a new group on a fresh port with a new peer, and the bytes are exact
    fresh = Receiver.remote()
    port = free_port()
    refs = _open(learner, port, handshake)
    refs["peer"] = fresh.join.remote(port, handshake, 1)
    wait_all(refs, BOUND_S, "rebuilding the group", WeightSyncError)
    got = fresh.receive.remote(metas, plan)
    wait_all(learner.send_weights(metas, plan), BOUND_S, "the sync", WeightSyncError)
    received = ray.get(got, timeout=30)
    assert set(received) == set(expected)
    assert all(torch.equal(received[n], expected[n]) for n in expected)


def test_a_receiver_of_another_checkpoint_is_refused_at_the_handshake(learner):
    peer = Receiver.remote()
    port = free_port()
    refs = _open(learner, port, _handshake(learner, 2))
    other = Handshake("gloo", 2, "float32", params_digest({"some.other.weight": (3,)}), 0).to_json()
    refs["peer"] = peer.join.remote(port, other, 1)
    with pytest.raises(WeightSyncError, match=r"disagree on the sync \(params: "):
        wait_all(refs, BOUND_S, "building the group", WeightSyncError)
    _assert_alive(learner)


def test_device_cuda_without_a_gpu_fails_at_start_with_a_clear_error(tiny_model_dir, learner):
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "resources.device=cuda"])
    with pytest.raises(LearnerError, match="resources.device=cuda but this process sees no GPU"):
        LearnerGroup(cfg, total_optimizer_steps=1, setup_timeout_s=60)


def test_a_failed_send_keeps_a_two_rank_learner_in_step(tiny_model_dir, learner):
    """Rank 0 fails before it broadcasts anything (here: no sync group); rank 1 gathers every
    parameter (an FSDP collective each). Rank 0 must still join those gathers, or rank 1 waits for
    them and the learner's next collective pairs with the wrong one."""
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            "learner.num_workers=2",
            "resources.collective_timeout_s=30",
            "algorithm.beta=0",
        ],
    )
    group = LearnerGroup(cfg, total_optimizer_steps=1)
    try:
        metas = group.weight_metas()
        t0 = time.monotonic()
        with pytest.raises(
            WeightSyncError, match="learner rank 0: RuntimeError: learner rank 0 has no weight-sync group"
        ):
            wait_all(
                group.send_weights(metas, plan_buckets(metas, 64 * 1024)), 25, "the sync", WeightSyncError
            )
        assert time.monotonic() - t0 < 25
        weights = _assert_alive(group)  # the next collectives pair up: the gathered weights are whole
        assert {n: tuple(t.shape) for n, t in weights.items()} == {m.name: m.shape for m in metas}
    finally:
        group.shutdown()
