"""Plug-in rewards that fail on every completion, for the end-to-end training test."""

import time


def always_raises(completion, gold, choices):
    raise RuntimeError("planted failure in a reward plug-in")


def always_hangs(completion, gold, choices):
    time.sleep(3600)
    return 1.0
