"""Tests of visualthinker_ray.grpo against independent plain computations (Python loops, numpy)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from visualthinker_ray.grpo import (
    AGG_MODES,
    balance_by_tokens,
    group_advantages,
    kl_k3,
    loss_denominator,
    masked_mean,
    policy_loss,
    split_micro_batches,
    token_entropy,
    token_logprobs,
)

# --------------------------------------------------------------------------------------------------
# Plain reference computations


def plain_advantages(
    rewards: list[float], g: int, scale: bool, eps: float = 1e-4
) -> tuple[list[float], int, list[bool]]:
    out, zero_groups, zero_std = [], 0, []
    for start in range(0, len(rewards), g):
        grp = rewards[start : start + g]
        mean = sum(grp) / g
        zero_std.append(len(set(grp)) == 1)
        if len(set(grp)) == 1:
            zero_groups += 1
            out += [0.0] * g
            continue
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (g - 1))  # unbiased
        out += [(x - mean) / (std + eps) if scale else x - mean for x in grp]
    return out, zero_groups, zero_std


def plain_token_stats(logits: np.ndarray, targets: np.ndarray, temperature: float):
    """Log-prob of the target and entropy, token by token, in float64 numpy."""
    b, t, _ = logits.shape
    lp, ent = np.zeros((b, t)), np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            x = logits[i, j].astype(np.float64) / temperature
            p = np.exp(x - x.max())
            p /= p.sum()
            lp[i, j] = math.log(p[targets[i, j]])
            ent[i, j] = -sum(q * math.log(q) for q in p if q > 0)
    return lp, ent


def plain_policy_loss(logp, old, ref, adv, mask, beta, clip_low, clip_high, agg, norm_constant=None):
    """Loss and metrics with Python loops and math.exp over nested lists."""
    seq_totals, seq_counts = [], []
    kls, ratios, clipped = [], [], []
    for i in range(len(logp)):
        tot = pg_tot = kl_tot = 0.0
        n = 0
        for j in range(len(logp[i])):
            if not mask[i][j]:
                continue
            ratio = math.exp(logp[i][j] - old[i][j])
            a = adv[i]
            lo, hi = 1 - clip_low, 1 + clip_high
            pg = -min(ratio * a, min(max(ratio, lo), hi) * a)
            r = ref[i][j] - logp[i][j] if ref is not None else 0.0
            kl = math.exp(r) - r - 1
            tot += pg + beta * kl
            pg_tot += pg
            kl_tot += kl
            n += 1
            kls.append(kl)
            ratios.append(ratio)
            clipped.append((a > 0 and ratio > hi) or (a < 0 and ratio < lo))
        seq_totals.append((tot, pg_tot, kl_tot))
        seq_counts.append(n)

    def aggregate(k):
        if agg == "token_mean":
            return sum(s[k] for s in seq_totals) / max(sum(seq_counts), 1)
        per_seq = [
            s[k] / (n if agg == "seq_mean_token_mean" else norm_constant)
            for s, n in zip(seq_totals, seq_counts, strict=True)
            if n > 0
        ]
        return sum(per_seq) / max(len(per_seq), 1)

    metrics = {
        "kl": sum(kls) / max(len(kls), 1),
        "clip_frac": sum(clipped) / max(len(clipped), 1),
        "ratio_mean": sum(ratios) / len(ratios) if ratios else 1.0,
        "ratio_max": max(ratios, default=1.0),
        "ratio_min": min(ratios, default=1.0),
        "pg_loss": aggregate(1),
        "kl_loss": beta * aggregate(2),
        "adv_mean": float(np.mean(adv)),
        "adv_std": float(np.std(adv)),
        "adv_min": min(adv),
        "adv_max": max(adv),
    }
    return aggregate(0), metrics


def random_mask(b: int, t: int, empty_rows: int = 0) -> torch.Tensor:
    """Right-padded completions of random lengths (>= 1), some holes, and `empty_rows` empty rows."""
    lengths = torch.randint(1, t + 1, (b,))
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    mask[torch.rand(b, t) < 0.1] = 0.0
    mask[:, 0] = 1.0
    if empty_rows:
        mask[torch.randperm(b)[:empty_rows]] = 0.0
    return mask


def random_inputs(b: int, t: int, dtype=torch.float64, spread: float = 0.3):
    logp = (-torch.rand(b, t, dtype=dtype) * 3).requires_grad_(True)
    old = logp.detach() + spread * torch.randn(b, t, dtype=dtype)
    ref = logp.detach() + spread * torch.randn(b, t, dtype=dtype)
    adv = torch.randn(b, dtype=dtype)
    return logp, old, ref, adv


# --------------------------------------------------------------------------------------------------
# Advantages


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_group_advantages_match_plain(scale_by_std, group_size):
    torch.manual_seed(group_size)
    num_prompts = 6
    rewards = torch.randint(0, 3, (num_prompts * group_size,)).float() * 0.5 + torch.rand(
        num_prompts * group_size
    ) * (torch.rand(num_prompts * group_size) < 0.3)
    rewards[:group_size] = 1.5  # a zero-std group
    rewards[group_size : 2 * group_size] = 0.1  # another, with a value that is inexact in binary
    res = group_advantages(rewards, group_size, scale_by_std=scale_by_std)
    expected, zero_groups, zero_std = plain_advantages(rewards.tolist(), group_size, scale_by_std)
    assert res.advantages.dtype == torch.float32
    assert res.num_groups == num_prompts
    assert res.num_zero_std_groups == zero_groups >= 2
    assert res.zero_std == zero_std and res.zero_std[:2] == [True, True] and not all(res.zero_std)
    np.testing.assert_allclose(res.advantages.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.all(res.advantages[: 2 * group_size] == 0)  # exactly zero, not tiny


def test_group_advantages_use_unbiased_std_and_eps():
    res = group_advantages(torch.tensor([0.0, 2.0, 1.0, 1.0]), 2)
    # group [0, 2]: mean 1, unbiased std sqrt(2); population std (1.0) would give +-1/(1 + 1e-4)
    expected = 1 / (math.sqrt(2) + 1e-4)
    np.testing.assert_allclose(res.advantages.numpy(), [-expected, expected, 0.0, 0.0], rtol=1e-6)
    assert res.num_zero_std_groups == 1


def test_group_advantages_group_size_one_is_all_zero():
    res = group_advantages(torch.tensor([0.0, 1.0, 2.0]), 1)
    assert torch.equal(res.advantages, torch.zeros(3))
    assert (res.num_groups, res.num_zero_std_groups) == (3, 3)


def test_group_advantages_shape_errors():
    with pytest.raises(ValueError, match=r"10.*group_size=4"):
        group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([0.0, float("nan")]), 2)


# --------------------------------------------------------------------------------------------------
# Token log-probs and entropy


@pytest.mark.parametrize("shape", [(1, 1, 5), (2, 7, 11), (3, 5, 50)])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("chunk_tokens", [None, 1, 3])
def test_token_logprobs_and_entropy_match_plain(shape, temperature, chunk_tokens):
    torch.manual_seed(sum(shape))
    logits = torch.randn(shape) * 3
    targets = torch.randint(0, shape[-1], shape[:2])
    lp = token_logprobs(logits, targets, temperature, chunk_tokens=chunk_tokens)
    ent = token_entropy(logits, temperature, chunk_tokens=chunk_tokens)
    exp_lp, exp_ent = plain_token_stats(logits.numpy(), targets.numpy(), temperature)
    assert lp.shape == ent.shape == shape[:2]
    np.testing.assert_allclose(lp.numpy(), exp_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent.numpy(), exp_ent, rtol=1e-5, atol=1e-5)


def test_token_logprobs_bf16_uses_float32_math():
    torch.manual_seed(0)
    logits = (torch.randn(2, 6, 1000) * 4).bfloat16()
    targets = torch.randint(0, 1000, (2, 6))
    lp = token_logprobs(logits, targets, 0.8)
    ent = token_entropy(logits, 0.8)
    assert lp.dtype == ent.dtype == torch.float32
    # The reference uses the exact bf16 values upcast; bf16 arithmetic would be off by ~1e-2.
    exp_lp, exp_ent = plain_token_stats(logits.float().numpy(), targets.numpy(), 0.8)
    np.testing.assert_allclose(lp.numpy(), exp_lp, atol=1e-4)
    np.testing.assert_allclose(ent.numpy(), exp_ent, atol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_gradient(temperature):
    torch.manual_seed(1)
    x = torch.randn(2, 6, 9, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (2, 6))
    # Non-contiguous input (the usual logits[:, :-1] shift) and chunks that split rows.
    assert torch.autograd.gradcheck(
        lambda z: token_logprobs(z[:, :-1], targets[:, :-1], temperature, chunk_tokens=2), (x,)
    )
    w = torch.randn(2, 5, dtype=torch.float64)
    (token_logprobs(x[:, :-1], targets[:, :-1], temperature) * w).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    naive = torch.log_softmax(x[:, :-1] / temperature, -1).gather(-1, targets[:, :-1, None]).squeeze(-1)
    (naive * w).sum().backward()
    torch.testing.assert_close(ours, x.grad)


def test_token_logprobs_bf16_gradient_and_saved_memory():
    torch.manual_seed(2)
    b, t, v = 2, 6, 500
    x = (torch.randn(b, t, v) * 2).bfloat16().requires_grad_(True)
    targets = torch.randint(0, v, (b, t))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        lp = token_logprobs(x, targets)
    # Only the input logits may be saved at full [B, T, V] size: no float32 copy kept for backward.
    assert all(s.numel() < b * t * v or s.dtype == torch.bfloat16 for s in saved)
    lp.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    x32 = x.detach().float().requires_grad_(True)
    torch.log_softmax(x32, -1).gather(-1, targets[..., None]).sum().backward()
    torch.testing.assert_close(x.grad.float(), x32.grad, atol=1e-2, rtol=1e-2)


def test_token_functions_reject_bad_arguments():
    logits = torch.zeros(1, 2, 3)
    targets = torch.zeros(1, 2, dtype=torch.long)
    for temperature in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            token_logprobs(logits, targets, temperature)
        with pytest.raises(ValueError, match="temperature"):
            token_entropy(logits, temperature)
    with pytest.raises(ValueError, match="target ids"):
        token_logprobs(logits, torch.full((1, 2), 3))
    with pytest.raises(ValueError, match="shape"):
        token_logprobs(logits, torch.zeros(1, 3, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# masked_mean and KL


def test_masked_mean_matches_loops_and_handles_empty():
    torch.manual_seed(3)
    x = torch.randn(4, 6, dtype=torch.float64)
    mask = random_mask(4, 6, empty_rows=1)
    x[mask == 0] = float("nan")  # padding garbage must not leak
    vals = [(x[i, j].item(), mask[i, j].item()) for i in range(4) for j in range(6)]
    valid = [v for v, m in vals if m]
    assert masked_mean(x, mask).item() == pytest.approx(sum(valid) / len(valid))
    rows = masked_mean(x, mask, dim=1)
    for i in range(4):
        row = [x[i, j].item() for j in range(6) if mask[i, j]]
        assert rows[i].item() == pytest.approx(sum(row) / len(row) if row else 0.0)
    assert masked_mean(x, torch.zeros(4, 6)).item() == 0.0


def test_kl_k3_matches_formula_is_nonnegative_and_zero_at_ref():
    torch.manual_seed(4)
    logp = -torch.rand(5, 7) * 4
    ref = logp + torch.randn(5, 7) * torch.logspace(-9, 0, 7)  # tiny to large differences
    kl = kl_k3(logp, ref)
    for i, j in itertools.product(range(5), range(7)):
        r = ref[i, j].item() - logp[i, j].item()
        assert kl[i, j].item() == pytest.approx(math.exp(r) - r - 1, rel=1e-4, abs=1e-7)
    assert bool((kl >= 0).all())
    assert torch.equal(kl_k3(logp, logp), torch.zeros_like(logp))
    # float32 near r = 0: exp(r) - r - 1 rounds below zero for some r; the estimator must not.
    logp = -torch.rand(2001) * 3
    assert bool((kl_k3(logp, logp + torch.linspace(-1e-6, 1e-6, 2001)) >= 0).all())


# --------------------------------------------------------------------------------------------------
# Policy loss


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 17)])
def test_policy_loss_matches_plain(agg, shape):
    torch.manual_seed(shape[0] * 100 + shape[1])
    b, t = shape
    logp, old, ref, adv = random_inputs(b, t)
    mask = random_mask(b, t, empty_rows=1 if b > 2 else 0)
    kwargs = dict(beta=0.04, clip_low=0.2, clip_high=0.28, agg=agg, norm_constant=21.0)
    loss, metrics = policy_loss(logp, old, ref, adv, mask, **kwargs)
    exp_loss, exp_metrics = plain_policy_loss(
        logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), **kwargs
    )
    assert loss.item() == pytest.approx(exp_loss, rel=1e-9, abs=1e-12)
    assert metrics.keys() == exp_metrics.keys()
    for name, value in exp_metrics.items():
        assert isinstance(metrics[name], float)
        assert metrics[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_aggregation_modes_differ_as_documented():
    # One long and one short sequence with per-token losses 1 and 3.
    logp = torch.zeros(2, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    adv = torch.tensor([-1.0, -3.0], dtype=torch.float64)  # ratio 1: per-token loss = -A
    losses = {
        agg: policy_loss(logp, logp, None, adv, mask, beta=0.0, agg=agg, norm_constant=8)[0].item()
        for agg in AGG_MODES
    }
    assert losses["seq_mean_token_mean"] == pytest.approx((1 + 3) / 2)
    assert losses["token_mean"] == pytest.approx((4 * 1 + 3) / 5)
    assert losses["seq_mean_token_sum_norm"] == pytest.approx((4 / 8 + 3 / 8) / 2)


def test_policy_loss_rejects_bad_modes():
    logp = torch.zeros(2, 3)
    args = (logp, logp, None, torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError) as err:
        policy_loss(*args, beta=0.0, agg="seq_sum")
    assert all(mode in str(err.value) for mode in AGG_MODES)
    with pytest.raises(ValueError, match="norm_constant"):
        policy_loss(*args, beta=0.0, agg="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(*args, beta=0.04)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, logp, None, torch.zeros(3), torch.ones(2, 3), beta=0.0)


def test_clipping_selects_tokens_and_blocks_their_gradient():
    ratios = [0.5, 0.79, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0]
    old = torch.full((2, len(ratios)), -1.0, dtype=torch.float64)
    logp = (old + torch.log(torch.tensor(ratios, dtype=torch.float64))).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, len(ratios))
    loss, metrics = policy_loss(logp, old, None, adv, mask, beta=0.0, clip_low=0.2, clip_high=0.28)
    loss.backward()
    # A > 0 is clipped only above 1 + clip_high, A < 0 only below 1 - clip_low (PPO's pessimistic bound;
    # the asymmetric range is DAPO's clip-higher: 1.25 stays unclipped with clip_high 0.28).
    expect_clipped = [[r > 1.28 for r in ratios], [r < 0.8 for r in ratios]]
    assert metrics["clip_frac"] == pytest.approx(4 / 16)
    n = len(ratios)
    for i, j in itertools.product(range(2), range(n)):
        grad = logp.grad[i, j].item()
        if expect_clipped[i][j]:
            assert grad == 0.0, (i, ratios[j])
        else:  # d/dlogp of -ratio * A, averaged over n tokens and 2 sequences
            assert grad == pytest.approx(-ratios[j] * adv[i].item() / (n * 2)), (i, ratios[j])
    # Symmetric clipping (0.2) does clip ratio 1.25 for A > 0.
    _, sym = policy_loss(logp, old, None, adv, mask, beta=0.0, clip_low=0.2, clip_high=0.2)
    assert sym["clip_frac"] == pytest.approx(5 / 16)


def test_ratio_metrics_ignore_padding():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    old = torch.zeros(2, 4, dtype=torch.float64)
    for valid_ratios, padding in (([1.1, 1.3, 1.2], 0.5), ([0.7, 0.9, 0.8], 5.0)):
        ratios = torch.full((2, 4), padding, dtype=torch.float64)
        ratios[mask == 1] = torch.tensor(valid_ratios, dtype=torch.float64)
        _, metrics = policy_loss(torch.log(ratios), old, None, torch.ones(2), mask, beta=0.0)
        assert metrics["ratio_max"] == pytest.approx(max(valid_ratios))
        assert metrics["ratio_min"] == pytest.approx(min(valid_ratios))
        assert metrics["ratio_mean"] == pytest.approx(sum(valid_ratios) / 3)


def test_kl_term_nonnegative_and_zero_when_ref_equals_policy():
    torch.manual_seed(5)
    logp, old, ref, _ = random_inputs(4, 9, spread=1.0)
    mask = random_mask(4, 9)
    zero_adv = torch.zeros(4, dtype=torch.float64)
    for agg in AGG_MODES:
        loss, metrics = policy_loss(logp, old, ref, zero_adv, mask, beta=1.0, agg=agg, norm_constant=9)
        assert loss.item() > 0 and metrics["kl"] > 0 and metrics["kl_loss"] == pytest.approx(loss.item())
    logp.grad = None
    loss, metrics = policy_loss(logp, old, logp.detach(), zero_adv, mask, beta=1.0)
    loss.backward()
    assert loss.item() == 0.0 and metrics["kl"] == 0.0
    assert torch.equal(logp.grad, torch.zeros_like(logp))


def test_beta_zero_ignores_ref():
    torch.manual_seed(6)
    logp, old, ref, adv = random_inputs(3, 6)
    mask = random_mask(3, 6)
    results = []
    for r in (None, ref, torch.full_like(ref, float("nan"))):
        logp.grad = None
        loss, _ = policy_loss(logp, old, r, adv, mask, beta=0.0)
        loss.backward()
        results.append((loss.detach(), logp.grad.clone()))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])
    assert torch.isfinite(results[0][0])
    # ...while beta > 0 does use it.
    assert policy_loss(logp, old, ref, adv, mask, beta=0.5)[0].item() != pytest.approx(results[0][0].item())


@pytest.mark.parametrize("shape", [(1, 3), (4, 7), (16, 30)])
def test_on_policy_loss_equals_recipe_loss(shape):
    """One update per rollout: value and gradient equal the reference recipe's reference loss."""
    torch.manual_seed(shape[1])
    b, t = shape
    beta = 0.04
    logp, _, ref, adv = random_inputs(b, t)
    mask = random_mask(b, t)  # every row non-empty, as in the reference (it divides by the length)
    ours, _ = policy_loss(logp, logp.detach(), ref, adv, mask, beta=beta)
    (g_ours,) = torch.autograd.grad(ours, logp)

    kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_token = -(torch.exp(logp - logp.detach()) * adv[:, None] - beta * kl)
    recipe = ((per_token * mask).sum(dim=1) / mask.sum(dim=1)).mean()
    (g_recipe,) = torch.autograd.grad(recipe, logp)

    torch.testing.assert_close(ours, recipe, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, g_recipe, rtol=1e-10, atol=1e-12)
    assert g_ours.abs().sum() > 0
    # old_logp is a constant even if the caller forgets to detach it.
    (g_undetached,) = torch.autograd.grad(policy_loss(logp, logp, ref, adv, mask, beta=beta)[0], logp)
    torch.testing.assert_close(g_undetached, g_recipe, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_empty_sequences_give_no_nan_and_are_not_counted(agg):
    torch.manual_seed(7)
    logp, old, ref, adv = random_inputs(5, 6)
    mask = random_mask(5, 6)
    mask[[1, 3]] = 0.0
    with torch.no_grad():  # padding garbage in every input
        for x in (logp, old, ref):
            x[mask == 0] = float("-inf")
    kwargs = dict(beta=0.04, agg=agg, norm_constant=6)
    loss, metrics = policy_loss(logp, old, ref, adv, mask, **kwargs)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(math.isfinite(v) for v in metrics.values())
    keep = [0, 2, 4]
    sub, _ = policy_loss(logp[keep], old[keep], ref[keep], adv[keep], mask[keep], **kwargs)
    assert loss.item() == pytest.approx(sub.item(), rel=1e-12)

    logp.grad = None
    empty, metrics = policy_loss(logp, old, ref, adv, torch.zeros_like(mask), **kwargs)
    empty.backward()  # still connected to the graph, so every learner rank can run backward
    assert empty.item() == 0.0 and torch.equal(logp.grad, torch.zeros_like(logp))
    assert metrics["clip_frac"] == 0.0 and metrics["ratio_mean"] == 1.0


@pytest.mark.parametrize("agg", AGG_MODES)
def test_global_denominator_makes_micro_batches_add_up(agg):
    torch.manual_seed(8)
    logp, old, ref, adv = random_inputs(7, 10)
    mask = random_mask(7, 10, empty_rows=1)
    kwargs = dict(beta=0.04, agg=agg, norm_constant=10)
    full, _ = policy_loss(logp, old, ref, adv, mask, **kwargs)
    (g_full,) = torch.autograd.grad(full, logp)
    denom = loss_denominator(mask, agg)
    total = sum(
        policy_loss(logp[s], old[s], ref[s], adv[s], mask[s], global_denominator=denom, **kwargs)[0]
        for s in (slice(0, 2), slice(2, 3), slice(3, 7))
    )
    (g_total,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(g_total, g_full)


# --------------------------------------------------------------------------------------------------
# Batch splitting

lengths_st = st.lists(st.integers(min_value=0, max_value=300), max_size=40)


@settings(max_examples=300, deadline=None)
@given(lengths=lengths_st, budget=st.integers(min_value=1, max_value=1500))
def test_split_micro_batches_invariants(lengths, budget):
    batches = split_micro_batches(lengths, budget)
    assert [i for b in batches for i in b] == list(range(len(lengths)))  # every index once, in order
    for b in batches:
        assert b
        padded = max(lengths[i] for i in b) * len(b)
        assert padded <= budget or len(b) == 1
    for cur, nxt in itertools.pairwise(batches):  # greedy: the next sequence did not fit
        grown = cur + [nxt[0]]
        assert max(lengths[i] for i in grown) * len(grown) > budget


def test_split_micro_batches_example():
    assert split_micro_batches([3, 3, 5, 12, 1, 1, 1], token_budget=10) == [[0, 1], [2], [3], [4, 5, 6]]
    assert split_micro_batches([5, 4, 5, 1], token_budget=10) == [[0, 1], [2, 3]]  # the budget is inclusive
    assert split_micro_batches([], token_budget=10) == []
    with pytest.raises(ValueError):
        split_micro_batches([1], 0)


def _loads(ranks, lengths):
    return [sum(lengths[i] for i in r) for r in ranks]


@settings(max_examples=300, deadline=None)
@given(lengths=lengths_st, num_ranks=st.integers(min_value=1, max_value=8))
def test_balance_by_tokens_invariants(lengths, num_ranks):
    ranks = balance_by_tokens(lengths, num_ranks)
    assert len(ranks) == num_ranks
    assert sorted(i for r in ranks for i in r) == list(range(len(lengths)))
    assert all(r == sorted(r) for r in ranks)
    if len(lengths) >= num_ranks:
        assert all(ranks)
    if lengths:
        loads, biggest = _loads(ranks, lengths), max(lengths)
        assert max(loads) - min(loads) <= biggest
        assert max(loads) <= sum(lengths) / num_ranks + biggest  # <= optimum + largest item


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=6),
    num_ranks=st.integers(min_value=1, max_value=3),
)
def test_balance_by_tokens_close_to_brute_force_optimum(lengths, num_ranks):
    best = min(
        max(sum(n for n, r in zip(lengths, assign, strict=True) if r == k) for k in range(num_ranks))
        for assign in itertools.product(range(num_ranks), repeat=len(lengths))
    )
    worst = max(_loads(balance_by_tokens(lengths, num_ranks), lengths))
    assert worst <= best + max(lengths)
    assert worst <= 4 / 3 * best + 1e-9  # Graham's bound for longest-first


def test_balance_by_tokens_zero_lengths_and_errors():
    assert balance_by_tokens([0, 0, 0, 0], 2) == [[0, 2], [1, 3]]
    assert balance_by_tokens([5], 3) == [[0], [], []]
    with pytest.raises(ValueError):
        balance_by_tokens([1], 0)
    with pytest.raises(ValueError):
        balance_by_tokens([-1], 1)


def test_entropy_ignores_masked_tokens():
    """A -inf (banned) logit has probability 0: entropy equals that of the remaining tokens."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, dtype=torch.float64)
    masked = logits.clone()
    masked[..., [1, 4]] = float("-inf")
    kept = logits[..., [0, 2, 3, 5]]
    p = torch.softmax(kept / 0.7, dim=-1)
    expected = -(p * torch.log(p)).sum(-1)
    got = token_entropy(masked, 0.7)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# GSPO and truncated importance sampling, against loops over nested lists


def plain_gspo_loss(logp, old, ref, adv, mask, beta, clip_low, clip_high):
    """GSPO's objective written out: per sequence s = exp(mean_t(logp - old)), term -min(s A, clip(s) A),
    plus beta times the sequence's token-mean k3 KL; averaged over non-empty sequences."""
    terms = []
    for i in range(len(logp)):
        idx = [j for j in range(len(logp[i])) if mask[i][j]]
        if not idx:
            continue
        s = math.exp(sum(logp[i][j] - old[i][j] for j in idx) / len(idx))
        a = adv[i]
        pg = -min(s * a, min(max(s, 1 - clip_low), 1 + clip_high) * a)
        kl = sum(math.exp(ref[i][j] - logp[i][j]) - (ref[i][j] - logp[i][j]) - 1 for j in idx) / len(idx)
        terms.append(pg + beta * kl)
    return sum(terms) / max(len(terms), 1)


@pytest.mark.parametrize("shape", [(1, 1), (4, 6), (8, 17)])
def test_gspo_loss_and_gradient_match_the_sequence_level_objective(shape):
    torch.manual_seed(7 + shape[1])
    b, t = shape
    logp, old, ref, adv = random_inputs(b, t, spread=0.02)
    mask = random_mask(b, t, empty_rows=1 if b > 2 else 0)
    kwargs = dict(beta=0.04, clip_low=3e-3, clip_high=4e-3)
    loss, metrics = policy_loss(logp, old, ref, adv, mask, ratio_level="sequence", **kwargs)
    lists = [x.tolist() for x in (logp, old, ref, adv, mask)]
    assert loss.item() == pytest.approx(plain_gspo_loss(*lists, **kwargs), rel=1e-9, abs=1e-12)
    # the gradient, against the same objective written with torch ops per sequence
    (grad,) = torch.autograd.grad(loss, logp)
    x = logp.detach().clone().requires_grad_(True)
    terms = []
    for i in range(b):
        m = mask[i].bool()
        if not m.any():
            continue
        s = torch.exp((x[i][m] - old[i][m]).mean())
        pg = -torch.minimum(s * adv[i], s.clamp(1 - 3e-3, 1 + 4e-3) * adv[i])
        r = ref[i][m] - x[i][m]
        terms.append(pg + 0.04 * (torch.exp(r) - r - 1).mean())
    (expected,) = torch.autograd.grad(torch.stack(terms).mean(), x)
    assert torch.allclose(grad, expected, rtol=1e-9, atol=1e-12)
    # clipped sequences get no policy gradient: the clip fraction counts their tokens
    assert 0.0 <= metrics["clip_frac"] <= 1.0


def test_gspo_differs_from_token_level_grpo_when_token_ratios_differ():
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    old = torch.tensor([[-1.5, -1.5]], dtype=torch.float64)  # token ratios e^0.5, e^-0.5; sequence ratio 1
    mask, adv = torch.ones(1, 2), torch.tensor([1.0], dtype=torch.float64)
    seq, _ = policy_loss(logp, old, None, adv, mask, beta=0.0, ratio_level="sequence")
    tok, _ = policy_loss(logp, old, None, adv, mask, beta=0.0)
    assert seq.item() == pytest.approx(-1.0)
    expected = -(min(math.exp(0.5), 1.2) + math.exp(-0.5)) / 2
    assert tok.item() == pytest.approx(expected)


@pytest.mark.parametrize("cap", [0.5, 2.0])
def test_truncated_importance_weights_multiply_each_tokens_policy_term(cap):
    torch.manual_seed(3)
    b, t = 5, 7
    logp, old, ref, adv = random_inputs(b, t)
    behaviour = old + 0.5 * torch.randn(b, t, dtype=torch.float64)
    mask = random_mask(b, t)
    kwargs = dict(beta=0.04, clip_low=0.2, clip_high=0.28)
    loss, metrics = policy_loss(logp, old, ref, adv, mask, behaviour_logp=behaviour, tis_cap=cap, **kwargs)
    # by hand: per token w * (pg + beta * kl), w = min(exp(old - behaviour), cap), sequence token means
    per_seq, weights = [], []
    for i in range(b):
        terms = []
        for j in range(t):
            if not mask[i, j]:
                continue
            ratio = math.exp(logp[i, j].item() - old[i, j].item())
            a = adv[i].item()
            pg = -min(ratio * a, min(max(ratio, 0.8), 1.28) * a)
            raw = math.exp(old[i, j].item() - behaviour[i, j].item())
            weights.append(raw)
            r = ref[i, j].item() - logp[i, j].item()
            terms.append(min(raw, cap) * (pg + 0.04 * (math.exp(r) - r - 1)))
        per_seq.append(sum(terms) / len(terms))
    assert loss.item() == pytest.approx(sum(per_seq) / b, rel=1e-9)
    assert metrics["is_weight_mean"] == pytest.approx(sum(weights) / len(weights), rel=1e-9)
    assert metrics["is_weight_max"] == pytest.approx(max(weights), rel=1e-9)
    assert metrics["is_truncated_frac"] == pytest.approx(sum(w > cap for w in weights) / len(weights))


def test_without_a_cap_the_behaviour_policy_is_only_measured():
    torch.manual_seed(4)
    logp, old, ref, adv = random_inputs(3, 4)
    mask = random_mask(3, 4)
    behaviour = old + 0.3
    plain, _ = policy_loss(logp, old, ref, adv, mask, beta=0.04)
    measured, metrics = policy_loss(logp, old, ref, adv, mask, beta=0.04, behaviour_logp=behaviour)
    assert measured.item() == plain.item()
    assert metrics["is_weight_mean"] == pytest.approx(math.exp(-0.3))
    assert metrics["is_truncated_frac"] == 0.0
    with pytest.raises(ValueError, match="tis_cap needs behaviour_logp"):
        policy_loss(logp, old, ref, adv, mask, beta=0.04, tis_cap=2.0)
    with pytest.raises(ValueError, match="ratio_level"):
        policy_loss(logp, old, ref, adv, mask, beta=0.04, ratio_level="sentence")


# --------------------------------------------------------------------------------------------------
# The decoupled objective: ratio against the proximal policy, weights proximal / engine


def plain_weighted_loss(logp, old, behaviour, adv, mask, level, mode, cap, low):
    """The clipped loss (beta 0, sequence token means) with the importance weight written out per
    sequence from nested lists: token w_t = exp(old_t - b_t); sequence: prod_t w_t; geometric:
    exp(mean_t log w_t); truncate: min(w, cap); mask: 0 outside [low, cap]. Returns (loss, raw)."""
    terms, raws = [], []
    for i in range(len(logp)):
        idx = [j for j in range(len(logp[i])) if mask[i][j]]
        if not idx:
            continue
        logs = {j: old[i][j] - behaviour[i][j] for j in idx}
        if level == "sequence":
            w = {j: math.exp(sum(logs.values())) for j in idx}
        elif level == "geometric":
            w = {j: math.exp(sum(logs.values()) / len(idx)) for j in idx}
        else:
            w = {j: math.exp(logs[j]) for j in idx}
        per_tok = []
        for j in idx:
            ratio = math.exp(logp[i][j] - old[i][j])
            pg = -min(ratio * adv[i], min(max(ratio, 0.8), 1.2) * adv[i])
            if mode == "truncate":
                applied = min(w[j], cap)
            else:
                applied = 0.0 if (w[j] > cap or w[j] < (low or 0.0)) else w[j]
            per_tok.append(applied * pg)
            raws.append(w[j])
        terms.append(sum(per_tok) / len(per_tok))
    return sum(terms) / max(len(terms), 1), raws


@pytest.mark.parametrize(
    "level,mode,cap,low",
    [
        ("token", "truncate", 1.5, None),
        ("sequence", "truncate", 1.1, None),
        ("geometric", "truncate", 1.1, None),
        ("token", "mask", 1.3, 0.7),
        ("sequence", "mask", 1.3, 0.5),
        ("geometric", "mask", 1.2, None),
    ],
)
def test_importance_weights_at_each_level_and_bound_match_a_plain_computation(level, mode, cap, low):
    torch.manual_seed(11)
    b, t = 6, 5
    logp, old, _, adv = random_inputs(b, t, spread=0.1)
    behaviour = old + 0.25 * torch.randn(b, t, dtype=torch.float64)
    mask = random_mask(b, t, empty_rows=1)
    kw = dict(behaviour_logp=behaviour, tis_cap=cap, is_level=level, is_mode=mode, is_low=low)
    loss, metrics = policy_loss(logp, old, None, adv, mask, beta=0.0, **kw)
    lists = [x.tolist() for x in (logp, old, behaviour, adv, mask)]
    expected, raws = plain_weighted_loss(*lists, level, mode, cap, low)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert metrics["is_weight_mean"] == pytest.approx(sum(raws) / len(raws), rel=1e-9)
    cut = [w > cap or (mode == "mask" and w < (low or 0.0)) for w in raws]
    assert metrics["is_truncated_frac"] == pytest.approx(sum(cut) / len(cut))
    assert 0 < sum(cut) < len(cut)  # the bound really cut some tokens and kept others here


def test_the_ratio_is_taken_against_the_proximal_policy_and_the_weight_against_the_engine():
    """A stale or bf16 engine gave every token e^-1 of the learner's probability. With the proximal
    policy as the ratio's base (old = logp at the start of the update) the ratio is 1: nothing is
    clipped, the gradient flows, weighted by min(e, cap) (PITFALLS: with the ratio against the
    engine every positive-advantage token would be past the clip and the weight exactly 1)."""
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    behaviour = logp.detach() - 1.0
    adv, mask = torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 3)
    loss, m = policy_loss(
        logp, logp.detach(), None, adv, mask, beta=0.0, behaviour_logp=behaviour, tis_cap=2.0
    )
    assert m["clip_frac"] == 0.0 and m["ratio_mean"] == pytest.approx(1.0)
    assert m["is_weight_mean"] == pytest.approx(math.e) and m["is_truncated_frac"] == 1.0
    assert m["engine_abs_log_ratio"] == pytest.approx(1.0)
    assert m["engine_kl_k3"] == pytest.approx(math.exp(-1.0) + 1.0 - 1.0)  # k3 at r = b - old = -1
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(grad, torch.full((1, 3), -2.0 / 3, dtype=torch.float64))  # -cap * A / T


def test_gspo_takes_its_sequence_ratio_against_the_proximal_policy():
    """Engine numerics of 0.01 nats a token would push GSPO's sequence ratio (3e-4 band) past the
    clip if taken against the engine; against the proximal policy it stays at 1 and trains."""
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    behaviour = logp.detach() + 0.01
    adv, mask = torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2)
    kw = dict(beta=0.0, clip_low=3e-4, clip_high=4e-4, ratio_level="sequence", behaviour_logp=behaviour)
    loss, m = policy_loss(logp, logp.detach(), None, adv, mask, tis_cap=2.0, is_level="geometric", **kw)
    assert m["clip_frac"] == 0.0
    assert m["is_weight_mean"] == pytest.approx(math.exp(-0.01))
    (grad,) = torch.autograd.grad(loss, logp)
    assert (grad != 0).all()


def test_bad_importance_weight_options_are_refused():
    logp, old, ref, adv = random_inputs(2, 3)
    mask, b = torch.ones(2, 3), old - 0.1
    with pytest.raises(ValueError, match="importance-weight level"):
        policy_loss(logp, old, None, adv, mask, beta=0.0, behaviour_logp=b, tis_cap=2.0, is_level="word")
    with pytest.raises(ValueError, match="importance-weight mode"):
        policy_loss(logp, old, None, adv, mask, beta=0.0, behaviour_logp=b, tis_cap=2.0, is_mode="clip")
    with pytest.raises(ValueError, match="is_low"):
        policy_loss(logp, old, None, adv, mask, beta=0.0, behaviour_logp=b, tis_cap=2.0, is_low=0.5)


def test_the_kl_of_stale_tokens_is_importance_weighted_and_stays_bounded():
    """A token the engine (here: the reference itself, one step stale) sampled with probability 0.5
    that the policy now gives 1e-4: unweighted k3 is exp(ln 5000) - ln 5000 - 1 ~ 4991; weighted by
    min(pi / pi_engine, cap) = 2e-4 it is ~1, the KL under the policy the term stands for."""
    ref = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    logp = torch.tensor([[math.log(1e-4)]], dtype=torch.float64, requires_grad=True)
    adv, mask = torch.tensor([0.0], dtype=torch.float64), torch.ones(1, 1)
    kw = dict(beta=1.0, behaviour_logp=ref)
    _, plain = policy_loss(logp, logp.detach(), ref, adv, mask, **kw)
    loss, weighted = policy_loss(logp, logp.detach(), ref, adv, mask, tis_cap=2.0, **kw)
    r = math.log(0.5 / 1e-4)
    assert plain["kl"] == pytest.approx(math.exp(r) - r - 1)
    assert weighted["kl"] == pytest.approx((math.exp(r) - r - 1) * 1e-4 / 0.5)
    assert loss.item() == pytest.approx(weighted["kl"])
