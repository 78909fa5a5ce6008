"""The rollout pool (driver side): N rollout workers, generation fan-out, and the weight-sync group.

A sender is anything with rank 0 of the sync group: a Ray actor exposing `node_ip()`,
`weight_metas()`, `init_sync_group(addr, port, world_size, timeout_s)` and `send_weights(plan)`
(wrapped by `ActorSender`), or an object with the `Sender` methods below (the learner group, whose
every rank takes part in gathering while rank 0 sends). Every wait here is bounded by a timeout.
"""

from __future__ import annotations

import time
from typing import Protocol

import ray

from visualthinker_ray.data.records import PromptRecord
from visualthinker_ray.ray_calls import free_port, wait_all
from visualthinker_ray.rollout.engine import Completion, SamplingSpec
from visualthinker_ray.rollout.worker import RolloutWorker, sampling_to_dict
from visualthinker_ray.weight_sync import DEFAULT_BUCKET_BYTES, TensorMeta, WeightSyncError, plan_buckets


class RolloutError(RuntimeError):
    """A rollout worker failed or did not answer in time; the message names it."""

    dead = False  # True when the failure includes a dead actor (replace it before retrying)


# Slack on top of the collective timeout for Ray's own scheduling and the engine reload.
DRIVER_SLACK_S = 30.0


class Sender(Protocol):
    def node_ip(self) -> str: ...
    def weight_metas(self) -> list[TensorMeta]: ...
    def init_sync_group(self, addr: str, port: int, world_size: int, timeout_s: float) -> dict: ...
    def send_weights(self, plan) -> dict: ...  # {label: ObjectRef}: every call taking part in the send


class ActorSender:
    """A single Ray actor as the sender (the test stand-in `ModelWeightSource`, or a one-rank learner)."""

    def __init__(self, handle, timeout_s: float = 60.0):
        self.handle, self.timeout_s = handle, timeout_s

    def node_ip(self) -> str:
        return ray.get(self.handle.node_ip.remote(), timeout=self.timeout_s)

    def weight_metas(self) -> list[TensorMeta]:
        return ray.get(self.handle.weight_metas.remote(), timeout=self.timeout_s)

    def init_sync_group(self, addr, port, world_size, timeout_s) -> dict:
        return {"sender (rank 0)": self.handle.init_sync_group.remote(addr, port, world_size, timeout_s)}

    def send_weights(self, plan) -> dict:
        return {"sender (rank 0)": self.handle.send_weights.remote(plan)}


def pool_args(cfg) -> dict:
    """RolloutPool's arguments from a Config."""
    from visualthinker_ray.rollout.engine import engine_kwargs

    r = cfg.rollout
    return dict(
        model_path=cfg.model.path,
        engines=[r.engine] * r.num_workers,
        engine_kwargs=engine_kwargs(cfg),
        gpus_per_worker=r.gpus_per_worker,
        resource=cfg.resources.rollout_resource,
        timeout_s=cfg.resources.collective_timeout_s,
        bucket_bytes=int(r.sync_bucket_mb * 1024 * 1024),
    )


class RolloutPool:
    def __init__(
        self,
        model_path: str,
        engines: list[str],
        engine_kwargs: dict | None = None,
        gpus_per_worker: float = 0,
        cpus_per_worker: float = 1,
        resource: str | None = None,
        timeout_s: float = 600.0,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        start_timeout_s: float = 600.0,
        generate_timeout_s: float = 3600.0,
    ):
        self.model_path, self.engine_kwargs = model_path, dict(engine_kwargs or {})
        self.gpus, self.cpus, self.resource = gpus_per_worker, cpus_per_worker, resource
        self.timeout_s, self.bucket_bytes, self.start_timeout_s = timeout_s, bucket_bytes, start_timeout_s
        self.generate_timeout_s = generate_timeout_s
        self.kinds: list[str] = list(engines)
        self.workers = [self._spawn(kind) for kind in self.kinds]
        self._wait_ready(range(len(self.workers)))
        self.group: dict | None = None  # {"addr", "port", "world_size"} of the live sync group

    @classmethod
    def from_config(cls, cfg, **overrides) -> RolloutPool:
        return cls(**{**pool_args(cfg), **overrides})

    # -- workers ---------------------------------------------------------------------------------

    def _spawn(self, kind: str):
        options = dict(num_cpus=self.cpus, num_gpus=self.gpus)
        if self.resource:
            options["resources"] = {self.resource: 1}
        return ray.remote(RolloutWorker).options(**options).remote(kind, self.model_path, self.engine_kwargs)

    def _wait_ready(self, indices) -> None:
        refs = {f"worker {i} ({self.kinds[i]})": self.workers[i].ready.remote() for i in indices}
        wait_all(refs, self.start_timeout_s, "starting rollout workers", WeightSyncError)

    def replace_worker(self, index: int, engine: str | None = None) -> None:
        """Kill worker `index` (if alive) and start a fresh one; the sync group is rebuilt on the next sync."""
        ray.kill(self.workers[index], no_restart=True)
        self.kinds[index] = engine or self.kinds[index]
        self.workers[index] = self._spawn(self.kinds[index])
        self._wait_ready([index])
        self.group = None

    def add_worker(self, engine: str | None = None) -> int:
        self.kinds.append(engine or self.kinds[0])
        self.workers.append(self._spawn(self.kinds[-1]))
        self._wait_ready([len(self.workers) - 1])
        self.group = None
        return len(self.workers) - 1

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers, self.group = [], None

    # -- generation ------------------------------------------------------------------------------

    def generate(
        self, records: list[PromptRecord], sampling: SamplingSpec, timeout_s: float | None = None
    ) -> tuple[list[Completion], list[dict]]:
        """Completions for every record in record order (a prompt's G samples stay on one worker),
        and per-worker throughput stats."""
        chunks = split_evenly(records, len(self.workers))
        spec = sampling_to_dict(sampling)
        refs = {
            f"worker {i} ({self.kinds[i]})": w.generate.remote([r.to_dict() for r in chunk], spec)
            for i, (w, chunk) in enumerate(zip(self.workers, chunks, strict=True))
            if chunk
        }
        results = wait_all(refs, timeout_s or self.generate_timeout_s, "generation", RolloutError)
        completions, stats = [], []
        for label, out in results.items():
            completions += [Completion(**c) for c in out["completions"]]
            stats.append({"worker": label, **{k: v for k, v in out.items() if k != "completions"}})
        return completions, stats

    # -- weight sync -----------------------------------------------------------------------------

    def build_group(self, sender, attempts: int = 2) -> dict:
        """A fresh sync group (sender = rank 0, worker i = rank i + 1) on a newly picked port."""
        sender = as_sender(sender)
        addr = sender.node_ip()
        world = len(self.workers) + 1
        last: WeightSyncError | None = None
        for _ in range(attempts):
            port = free_port(addr)
            refs = dict(sender.init_sync_group(addr, port, world, self.timeout_s))
            for i, w in enumerate(self.workers):
                refs[f"worker {i} ({self.kinds[i]}, rank {i + 1})"] = w.init_sync_group.remote(
                    addr, port, world, i + 1, self.timeout_s
                )
            try:
                wait_all(
                    refs,
                    self.timeout_s + DRIVER_SLACK_S,
                    f"building the weight-sync group {addr}:{port}",
                    WeightSyncError,
                )
                self.group = {"addr": addr, "port": port, "world_size": world}
                return self.group
            except WeightSyncError as e:
                last = e
                if e.dead:  # a dead worker will not join on another port either: replace it first
                    break
        self.group = None
        raise last  # type: ignore[misc]

    def sync(self, sender, version: int) -> dict:
        """Push the sender's weights to every worker: one metadata call each, bytes through the group."""
        sender = as_sender(sender)
        if self.group is None:
            self.build_group(sender)
        t0 = time.monotonic()
        metas = sender.weight_metas()
        plan = plan_buckets(metas, self.bucket_bytes)
        refs = dict(sender.send_weights(plan))
        for i, w in enumerate(self.workers):
            refs[f"worker {i} ({self.kinds[i]}, rank {i + 1})"] = w.receive_weights.remote(
                metas, plan, version
            )
        try:
            results = wait_all(
                refs, self.timeout_s + DRIVER_SLACK_S, f"weight sync to version {version}", WeightSyncError
            )
        except WeightSyncError:
            self.group = None  # a failed collective leaves the group unusable: rebuild after repairs
            raise
        return {
            "seconds": time.monotonic() - t0,
            "buckets": len(plan),
            "bytes": sum(m.nbytes for m in metas),
            "results": results,
        }

    def policy_versions(self) -> list[int]:
        refs = {f"worker {i}": w.policy_version.remote() for i, w in enumerate(self.workers)}
        return list(wait_all(refs, DRIVER_SLACK_S, "reading policy versions", WeightSyncError).values())


def as_sender(sender) -> Sender:
    if hasattr(sender, "send_weights") and hasattr(sender.send_weights, "remote"):
        return ActorSender(sender)
    return sender


def split_evenly(items: list, n: int) -> list[list]:
    """`n` contiguous chunks whose sizes differ by at most one (concatenated, the original order)."""
    q, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + q + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out
