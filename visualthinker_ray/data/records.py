"""The prompt record: the plain-data unit that crosses every Ray boundary.

Images stay encoded (PNG/JPEG bytes) until a worker needs pixels, so a large data set never sits
decoded in host memory.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass, field

LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class PromptRecord:
    id: str
    images: tuple[bytes, ...]  # encoded image files, in the order the prompt shows them
    question: str  # the question text inserted in the prompt template
    gold: str  # the gold answer as option TEXT (SAT) or choice text (CV-Bench)
    choices: tuple[str, ...] = ()  # the options, in the order shown; empty when free-form
    question_type: str = ""  # SAT question_type, or CV-Bench task (Count, Relation, Depth, Distance)
    source: str = ""  # data set or CV-Bench source (ADE20K, COCO, Omni3D)
    meta: dict = field(default_factory=dict)  # anything else worth keeping (idx, type 2D/3D, ...)

    @property
    def gold_letter(self) -> str | None:
        """The option letter of the gold answer ("A" for the first option), if it is an option."""
        if self.gold in self.choices:
            return LETTERS[self.choices.index(self.gold)]
        return None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PromptRecord:
        return cls(
            id=str(d["id"]),
            images=tuple(d["images"]),
            question=d["question"],
            gold=d["gold"],
            choices=tuple(d.get("choices", ())),
            question_type=d.get("question_type", ""),
            source=d.get("source", ""),
            meta=dict(d.get("meta", {})),
        )
