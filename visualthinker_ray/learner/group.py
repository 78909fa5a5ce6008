"""LearnerGroup: places the learner ranks, splits each batch across them, reduces their metrics.

A batch item is a batches.TrainItem. The same PromptRecord object appears in the G items of its
prompt: pickling stores it (and its image bytes) once per call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from visualthinker_ray.batches import TrainBatch, TrainItem
from visualthinker_ray.config import Config
from visualthinker_ray.grpo import balance_by_tokens, split_micro_batches
from visualthinker_ray.ray_calls import wait_all

log = logging.getLogger(__name__)

PAD = -1  # a padding micro-batch: run with zero weight so every rank makes the same FSDP calls


@dataclass
class RankPlan:
    items: list[int]  # global item indices this rank holds, ascending
    mini_batches: list[list[list[int]]]  # per optimizer step: micro-batches of LOCAL indices (or [PAD])


def plan_batch(
    prompt_lens: list[int],
    completion_lens: list[int],
    num_ranks: int,
    num_mini_batches: int,
    token_budget: int,
    agg: str,
) -> tuple[list[RankPlan], list[float]]:
    """Split a batch into optimizer steps, ranks and micro-batches; pure, so it is tested without Ray.

    Each mini-batch (a contiguous slice: one optimizer step) is balanced over the ranks by tokens,
    each rank's share is cut into micro-batches within the token budget, and ranks with fewer
    micro-batches get padding ones. Also returns each mini-batch's loss denominator over all ranks
    (non-empty sequences, or completion tokens for agg='token_mean').
    """
    n = len(completion_lens)
    if len(prompt_lens) != n:
        raise ValueError(f"{len(prompt_lens)} prompt lengths but {n} completion lengths")
    if n < num_mini_batches * num_ranks:
        raise ValueError(
            f"{n} sequences cannot fill {num_mini_batches} mini-batch(es) x {num_ranks} learner rank(s); "
            "lower learner.mini_batches or learner.num_workers, or raise algorithm.prompts_per_step"
        )
    totals = [p + c for p, c in zip(prompt_lens, completion_lens, strict=True)]
    bounds = [round(m * n / num_mini_batches) for m in range(num_mini_batches + 1)]
    per_rank_global: list[list[list[int]]] = [[] for _ in range(num_ranks)]  # [rank][mini] -> global ids
    denominators = []
    for m in range(num_mini_batches):
        ids = list(range(bounds[m], bounds[m + 1]))
        for r, share in enumerate(balance_by_tokens([totals[i] for i in ids], num_ranks)):
            per_rank_global[r].append([ids[j] for j in share])
        if agg == "token_mean":
            denominators.append(float(sum(completion_lens[i] for i in ids)))
        else:
            denominators.append(float(sum(1 for i in ids if completion_lens[i] > 0)))
    plans = []
    for r in range(num_ranks):
        items = sorted(i for mini in per_rank_global[r] for i in mini)
        local = {g: k for k, g in enumerate(items)}
        minis = []
        for mini in per_rank_global[r]:
            micro = split_micro_batches([totals[i] for i in mini], token_budget) if mini else []
            minis.append([[local[mini[j]] for j in mb] for mb in micro])
        plans.append(RankPlan(items, minis))
    for m in range(num_mini_batches):
        most = max(len(p.mini_batches[m]) for p in plans)
        for p in plans:
            p.mini_batches[m] += [[PAD]] * (most - len(p.mini_batches[m]))
    return plans, [max(d, 1.0) for d in denominators]


def reduce_metrics(per_rank: list[dict]) -> dict:
    """Loss metrics weighted by each rank's sequences; counts summed; times and memory as the max."""
    out: dict[str, float] = {}
    weight = sum(m.get("sequences", 0.0) for m in per_rank)
    for key in per_rank[0]:
        values = [m[key] for m in per_rank if key in m]
        if key in ("sequences", "tokens"):
            out[key] = sum(values)
        elif key in (
            "step_s",
            "peak_mem_gb",
            "grad_norm",
            "lr",
            "logprob_mismatch_max",
            "logprob_mismatch_p99",
        ):
            # grad norm and lr are the same on every rank; the mismatch tail is the worst rank's
            out[key] = max(values)
        elif weight:
            out[key] = sum(m[key] * m.get("sequences", 0.0) for m in per_rank if key in m) / weight
    return out


class LearnerGroup:
    def __init__(self, cfg: Config, total_optimizer_steps: int, setup_timeout_s: float = 600.0):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from visualthinker_ray.learner.worker import LearnerWorker

        self.cfg = cfg
        self.timeout_s = cfg.resources.collective_timeout_s
        n, gpus = cfg.learner.num_workers, cfg.learner.gpus_per_worker
        bundle: dict[str, float] = {"CPU": 1}
        if gpus:
            bundle["GPU"] = gpus
        if cfg.resources.learner_resource:
            bundle[cfg.resources.learner_resource] = 1
        self.pg = placement_group([dict(bundle) for _ in range(n)], strategy="PACK")
        wait_all(
            {"placement group": self.pg.ready()},
            setup_timeout_s,
            f"placing {n} learner rank(s) with {bundle} each",
            LearnerError,
        )
        actor = ray.remote(LearnerWorker)
        self.workers = [
            actor.options(
                num_cpus=1,
                num_gpus=gpus,
                resources={cfg.resources.learner_resource: 1} if cfg.resources.learner_resource else None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(cfg.model_dump(mode="json"), i, n, total_optimizer_steps)
            for i in range(n)
        ]
        t0 = time.time()
        addr, port = _wait(self.workers[0].node_address.remote(), setup_timeout_s, "learner rank 0 start")
        self.rank_info = infos = _wait_all(
            [w.setup.remote(addr, port) for w in self.workers],
            setup_timeout_s,
            "learner set-up (model + FSDP)",
        )
        log.info(
            "learner group: %d rank(s), %s trainable parameters, reference=%s, %d torch thread(s) "
            "per rank, ready in %.1f s",
            n,
            f"{infos[0]['trainable_params']:,}",
            infos[0]["reference"],
            infos[0]["torch_threads"],
            time.time() - t0,
        )

    def _plan(self, items: list[TrainItem], num_mini_batches: int):
        return plan_batch(
            [it.prompt_len for it in items],
            [len(it.token_ids) for it in items],
            len(self.workers),
            num_mini_batches,
            self.cfg.learner.micro_batch_tokens,
            self.cfg.algorithm.loss_agg,
        )

    def train_step(self, batch: TrainBatch | list[TrainItem]) -> dict:
        items = batch.items if isinstance(batch, TrainBatch) else batch
        plans, denominators = self._plan(items, self.cfg.learner.mini_batches)
        refs = [
            w.train_step.remote([items[i] for i in p.items], p.mini_batches, denominators)
            for w, p in zip(self.workers, plans, strict=True)
        ]
        return reduce_metrics(_wait_all(refs, self.timeout_s, "learner train step"))

    def compute_logprobs(
        self, items: list[TrainItem], use_reference: bool = False, raw: bool = False
    ) -> list[list[float]]:
        """Per-item completion log-probs, in the items' order (raw: temperature 1, no bans)."""
        plans, _ = self._plan(items, 1)
        refs = [
            w.compute_logprobs.remote([items[i] for i in p.items], p.mini_batches[0], use_reference, raw)
            for w, p in zip(self.workers, plans, strict=True)
        ]
        out: list = [None] * len(items)
        for p, res in zip(plans, _wait_all(refs, self.timeout_s, "learner log-probs"), strict=True):
            for local, global_idx in enumerate(p.items):
                out[global_idx] = res[local]
        return out

    def full_state_dict(self, reference: bool = False) -> dict:
        """Rank 0's gathered full parameters (every rank takes part in the gathers)."""
        results = _wait_all(
            [w.full_state_dict.remote(reference) for w in self.workers], self.timeout_s, "gathering weights"
        )
        return results[0]

    def training_state(self) -> dict:
        """Rank 0's gathered optimizer state, scheduler state and lr (tests of resume)."""
        results = _wait_all(
            [w.training_state.remote() for w in self.workers], self.timeout_s, "gathering state"
        )
        return results[0]

    # -- the weight-sync sender (weight_sync/coordinator.py's Sender protocol) ------------------------------------
    def node_ip(self) -> str:
        return _wait(self.workers[0].node_ip.remote(), self.timeout_s, "learner rank 0 address")

    def weight_metas(self, served_dtype: str | None = None, trainable_only: bool = False) -> list:
        return _wait(
            self.workers[0].weight_metas.remote(served_dtype, trainable_only),
            self.timeout_s,
            "learner weight metadata",
        )

    def init_sync_group(self, addr: str, port: int, handshake: str, timeout_s: float) -> dict:
        return {
            "learner rank 0 (sender)": self.workers[0].init_sync_group.remote(
                addr, port, handshake, timeout_s
            )
        }

    def send_weights(self, metas, plan) -> dict:
        return {f"learner rank {i}": w.send_weights.remote(metas, plan) for i, w in enumerate(self.workers)}

    def save_checkpoint(self, path: str) -> None:
        _wait_all(
            [w.save_checkpoint.remote(path) for w in self.workers], self.timeout_s, "saving a checkpoint"
        )

    def load_checkpoint(self, path: str) -> int:
        """Restores every rank's shard; returns the optimizer step count."""
        return _wait_all(
            [w.load_checkpoint.remote(path) for w in self.workers], self.timeout_s, "loading a checkpoint"
        )[0]

    def export_hf(self, out_dir: str) -> str:
        return _wait_all(
            [w.export_hf.remote(out_dir) for w in self.workers], self.timeout_s, "exporting the model"
        )[0]

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)


class LearnerError(RuntimeError):
    """A learner rank failed, died or did not answer in time; the message names it."""


def _ranks(refs: list) -> dict:
    return {f"learner rank {i}": ref for i, ref in enumerate(refs)}


def _wait(ref, timeout_s: float, what: str):
    return _wait_all([ref], timeout_s, what)[0]


def _wait_all(refs: list, timeout_s: float, what: str) -> list:
    """Per-rank results in rank order; a dead or hung rank is named in the error, never a hang."""
    return list(wait_all(_ranks(refs), timeout_s, what, LearnerError).values())
