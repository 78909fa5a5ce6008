"""Checkpoint folders: written under a temporary name, renamed when complete, the last N kept.

A checkpoint `step_00000012/` holds the learner's sharded state (`learner/`, written by every rank
with torch.distributed.checkpoint), `learner_extra.pt` (scheduler, step count) and
`trainer_state.json` (step, data order, policy version, config). On a cluster the checkpoint
folder must be on storage every learner pod and the driver can reach.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def begin(root: str | Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of `step` (a leftover from a crash is removed)."""
    tmp = Path(root) / f"step_{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, trainer_state: dict) -> Path:
    """Write the trainer state last, then rename: a folder named step_N is always complete."""
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def complete_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest(root: str | Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def prune(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints; returns what was deleted."""
    done = complete_checkpoints(root)
    doomed = done[:-keep_last] if keep_last > 0 else done
    for p in doomed:
        shutil.rmtree(p)
    return doomed


def load_trainer_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text())
