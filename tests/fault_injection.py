"""Faults injected from inside the driver's loop at fixed steps, each one something a cluster does to
a run (the fault tests and bench/bench_faults.py use it; no mock: real kills and signals).

A schedule maps a step (1-based) to fault names, injected in that step's phase:
  scale:N          `python -m visualthinker_ray scale --rollout N` against the job, as a user would
  kill_generating  kill a rollout worker holding part of the batch just submitted (ray.kill)
  sigkill_generating  the same by a SIGKILL of its own process (os.kill: no Ray involved, as the
                   kernel's OOM killer does it); its vLLM engine core is left to die on its own
  stop_generating  SIGSTOP one (it then answers nothing, not even health checks)
  kill_engine      SIGKILL the vLLM engine-core process under one (its actor lives on)
  kill_grader      SIGKILL a reward worker before it grades
  kill_at_sync     SIGKILL a rollout worker as the step's weight sync starts
"""

from __future__ import annotations

import os
import signal

import psutil
import ray

from visualthinker_ray.trainer import Trainer

KINDS = (
    "scale", "kill_generating", "sigkill_generating", "stop_generating", "kill_engine", "kill_grader",
    "kill_at_sync",
)  # fmt: skip


class FaultyTrainer(Trainer):
    def __init__(self, cfg, schedule: dict[int, list[str]], resume: bool = False):
        unknown = {f for faults in schedule.values() for f in faults if f.split(":")[0] not in KINDS}
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {KINDS}")
        super().__init__(cfg, resume=resume)
        self.schedule = schedule
        self.injected: list[tuple[int, str]] = []  # (step, fault), in the order injected
        # (fault, pids) of each process kill: the worker's process tree as `alive` reported it just
        # before (the actor first), or the engine core's pid, for tests that check nothing is left
        self.killed: list[tuple[str, list[int]]] = []
        pool_sync = self.rollout.sync

        def sync_after_a_kill(sender, version):  # the sync at the end of step s is version s
            if "kill_at_sync" in self.schedule.get(version, ()):
                self._inject("kill_at_sync", lambda: ray.kill(self.rollout.members[0].handle))
            return pool_sync(sender, version)

        self.rollout.sync = sync_after_a_kill

    def _due(self) -> list[str]:
        return self.schedule.get(self.step + 1, [])

    def _inject(self, fault: str, action) -> None:
        action()
        self.injected.append((self.step + 1, fault))

    def _resize_rollout(self):
        from visualthinker_ray.cli import main

        for fault in self._due():
            if fault.startswith("scale:"):
                command = ["scale", "--rollout", fault.split(":")[1], "--job", self.cfg.resources.job_name]
                self._inject(fault, lambda c=command: main(c))
        super()._resize_rollout()
        self.rollout.settle()  # a new worker joins at this step's sync, not whenever it is up

    def _submit_ahead(self):
        super()._submit_ahead()
        # a worker with a part of the batch just submitted: it is generating, or about to
        busy = self._pending[-1].generation.parts[0].member.handle
        for fault in self._due():
            if fault == "kill_generating":
                self._inject(fault, lambda: ray.kill(busy))
            elif fault == "sigkill_generating":
                pids = ray.get(busy.alive.remote(), timeout=60)
                self.killed.append((fault, pids))
                self._inject(fault, lambda p=pids[0]: os.kill(p, signal.SIGKILL))
            elif fault == "stop_generating":
                pid = ray.get(busy.alive.remote(), timeout=60)[0]
                self._inject(fault, lambda p=pid: os.kill(p, signal.SIGSTOP))
            elif fault == "kill_engine":
                pid = ray.get(busy.alive.remote(), timeout=60)[0]
                cores = [p for p in psutil.Process(pid).children(recursive=True) if "EngineCore" in p.name()]
                if not cores:
                    raise RuntimeError("kill_engine needs a vLLM rollout worker (rollout.engine=vllm)")
                self.killed.append((fault, [cores[0].pid]))
                self._inject(fault, cores[0].kill)

    def _grade(self, records, completions):
        if "kill_grader" in self._due():
            self._inject("kill_grader", lambda: ray.kill(self.rewards.actors[0], no_restart=False))
        return super()._grade(records, completions)
