"""The training data order: a seeded permutation per epoch, consumed in batches, resumable.

State is (epoch, position): resuming from it replays exactly the order of an uninterrupted run,
including across epoch boundaries (a resume at a boundary once skipped an epoch in the reference).
"""

from __future__ import annotations

import math
import random

from visualthinker_ray.errors import InputError


class DataOrder:
    def __init__(self, num_items: int, batch_size: int, seed: int = 0):
        if num_items < 1:
            raise InputError("the training set is empty")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.epoch, self.position = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        # The last batch of an epoch may be smaller: every item is used exactly once per epoch.
        return math.ceil(self.num_items / self.batch_size)

    def permutation(self, epoch: int) -> list[int]:
        order = list(range(self.num_items))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> tuple[int, list[int]]:
        """(epoch, item indices) of the next batch; advances the state."""
        if self.position >= self.num_items:
            self.epoch, self.position = self.epoch + 1, 0
        perm = self.permutation(self.epoch)
        batch = perm[self.position : self.position + self.batch_size]
        self.position += len(batch)
        return self.epoch, batch

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_items": self.num_items,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_items"] != self.num_items or state["seed"] != self.seed:
            raise InputError(
                f"checkpoint data order was for {state['num_items']} items with seed {state['seed']}, but this run "
                f"has {self.num_items} items with seed {self.seed}: resume with the same data and data.seed"
            )
        self.epoch, self.position = state["epoch"], state["position"]
