"""The weight-sync transport: bucket planning, update checks and the handshake (pure), and real gloo
groups between the test process (rank 0) and Ray actors on loopback: exact bytes, the wire dtype,
bounded failures, rebuilds."""

import random
import time

import pytest
import ray
import torch

from visualthinker_ray.ray_calls import free_port
from visualthinker_ray.rollout.engine import prompt_seed
from visualthinker_ray.weight_sync import (
    Handshake,
    TensorMeta,
    WeightSyncError,
    check_update,
    params_digest,
    plan_buckets,
    tensor_metas,
)
from visualthinker_ray.weight_sync.coordinator import rank_offsets
from visualthinker_ray.weight_sync.plan import handshake_mismatch, wire_dtype
from visualthinker_ray.weight_sync.transport import SyncGroup, WeightSender, receive_buckets

TIMEOUT_S = 4.0


def _random_metas(seed: int, n: int = 60) -> list[TensorMeta]:
    rng = random.Random(seed)
    dtypes = ["float32", "bfloat16", "float16", "int64"]
    return [
        TensorMeta(
            f"t{i}",
            tuple(rng.choice([1, 3, 7, 64, 300]) for _ in range(rng.randint(0, 3))),
            rng.choice(dtypes),
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [64, 1000, 10_000, 10**9])
def test_plan_buckets_invariants(seed, budget):
    metas = _random_metas(seed)
    plan = plan_buckets(metas, budget)
    placed = sorted(i for b in plan for i, _ in b.entries)
    assert placed == list(range(len(metas))), "every tensor exactly once"
    for b in plan:
        assert {metas[i].dtype for i, _ in b.entries} == {b.dtype}, "one dtype per bucket"
        nbytes = sum(metas[i].nbytes for i, _ in b.entries)
        assert nbytes <= budget or len(b.entries) == 1, "over budget only as a singleton"
        # the tensors tile the flat buffer exactly, in stream order
        offsets = [off for _, off in b.entries]
        sizes = [metas[i].numel for i, _ in b.entries]
        assert offsets == [sum(sizes[:k]) for k in range(len(sizes))] and sum(sizes) == b.numel
        assert [i for i, _ in b.entries] == sorted(i for i, _ in b.entries)
    # a streaming sender can broadcast each bucket as soon as its last tensor arrives
    assert [b.last_index for b in plan] == sorted(b.last_index for b in plan)


def test_plan_buckets_packs_small_tensors_and_isolates_big_ones():
    metas = [TensorMeta(f"s{i}", (10,), "float32") for i in range(10)] + [
        TensorMeta("big", (1000,), "float32")
    ]
    plan = plan_buckets(metas, 200)  # 40 B per small tensor: 5 per bucket
    assert [len(b.entries) for b in plan] == [5, 5, 1]
    assert plan[-1].entries == ((10, 0),)
    with pytest.raises(ValueError):
        plan_buckets(metas, 0)


def test_check_update_is_strict():
    expected = {"a.weight": (2, 3), "b.bias": (3,)}
    check_update([("a.weight", (2, 3)), ("b.bias", (3,)), ("tied", (3,))], expected, {"tied": (3,)})
    with pytest.raises(WeightSyncError, match=r"unknown weight 'a.wieght'.*did you mean a.weight"):
        check_update([("a.wieght", (2, 3)), ("b.bias", (3,))], expected)
    with pytest.raises(WeightSyncError, match=r"missing 1 of 2 weights.*b.bias"):
        check_update([("a.weight", (2, 3))], expected)
    with pytest.raises(WeightSyncError, match=r"'b.bias' has shape \(1,\)"):
        check_update([("a.weight", (2, 3)), ("b.bias", (1,))], expected)
    with pytest.raises(WeightSyncError, match="sent twice"):
        check_update([("a.weight", (2, 3)), ("a.weight", (2, 3)), ("b.bias", (3,))], expected)
    # frozen parameters may be left out, by name and in whole blocks; any other omission still fails
    model = {
        "m.visual.blocks.0.qkv.weight": (3,),
        "m.text.layers.0.q.weight": (2,),
        "m.text.layers.0.k.weight": (2,),
    }
    text = [("m.text.layers.0.q.weight", (2,)), ("m.text.layers.0.k.weight", (2,))]
    check_update(text, model, may_skip=["m.visual.blocks.0.qkv.weight"])
    with pytest.raises(WeightSyncError, match=r"missing 1 of 3 weights.*m.visual.blocks.0.qkv.weight"):
        check_update(text, model, may_skip=["x"])
    # q without k would make vLLM rebuild the fused qkv layer from a partial load
    with pytest.raises(WeightSyncError, match=r"leaves out only some weights of \['m.text.layers.0'\]"):
        check_update(
            text[:1] + [("m.visual.blocks.0.qkv.weight", (3,))], model, may_skip=["m.text.layers.0.k.weight"]
        )


def test_wire_dtype_casts_floating_weights_only():
    named = [("w", torch.zeros(2, 3)), ("i", torch.zeros(4, dtype=torch.int64)), ("h", torch.zeros(1).half())]
    assert [m.dtype for m in tensor_metas(named)] == ["float32", "int64", "float16"]
    assert [m.dtype for m in tensor_metas(named, "bfloat16")] == ["bfloat16", "int64", "bfloat16"]
    assert wire_dtype("int64", "bfloat16") == "int64" and wire_dtype("float32", None) == "float32"
    # half the bytes of an fp32 model on the wire
    assert sum(m.nbytes for m in tensor_metas(named[:1], "bfloat16")) * 2 == sum(
        m.nbytes for m in tensor_metas(named[:1])
    )


def test_handshake_names_every_differing_field():
    a = Handshake("gloo", 3, "float32", params_digest({"w": (2, 3)}), 5)
    assert handshake_mismatch(a, Handshake.from_json(a.to_json())) == []
    b = Handshake("gloo", 4, "bfloat16", params_digest({"w": (3, 2)}), 5)
    diff = handshake_mismatch(a, b)
    assert [d.split(":")[0] for d in diff] == ["world_size", "wire_dtype", "params"]
    assert "3 != 4" in diff[0] and "'float32' != 'bfloat16'" in diff[1]
    # the digest depends on names and shapes, not on the order they are listed in
    assert params_digest({"a": (1,), "b": (2,)}) == params_digest({"b": (2,), "a": (1,)})


def test_rank_offsets_give_every_engine_worker_its_own_rank():
    # two rollout engines with tensor parallel 2 and 1: ranks 1-2 and 3, world 4 with the sender
    assert rank_offsets([2, 1]) == ([1, 3], 4)
    assert rank_offsets([1, 1, 1]) == ([1, 2, 3], 4)


def test_prompt_seeds_differ_per_prompt_and_repeat_per_step():
    seeds = [prompt_seed(7, f"p{i}") for i in range(100)]
    assert len(set(seeds)) == 100 and all(0 <= s < 2**31 for s in seeds)
    assert prompt_seed(7, "p0") == prompt_seed(7, "p0") != prompt_seed(8, "p0")


@ray.remote(num_cpus=1)
class Peer:
    """A bare receiver (rank >= 1) with no engine."""

    def __init__(self):
        self.rx = None

    def join(self, port, world, rank, timeout_s, handshake=None):
        if self.rx is not None:
            self.rx.close()
        self.rx = None
        hs = Handshake.from_json(handshake) if handshake else _handshake(world)
        self.rx = SyncGroup("127.0.0.1", port, hs, rank, timeout_s, "cpu")
        return True

    def receive(self, metas, plan):
        got = {n: t.clone() for bucket in receive_buckets(self.rx, metas, plan) for n, t in bucket}
        return {m.name: got[m.name] for m in metas}

    def sleep(self, s):
        time.sleep(s)
        return True


@pytest.fixture(scope="module")
def peers():
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    ps = [Peer.remote(), Peer.remote()]
    ray.get([p.sleep.remote(0) for p in ps], timeout=60)
    yield ps
    ray.shutdown()


def _handshake(world: int, wire: str = "float32") -> Handshake:
    return Handshake("gloo", world, wire, "digest", 0)


def _group(peers, timeout_s=TIMEOUT_S, joiners=None):
    port = free_port()
    world = len(peers) + 1
    joiners = peers if joiners is None else joiners
    refs = [p.join.remote(port, world, peers.index(p) + 1, timeout_s) for p in joiners]
    return WeightSender("127.0.0.1", port, _handshake(world), timeout_s, "cpu", bucket_bytes=4096), refs


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [
        ("w.fp32", torch.randn(37, 11, generator=g)),
        ("w.bf16", torch.randn(5, 9, generator=g).to(torch.bfloat16)),
        ("w.big", torch.randn(3000, generator=g)),  # over the 4 KiB budget: its own bucket
        ("w.int", torch.arange(7)),
        ("w.scalar", torch.tensor(3.5)),
    ] + [(f"w.small{i}", torch.randn(50, generator=g)) for i in range(40)]


def test_broadcast_delivers_exact_bytes_and_a_new_port_rebuilds(peers):
    for _ in range(2):  # the second group replaces the first on a fresh port, same processes
        sender, joined = _group(peers)
        assert ray.get(joined, timeout=30) == [True, True]
        named = _tensors()
        metas = tensor_metas(named)
        plan = plan_buckets(metas, 4096)
        assert len(plan) > 3
        got = [p.receive.remote(metas, plan) for p in peers]
        stats = sender.send(iter(named), metas, plan)
        assert stats["buckets"] == len(plan)
        for out in ray.get(got, timeout=30):
            assert list(out) == [n for n, _ in named]
            for n, t in named:
                assert out[n].dtype == t.dtype and torch.equal(out[n], t), n
        sender.close()


def test_a_rank_that_never_joins_is_named_within_the_deadline(peers):
    t0 = time.monotonic()
    port = free_port()
    joined = peers[0].join.remote(port, 3, 1, 2.0)  # rank 2 never comes
    with pytest.raises(
        WeightSyncError, match=r"rank\(s\) \[2\] of 3 did not join within 2s \(seen from rank 0\)"
    ):
        WeightSender("127.0.0.1", port, _handshake(3), 2.0, "cpu")
    assert time.monotonic() - t0 < 2.0 + 3.0
    # the peer that did join fails too, in bounded time, instead of waiting for a group that never forms
    with pytest.raises(ray.exceptions.RayTaskError, match="WeightSyncError"):
        ray.get(joined, timeout=10)


def test_a_stuck_peer_makes_the_send_raise_within_the_timeout(peers):
    sender, joined = _group(peers, timeout_s=3.0)
    ray.get(joined, timeout=30)
    named = [("big", torch.zeros(8_000_000))]  # 32 MB: more than the socket buffers take unread
    metas = tensor_metas(named)
    plan = plan_buckets(metas, 4096)
    live = peers[0].receive.remote(metas, plan)
    stuck = peers[1].sleep.remote(6)  # joined, alive, but never takes part
    t0 = time.monotonic()
    with pytest.raises(
        WeightSyncError, match=r"weight-sync@127\.0\.0\.1:\d+: bucket 1/1 .* failed on rank 0"
    ):
        sender.send(iter(named), metas, plan)
    assert time.monotonic() - t0 < 3.0 + 2.0
    with pytest.raises(WeightSyncError, match="rebuild"):  # the group is marked broken
        sender.send(iter(named), metas, plan)
    ray.get(stuck, timeout=30)
    ray.wait([live], timeout=30)
    sender.close()


def test_sender_refuses_a_stream_that_differs_from_its_metadata(peers):
    sender, joined = _group(peers)
    ray.get(joined, timeout=30)
    named = _tensors()
    metas = tensor_metas(named)
    with pytest.raises(WeightSyncError, match=r"tensor #0 is w.bf16 .* metadata .* says w.fp32"):
        sender.send(iter(named[1:]), metas)
    sender.close()


def test_floating_weights_travel_in_the_wire_dtype_and_arrive_cast_exactly(peers):
    sender, joined = _group(peers)
    ray.get(joined, timeout=30)
    named = _tensors()
    metas = tensor_metas(named, "bfloat16")  # fp32 master weights, a bf16 engine
    plan = plan_buckets(metas, 4096)
    got = [p.receive.remote(metas, plan) for p in peers]
    stats = sender.send(iter(named), metas, plan)
    assert (
        stats["bytes"] == sum(m.nbytes for m in metas) < sum(t.numel() * t.element_size() for _, t in named)
    )
    for out in ray.get(got, timeout=30):
        for n, t in named:
            want = t.to(torch.bfloat16) if t.is_floating_point() else t
            assert out[n].dtype == want.dtype and torch.equal(out[n], want), n
    sender.close()


def test_a_rank_with_another_handshake_fails_group_creation_naming_the_field(peers):
    port = free_port()
    other = Handshake("gloo", 3, "bfloat16", "digest", 0)  # the peers think the wire is bf16
    joined = [p.join.remote(port, 3, i + 1, 5.0, other.to_json()) for i, p in enumerate(peers)]
    t0 = time.monotonic()
    with pytest.raises(
        WeightSyncError, match=r"rank 0 and rank 1 disagree on the sync \(wire_dtype: 'float32' != 'bfloat16'"
    ):
        WeightSender("127.0.0.1", port, _handshake(3), 5.0, "cpu")
    for ref in joined:  # the peers fail too, in bounded time (seeing the mismatch, or rank 0 gone)
        with pytest.raises(ray.exceptions.RayTaskError, match="disagree on the sync|lost the group's store"):
            ray.get(ref, timeout=30)
    assert time.monotonic() - t0 < 5.0 + 5.0


def test_reload_warnings_are_silenced_for_buffer_only_layers_and_skipped_syncs_only():
    import logging

    from visualthinker_ray.weight_sync.vllm_receiver import _SilenceSkippedLayers, buffer_only_classes

    class Rotary(torch.nn.Module):  # buffers only, like vLLM's rotary caches
        def __init__(self):
            super().__init__()
            self.register_buffer("cache", torch.ones(4))

    class Norm(torch.nn.Module):  # a parameter and a buffer
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4))
            self.register_buffer("eps", torch.ones(1))

    model = torch.nn.Sequential(Rotary(), Norm(), torch.nn.Linear(4, 4))
    assert buffer_only_classes(model) == {"Rotary"}

    quiet = _SilenceSkippedLayers(buffer_only_classes(model))

    def warning(layer):
        return logging.LogRecord("vllm", logging.WARNING, "", 0, "%s: Failed to load weights", (layer,), None)

    assert not quiet.filter(warning("Rotary"))  # expected on every sync
    assert quiet.filter(warning("Linear"))  # a layer kept stale weights: the user sees it
    assert quiet.filter(logging.LogRecord("vllm", logging.WARNING, "", 0, "something else", (), None))
    quiet.active = True  # a sync that leaves frozen layers out on purpose
    assert not quiet.filter(warning("Linear"))
    assert quiet.silenced == {"Rotary": 1, "Linear": 1} and quiet.passed == ["Linear"]
