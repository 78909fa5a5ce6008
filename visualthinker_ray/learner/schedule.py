"""Learning-rate schedules as a pure function of the optimizer step (used through LambdaLR)."""

from __future__ import annotations

import math

from visualthinker_ray.errors import InputError


def lr_factor(
    step: int, total_steps: int, warmup_steps: int = 0, kind: str = "linear", floor: float = 0.0
) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based).

    Linear warm-up from 1/warmup to 1 over the first `warmup_steps` steps, then constant, or a
    linear or cosine decay from 1 to `floor` at `total_steps`.
    """
    if kind not in ("constant", "linear", "cosine"):
        raise InputError(f"unknown lr schedule {kind!r}; use constant, linear or cosine")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    shape = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * shape
