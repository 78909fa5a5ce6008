"""The generation-engine contract shared by the vLLM and HF engines.

A completion's `logprobs` are log p(token) under the distribution actually sampled from:
log_softmax(logits / temperature) with the vision special tokens masked out (top-p truncation is
not reflected). The learner computes the same quantity, so the two can be compared token by token.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Protocol

from visualthinker_ray.data.records import PromptRecord


@dataclass(frozen=True)
class SamplingSpec:
    n: int = 1  # completions per prompt (G)
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Completion:
    prompt_id: str
    sample_index: int  # 0..n-1 within its prompt's group
    prompt_token_ids: list[int]  # as the engine tokenized the prompt, image placeholders expanded
    token_ids: list[int]  # the completion's tokens (EOS included when it stopped on EOS)
    text: str
    logprobs: list[float]  # one per completion token, see the module docstring
    finish_reason: str  # "stop" or "length"
    policy_version: int
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def prompt_seed(base: int, prompt_id: str) -> int:
    """The sampling seed of one prompt: its own random stream, derived from the step's base seed
    (itself from data.seed and the step) and the prompt id, the same in every process."""
    digest = hashlib.sha256(f"{base}/{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class Engine(Protocol):
    policy_version: int

    def generate(self, records: list[PromptRecord], sampling: SamplingSpec) -> list[Completion]:
        """`sampling.n` completions per record, a record's completions contiguous, records in order."""
        ...

    def score(self, records: list[PromptRecord], completions: list[list[int]]) -> list[list[float]]:
        """log p of each completion's tokens after its record's prompt under the weights held now
        (raw log_softmax: temperature 1, no bans): the probe of the sync alarm."""
        ...
