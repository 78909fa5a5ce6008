"""The learner group on the CPU: real Ray actors, FSDP2 over gloo, the real tiny Qwen2-VL."""

import dataclasses
import math
import random

import pytest
import ray
import torch

from visualthinker_ray.batches import TrainItem
from visualthinker_ray.config import load_config
from visualthinker_ray.data.sat import load_sat
from visualthinker_ray.learner.group import LearnerGroup
from visualthinker_ray.models import VISION_SPECIAL_TOKENS, load_processor
from visualthinker_ray.sequences import encode_prompt

G = 4


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def items(tiny_model_dir, synthetic_dir):
    """G completions for each of 3 prompts: random non-special tokens of varied lengths."""
    records = load_sat(str(synthetic_dir / "SAT"), split="train", seed=0).records[:3]
    cfg = load_config()
    proc = load_processor(tiny_model_dir, cfg.model.min_pixels, cfg.model.max_pixels)
    banned = {proc.tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS}
    vocab = [i for i in range(len(proc.tokenizer)) if i not in banned]
    rng = random.Random(0)
    out = []
    for rec in records:
        prompt_len = len(encode_prompt(proc, rec, cfg.model.min_pixels, cfg.model.max_pixels).input_ids)
        for _ in range(G):
            out.append(
                TrainItem(
                    record=rec,
                    token_ids=[rng.choice(vocab) for _ in range(rng.randint(3, 10))],
                    advantage=0.0,
                    prompt_len=prompt_len,
                )
            )
    return out


def with_advantages(items, advantages):
    return [dataclasses.replace(it, advantage=float(a)) for it, a in zip(items, advantages, strict=True)]


def make_group(tiny_model_dir, *overrides, total_steps=10):
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            "learner.lr=1e-3",
            "learner.lr_schedule=constant",
            "learner.micro_batch_tokens=256",
            "resources.collective_timeout_s=120",
            "algorithm.tis_cap=null",  # these items carry no engine log-probs unless a test adds them
            *overrides,
        ],
    )
    return LearnerGroup(cfg, total_optimizer_steps=total_steps)


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def run_update(tiny_model_dir, batch, world, *overrides):
    group = make_group(tiny_model_dir, f"learner.num_workers={world}", "algorithm.beta=0.04", *overrides)
    before = group.full_state_dict()
    metrics = group.train_step(batch)
    after = group.full_state_dict()
    group.shutdown()
    metrics["gradient_checkpointing"] = group.rank_info[0]["gradient_checkpointing"]
    metrics["torch_threads"] = group.rank_info[0]["torch_threads"]
    return before, after, metrics


def assert_same_update(a, b):
    (b1, a1, m1), (b2, a2, m2) = a, b
    assert all(torch.equal(b1[k], b2[k]) for k in b1)  # same start
    assert changed(b1, a1), "the update changed nothing"
    worst = max((a1[k] - a2[k]).abs().max().item() for k in a1)
    assert worst < 1e-5, f"updates differ by {worst:.2e}"
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
    assert m1["sequences"] == m2["sequences"]


@pytest.mark.parametrize(
    "overrides",
    [(), ("learner.mini_batches=2", "learner.update_epochs=2")],
    ids=["one-update", "two-minibatches-two-epochs"],
)
def test_two_ranks_and_one_rank_give_the_same_update(tiny_model_dir, items, overrides):
    batch = with_advantages(items, [1.0, -1.0, 0.5, -0.5] * 3)
    one = run_update(tiny_model_dir, batch, 1, *overrides)
    two = run_update(tiny_model_dir, batch, 2, *overrides)
    assert_same_update(one, two)
    if overrides:
        # after the first optimizer step the policy moved away from the old log-probs
        assert one[2]["ratio_max"] > 1.0 + 1e-4 or one[2]["ratio_min"] < 1.0 - 1e-4
    else:
        assert one[2]["ratio_mean"] == pytest.approx(1.0)  # on-policy: ratio exp(logp - logp.detach())


def test_activation_checkpointing_does_not_change_the_update(tiny_model_dir, items):
    batch = with_advantages(items, [1.0, -1.0, 0.5, -0.5] * 3)
    plain = run_update(tiny_model_dir, batch, 1)
    ckpt = run_update(tiny_model_dir, batch, 1, "model.gradient_checkpointing=true")
    assert ckpt[2]["gradient_checkpointing"] and not plain[2]["gradient_checkpointing"]
    assert_same_update(plain, ckpt)


def test_cpu_threads_reach_the_rank_and_do_not_change_the_update(tiny_model_dir, items):
    batch = with_advantages(items, [1.0, -1.0, 0.5, -0.5] * 3)
    one = run_update(tiny_model_dir, batch, 1, "learner.cpu_threads=1")
    two = run_update(tiny_model_dir, batch, 1, "learner.cpu_threads=2")
    assert (one[2]["torch_threads"], two[2]["torch_threads"]) == (1, 2)
    assert_same_update(one, two)


def test_advantage_sign_moves_log_probability(tiny_model_dir, items):
    group = make_group(tiny_model_dir, "learner.num_workers=2", "algorithm.beta=0.0", "learner.lr=3e-3")
    # One positive and one negative completion per prompt; the rest zero.
    adv = [1.0, -1.0, 0.0, 0.0] * 3
    batch = with_advantages(items, adv)
    before = group.compute_logprobs(batch)
    group.train_step(batch)
    after = group.compute_logprobs(batch)
    group.shutdown()
    for i, a in enumerate(adv):
        delta = sum(after[i]) - sum(before[i])
        if a > 0:
            assert delta > 0, f"item {i}: positive advantage lost log-prob ({delta:.4f})"
        elif a < 0:
            assert delta < 0, f"item {i}: negative advantage gained log-prob ({delta:.4f})"


def test_zero_advantage_without_kl_leaves_weights_unchanged(tiny_model_dir, items):
    group = make_group(tiny_model_dir, "algorithm.beta=0.0")
    before = group.full_state_dict()
    metrics = group.train_step(with_advantages(items, [0.0] * len(items)))
    after = group.full_state_dict()
    group.shutdown()
    assert metrics["grad_norm"] == 0.0
    assert not changed(before, after)


def test_frozen_vision_and_reference_never_change(tiny_model_dir, items):
    group = make_group(
        tiny_model_dir, "learner.num_workers=2", "model.freeze_vision=true", "algorithm.beta=0.1"
    )
    before = group.full_state_dict()
    ref_before = group.full_state_dict(reference=True)
    for step in range(3):
        group.train_step(with_advantages(items, [(-1.0) ** (i + step) for i in range(len(items))]))
    after = group.full_state_dict()
    ref_after = group.full_state_dict(reference=True)
    group.shutdown()
    moved = changed(before, after)
    vision = {k for k in before if k.startswith("model.visual.")}
    assert vision, "no vision parameters found"
    assert not moved & vision, f"frozen vision parameters changed: {sorted(moved & vision)[:3]}"
    assert moved, "the language model did not train"
    assert not changed(ref_before, ref_after), "the reference model changed"
    assert all(torch.equal(before[k], ref_before[k]) for k in before)  # the reference is the initial policy


def test_no_reference_model_when_beta_is_zero(tiny_model_dir, items):
    group = make_group(tiny_model_dir, "algorithm.beta=0.0")
    with pytest.raises(RuntimeError, match="no reference model"):
        group.compute_logprobs(items[:2], use_reference=True)
    group.shutdown()


def _max_diff(a: dict, b: dict) -> float:
    """Largest difference between two nested {name: tensor or number or dict} states (same keys)."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            worst = max(worst, _max_diff(x, y))
        else:
            worst = max(
                worst,
                (torch.as_tensor(x, dtype=torch.float64) - torch.as_tensor(y, dtype=torch.float64))
                .abs()
                .max()
                .item(),
            )
    return worst


def test_checkpoint_resume_continues_exactly_and_export_loads(tiny_model_dir, items, tmp_path):
    """Save after one step, keep training; a fresh group loaded from the checkpoint makes the same
    next step: its weights, optimizer state (Adam moments, step), scheduler state and lr equal the
    uninterrupted run's, under a warm-up + linear-decay schedule sized for the whole run (so a lost
    scheduler state changes the lr). The HF export loads with transformers."""
    from transformers import AutoModelForImageTextToText

    batch1 = with_advantages(items, [1.0, -1.0, 0.5, -0.5] * 3)
    batch2 = with_advantages(items, [-0.5, 0.5, -1.0, 1.0] * 3)
    args = (
        "learner.num_workers=2",
        "algorithm.beta=0.04",
        "learner.lr_schedule=linear",
        "learner.warmup_steps=3",  # lr factors 1/3, 2/3, 1: a lost scheduler state shows in the lr
    )
    group = make_group(tiny_model_dir, *args, total_steps=4)
    group.train_step(batch1)
    group.save_checkpoint(str(tmp_path))
    group.train_step(batch2)
    straight, straight_state = group.full_state_dict(), group.training_state()
    export = group.export_hf(str(tmp_path / "hf"))
    group.shutdown()

    resumed = make_group(tiny_model_dir, *args, total_steps=4)
    fresh_lr = resumed.training_state()["lr"]
    assert resumed.load_checkpoint(str(tmp_path)) == 1
    resumed.train_step(batch2)
    after, after_state = resumed.full_state_dict(), resumed.training_state()
    resumed.shutdown()
    worst = _max_diff(straight, after)
    assert worst < 1e-6, f"resumed step differs by {worst:.2e}"
    assert after_state["optimizer_steps"] == straight_state["optimizer_steps"] == 2
    assert after_state["scheduler"] == straight_state["scheduler"]
    assert after_state["lr"] == straight_state["lr"] != fresh_lr  # the schedule moved, and resumed
    assert (
        set(after_state["optim"]) == set(straight)
        and _max_diff(straight_state["optim"], after_state["optim"]) < 1e-6
    )

    hf = AutoModelForImageTextToText.from_pretrained(export)
    exported = dict(hf.named_parameters())
    assert exported.keys() == straight.keys()
    assert all(torch.equal(exported[k], straight[k]) for k in straight)


def test_a_dead_learner_rank_fails_the_step_in_bound_with_an_error_naming_it(tiny_model_dir, items):
    """Rank 1 dies: rank 0's next collective times out (resources.collective_timeout_s) and the step
    fails with one error naming both, never a hang (the run then stops; `train --resume` goes on)."""
    import time

    from visualthinker_ray.learner.group import LearnerError

    group = make_group(tiny_model_dir, "learner.num_workers=2", "resources.collective_timeout_s=8")
    try:
        ray.kill(group.workers[1], no_restart=True)
        t0 = time.monotonic()
        with pytest.raises(LearnerError, match=r"learner train step failed") as err:
            group.train_step(with_advantages(items, [1.0, -1.0, 0.5, -0.5] * 3))
        assert "learner rank 1" in str(err.value) and "actor died" in str(err.value)
        assert "learner rank 0" in str(err.value)  # its collective gave up instead of waiting forever
        assert time.monotonic() - t0 < 8 + 30
    finally:
        group.shutdown()


def test_rank0_holds_its_rendezvous_port_until_setup():
    """The port rank 0 hands out is bound at once: no other process can take it before set-up."""
    import socket

    from visualthinker_ray.learner.worker import LearnerWorker

    worker = LearnerWorker(load_config().model_dump(), rank=0, world_size=2, total_optimizer_steps=1)
    _, port = worker.node_address()
    with socket.socket() as s, pytest.raises(OSError):
        s.bind(("", port))


def test_stale_items_take_their_ratio_against_the_proximal_policy_and_are_weighted_by_the_engine(
    tiny_model_dir, items
):
    """The decoupled objective. The engine gave every token e^-1 of the learner's probability (it was
    one version behind, or its bf16 kernels differ). Fresh or stale, the PPO ratio is taken against
    the learner's weights at the start of the update (1: nothing clipped, the weights move) and every
    token is weighted by min(pi_proximal / pi_engine = e, tis_cap = 2). With the old rule (ratio
    against the engine for stale items) the ratio would be e, every token past the clip, no gradient,
    and the weight exactly 1."""
    group = make_group(tiny_model_dir, "algorithm.beta=0.0", "algorithm.tis_cap=2.0")
    try:
        own = group.compute_logprobs(items)
        behind = [[x - 1.0 for x in lp] for lp in own]
        fresh = [
            dataclasses.replace(it, advantage=1.0, behaviour_logprobs=b)
            for it, b in zip(items, behind, strict=True)
        ]
        before = group.full_state_dict()
        stale = group.train_step([dataclasses.replace(it, staleness=1) for it in fresh])
        assert stale["clip_frac"] == 0.0 and stale["ratio_mean"] == pytest.approx(1.0)
        assert (
            stale["is_weight_mean"] == pytest.approx(math.e, rel=1e-3) and stale["is_truncated_frac"] == 1.0
        )
        assert stale["engine_abs_log_ratio"] == pytest.approx(1.0, rel=1e-3)
        assert changed(before, group.full_state_dict())
        with pytest.raises(Exception, match="behaviour_logprobs"):
            group.train_step(items)  # tis_cap without the engine's log-probs
    finally:
        group.shutdown()
