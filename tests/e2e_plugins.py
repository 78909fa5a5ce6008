"""Plug-in rewards that fail on every completion, for the end-to-end training test."""

import time


def always_raises(completion, gold, choices):
    raise RuntimeError("planted failure in a reward plug-in")


def always_hangs(completion, gold, choices):
    time.sleep(3600)
    return 1.0


def length_parity(completion, gold, choices):
    """A reward with variance for the random tiny model (whose format and accuracy rewards are all 0):
    completions of odd length earn 1, so every group has advantages and the update moves weights."""
    return float(len(completion) % 2)


def flat_for_counts(completion, gold, choices):
    """A reward for dynamic sampling: 0 for every completion of a counting question (a gold that is
    a number), so such a group's rewards are all equal for sure and the group is dropped; length
    parity for the others, so they have signal unless all four lengths share a parity (1 in 8)."""
    return 0.0 if gold.strip().isdigit() else float(len(completion) % 2)
