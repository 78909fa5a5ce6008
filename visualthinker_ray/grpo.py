"""GRPO maths: group advantages, token log-probs, the clipped policy loss and batch splitting.

Pure torch: no Ray, no model code, so every piece is unit-tested on CPU. The defaults reproduce the
reference run (advantage (r - mean) / (std + 1e-4), k3 KL with beta against the frozen
initial model, mean over a sequence's tokens then over sequences, one update per rollout); the
options cover DAPO (asymmetric "clip-higher", token-mean aggregation) and Dr.GRPO (no std scaling,
sequence token sums over a constant).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AGG_MODES",
    "RATIO_LEVELS",
    "GroupAdvantages",
    "IS_LEVELS",
    "IS_MODES",
    "ImportanceWeights",
    "balance_by_tokens",
    "group_advantages",
    "importance_weights",
    "kl_k3",
    "loss_denominator",
    "masked_mean",
    "policy_loss",
    "split_micro_batches",
    "token_entropy",
    "token_logprobs",
]

# seq_mean_token_mean: the reference run; token_mean: DAPO; seq_mean_token_sum_norm: Dr.GRPO.
AGG_MODES = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")

# token: PPO's per-token ratio (GRPO, DAPO, Dr.GRPO); sequence: GSPO's per-sequence ratio.
RATIO_LEVELS = ("token", "sequence")

# Upper bound on the elements of one float32 temporary in token_logprobs / token_entropy (128 MiB).
# Qwen2-VL's vocabulary (~152K) gives ~220 tokens per chunk.
_CHUNK_ELEMENTS = 1 << 25


# --------------------------------------------------------------------------------------------------
# Advantages


@dataclass(frozen=True)
class GroupAdvantages:
    """group_advantages' result; num_zero_std_groups / num_groups is worth logging every step."""

    advantages: Tensor  # [N] float32, one per completion, in the order of the rewards
    num_groups: int
    num_zero_std_groups: int  # groups whose completions all got the same reward (no learning signal)
    zero_std: list[bool]  # per group, in order: all its rewards equal (dynamic sampling drops these)


def group_advantages(
    rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> GroupAdvantages:
    """Group-relative advantages; the `group_size` completions of one prompt must be contiguous.

    scale_by_std=True: (r - group mean) / (group std + eps) with the unbiased std, as the reference
    GRPO trainer. scale_by_std=False: r - group mean (Dr.GRPO: dividing by the std over-weights
    groups whose rewards are nearly uniform). Groups with identical rewards get exactly zero advantage.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    n = rewards.numel()
    if n % group_size:
        raise ValueError(
            f"{n} rewards cannot be split into groups of group_size={group_size} "
            "(expected num_prompts * group_size contiguous completions)"
        )
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf")
    r = rewards.detach().to(torch.float64).view(-1, group_size)
    # Exact test: the float mean of equal values need not equal them, and std would then divide noise.
    zero_std = (r == r[:, :1]).all(dim=1)
    if group_size == 1:
        adv = torch.zeros_like(r)  # the std of one sample is undefined: no signal, not NaN
    else:
        adv = r - r.mean(dim=1, keepdim=True)
        if scale_by_std:
            adv = adv / (r.std(dim=1, keepdim=True) + eps)  # torch default: unbiased (N - 1)
        adv = torch.where(zero_std[:, None], torch.zeros_like(adv), adv)
    return GroupAdvantages(
        advantages=adv.reshape(-1).to(torch.float32),
        num_groups=r.shape[0],
        num_zero_std_groups=int(zero_std.sum()),
        zero_std=zero_std.tolist(),
    )


# --------------------------------------------------------------------------------------------------
# Token log-probs and entropy


def _check_logits(logits: Tensor, temperature: float) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def _chunk_len(vocab: int, chunk_tokens: int | None) -> int:
    if chunk_tokens is not None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        return chunk_tokens
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1))


def _chunks(logits: Tensor, chunk: int):
    """(b, start, end) for token chunks of each row; logits[b, start:end] is a view, never a copy."""
    for b in range(logits.shape[0]):
        for s in range(0, logits.shape[1], chunk):
            e = min(s + chunk, logits.shape[1])
            yield b, s, e


def _math_dtype(logits: Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16 -> float32; float64 stays


class _SelectedLogProb(torch.autograd.Function):
    """log softmax(logits / T)[target], chunk by chunk in float32 (float64 for float64 logits).

    Autograd through a plain log_softmax would keep a float32 [B, T, V] copy alive until backward
    (3.4 GB for 8 x 700 completion tokens of Qwen2-VL). Here only the logits (held by the model's
    graph anyway), the targets and the [B, T] logsumexp are saved; backward recomputes the softmax
    chunk by chunk: d/dlogits = (onehot(target) - softmax) * grad / T.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float, chunk: int) -> Tensor:
        dtype = _math_dtype(logits)
        out = torch.empty(targets.shape, dtype=dtype, device=logits.device)
        lse = torch.empty(targets.shape, dtype=dtype, device=logits.device)
        for b, s, e in _chunks(logits, chunk):
            x = logits[b, s:e].to(dtype) / temperature
            lse[b, s:e] = torch.logsumexp(x, dim=-1)
            out[b, s:e] = x.gather(-1, targets[b, s:e, None]).squeeze(-1) - lse[b, s:e]
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        ctx.chunk = chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, targets, lse = ctx.saved_tensors
        t = ctx.temperature
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        g = grad_out.to(lse.dtype) / t
        for b, s, e in _chunks(logits, ctx.chunk):
            p = torch.exp(logits[b, s:e].to(lse.dtype) / t - lse[b, s:e, None])
            gc = p.mul_(-g[b, s:e, None])
            gc.scatter_add_(-1, targets[b, s:e, None], g[b, s:e, None])
            grad[b, s:e] = gc
        return grad, None, None, None


def token_logprobs(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, *, chunk_tokens: int | None = None
) -> Tensor:
    """Per-token log-probs [B, T] of `targets` under softmax(logits / temperature), float32 or float64.

    The temperature divides the logits before the softmax, as vLLM and HF sampling do, so the
    learner's log-probs match the distribution the completions were sampled from. Math is float32
    even for bf16 logits; memory stays O(chunk * V) beyond the inputs (see _SelectedLogProb).
    chunk_tokens overrides the number of tokens per float32 chunk.
    """
    _check_logits(logits, temperature)
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets shape {tuple(targets.shape)} != logits [B, T] {tuple(logits.shape[:2])}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    if bool(((targets < 0) | (targets >= logits.shape[-1])).any()):
        raise ValueError(f"target ids must lie in [0, {logits.shape[-1]}) (padding included)")
    chunk = _chunk_len(logits.shape[-1], chunk_tokens)
    return _SelectedLogProb.apply(logits, targets.long(), float(temperature), chunk)


def token_entropy(logits: Tensor, temperature: float = 1.0, *, chunk_tokens: int | None = None) -> Tensor:
    """Entropy [B, T] of softmax(logits / temperature), float32 or float64, chunked as token_logprobs.

    Meant for logging under torch.no_grad(); it is differentiable, but then autograd keeps every
    chunk's float32 temporaries. Logits may be -inf for masked (banned) tokens, which then add
    nothing; at least one logit per position must be finite.
    """
    _check_logits(logits, temperature)
    chunk = _chunk_len(logits.shape[-1], chunk_tokens)
    parts = []
    dtype = _math_dtype(logits)
    for b, s, e in _chunks(logits, chunk):
        x = logits[b, s:e].to(dtype) / temperature
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        p = torch.exp(x - lse)
        # H = -sum p log p = lse - sum p x, since log p = x - lse and sum p = 1.
        # Masked tokens (x = -inf, p = 0) contribute 0, not 0 * -inf = NaN.
        px = torch.where(p > 0, p * x, torch.zeros_like(x))
        parts.append(lse.squeeze(-1) - px.sum(dim=-1))
    if not parts:
        return torch.zeros(logits.shape[:2], dtype=dtype, device=logits.device)
    return torch.cat(parts).view(logits.shape[:2])


# --------------------------------------------------------------------------------------------------
# Policy loss


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x where mask is nonzero (mask broadcasts to x); 0 where nothing is valid, never NaN.

    Invalid entries are excluded with where(), so NaN/inf in padding cannot leak into the result.
    """
    valid = (mask != 0).expand_as(x)
    total = torch.where(valid, x, torch.zeros_like(x))
    if dim is None:
        return total.sum() / valid.sum().clamp(min=1)
    return total.sum(dim) / valid.sum(dim).clamp(min=1)


def _masked_extremes(x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(max, min) of x over valid entries; (1, 1) when none is valid (x is a ratio here)."""
    one = torch.ones((), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return one, one
    inf = torch.full((), math.inf, dtype=x.dtype, device=x.device)
    any_valid = valid.any()
    hi = torch.where(any_valid, torch.where(valid, x, -inf).max(), one)
    lo = torch.where(any_valid, torch.where(valid, x, inf).min(), one)
    return hi, lo


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(policy || ref): exp(r) - r - 1 with r = ref_logp - logp.

    Written expm1(r) - r: the same value, but in float32 exp(r) - r - 1 rounds slightly below zero
    for some |r| < 1e-6, while this form stays >= 0.
    """
    r = ref_logp - logp
    return torch.expm1(r) - r


def _check_agg(agg: str, norm_constant: float | None) -> None:
    if agg not in AGG_MODES:
        raise ValueError(f"unknown agg {agg!r}; valid modes: {', '.join(AGG_MODES)}")
    if agg == "seq_mean_token_sum_norm" and (norm_constant is None or not norm_constant > 0):
        raise ValueError(
            f"agg='seq_mean_token_sum_norm' (Dr.GRPO) needs norm_constant > 0 (e.g. the max completion "
            f"length), got norm_constant={norm_constant}"
        )


def loss_denominator(mask: Tensor, agg: str) -> int:
    """What policy_loss divides by for this mask: valid tokens (token_mean) or non-empty sequences.

    With micro-batches or several learner ranks, sum this over the whole batch and pass it as
    policy_loss(global_denominator=...): the micro-batch losses then add up to the full-batch loss
    (a per-micro-batch token mean would weight short micro-batches' tokens more).
    """
    _check_agg(agg, 1.0)
    valid = mask != 0
    return int(valid.sum()) if agg == "token_mean" else int(valid.any(dim=1).sum())


def _aggregate(
    per_token: Tensor,
    valid: Tensor,
    agg: str,
    norm_constant: float | None,
    denominator: float | None,
) -> Tensor:
    masked = torch.where(valid, per_token, torch.zeros_like(per_token))
    if agg == "token_mean":
        total = masked.sum()
        count = valid.sum()
    else:
        # Reference run: each sequence's token mean; Dr.GRPO: token sum over a length-free constant.
        per_seq = valid.sum(dim=1).clamp(min=1) if agg == "seq_mean_token_mean" else norm_constant
        total = (masked.sum(dim=1) / per_seq).sum()
        # Sequences without a valid token (padding rows) are not counted in the mean over sequences.
        count = valid.any(dim=1).sum()
    if denominator is not None:
        return total / denominator
    return total / count.clamp(min=1)


IS_LEVELS = ("token", "sequence", "geometric")
IS_MODES = ("truncate", "mask")


@dataclass(frozen=True)
class ImportanceWeights:
    raw: Tensor  # [B, T] pi_proximal / pi_engine at the chosen level, broadcast to the tokens
    applied: Tensor  # [B, T] what multiplies each token's policy term (truncated or masked)
    cut: Tensor  # [B, T] bool: the bound changed this token's weight (capped, or masked to 0)


def _check_is(level: str, mode: str, cap: float | None, low: float | None) -> None:
    if level not in IS_LEVELS:
        raise ValueError(f"unknown importance-weight level {level!r}; valid: {', '.join(IS_LEVELS)}")
    if mode not in IS_MODES:
        raise ValueError(f"unknown importance-weight mode {mode!r}; valid: {', '.join(IS_MODES)}")
    if low is not None and (mode != "mask" or cap is None or not 0 <= low < cap):
        raise ValueError(f"is_low needs is_mode='mask' and 0 <= is_low < tis_cap, got {low} (cap {cap})")


def importance_weights(
    proximal: Tensor,
    behaviour: Tensor,
    valid: Tensor,
    level: str = "token",
    mode: str = "truncate",
    cap: float | None = None,
    low: float | None = None,
) -> ImportanceWeights:
    """pi_proximal / pi_engine of the sampled tokens, and what the bound makes of it.

    level: token (one weight per token); sequence (the product over the sequence's tokens, exp of
    the summed log ratio: unbiased for the whole sequence, high variance on long ones); geometric
    (exp of the mean log ratio: GSPO's length normalisation). mode: truncate multiplies by
    min(w, cap); mask keeps w inside [low, cap] and drops the token (sequence) outside it (weight 0,
    counted in `cut`). Without a cap the weights are only measured (applied = 1).
    """
    _check_is(level, mode, cap, low)
    log_w = torch.where(valid, proximal - behaviour, torch.zeros_like(proximal))
    if level == "sequence":
        log_w = log_w.sum(dim=1, keepdim=True).expand_as(log_w)
    elif level == "geometric":
        log_w = masked_mean(log_w, valid, dim=1)[:, None].expand_as(log_w)
    # Clamped before exp: a sequence product can overflow float32; the bound cuts it anyway.
    raw = torch.exp(log_w.clamp(max=80.0))
    if cap is None:
        return ImportanceWeights(raw, torch.ones_like(raw), torch.zeros_like(valid))
    if mode == "truncate":
        return ImportanceWeights(raw, raw.clamp(max=cap), valid & (raw > cap))
    outside = (raw > cap) | (raw < (low or 0.0))
    return ImportanceWeights(raw, torch.where(outside, torch.zeros_like(raw), raw), valid & outside)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    beta: float,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "seq_mean_token_mean",
    norm_constant: float | None = None,
    global_denominator: float | None = None,
    ratio_level: str = "token",
    behaviour_logp: Tensor | None = None,
    tis_cap: float | None = None,
    is_level: str = "token",
    is_mode: str = "truncate",
    is_low: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped GRPO loss with a k3 KL penalty, and its metrics.

    logp, old_logp, ref_logp, mask: [B, T] over completion tokens (mask nonzero = completion token;
    it is not a weight);
    advantages: [B], one per sequence. old_logp and ref_logp are treated as constants.
    Per token: -min(ratio * A, clamp(ratio, 1 - clip_low, 1 + clip_high) * A) + beta * k3 KL, with
    ratio = exp(logp - old_logp) (PPO clipping; clip_high > clip_low is DAPO's clip-higher).
    Aggregation (agg): see AGG_MODES; sequences with no valid token add nothing and are not counted.
    global_denominator replaces the local count (see loss_denominator) for gradient accumulation.

    ratio_level="sequence" is GSPO: one ratio per sequence, exp(token mean of logp - old_logp),
    clipped as a whole; each token of the sequence carries the sequence's term (so agg
    seq_mean_token_mean averages the sequence terms).

    The KL term is weighted by the same importance weight (it too is an expectation under the
    policy, estimated from the engine's samples).

    The decoupled objective (AReaL; the TIS work): old_logp is the *proximal* policy, the learner's
    weights at the start of this update, and the PPO ratio is taken against it, whatever sampled the
    tokens. behaviour_logp (the engine's log-probs of the sampled tokens) with tis_cap weights each
    token's policy term by the importance weight pi_proximal / pi_engine (importance_weights: per
    token, per sequence or its geometric mean; truncated at tis_cap, or tokens / sequences outside
    [is_low, tis_cap] masked out), a constant. That one weight corrects both a stale engine
    (one-step-off) and engine/learner numerics (bf16 kernels), which the clip alone cannot tell
    apart from the policy's own movement.

    With old_logp = logp.detach() (one update per rollout) the value and the gradient equal the reference recipe's
    -[exp(logp - logp.detach()) * A - beta * KL]. Metrics are local to this call (they ignore
    global_denominator), computed without grad, with one device sync.
    """
    _check_agg(agg, norm_constant)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logp shape {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logp.shape[0]}], got {tuple(advantages.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta != 0 and ref_logp is None:
        raise ValueError(f"ref_logp is required when beta != 0 (beta={beta})")
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if global_denominator is not None and not global_denominator > 0:
        raise ValueError(f"global_denominator must be > 0, got {global_denominator}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; valid: {', '.join(RATIO_LEVELS)}")
    if tis_cap is not None and (behaviour_logp is None or not tis_cap > 0):
        raise ValueError(f"tis_cap needs behaviour_logp and a value > 0, got tis_cap={tis_cap}")
    _check_is(is_level, is_mode, tis_cap, is_low)
    if behaviour_logp is not None and behaviour_logp.shape != logp.shape:
        raise ValueError(
            f"behaviour_logp shape {tuple(behaviour_logp.shape)} != logp shape {tuple(logp.shape)}"
        )

    valid = mask != 0
    dtype = torch.promote_types(logp.dtype, torch.float32)  # bf16 log-probs are upcast; float64 stays
    logp = logp.to(dtype)
    zero = torch.zeros_like(logp)
    # Padding may hold inf/NaN log-probs: replace them before any arithmetic (0 * x, or a NaN in a
    # backward exp, would still poison the loss and the gradient).
    logp = torch.where(valid, logp, zero)
    old = torch.where(valid, old_logp.detach().to(dtype), zero)
    if ratio_level == "sequence":
        # GSPO: the length-normalised sequence likelihood ratio, broadcast to the sequence's tokens.
        log_seq_ratio = masked_mean(logp - old, valid, dim=1)
        ratio = torch.exp(log_seq_ratio)[:, None].expand_as(logp)
    else:
        ratio = torch.exp(logp - old)
    adv = advantages.detach().to(dtype)[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    pg = -torch.minimum(unclipped, clipped)
    weights = None
    if behaviour_logp is not None:
        behaviour = torch.where(valid, behaviour_logp.detach().to(dtype), zero)
        weights = importance_weights(old, behaviour, valid, is_level, is_mode, tis_cap, is_low)
        if tis_cap is not None:
            pg = pg * weights.applied

    kl = None
    if ref_logp is not None:
        kl = kl_k3(logp, torch.where(valid, ref_logp.detach().to(dtype), zero))
        if weights is not None and tis_cap is not None:
            # k3 estimates KL(pi || ref) from tokens sampled by pi; these were sampled by the engine.
            # Unweighted, a stale token the policy has made unlikely gives exp(ref - logp) >> 1 (the
            # k3 KL of one-step-off's step 2 read 238 on the default work); weighted, w * k3 stays
            # near 1 there, and the term estimates the KL under the proximal policy.
            kl = kl * weights.applied
    # beta == 0 must ignore ref_logp entirely (0 * NaN would still poison the loss).
    per_token = pg + beta * kl if beta != 0 else pg
    loss = _aggregate(per_token, valid, agg, norm_constant, global_denominator)

    with torch.no_grad():
        # The clipped branch is active where the ratio left the trust region in the direction the
        # advantage pushes; those tokens get no gradient.
        is_clipped = ((adv > 0) & (ratio > 1 + clip_high)) | ((adv < 0) & (ratio < 1 - clip_low))
        kl_tok = kl if kl is not None else zero
        ratio_max, ratio_min = _masked_extremes(ratio, valid)
        a = adv.squeeze(1)
        adv_stats = [a.mean(), a.std(unbiased=False), a.max(), a.min()] if a.numel() else [zero.sum()] * 4
        stats = {
            "kl": masked_mean(kl_tok, valid),
            "clip_frac": masked_mean(is_clipped.float(), valid),
            # No valid token: report the neutral ratio 1 rather than 0.
            "ratio_mean": torch.where(valid.any(), masked_mean(ratio, valid), 1.0),
            "ratio_max": ratio_max,
            "ratio_min": ratio_min,
            "pg_loss": _aggregate(pg, valid, agg, norm_constant, None),
            "kl_loss": beta * _aggregate(kl_tok, valid, agg, norm_constant, None) if beta else zero.sum(),
            "adv_mean": adv_stats[0],
            "adv_std": adv_stats[1],  # population std: defined for a single sequence
            "adv_max": adv_stats[2],
            "adv_min": adv_stats[3],
        }
        if weights is not None:
            raw = weights.raw
            w_max, w_min = _masked_extremes(raw, valid)
            stats.update(
                is_weight_mean=torch.where(valid.any(), masked_mean(raw, valid), 1.0),
                is_weight_max=w_max,
                is_weight_min=w_min,
                # tokens whose weight the cap cut (truncate) or that were dropped (mask); 0 without a cap
                is_truncated_frac=masked_mean(weights.cut.float(), valid) if tis_cap else zero.sum(),
                # the engine's distance from the proximal policy on these tokens, in every mode
                engine_kl_k3=masked_mean(kl_k3(old, behaviour), valid),
                engine_abs_log_ratio=masked_mean((old - behaviour).abs(), valid),
            )
        values = torch.stack([v.to(dtype).reshape(()) for v in stats.values()]).tolist()  # one sync
    metrics = dict(zip(stats.keys(), values, strict=True))
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# Splitting a batch for the learner group


def _check_lengths(lengths: list[int]) -> None:
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"lengths[{i}] = {n} is negative")


def split_micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Split sequence indices, in order, into micro-batches of padded size max(len) * count <= budget.

    Greedy: a micro-batch takes the next sequence while the padded size fits. A sequence longer
    than the budget goes alone (never dropped: every completion's gradient counts).
    """
    _check_lengths(lengths)
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if current and max(longest, n) * (len(current) + 1) > token_budget:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def balance_by_tokens(lengths: list[int], num_ranks: int) -> list[list[int]]:
    """Assign sequence indices to num_ranks ranks with balanced token sums.

    Longest first onto the lightest rank (LPT): the heaviest rank exceeds the lightest by at most
    the longest sequence. Ties go to the rank with fewer sequences, so no rank is left empty while
    there are at least num_ranks sequences. Each rank's indices are in ascending order.
    """
    _check_lengths(lengths)
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    ranks: list[list[int]] = [[] for _ in range(num_ranks)]
    heap = [(0, 0, r) for r in range(num_ranks)]  # (tokens, sequences, rank)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        tokens, count, r = heapq.heappop(heap)
        ranks[r].append(i)
        heapq.heappush(heap, (tokens + lengths[i], count + 1, r))
    return [sorted(idx) for idx in ranks]


def mismatch_stats(diffs: torch.Tensor) -> dict[str, float]:
    """Mean, max and 99th percentile of per-token |engine - learner| log-prob differences.

    The mean hides what matters on bf16 GPUs: a stale-weights bug or a bad kernel shows up first
    as a heavy tail (a few tokens far off) while the mean stays small. Keys are suffixes of
    `logprob_mismatch`: "" (mean), "_max", "_p99". p99 is the nearest-rank percentile.
    """
    if diffs.numel() == 0:
        return {"": 0.0, "_max": 0.0, "_p99": 0.0}
    d = diffs.float().flatten().sort().values
    rank = max(0, math.ceil(0.99 * d.numel()) - 1)
    return {"": d.mean().item(), "_max": d[-1].item(), "_p99": d[rank].item()}
