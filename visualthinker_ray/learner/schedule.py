"""Learning-rate schedules as a pure function of the optimizer step (used through LambdaLR)."""

from __future__ import annotations

import math

from visualthinker_ray.errors import InputError


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, kind: str = "linear") -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based).

    Linear warm-up from 1/(warmup+1) to 1 over `warmup_steps`, then constant, linear decay to 0 at
    `total_steps`, or cosine decay to 0 at `total_steps`.
    """
    if kind not in ("constant", "linear", "cosine"):
        raise InputError(f"unknown lr schedule {kind!r}; use constant, linear or cosine")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
