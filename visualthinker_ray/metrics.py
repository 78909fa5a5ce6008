"""Per-step training metrics from plain data: rewards, lengths, the "aha moment" signals."""

from __future__ import annotations

from collections import defaultdict


def _stats(prefix: str, values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        f"{prefix}/mean": sum(values) / len(values),
        f"{prefix}/max": float(max(values)),
        f"{prefix}/min": float(min(values)),
    }


def rollout_metrics(
    question_types: list[str],
    lengths: list[int],
    truncated: list[bool],
    scores: list[dict],
    reflections: list[bool],
) -> dict[str, float]:
    """Reward components, accuracy per question type, response length, truncation, self-reflection.

    All lists are per completion. The self-reflection rate (share of completions with phrases like
    "wait" or "let me verify") and the mean response length are the paper's "aha moment" signals.
    """
    n = len(lengths)
    if n == 0:
        return {}
    out: dict[str, float] = {}
    for key in sorted(
        {k for s in scores for k in s if isinstance(s[k], (int, float)) and not isinstance(s[k], bool)}
    ):
        out[f"reward/{key}"] = sum(float(s.get(key, 0.0)) for s in scores) / n
    by_type: dict[str, list[float]] = defaultdict(list)
    for qt, s in zip(question_types, scores, strict=True):
        by_type[qt or "unknown"].append(float(s.get("accuracy", 0.0)))
    for qt, accs in sorted(by_type.items()):
        out[f"accuracy_by_type/{qt}"] = sum(accs) / len(accs)
    out.update(_stats("response_length", [float(x) for x in lengths]))
    out["response/truncated_frac"] = sum(truncated) / n
    out["response/self_reflection_rate"] = sum(reflections) / n
    return out


def probe_mismatch(engines: dict[str, dict], learner: list[list[float]]) -> dict[str, float]:
    """The sync alarm: |engine - learner| log-prob per token of the same probe sequences on the same
    weights, over every engine that scored: mean and max over all of them, and the worst engine's
    mean (one worker with a broken sync stands out there even when the others are fine)."""
    per_engine = []
    for result in engines.values():
        diffs = [
            abs(e - lp)
            for seq_e, seq_l in zip(result["logprobs"], learner, strict=True)
            for e, lp in zip(seq_e, seq_l, strict=True)
        ]
        if diffs:
            per_engine.append(diffs)
    if not per_engine:
        return {}
    flat = [d for diffs in per_engine for d in diffs]
    return {
        "sync/probe_mismatch_mean": sum(flat) / len(flat),
        "sync/probe_mismatch_max": max(flat),
        "sync/probe_mismatch_worst_engine_mean": max(sum(d) / len(d) for d in per_engine),
        "sync/probe_engines": float(len(per_engine)),
    }
