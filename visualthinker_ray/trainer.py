"""The controller: one loop that runs GRPO over the three actor pools.

    for each step:  sample prompts -> generate G completions each -> grade -> advantages
                    -> learner update -> weight sync -> log (and checkpoint / evaluate every K)

`train_step` is the whole algorithm on one screen. The phases talk through typed data
(batches.py). With algorithm.max_staleness = k > 0 the same loop keeps the generation of the next
k batches running on the rollout workers (a queue of submitted batches) while this step grades and
updates: one-step-off for k = 1. Each completion carries the policy version that sampled it; the
learner's loss corrects for the gap (learner/worker.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from visualthinker_ray import checkpoint
from visualthinker_ray.batches import RolloutBatch, TrainBatch, TrainItem
from visualthinker_ray.config import Config, dump_config
from visualthinker_ray.data.order import DataOrder
from visualthinker_ray.data.records import PromptRecord
from visualthinker_ray.grpo import group_advantages
from visualthinker_ray.metrics import probe_mismatch, rollout_metrics
from visualthinker_ray.models import check_cpu_dtype, resolve_dtype
from visualthinker_ray.ray_calls import connect_ray
from visualthinker_ray.rollout.engine import Completion, SamplingSpec

if TYPE_CHECKING:
    from visualthinker_ray.rollout.pool import Generation

log = logging.getLogger(__name__)


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


def split_by_signal(records: list[PromptRecord], completions: list[Completion], scores: list[dict], g: int):
    """The groups (record, its g completions, their scores) whose rewards differ, and those whose
    rewards are all equal (zero advantage: no signal), each in order."""
    zero_std = group_advantages(torch.tensor([s["total"] for s in scores], dtype=torch.float64), g).zero_std
    groups = [
        (rec, completions[k * g : (k + 1) * g], scores[k * g : (k + 1) * g]) for k, rec in enumerate(records)
    ]
    kept, dropped = [], []
    for group, no_signal in zip(groups, zero_std, strict=True):
        (dropped if no_signal else kept).append(group)
    return kept, dropped


def rollout_target(requested: int | None, cluster_units: float | None) -> int | None:
    """The rollout pool size for this step: one worker per rollout resource unit the cluster has
    when the job follows the cluster (never fewer than one), else what `scale` asked for, else None
    (unchanged). A target is what the pool resizes towards, not a cap on fault repair: a lost node
    takes its units away, and the replacement of its worker stays pending (RolloutPool.scale_to)."""
    if cluster_units is not None:
        return max(1, int(cluster_units))
    return requested


def on_cpus(cfg: Config) -> bool:
    """Whether every role runs on CPUs: no rollout worker or learner rank asks for a GPU."""
    return not (cfg.rollout.gpus_per_worker or cfg.learner.gpus_per_worker)


def probe_threshold(cfg: Config) -> float:
    """logging.probe_mismatch_warn, or its default for the dtype the model runs in: bf16 engines and
    learners differ by ~1e-3 nats per token on healthy weights, float32 ones by ~1e-6."""
    if cfg.logging.probe_mismatch_warn is not None:
        return cfg.logging.probe_mismatch_warn
    dtype = resolve_dtype(cfg.model.dtype, "cpu" if on_cpus(cfg) else "cuda")
    return 0.05 if dtype == torch.bfloat16 else 1e-3


def check_groups(completions: list[Completion], records: list[PromptRecord], group_size: int) -> None:
    """The G completions of each prompt must be contiguous and in prompt order (graded groups were
    misaligned in the reference code); fail loudly rather than compute wrong advantages."""
    expected = [(r.id, k) for r in records for k in range(group_size)]
    got = [(c.prompt_id, c.sample_index) for c in completions]
    if got != expected:
        raise RuntimeError(
            f"completions are not grouped per prompt: expected {expected[:4]}..., got {got[:4]}..."
        )


@dataclass
class Submitted:
    """A batch whose generation has started on the rollout pool."""

    step: int
    epoch: int
    records: list[PromptRecord]
    generation: Generation


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False):
        from visualthinker_ray.control import create_control
        from visualthinker_ray.data.sat import load_train_records
        from visualthinker_ray.learner.group import LearnerGroup
        from visualthinker_ray.reward_pool import RewardPool
        from visualthinker_ray.rollout.pool import RolloutPool
        from visualthinker_ray.tracking import Tracker, check_trackers

        self.cfg = cfg
        alg = cfg.algorithm
        self.evaluations: list[tuple[int, dict[str, float]]] = []  # (step, held-out scalars), this process
        self.log_dir = Path(cfg.logging.dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir or self.log_dir / "checkpoints")
        resume_from = checkpoint.latest(self.ckpt_dir) if resume else None
        if resume and resume_from is None:
            log.warning("--resume: no complete checkpoint under %s; starting from step 0", self.ckpt_dir)

        data = load_train_records(cfg)
        self.records = data.records
        self.order = DataOrder(len(self.records), alg.prompts_per_step, seed=cfg.data.seed)
        # dynamic sampling's extra prompts: their own order, so the main one is the same with or without
        self.fill_order = DataOrder(len(self.records), alg.prompts_per_step, seed=cfg.data.seed + 1)
        per_epoch = self.order.batches_per_epoch
        self.total_steps = min(alg.max_steps or per_epoch * alg.epochs, per_epoch * alg.epochs)
        optimizer_steps = self.total_steps * cfg.learner.mini_batches * cfg.learner.update_epochs
        log.info(
            "%d training prompts, %d steps per epoch, %d steps in total",
            len(self.records),
            per_epoch,
            self.total_steps,
        )

        check_trackers(cfg.logging.trackers)  # before any actor starts
        if on_cpus(cfg) and check_cpu_dtype(cfg.model.dtype, cfg.resources.device) == "emulated":
            log.warning("model.dtype=bfloat16 on a CPU without native bf16 (AVX512-BF16): it runs, slower")
        connect_ray(cfg)
        self.control = create_control(cfg.resources.job_name)  # `scale --job` finds the run through it
        self.grader_restarts = 0
        self.step = 0
        self.learner = LearnerGroup(cfg, total_optimizer_steps=optimizer_steps)
        if resume_from is not None:
            state = checkpoint.load_trainer_state(resume_from)
            self.learner.load_checkpoint(str(resume_from))
            self.order.load_state_dict(state["data_order"])
            if "fill_order" in state:
                self.fill_order.load_state_dict(state["fill_order"])
            self.step = state["step"]
            log.info("resumed from %s at step %d", resume_from, self.step)
        # The generation pipeline: batches submitted and not yet trained on, oldest first.
        self._pending: deque[Submitted] = deque()
        self._probe: list[TrainItem] | None = None  # the sync alarm's fixed sequences (probe_sync)
        self._rollout_request: int | None = None  # the last `scale --rollout N`: it stands until the next
        self._next_submit = self.step
        self._order_after: dict[int, dict] = {}
        self.rollout = RolloutPool.from_config(cfg)
        self.rewards = RewardPool(cfg)
        # Resumed or not, the rollout workers start from model.path: give them the learner's weights.
        if self.step > 0:
            self.rollout.sync(self.learner, version=self.step)
        lg = cfg.logging  # the Tracker makes log_dir
        self.tracker = Tracker(
            self.log_dir, self.total_steps, start_step=self.step, trackers=lg.trackers, project=lg.project,
            run_name=lg.run_name, config=cfg.model_dump(mode="json"), mlflow_tracking_uri=lg.mlflow_tracking_uri,
        )  # fmt: skip
        (self.log_dir / "config.yaml").write_text(dump_config(cfg))

    # -- one RL step ----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """Generate (or take the batch generated ahead), grade, advantages, update, sync.

        With algorithm.max_staleness k > 0 the generation of steps up to k ahead runs on the rollout
        workers while this step grades and updates; the phases are the same, only the wait for a
        batch gets shorter. k = 0 is the strictly synchronous loop.
        """
        cfg, alg = self.cfg, self.cfg.algorithm
        timer = PhaseTimer()
        t0 = time.perf_counter()
        self._resize_rollout()  # workers asked for join at this step's sync
        self._submit_ahead()  # generation of this step's batch and up to k after it
        with timer("generate"):  # the wait for this step's batch (all of generation when k = 0)
            batch = self._collect(self._pending.popleft())
        with timer("grade"):
            scores, graded = self._grade(batch.records, batch.completions)
        dynamic = {}
        if alg.dynamic_sampling:
            with timer("refill"):
                batch, scores, dynamic = self._refill(batch, scores)

        rewards = torch.tensor([s["total"] for s in scores], dtype=torch.float32)
        adv = group_advantages(rewards, alg.group_size, alg.scale_adv_by_std, alg.adv_eps)
        train = self._train_batch(batch, adv.advantages.tolist())

        with timer("update"):
            learner = self.learner.train_step(train)
            tail = learner.get("logprob_mismatch_p99", 0.0)
            if tail > cfg.logging.logprob_mismatch_warn:
                log.warning(
                    "step %d: engine and learner log-probs differ by %.3g at the 99th percentile (max %.3g, "
                    "threshold logging.logprob_mismatch_warn=%.3g): stale or wrongly loaded weights in the "
                    "rollout engine, or a dtype/kernel mismatch; the update is off-policy by that much",
                    self.step + 1, tail, learner.get("logprob_mismatch_max", 0.0), cfg.logging.logprob_mismatch_warn,
                )  # fmt: skip

        with timer("sync"):
            # vLLM loads the new weights while it generates the next batches (their tokens after
            # this point come from them); the HF engine finishes its generation on the old ones first.
            if not self.rollout.updates_during_generation:
                self.rollout.wait_done([p.generation for p in self._pending])
            self.rollout.sync(self.learner, version=self.step + 1)
        probe = {}
        if self.step == 0 or (self.step + 1) % cfg.logging.probe_every == 0:
            with timer("probe"):  # the sync alarm, in every mode: both sides now hold version step + 1
                probe = self.probe_sync(batch)

        completions = batch.completions
        tokens = sum(len(c.token_ids) for c in completions)
        by_id = {r.id: r for r in batch.records}
        metrics = rollout_metrics(
            [by_id[c.prompt_id].question_type for c in completions],
            [len(c.token_ids) for c in completions],
            [c.finish_reason == "length" for c in completions],
            scores,
            [bool(s.get("self_reflection")) for s in scores],
        )
        metrics.update({f"learner/{k}": v for k, v in learner.items()})
        metrics.update({f"time/{k}_s": v for k, v in timer.seconds.items()})
        metrics.update({f"dynamic_sampling/{k}": v for k, v in dynamic.items()})
        metrics.update(probe)
        staleness = train.staleness
        metrics.update(
            {
                "time/step_s": time.perf_counter() - t0,
                "time/generate_busy_s": batch.generate_s,
                "throughput/generate_tokens_per_s": tokens / max(batch.generate_s, 1e-9),
                "throughput/update_tokens_per_s": learner.get("tokens", 0)
                / max(timer.seconds["update"], 1e-9),
                "advantage/zero_std_group_frac": adv.num_zero_std_groups / max(1, adv.num_groups),
                "offpolicy/staleness_mean": sum(staleness) / len(staleness),
                "offpolicy/staleness_max": max(staleness),
                # completions whose tokens came from two or more policy versions (vLLM, k > 0)
                "offpolicy/mixed_version_frac": sum(
                    len(c.meta.get("weight_versions", ())) > 1 for c in completions
                )
                / len(completions),
                "reward_pool/timeouts": graded.timeouts,
                "reward_pool/errors": graded.errors,
                "rollout/pool_size": len(self.rollout.members),
                "rollout/joining": self.rollout.joining,
                "faults/rollout_replaced": self.rollout.replaced,  # since this process started
                "faults/grader_restarts": self.grader_restarts,
                "data/epoch": batch.epoch,
            }
        )
        self._step_record = {
            "step": self.step + 1,
            "epoch": batch.epoch,
            "prompt_ids": [r.id for r in batch.records],
        }
        self._samples = [
            {"prompt_id": c.prompt_id, "gold": by_id[c.prompt_id].gold, "text": c.text, "total": s["total"]}
            for c, s in list(zip(completions, scores, strict=True))[:: alg.group_size][:4]
        ]
        return metrics

    def probe_sync(self, batch: RolloutBatch) -> dict[str, float]:
        """Score the fixed probe sequences on every rollout engine and on the learner, which hold the
        same version right after a sync: their gap is the engine's numerics, unless the sync went
        wrong. The probe is the first batch's completions (one per prompt), kept for the whole run."""
        cfg = self.cfg
        if self._probe is None:
            firsts = batch.completions[:: cfg.algorithm.group_size][: cfg.logging.probe_size]
            by_id = {r.id: r for r in batch.records}
            self._probe = [
                TrainItem(by_id[c.prompt_id], c.token_ids, 0.0, len(c.prompt_token_ids)) for c in firsts
            ]
        records, tokens = [it.record for it in self._probe], [it.token_ids for it in self._probe]
        engines = self.rollout.score(records, tokens, cfg.resources.collective_timeout_s)
        out = probe_mismatch(engines, self.learner.compute_logprobs(self._probe, raw=True))
        behind = [label for label, r in engines.items() if r["version"] != self.step + 1]
        worst, warn = out.get("sync/probe_mismatch_worst_engine_mean", 0.0), probe_threshold(cfg)
        if worst > warn or behind:
            log.warning(
                "step %d: after the weight sync a rollout engine scores the probe %.3g nats per token away "
                "from the learner (max %.3g; threshold logging.probe_mismatch_warn=%.3g)%s: its weights are "
                "not the learner's (a failed, partial or skipped sync), or its numerics differ that much",
                self.step + 1, worst, out.get("sync/probe_mismatch_max", 0.0), warn,
                f"; not at version {self.step + 1}: {', '.join(behind)}" if behind else "",
            )  # fmt: skip
        return out

    # -- the phases -----------------------------------------------------------------------------------
    def _sampling(self, step: int, round_: int = 0) -> SamplingSpec:
        cfg = self.cfg
        return SamplingSpec(
            n=cfg.algorithm.group_size,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.rollout.max_new_tokens,
            stop=tuple(cfg.rollout.stop),
            # the step's base seed; each prompt draws from its own stream (engine.prompt_seed);
            # dynamic sampling's extra rounds get their own
            seed=cfg.data.seed * 1_000_003 + step + round_ * 1_000_000_007,
        )

    def _submit_ahead(self) -> None:
        """Start generating every batch up to step + max_staleness not yet started, on the weights the
        engines hold now (version self.step): a batch is never more than max_staleness versions old
        when trained, and generation never waits for the learner within that bound."""
        last = min(self.step + self.cfg.algorithm.max_staleness, self.total_steps - 1)
        while self._next_submit <= last:
            step = self._next_submit
            epoch, indices = self.order.next_batch()
            self._order_after[step] = self.order.state_dict()  # what a checkpoint after `step` resumes from
            records = [self.records[i] for i in indices]
            self._pending.append(
                Submitted(step, epoch, records, self.rollout.submit(records, self._sampling(step)))
            )
            self._next_submit += 1

    def _collect(self, sub: Submitted) -> RolloutBatch:
        if sub.step != self.step:
            raise RuntimeError(f"pipeline out of order: step {self.step} got the batch of step {sub.step}")
        completions, stats = self.rollout.collect(sub.generation)
        check_groups(completions, sub.records, self.cfg.algorithm.group_size)
        busy = max((s.get("seconds", 0.0) for s in stats), default=0.0)
        return RolloutBatch(sub.step, sub.epoch, sub.records, completions, busy, stats)

    def _grade(self, records: list[PromptRecord], completions: list[Completion]):
        by_id = {r.id: r for r in records}
        graded = self.rewards.grade(
            [
                {
                    "completion": c.text,
                    "gold": by_id[c.prompt_id].gold,
                    "choices": list(by_id[c.prompt_id].choices),
                }
                for c in completions
            ]
        )
        self.grader_restarts += graded.restarts
        return graded.results, graded

    def _resize_rollout(self) -> None:
        """Resize the rollout pool to what `scale --rollout N` asked for last, or (rollout.scale_with_cluster)
        to the rollout resource units the cluster has now; report the pool to the control actor."""
        import ray

        requested = None
        try:
            requested = ray.get(self.control.take_rollout_request.remote(), timeout=30)
        except ray.exceptions.RayError as e:  # steering is optional: training goes on without it
            log.warning("could not read scale requests from the control actor: %s", e)
        units = None
        if self.cfg.rollout.scale_with_cluster:
            units = ray.cluster_resources().get(self.cfg.resources.rollout_resource, 0)
        # A request stands until the next one: a shrink that keeps a pending replacement (scale_to
        # never cancels one) retires down to the request once the replacement serves.
        if requested is not None:
            self._rollout_request = requested
        want = rollout_target(self._rollout_request, units)
        pool = self.rollout
        # scale_to never cancels a pending replacement, so the pool may stay above `want` (a no-op)
        if want and want != len(pool.members) + pool.joining and pool.scale_to(want):
            log.info(
                "step %d: rollout pool resized towards %d workers: %d serving, pending: %s",
                self.step + 1, want, len(pool.members), "; ".join(pool.pending) or "none",
            )  # fmt: skip
        self.control.report.remote(
            {
                "step": self.step,
                "rollout_serving": len(pool.members),
                "rollout_joining": pool.joining,
                "rollout_pending": pool.pending,
                "rollout_replaced": pool.replaced,
                "scale_with_cluster": self.cfg.rollout.scale_with_cluster,
            }
        )

    def _refill(self, batch: RolloutBatch, scores: list[dict]) -> tuple[RolloutBatch, list[dict], dict]:
        """Dynamic sampling: a group whose rewards are all equal has zero advantage (no signal).
        Replace such groups by groups of further prompts, drawn from their own seeded order (so the
        main data order stays exact and resumable), in at most dynamic_sampling_max_rounds extra
        rounds; if still short, dropped groups fill the batch (they then add only the KL term)."""
        alg = self.cfg.algorithm
        g, want = alg.group_size, len(batch.records)
        kept, dropped = split_by_signal(batch.records, batch.completions, scores, g)
        first_dropped, rounds, busy = len(dropped), 0, batch.generate_s
        while len(kept) < want and rounds < alg.dynamic_sampling_max_rounds:
            rounds += 1
            _, indices = self.fill_order.next_batch()
            records = [self.records[i] for i in indices]
            completions, stats = self.rollout.generate(records, self._sampling(batch.step, rounds))
            check_groups(completions, records, g)
            busy += max((s.get("seconds", 0.0) for s in stats), default=0.0)
            more_kept, more_dropped = split_by_signal(
                records, completions, self._grade(records, completions)[0], g
            )
            kept, dropped = kept + more_kept, dropped + more_dropped
        short = max(0, want - len(kept))
        chosen = kept[:want] + dropped[:short]
        refilled = RolloutBatch(
            batch.step,
            batch.epoch,
            [rec for rec, _, _ in chosen],
            [c for _, cs, _ in chosen for c in cs],
            busy,
            batch.stats,
        )
        stats = {"dropped_groups": first_dropped, "rounds": rounds, "short_groups": short}
        return refilled, [s for _, _, ss in chosen for s in ss], stats

    def _train_batch(self, batch: RolloutBatch, advantages: list[float]) -> TrainBatch:
        by_id = {r.id: r for r in batch.records}
        return TrainBatch(
            [
                TrainItem(
                    record=by_id[c.prompt_id],
                    token_ids=c.token_ids,
                    advantage=float(a),
                    prompt_len=len(c.prompt_token_ids),
                    behaviour_logprobs=c.logprobs,
                    staleness=self.step - c.policy_version,
                )
                for c, a in zip(batch.completions, advantages, strict=True)
            ],
        )

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        metrics: dict[str, float] = {}
        evaluated_at = None
        failed = True
        try:
            if cfg.eval.at_start and self.step == 0:
                self.evaluate()
                evaluated_at = 0
            log.info("training steps %d-%d", self.step + 1, self.total_steps)
            while self.step < self.total_steps:
                metrics = self.train_step()
                self._order_after.pop(self.step - 1, None)  # only the latest is checkpointed
                self.step += 1
                self.tracker.log_scalars(self.step, metrics)
                with open(self.log_dir / "steps.jsonl", "a") as f:  # the data order, for audits and resume
                    f.write(json.dumps({**self._step_record, "reward": metrics.get("reward/total")}) + "\n")
                if self.step % cfg.logging.sample_every == 0 or self.step == 1:
                    self.tracker.log_samples(self.step, self._samples)
                self.tracker.step_done(metrics)
                if self.step % cfg.checkpoint.every == 0 or self.step == self.total_steps:
                    self.save_checkpoint()
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self.evaluate()
                    evaluated_at = self.step
            if cfg.eval.at_end and evaluated_at != self.step:
                self.evaluate()
            self.export()
            failed = False
        finally:
            self.tracker.close(failed)
        return metrics

    def save_checkpoint(self) -> Path:
        tmp = checkpoint.begin(self.ckpt_dir, self.step)
        self.learner.save_checkpoint(str(tmp))
        final = checkpoint.commit(
            tmp,
            {
                "step": self.step,
                # the order as it was after drawing the last trained batch: batches generated ahead
                # (max_staleness > 0) are drawn again and regenerated on resume
                "data_order": self._order_after.get(self.step - 1) or self.order.state_dict(),
                "fill_order": self.fill_order.state_dict(),
                "policy_version": self.step,
                "config": self.cfg.model_dump(mode="json"),
            },
        )
        checkpoint.prune(self.ckpt_dir, self.cfg.checkpoint.keep_last)
        log.info("checkpoint %s", final)
        return final

    def evaluate(self) -> dict[str, float]:
        from visualthinker_ray.evaluate import evaluate_records, load_eval_records

        records = load_eval_records(self.cfg)
        result = evaluate_records(self.rollout, records, self.cfg)
        scalars = result["scalars"]
        self.evaluations.append((self.step, scalars))
        self.tracker.log_scalars(self.step, {f"eval/{k}": v for k, v in scalars.items()})
        log.info(
            "held-out evaluation at step %d: accuracy %.3f on %d rows",
            self.step, scalars.get("accuracy/overall", float("nan")), len(records),
        )  # fmt: skip
        return scalars

    def export(self) -> str:
        out = str(self.log_dir / "final_hf")
        self.learner.export_hf(out)
        log.info("final model exported in HF format to %s", out)
        return out

    def shutdown(self) -> None:
        import ray

        ray.kill(self.control)
        for pool in (self.rollout, self.rewards, self.learner):
            try:
                pool.shutdown()
            except Exception as e:  # shutting down after a failure must not hide the failure
                log.warning("shutdown of %s failed: %s", type(pool).__name__, e)
