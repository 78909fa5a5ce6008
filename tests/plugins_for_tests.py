"""Plug-in rewards ("tests.plugins_for_tests:NAME") that misbehave on purpose, for the reward pool tests.

The misbehaving ones only misbehave on completions containing their marker, so the other items of
the same call show that they keep their real grades.
"""

import collections
import itertools
import os
import time

RAISE = "RAISE"
HANG = "HANG"
CRASH = "CRASH"


def always_one(completion, gold, choices):
    return 1.0


def raises(completion, gold, choices):
    if RAISE in completion:
        raise ValueError("planted failure in the raises plug-in")
    return 0.5


def hangs_python(completion, gold, choices):
    if HANG in completion:
        time.sleep(3600)
    return 0.25


def hangs_c(completion, gold, choices):
    """Spins forever in C holding the GIL, never checking for signals: SIGALRM cannot interrupt it.

    (A catastrophic regex such as re.match(r"(a+)+$", "a" * 40 + "b") does NOT qualify on
    CPython 3.11: the regex engine checks for signals, so a soft timeout interrupts it.)
    """
    if HANG in completion:
        collections.deque(itertools.repeat(None), maxlen=0)
    return 0.75


def crashes(completion, gold, choices):
    """Kills the whole actor process, as a segfaulting C extension would."""
    if CRASH in completion:
        os._exit(1)
    return 1.0
