"""The typed data that passes between the roles of one RL step.

    rollout pool --RolloutBatch--> driver (grade, advantages) --TrainBatch--> learner group

A completion carries the policy version that sampled it and the engine's log-probs of its tokens
(the behaviour policy); a training item carries how many versions old it is when trained, so the
learner can take its PPO ratio against the right policy (learner/worker.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from visualthinker_ray.data.records import PromptRecord
from visualthinker_ray.rollout.engine import Completion


@dataclass
class RolloutBatch:
    """One step's generated data: its prompts in order, `group_size` completions each, contiguous."""

    step: int  # the RL step (0-based) that trains on it
    epoch: int
    records: list[PromptRecord]
    completions: list[Completion]
    generate_s: float = 0.0  # the slowest rollout worker's busy seconds (not the driver's wait)
    stats: list[dict] = field(default_factory=list)  # per-worker throughput


@dataclass
class TrainItem:
    """One completion as the learner trains on it."""

    record: PromptRecord
    token_ids: list[int]
    advantage: float
    prompt_len: int
    behaviour_logprobs: list[float] | None = None  # the engine's, per completion token
    staleness: int = 0  # policy versions between the one that sampled it and the one trained


@dataclass
class TrainBatch:
    items: list[TrainItem]

    @property
    def staleness(self) -> list[int]:
        return [it.staleness for it in self.items]
