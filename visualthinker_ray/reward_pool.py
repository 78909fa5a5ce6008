"""The reward pool: CPU Ray actors that grade completions with time limits, and survive hangs.

Two layers of time limits, because a hung grader must never stall a training step:

* Soft, inside the actor: each grader call on one completion gets ``reward.timeout_s``, enforced
  with ``signal.setitimer`` + SIGALRM (sync actor methods run on the worker's main thread, where
  Python signal handlers run). It interrupts any hang that executes Python bytecode or a C call that
  checks for signals (``time.sleep``, ``re`` matching): that reward scores 0 and the item is marked
  ``timed_out``; the other rewards of the item are still computed.
* Hard, in the driver: a C loop that holds the GIL and never checks for signals (e.g.
  ``collections.deque(itertools.repeat(None), maxlen=0)``) ignores SIGALRM. Each call therefore
  also gets a deadline (items x rewards x timeout_s + slack); past it the pool kills the actor
  (it restarts: ``max_restarts=-1``) and re-grades that chunk one item at a time, each with its
  own deadline. An item that hangs again scores 0 and counts as a timeout.
* An actor that dies mid-call (a crashing C extension) restarts; its chunk is retried once whole,
  then item by item, and an item that kills it again scores 0 with an error. Restarts are counted
  from the instance id each actor reports with every reply.

An item is ``{"completion": str, "gold": str, "choices": list[str] | None}``; its result maps each
reward's name to its raw value, plus "total" (the weighted sum), "timed_out", "error" (the first
traceback, naming the reward, or None) and "self_reflection" (the "aha" phrase detector).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray

from visualthinker_ray.config import Config, RewardConfig
from visualthinker_ray.ray_calls import split_evenly
from visualthinker_ray.rewards import (
    RewardFn,
    builtin_rewards,
    reward_fns_from_config,
    score_completion,
    self_reflection,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Grading one item (runs inside the actor; plain functions, usable without Ray)
# ---------------------------------------------------------------------------------------------


class GraderTimeout(BaseException):
    """Raised by the SIGALRM handler; a BaseException so a grader's ``except Exception`` can't eat it."""


def _raise_timeout(signum, frame):
    raise GraderTimeout()


def call_with_time_limit(fn: Callable[[], float], seconds: float) -> float:
    """``fn()``, interrupted by GraderTimeout after ``seconds`` when on the main thread.

    Off the main thread no signal can be delivered, so ``fn`` runs unbounded (the pool's hard
    deadline still applies).
    """
    if threading.current_thread() is not threading.main_thread():
        return fn()
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)


def grade_item(item: dict, rewards: Sequence[RewardFn], timeout_s: float) -> dict:
    """One item's result; a reward that raises or runs past ``timeout_s`` scores 0."""
    completion, gold, choices = item["completion"], item["gold"], item.get("choices")
    result: dict = {}
    total, timed_out, error = 0.0, False, None
    for reward in rewards:
        try:
            # score_completion on one reward reuses its checks (finite real value, name in the message).
            value = call_with_time_limit(
                lambda r=reward: score_completion(completion, gold, choices, [r])[r.name], timeout_s
            )
        except GraderTimeout:
            value, timed_out = 0.0, True
        except Exception:
            value = 0.0
            error = error or f"reward {reward.name!r} raised:\n{traceback.format_exc()}"
        result[reward.name] = value
        total += reward.weight * value
    result.update(total=total, timed_out=timed_out, error=error, self_reflection=self_reflection(completion))
    return result


def failed_result(item: dict, reward_names: Sequence[str], timed_out: bool, error: str | None) -> dict:
    """All rewards 0, for an item whose grading was killed by the hard deadline or crashed the actor."""
    result: dict = dict.fromkeys(reward_names, 0.0)
    result.update(
        total=0.0, timed_out=timed_out, error=error, self_reflection=self_reflection(item.get("completion"))
    )
    return result


# ---------------------------------------------------------------------------------------------
# Pure helpers for the pool
# ---------------------------------------------------------------------------------------------


def hard_deadline(n_items: int, n_rewards: int, timeout_s: float, slack_s: float) -> float:
    """Seconds a call grading ``n_items`` may take before the actor counts as hung."""
    return n_items * n_rewards * timeout_s + slack_s


def count_outcomes(results: Sequence[dict]) -> tuple[int, int, str | None]:
    """(items with a timed-out grader, items with a raising grader, the first error in item order)."""
    timeouts = sum(bool(r["timed_out"]) for r in results)
    errors = [r["error"] for r in results if r["error"] is not None]
    return timeouts, len(errors), (errors[0] if errors else None)


# ---------------------------------------------------------------------------------------------
# The actor and the pool
# ---------------------------------------------------------------------------------------------


class RewardWorker:
    """Grades items with the configured rewards; plug-ins are imported here, in the actor process."""

    def __init__(self, reward_cfg: dict):
        cfg = RewardConfig.model_validate(reward_cfg)
        self.rewards = reward_fns_from_config(cfg)
        self.timeout_s = cfg.timeout_s
        self.instance = uuid.uuid4().hex  # changes on every (re)start: how the pool counts restarts

    def ping(self) -> str:
        return self.instance

    def grade(self, items: list[dict]) -> tuple[str, list[dict]]:
        """(this instance's id, one result per item)."""
        return self.instance, [grade_item(item, self.rewards, self.timeout_s) for item in items]


@dataclass
class PoolResult:
    results: list[dict]  # one per input item, in input order
    timeouts: int  # items where some grader ran out of time (soft or hard deadline)
    errors: int  # items where some grader raised (or whose grading crashed the actor)
    restarts: int  # actor restarts seen during this call
    first_error: str | None  # the first error's traceback, naming the reward


class RewardPool:
    """``reward.num_workers`` RewardWorker actors; ``grade`` spreads items over them in parallel.

    ``slack_s`` is added to every hard deadline (Ray overhead, a slow soft timeout); actor
    (re)starts are waited for separately, up to ``startup_timeout_s``.
    """

    def __init__(
        self, cfg: Config, num_cpus: float = 1, slack_s: float = 10.0, startup_timeout_s: float = 120.0
    ):
        self.timeout_s = cfg.reward.timeout_s
        self.reward_names = [*builtin_rewards(), *(p.name for p in cfg.reward.plugins)]
        self.slack_s = slack_s
        self.startup_timeout_s = startup_timeout_s
        resource = cfg.resources.reward_resource
        actor_cls = ray.remote(RewardWorker).options(
            num_cpus=num_cpus,
            resources={resource: 1} if resource else None,
            max_restarts=-1,
            max_task_retries=0,  # the pool retries itself, knowing which items hang
        )
        reward_cfg = cfg.reward.model_dump(mode="json")
        self.actors = [actor_cls.remote(reward_cfg) for _ in range(cfg.reward.num_workers)]
        self._instances: list[str | None] = [None] * len(self.actors)
        self._error_logged = False
        self._ready(range(len(self.actors)))  # fails here, with the cause, if a plug-in does not load

    def _deadline(self, n_items: int) -> float:
        return hard_deadline(n_items, len(self.reward_names), self.timeout_s, self.slack_s)

    def _ready(self, indices: Sequence[int]) -> int:
        """Wait until these actors are up; returns how many restarted since they were last seen.

        A ping that reaches an actor mid-restart fails with ActorUnavailableError: ping again.
        """
        deadline = time.monotonic() + self.startup_timeout_s
        refs = {i: self.actors[i].ping.remote() for i in indices}
        restarts = 0
        for i in indices:
            while True:
                try:
                    instance = ray.get(refs[i], timeout=max(deadline - time.monotonic(), 0.0))
                    break
                except ray.exceptions.ActorUnavailableError:
                    time.sleep(0.1)
                    refs[i] = self.actors[i].ping.remote()
                except ray.exceptions.RayError as err:
                    raise RuntimeError(
                        f"reward worker {i} is not up within {self.startup_timeout_s}s: {err}"
                    ) from err
            restarts += self._observe(i, instance)
        return restarts

    def _observe(self, i: int, instance: str) -> int:
        """1 if actor ``i`` answered from a new instance (it restarted), else 0."""
        restarted = self._instances[i] is not None and instance != self._instances[i]
        self._instances[i] = instance
        return int(restarted)

    def _collect(self, i: int, ref: ray.ObjectRef, timeout: float) -> tuple[list[dict], int]:
        """The results of a grade call on actor ``i``, and whether a restarted instance served it."""
        instance, results = ray.get(ref, timeout=max(timeout, 0.0))
        return results, self._observe(i, instance)

    def _kill(self, i: int) -> int:
        """Kill a hung actor (it restarts); returns 1, the restart this causes."""
        log.warning("reward worker %d missed its hard deadline; killing it (it restarts)", i)
        ray.kill(self.actors[i], no_restart=False)
        self._instances[i] = None  # counted here, not again when its new instance answers
        return 1

    def grade(self, items: Sequence[dict]) -> PoolResult:
        """Grade ``items`` across the actors; results in input order, never a hang."""
        items = list(items)
        chunks = [c for c in split_evenly(items, len(self.actors)) if c]
        restarts = self._ready(range(len(chunks)))
        start = time.monotonic()
        refs = [self.actors[i].grade.remote(chunk) for i, chunk in enumerate(chunks)]
        outputs: list[list[dict]] = [[] for _ in chunks]
        failed: list[tuple[int, bool]] = []  # (actor index, whether it died rather than hung)
        for i, (chunk, ref) in enumerate(zip(chunks, refs, strict=True)):
            remaining = self._deadline(len(chunk)) - (time.monotonic() - start)
            try:
                outputs[i], restarted = self._collect(i, ref, remaining)
                restarts += restarted
            except ray.exceptions.GetTimeoutError:
                restarts += self._kill(i)
                failed.append((i, False))
            except ray.exceptions.RayActorError:
                failed.append((i, True))
        if failed:  # a failed chunk only uses its own actor, so they recover in parallel
            with ThreadPoolExecutor(len(failed)) as threads:
                recovered = list(threads.map(lambda f: self._recover(f[0], chunks[f[0]], f[1]), failed))
            for (i, _), (results, n) in zip(failed, recovered, strict=True):
                outputs[i] = results
                restarts += n
        results = [result for chunk_results in outputs for result in chunk_results]
        timeouts, errors, first_error = count_outcomes(results)
        if first_error is not None and not self._error_logged:
            self._error_logged = True
            log.warning("a reward grader failed (%d items this call); first error:\n%s", errors, first_error)
        return PoolResult(results, timeouts, errors, restarts, first_error)

    def _recover(self, i: int, items: list[dict], died: bool) -> tuple[list[dict], int]:
        """Re-grade a failed chunk on actor ``i``: once whole if the actor died, then item by item."""
        restarts = self._ready([i])
        if died:
            try:
                results, restarted = self._collect(
                    i, self.actors[i].grade.remote(items), self._deadline(len(items))
                )
                return results, restarts + restarted
            except ray.exceptions.GetTimeoutError:
                restarts += self._kill(i)
            except ray.exceptions.RayActorError:
                pass
        results = []
        for item in items:
            restarts += self._ready([i])
            try:
                result, restarted = self._collect(i, self.actors[i].grade.remote([item]), self._deadline(1))
                results += result
                restarts += restarted
            except ray.exceptions.GetTimeoutError:
                restarts += self._kill(i)
                results.append(failed_result(item, self.reward_names, True, None))
            except ray.exceptions.RayActorError as err:
                message = f"grading this item crashed reward worker {i}: {err}"
                results.append(failed_result(item, self.reward_names, False, message))
        return results, restarts

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
