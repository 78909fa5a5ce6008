"""The rollout pool (driver side): N rollout workers, generation fan-out, and their weight sync.

The sync itself (group membership, ranks, one sync end to end) is weight_sync/coordinator.py's;
the pool tells it who the receivers are and rebuilds the group when a worker is replaced or added.
Every wait here is bounded by a timeout.
"""

from __future__ import annotations

import ray

from visualthinker_ray.data.records import PromptRecord
from visualthinker_ray.ray_calls import split_evenly, wait_all
from visualthinker_ray.rollout.engine import Completion, SamplingSpec
from visualthinker_ray.rollout.worker import (
    CONCURRENCY_GROUPS,
    RolloutWorker,
    sampling_to_dict,
    updates_during_generation,
)
from visualthinker_ray.weight_sync import DEFAULT_BUCKET_BYTES, WeightSyncError
from visualthinker_ray.weight_sync.coordinator import DRIVER_SLACK_S, SyncCoordinator


class RolloutError(RuntimeError):
    """A rollout worker failed or did not answer in time; the message names it."""

    dead = False  # True when the failure includes a dead actor (replace it before retrying)


def pool_args(cfg) -> dict:
    """RolloutPool's arguments from a Config."""
    from visualthinker_ray.rollout.factory import engine_kwargs

    r = cfg.rollout
    return dict(
        model_path=cfg.model.path,
        engines=[r.engine] * r.num_workers,
        engine_kwargs=engine_kwargs(cfg),
        gpus_per_worker=r.gpus_per_worker,
        resource=cfg.resources.rollout_resource,
        timeout_s=cfg.resources.collective_timeout_s,
        bucket_bytes=int(r.sync_bucket_mb * 1024 * 1024),
        skip_frozen=r.sync_skip_frozen,
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
        skip_frozen: bool = True,
    ):
        self.model_path, self.engine_kwargs = model_path, dict(engine_kwargs or {})
        self.gpus, self.cpus, self.resource = gpus_per_worker, cpus_per_worker, resource
        self.timeout_s, self.bucket_bytes, self.start_timeout_s = timeout_s, bucket_bytes, start_timeout_s
        self.generate_timeout_s = generate_timeout_s
        self.kinds: list[str] = list(engines)
        self.workers = [self._spawn(kind) for kind in self.kinds]
        self._wait_ready(range(len(self.workers)))
        self.weights = SyncCoordinator(timeout_s, bucket_bytes, skip_frozen)

    @classmethod
    def from_config(cls, cfg, **overrides) -> RolloutPool:
        return cls(**{**pool_args(cfg), **overrides})

    # -- workers ---------------------------------------------------------------------------------

    def _spawn(self, kind: str):
        options = dict(num_cpus=self.cpus, num_gpus=self.gpus)
        if self.resource:
            options["resources"] = {self.resource: 1}
        actor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(RolloutWorker)
        return actor.options(**options).remote(kind, self.model_path, self.engine_kwargs)

    def _wait_ready(self, indices) -> None:
        refs = {f"worker {i} ({self.kinds[i]})": self.workers[i].ready.remote() for i in indices}
        wait_all(refs, self.start_timeout_s, "starting rollout workers", WeightSyncError)

    def replace_worker(self, index: int, engine: str | None = None) -> None:
        """Kill worker `index` (if alive) and start a fresh one; the sync group is rebuilt on the next sync."""
        ray.kill(self.workers[index], no_restart=True)
        self.kinds[index] = engine or self.kinds[index]
        self.workers[index] = self._spawn(self.kinds[index])
        self._wait_ready([index])
        self.weights.reset()

    def add_worker(self, engine: str | None = None) -> int:
        self.kinds.append(engine or self.kinds[0])
        self.workers.append(self._spawn(self.kinds[-1]))
        self._wait_ready([len(self.workers) - 1])
        self.weights.reset()
        return len(self.workers) - 1

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
        self.weights.reset()

    # -- generation ------------------------------------------------------------------------------

    def generate(
        self, records: list[PromptRecord], sampling: SamplingSpec, timeout_s: float | None = None
    ) -> tuple[list[Completion], list[dict]]:
        """Completions for every record in record order (a prompt's G samples stay on one worker),
        and per-worker throughput stats."""
        return self.collect(self.submit(records, sampling), timeout_s)

    @property
    def updates_during_generation(self) -> bool:
        """True when every worker loads a sync while it generates (vLLM); else wait_done() first."""
        return all(updates_during_generation(kind) for kind in self.kinds)

    def submit(self, records: list[PromptRecord], sampling: SamplingSpec) -> dict:
        """Start generating without waiting (collect() waits). Each worker generates one call at a
        time, in the order they arrive; a weight sync meanwhile is loaded at once by vLLM (its
        requests in flight go on under the new weights) and after the generation by the HF engine."""
        chunks = split_evenly(records, len(self.workers))
        spec = sampling_to_dict(sampling)
        return {
            f"worker {i} ({self.kinds[i]})": w.generate.remote([r.to_dict() for r in chunk], spec)
            for i, (w, chunk) in enumerate(zip(self.workers, chunks, strict=True))
            if chunk
        }

    def wait_done(self, pending: list[dict], timeout_s: float | None = None) -> None:
        """Wait until the submitted generations have finished (their results stay in the object store).
        A generation still running after the timeout is an error that names its worker."""
        labels = {ref: label for p in pending for label, ref in p.items()}
        if not labels:
            return
        timeout_s = timeout_s or self.generate_timeout_s
        _, running = ray.wait(list(labels), num_returns=len(labels), timeout=timeout_s, fetch_local=False)
        if running:
            names = ", ".join(sorted({labels[r] for r in running}))
            raise RolloutError(f"generation did not finish within {timeout_s:.0f} s on {names}")

    def collect(self, pending: dict, timeout_s: float | None = None) -> tuple[list[Completion], list[dict]]:
        """The completions of one submit(), in record order, and per-worker throughput stats."""
        results = wait_all(pending, timeout_s or self.generate_timeout_s, "generation", RolloutError)
        completions, stats = [], []
        for label, out in results.items():
            completions += [Completion(**c) for c in out["completions"]]
            stats.append({"worker": label, **{k: v for k, v in out.items() if k != "completions"}})
        return completions, stats

    # -- weight sync -----------------------------------------------------------------------------

    def receivers(self) -> dict:
        return {f"worker {i} ({self.kinds[i]})": w for i, w in enumerate(self.workers)}

    def build_group(self, sender, version: int = 0) -> dict:
        """A fresh sync group (sender = rank 0, then every engine worker of every rollout worker)."""
        return self.weights.build_group(sender, self.receivers(), version)

    def sync(self, sender, version: int) -> dict:
        """Push the sender's weights to every worker: metadata by call, bytes through the group."""
        return self.weights.sync(sender, self.receivers(), version)

    def policy_versions(self) -> list[int]:
        refs = {f"worker {i}": w.policy_version.remote() for i, w in enumerate(self.workers)}
        return list(wait_all(refs, DRIVER_SLACK_S, "reading policy versions", WeightSyncError).values())
