"""The rollout pool (driver side): the rollout workers, generation fan-out, their weight sync, and
their repair and resizing while training runs.

The sync itself (group membership, ranks, one sync end to end) is weight_sync/coordinator.py's;
the pool tells it who the receivers are and forgets the group whenever membership changes.

Faults. A worker that dies (its actor or its vLLM engine), stops answering health checks
(SIGSTOP, a wedged process) or overruns `generate_timeout_s` is killed and replaced by a fresh
worker with the same resources. The prompts it had not finished go to the workers still serving
(they keep their per-prompt seeds, so the step keeps its size and sampling); the replacement joins
at the next weight sync, so it never serves weights older than the others. If no worker is left,
the pool waits for the replacement and syncs it at once, at the pool's version; except in
`wait_done` (the HF engine's wait before a sync, after the learner's update: the sender already holds
the next version), where those prompts wait for that sync and are generated after it, under its
version. A sync that fails on a dead or hung worker is retried without it; one that fails with every
worker healthy is retried once on a new group (a vLLM worker whose update failed stays paused until
then: vllm_engine.py). More than `max_restarts` replacements within `restart_window_s` end the run
with an error naming the last cause. Every wait here is bounded.

Resizing. `scale_to(n)` starts workers (they join at the next sync, when they are up: a worker
waiting for a node the autoscaler adds does not hold the run back) or retires the newest ones (their
unfinished prompts are handed back to the rest, as after a fault, but not counted as one). A resize
never cancels the replacement of a lost worker, only workers a scale-up started: a node that is lost
takes its resource units with it, so a pool that follows the cluster is asked to shrink just then,
and the replacement's pending resource request is what makes an autoscaler bring the node back.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

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

log = logging.getLogger(__name__)


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
        generate_timeout_s=r.generate_timeout_s,
        hang_timeout_s=r.hang_timeout_s,
        max_restarts=r.max_restarts,
        restart_window_s=r.restart_window_s,
    )


@dataclass(eq=False)
class Member:
    """One rollout worker actor; ids are never reused, so logs tell a replacement from the original."""

    id: int
    kind: str
    handle: Any
    replacing: str | None = None  # the label of the lost worker it replaces; None: started by a resize

    @property
    def label(self) -> str:
        return f"worker {self.id} ({self.kind})"


@dataclass(eq=False)
class Part:
    """Some consecutive records of a generation, on one worker."""

    records: list[PromptRecord]
    member: Member
    ref: Any  # the generate call's ObjectRef; None once its worker is lost (generated again)
    result: dict | None = None


@dataclass(eq=False)
class Generation:
    """One submit(): its records in parts, in record order (a lost part is replaced in place)."""

    sampling: dict
    parts: list[Part] = field(default_factory=list)


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def engine_died(e: ray.exceptions.RayTaskError) -> bool:
    """A generate call that failed because the worker's vLLM engine process died (a fault to repair,
    unlike an error in the request itself)."""
    return "EngineDeadError" in str(e) or "EngineDead" in type(getattr(e, "cause", None) or e).__name__


def resize_plan(n: int, serving: int, pending: list[bool]) -> tuple[int, list[int], int]:
    """How `scale_to(n)` gets to n workers: (workers to start, indices into `pending` to cancel, newest
    serving workers to retire). `pending` lists the started workers not serving yet, oldest first,
    True for the replacement of a lost worker. Replacements count towards growth but are never
    cancelled; scale-up workers are cancelled newest first; serving workers are retired down to n
    only (a pending replacement may then make the pool one larger than n once it is up)."""
    if n < 1:
        raise ValueError(f"a rollout pool needs at least one worker, not {n}")
    start = max(0, n - serving - len(pending))
    excess = serving + len(pending) - n
    cancel = []
    for i in reversed(range(len(pending))):
        if excess <= 0:
            break
        if not pending[i]:
            cancel.append(i)
            excess -= 1
    return start, cancel, max(0, serving - n)


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
        hang_timeout_s: float = 60.0,
        max_restarts: int = 3,
        restart_window_s: float = 3600.0,
    ):
        self.model_path, self.engine_kwargs = model_path, dict(engine_kwargs or {})
        self.gpus, self.cpus, self.resource = gpus_per_worker, cpus_per_worker, resource
        self.timeout_s, self.bucket_bytes, self.start_timeout_s = timeout_s, bucket_bytes, start_timeout_s
        self.generate_timeout_s, self.hang_timeout_s = generate_timeout_s, hang_timeout_s
        self.max_restarts, self.restart_window_s = max_restarts, restart_window_s
        self.weights = SyncCoordinator(timeout_s, bucket_bytes, skip_frozen)
        self._ids = itertools.count()
        self._restarts: deque[float] = deque()  # when each replacement happened, within the window
        self.replaced = 0  # workers replaced after a fault, over the pool's life
        self.sender, self.version = None, 0  # who synced last, and the version every member serves
        self.members: list[Member] = [self._spawn(kind) for kind in engines]
        self._joining: list[tuple[Member, Any]] = []  # started, not serving yet: (member, ready ref)
        self._logged_kept: set[int] = set()  # replacements a resize kept, already logged
        self._wait_ready(self.members)

    @classmethod
    def from_config(cls, cfg, **overrides) -> RolloutPool:
        return cls(**{**pool_args(cfg), **overrides})

    # -- workers ---------------------------------------------------------------------------------
    @property
    def workers(self) -> list:
        return [m.handle for m in self.members]

    @property
    def kinds(self) -> list[str]:
        return [m.kind for m in self.members]

    @property
    def joining(self) -> int:
        return len(self._joining)

    @property
    def pending(self) -> list[str]:
        """The started workers not serving yet, oldest first, each with why it was started."""
        return [
            f"{m.label}: replaces {m.replacing}" if m.replacing else f"{m.label}: scale-up"
            for m, _ in self._joining
        ]

    def _spawn(self, kind: str, replacing: str | None = None) -> Member:
        options = dict(num_cpus=self.cpus, num_gpus=self.gpus)
        if self.resource:
            options["resources"] = {self.resource: 1}
        actor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(RolloutWorker)
        handle = actor.options(**options).remote(kind, self.model_path, self.engine_kwargs)
        return Member(next(self._ids), kind, handle, replacing)

    def _wait_ready(self, members: list[Member]) -> None:
        refs = {m.label: m.handle.ready.remote() for m in members}
        wait_all(refs, self.start_timeout_s, "starting rollout workers", RolloutError)

    def replace_worker(self, index: int, engine: str | None = None) -> None:
        """Kill worker `index` (if alive) and start a fresh one in its place, waiting until it is up;
        the sync group is rebuilt on the next sync."""
        old = self.members[index]
        ray.kill(old.handle, no_restart=True)
        new = self._spawn(engine or old.kind)
        self._wait_ready([new])
        self.members[index] = new
        self.weights.reset()

    def add_worker(self, engine: str | None = None) -> int:
        """One more worker, waiting until it is up; it gets weights at the next sync."""
        new = self._spawn(engine or self.members[0].kind)
        self._wait_ready([new])
        self.members.append(new)
        self.weights.reset()
        return len(self.members) - 1

    def scale_to(self, n: int) -> bool:
        """Grow or shrink to `n` workers (see resize_plan); whether anything was started, cancelled
        or retired. New ones join at a sync once they are up; retired ones are the newest serving
        workers, their unfinished prompts handed back to the others. Pending replacements of lost
        workers are kept, and logged."""
        if n < 1:
            raise ValueError(f"a rollout pool needs at least one worker, not {n}")
        if len(self.members) > n:
            # Retire only live workers: one whose node went (which is why the cluster shrank) and
            # whose loss the pool has not seen yet is a fault, replaced, not the one to retire.
            for m, cause in self._unhealthy(self.members):
                self._replace(m, f"{cause} (found when resizing the pool to {n})")
        kind = self.members[0].kind if self.members else self._joining[0][0].kind
        start, cancel, retire = resize_plan(
            n, len(self.members), [m.replacing is not None for m, _ in self._joining]
        )
        for i in sorted(cancel, reverse=True):
            member, _ = self._joining.pop(i)
            ray.kill(member.handle, no_restart=True)
            log.info(
                "cancelled %s, started by a scale-up, not serving yet (rollout pool scaled to %d)",
                member.label,
                n,
            )
        for _ in range(start):
            self._joining.append(self._start(kind))
        for _ in range(retire):
            member = self.members.pop()
            ray.kill(member.handle, no_restart=True)
            self.weights.reset()
            log.info("retired %s (rollout pool scaled to %d)", member.label, n)
        kept = [m for m, _ in self._joining if m.replacing is not None]
        if len(self.members) + len(self._joining) > n and {m.id for m in kept} - self._logged_kept:
            self._logged_kept.update(m.id for m in kept)
            log.info(
                "rollout pool asked for %d workers: %d serving, and kept pending %s (a resize never "
                "cancels a replacement: its resource request is what brings a lost node back)",
                n, len(self.members), "; ".join(self.pending),
            )  # fmt: skip
        return bool(start or cancel or retire)

    def _start(self, kind: str, replacing: str | None = None) -> tuple[Member, Any]:
        member = self._spawn(kind, replacing)
        return member, member.handle.ready.remote()

    def _admit(self, block: bool) -> None:
        """Make the started workers that are up serving members (the group is rebuilt at the next
        sync, which gives them the weights). With `block`, wait (bounded) for at least one."""
        while self._joining:
            refs = {ref: member for member, ref in self._joining}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
            if block and not ready and not self.members:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=self.start_timeout_s)
                if not ready:
                    labels = ", ".join(m.label for m in refs.values())
                    raise RolloutError(
                        f"no rollout worker is serving and none of the workers started ({labels}) was up "
                        f"within {self.start_timeout_s:.0f} s: does the cluster have a free slot with "
                        "the rollout resources (resources.rollout_resource, rollout.gpus_per_worker)?"
                    )
            if not ready:
                return
            for ref in ready:
                member = refs[ref]
                self._joining = [(m, r) for m, r in self._joining if m is not member]
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as e:  # it died starting up: try another, counted
                    self._count_fault(member, f"failed to start ({first_line(e)})")
                    self._joining.append(self._start(member.kind, member.replacing))
                    continue
                self.members.append(member)
                self.weights.reset()
                log.info("%s joined the rollout pool (%d serving)", member.label, len(self.members))
            if not block or self.members:
                return

    def settle(self, timeout_s: float | None = None) -> None:
        """Wait until every started worker is up (tests, benchmarks): the next sync makes them
        members, with the weights, before they get any prompt."""
        refs = [ref for _, ref in self._joining]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s or self.start_timeout_s)
        if pending:
            raise RolloutError(f"{len(pending)} rollout worker(s) not up within the timeout")

    def _count_fault(self, member: Member, cause: str) -> None:
        now = time.monotonic()
        self._restarts.append(now)
        while self._restarts and self._restarts[0] < now - self.restart_window_s:
            self._restarts.popleft()
        self.replaced += 1
        if len(self._restarts) > self.max_restarts:
            raise RolloutError(
                f"{member.label} {cause}: {len(self._restarts)} rollout worker faults within "
                f"{self.restart_window_s:.0f} s, more than rollout.max_restarts={self.max_restarts}; "
                "the run stops here (resume it from its last checkpoint with `train --resume`)"
            )
        log.warning(
            "%s %s; replacing it (%d of at most %d faults within %.0f s)",
            member.label, cause, len(self._restarts), self.max_restarts, self.restart_window_s,
        )  # fmt: skip

    def _replace(self, member: Member, cause: str) -> None:
        """Kill a failed member and start its replacement (which joins at a sync). A worker that is
        no longer a member (already replaced, or retired) is left alone."""
        if member not in self.members:
            return
        self.members.remove(member)
        ray.kill(member.handle, no_restart=True)
        self.weights.reset()
        self._count_fault(member, cause)
        self._joining.append(self._start(member.kind, member.label))

    def _unhealthy(self, members: list[Member]) -> list[tuple[Member, str]]:
        """The members that are dead or do not answer a health check within hang_timeout_s."""
        refs = {m.handle.alive.remote(): m for m in members}
        if not refs:
            return []
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=self.hang_timeout_s)
        bad = [(refs[r], f"answered no health check within {self.hang_timeout_s:.0f} s") for r in pending]
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                bad.append((refs[ref], f"died ({first_line(e)})"))
        return bad

    def _serving(self) -> None:
        """At least one member serving the current weights: if every worker was lost, wait for a
        replacement and sync it (with the retries of sync()) before it gets any prompt. The sender
        holds `self.version` whenever this runs: wait_done, the one wait after the learner's update
        (HF pools), does not redispatch to an empty pool but leaves those prompts to collect(),
        after the sync that follows, so a replacement never gets new weights under an old number."""
        if self.members:
            return
        if self.sender is None:  # nothing synced yet: every worker serves model.path (version 0)
            self._admit(block=True)
        else:
            self.sync(self.sender, self.version)

    def shutdown(self) -> None:
        for m in self.members + [m for m, _ in self._joining]:
            ray.kill(m.handle, no_restart=True)
        self.members, self._joining = [], []
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

    def submit(self, records: list[PromptRecord], sampling: SamplingSpec) -> Generation:
        """Start generating without waiting (collect() waits). Each worker generates one call at a
        time, in the order they arrive; a weight sync meanwhile is loaded at once by vLLM (its
        requests in flight go on under the new weights) and after the generation by the HF engine."""
        gen = Generation(sampling_to_dict(sampling))
        gen.parts = self._dispatch(records, gen.sampling)
        return gen

    def _dispatch(self, records: list[PromptRecord], sampling: dict) -> list[Part]:
        self._serving()
        chunks = split_evenly(records, len(self.members))
        return [
            Part(chunk, m, m.handle.generate.remote([r.to_dict() for r in chunk], sampling))
            for m, chunk in zip(self.members, chunks, strict=True)
            if chunk
        ]

    def wait_done(self, pending: list[Generation], timeout_s: float | None = None) -> None:
        """Wait until the submitted generations have finished (repairing faults on the way); their
        completions are kept for collect(). Called between the learner's update and the sync (HF
        pools): prompts lost with the last worker are not generated here (a replacement would get
        the sender's new weights before the pool's version moves) but by collect(), after the sync."""
        for gen in pending:
            self._finish(gen, timeout_s, defer_unserved=True)

    def collect(self, gen: Generation, timeout_s: float | None = None) -> tuple[list[Completion], list[dict]]:
        """The completions of one submit(), in record order, and per-part throughput stats."""
        self._finish(gen, timeout_s)
        completions, stats = [], []
        for part in gen.parts:
            out = part.result
            completions += [Completion(**c) for c in out["completions"]]
            stats.append(
                {"worker": part.member.label, **{k: v for k, v in out.items() if k != "completions"}}
            )
        return completions, stats

    def _finish(self, gen: Generation, timeout_s: float | None = None, defer_unserved: bool = False) -> None:
        """Wait for every part; a part whose worker died, hung or overran is generated again by the
        workers serving (its worker is replaced). An error inside a request is raised, not retried.
        With `defer_unserved`, parts lost when no worker is serving are left for a later call."""
        bound = timeout_s or self.generate_timeout_s
        deadline = time.monotonic() + bound
        check_every = max(0.5, self.hang_timeout_s / 4)
        while True:
            if not (defer_unserved and not self.members):
                for part in [p for p in gen.parts if p.ref is None]:  # lost: generate it again
                    i = gen.parts.index(part)
                    gen.parts[i : i + 1] = self._dispatch(part.records, gen.sampling)
            waiting = {p.ref: p for p in gen.parts if p.result is None and p.ref is not None}
            if not waiting:
                return
            left = deadline - time.monotonic()
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=max(0.0, min(check_every, left)))
            lost: list[Part] = []
            for ref in ready:
                part = waiting[ref]
                try:
                    part.result = ray.get(ref)
                except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as e:
                    self._replace(part.member, f"died during generation ({first_line(e)})")
                    lost.append(part)
                except ray.exceptions.RayTaskError as e:
                    if not engine_died(e):
                        raise RolloutError(
                            f"generation failed on {part.member.label}: {first_line(e)}"
                        ) from e
                    self._replace(part.member, f"lost its engine during generation ({first_line(e)})")
                    lost.append(part)
            if not ready:
                busy = list(
                    {id(p.member): p.member for p in waiting.values() if p.member in self.members}.values()
                )
                if time.monotonic() >= deadline:
                    for m in busy:
                        self._replace(m, f"returned no generation within {bound:.0f} s")
                else:
                    for m, cause in self._unhealthy(busy):
                        self._replace(m, f"{cause} during generation")
            for part in lost:
                part.ref = None  # generated again at the top of the loop (or put off, see above)
            if time.monotonic() >= deadline and any(p.result is None for p in gen.parts):
                deadline = time.monotonic() + bound  # the redispatched parts get a bound of their own

    # -- weight sync -----------------------------------------------------------------------------
    def receivers(self) -> dict:
        return {m.label: m.handle for m in self.members}

    def build_group(self, sender, version: int = 0) -> dict:
        """A fresh sync group (sender = rank 0, then every engine worker of every rollout worker)."""
        return self.weights.build_group(sender, self.receivers(), version)

    def sync(self, sender, version: int) -> dict:
        """Push the sender's weights to every worker (workers that came up since the last sync join
        first): metadata by call, bytes through the group. A worker that dies or hangs in it is
        replaced and the sync retried without it."""
        self.sender = sender
        self._admit(block=not self.members)
        retried = False
        while True:
            try:
                out = self.weights.sync(sender, self.receivers(), version)
                break
            except WeightSyncError as e:
                bad = self._unhealthy(self.members)
                if not bad:  # every worker is fine: a transient failure (retried once, on a new group)
                    if retried:  # or the sender's: the learner group reports its own faults
                        raise
                    log.warning("weight sync to version %d failed with every worker healthy; "
                                "retrying once on a new group: %s", version, first_line(e))  # fmt: skip
                    retried = True
                for m, cause in bad:
                    self._replace(m, f"{cause} in the weight sync to version {version}")
                self._admit(block=not self.members)  # _count_fault bounds this loop
        self.version = version
        return out

    def score(self, records: list[PromptRecord], completions: list[list[int]], timeout_s: float) -> dict:
        """Every serving worker's log-probs of the same fixed sequences (the sync alarm's probe):
        {worker label: {"version", "logprobs"}}. Bounded; a worker that fails is left out and
        logged (its fault is the generation path's to repair)."""
        recs = [r.to_dict() for r in records]
        refs = {m.label: m.handle.score.remote(recs, completions) for m in self.members}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        out = {}
        for label, ref in refs.items():
            if ref not in ready:
                log.warning("probe: %s did not score within %.0f s", label, timeout_s)
                continue
            try:
                out[label] = ray.get(ref)
            except ray.exceptions.RayError as e:
                log.warning("probe: %s failed to score: %s", label, first_line(e))
        return out

    def policy_versions(self) -> list[int]:
        refs = {m.label: m.handle.policy_version.remote() for m in self.members}
        return list(wait_all(refs, DRIVER_SLACK_S, "reading policy versions", WeightSyncError).values())
