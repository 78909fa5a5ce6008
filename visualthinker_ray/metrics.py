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
