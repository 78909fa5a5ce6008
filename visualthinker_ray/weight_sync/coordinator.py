"""The driver's side of weight sync: who is in the group, at which ranks, and one sync end to end.

A sender is learner rank 0 (through the learner group) or any Ray actor with the sender methods
(`ActorSender` wraps it): `node_ip()`, `weight_metas(served_dtype, trainable_only)`,
`init_sync_group(addr, port, handshake_json, timeout_s)`, `send_weights(metas, plan)`.
A receiver is a rollout actor: `sync_info()` says how many ranks it brings (its tensor-parallel
size: every vLLM worker joins) plus its wire dtype and parameter digest; `init_sync_group(...)`
and `receive_weights(...)` take plain data only. Every wait here is bounded.
"""

from __future__ import annotations

import time
from typing import Protocol

import ray

from visualthinker_ray.ray_calls import free_port, wait_all
from visualthinker_ray.weight_sync.plan import Handshake, TensorMeta, WeightSyncError, plan_buckets

# Slack on top of the collective timeout for Ray's own scheduling and the engine reload.
DRIVER_SLACK_S = 30.0


class Sender(Protocol):
    def node_ip(self) -> str: ...
    def weight_metas(self, served_dtype: str | None, trainable_only: bool) -> list[TensorMeta]: ...
    def init_sync_group(self, addr: str, port: int, handshake: str, timeout_s: float) -> dict: ...
    def send_weights(self, metas, plan) -> dict: ...  # {label: ObjectRef}: every call taking part


class ActorSender:
    """A single Ray actor as the sender (the tests' stand-in, or a one-rank learner)."""

    def __init__(self, handle, timeout_s: float = 60.0):
        self.handle, self.timeout_s = handle, timeout_s

    def node_ip(self) -> str:
        return ray.get(self.handle.node_ip.remote(), timeout=self.timeout_s)

    def weight_metas(self, served_dtype, trainable_only) -> list[TensorMeta]:
        return ray.get(self.handle.weight_metas.remote(served_dtype, trainable_only), timeout=self.timeout_s)

    def init_sync_group(self, addr, port, handshake, timeout_s) -> dict:
        return {"sender (rank 0)": self.handle.init_sync_group.remote(addr, port, handshake, timeout_s)}

    def send_weights(self, metas, plan) -> dict:
        return {"sender (rank 0)": self.handle.send_weights.remote(metas, plan)}


def as_sender(sender) -> Sender:
    if hasattr(sender, "send_weights") and hasattr(sender.send_weights, "remote"):
        return ActorSender(sender)
    return sender


def rank_offsets(ranks_per_receiver: list[int]) -> tuple[list[int], int]:
    """Each receiver's first rank in the group (rank 0 is the sender) and the world size."""
    offsets, next_rank = [], 1
    for n in ranks_per_receiver:
        offsets.append(next_rank)
        next_rank += n
    return offsets, next_rank


class SyncCoordinator:
    """Builds the sync group over a list of receiver actors and runs syncs through it.

    The first sync over a new group carries every parameter; later ones leave out the parameters
    the sender reports frozen (they cannot have changed), unless `skip_frozen` is off.
    """

    def __init__(self, timeout_s: float, bucket_bytes: int, skip_frozen: bool = True):
        self.timeout_s, self.bucket_bytes, self.skip_frozen = timeout_s, bucket_bytes, skip_frozen
        self.group: dict | None = None  # {"addr", "port", "world_size", "handshake"} of the live group
        self.full_sync_done = False
        self.all_names: set[str] = set()  # every parameter, from the group's first (full) sync

    def reset(self) -> None:
        """Forget the group (a receiver was replaced or added): the next sync builds a new one."""
        self.group, self.full_sync_done = None, False

    def _infos(self, receivers: dict) -> dict:
        refs = {label: r.sync_info.remote() for label, r in receivers.items()}
        infos = wait_all(
            refs, self.timeout_s + DRIVER_SLACK_S, "reading the rollout workers' sync info", WeightSyncError
        )
        for key in ("wire_dtype", "params", "backend"):
            values = {label: info[key] for label, info in infos.items()}
            if len(set(values.values())) > 1:
                raise WeightSyncError(
                    f"the rollout workers disagree on {key}: {values}; one model and dtype per pool"
                )
        return infos

    def build_group(self, sender, receivers: dict, version: int, attempts: int = 2) -> dict:
        """A fresh group on a newly picked port: sender = rank 0, then each receiver's ranks."""
        sender = as_sender(sender)
        infos = self._infos(receivers)
        first = next(iter(infos.values()))
        offsets, world = rank_offsets([info["ranks"] for info in infos.values()])
        handshake = Handshake(first["backend"], world, first["wire_dtype"], first["params"], version)
        addr = sender.node_ip()
        last: WeightSyncError | None = None
        for _ in range(attempts):
            port = free_port(addr)
            refs = dict(sender.init_sync_group(addr, port, handshake.to_json(), self.timeout_s))
            for (label, r), offset in zip(receivers.items(), offsets, strict=True):
                refs[f"{label} (ranks {offset}..{offset + infos[label]['ranks'] - 1})"] = (
                    r.init_sync_group.remote(addr, port, offset, self.timeout_s, handshake.to_json())
                )
            try:
                wait_all(
                    refs,
                    self.timeout_s + DRIVER_SLACK_S,
                    f"building the weight-sync group {addr}:{port}",
                    WeightSyncError,
                )
                self.group = {"addr": addr, "port": port, "world_size": world, "handshake": handshake}
                self.full_sync_done = False
                return self.group
            except WeightSyncError as e:
                last = e
                if e.dead:  # a dead worker will not join on another port either: replace it first
                    break
        self.group = None
        raise last  # type: ignore[misc]

    def sync(self, sender, receivers: dict, version: int) -> dict:
        """Push the sender's weights to every receiver: metadata by call, bytes through the group."""
        sender = as_sender(sender)
        if self.group is None:
            self.build_group(sender, receivers, version)
        t0 = time.monotonic()
        wire = self.group["handshake"].wire_dtype
        if self.full_sync_done and self.skip_frozen:
            metas = sender.weight_metas(wire, trainable_only=True)
            skipped = sorted(self.all_names - {m.name for m in metas})
        else:  # the first sync over a group: everything, and the names it holds
            metas = sender.weight_metas(wire, trainable_only=False)
            self.all_names, skipped = {m.name for m in metas}, []
        plan = plan_buckets(metas, self.bucket_bytes)
        refs = dict(sender.send_weights(metas, plan))
        for label, r in receivers.items():
            refs[label] = r.receive_weights.remote(metas, plan, version, skipped)
        try:
            results = wait_all(
                refs, self.timeout_s + DRIVER_SLACK_S, f"weight sync to version {version}", WeightSyncError
            )
        except WeightSyncError:
            self.reset()  # a failed collective leaves the group unusable: rebuild after repairs
            raise
        self.full_sync_done = True
        return {
            "seconds": time.monotonic() - t0,
            "buckets": len(plan),
            "bytes": sum(m.nbytes for m in metas),
            "skipped_params": len(skipped),
            "results": results,
        }
