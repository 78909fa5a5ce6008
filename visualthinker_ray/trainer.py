"""The controller: one loop that runs GRPO over the three actor pools.

    for each step:  sample prompts -> generate G completions each -> grade -> advantages
                    -> learner update -> weight sync -> log (and checkpoint / evaluate every K)

`train_step` is the whole algorithm on one screen. The phases talk only through plain data, so a
pipelined mode (generating step t+1 while step t updates) can later reorder `generate` and
`update` without touching them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from visualthinker_ray import checkpoint
from visualthinker_ray.config import Config, dump_config
from visualthinker_ray.data.order import DataOrder
from visualthinker_ray.data.records import PromptRecord
from visualthinker_ray.grpo import group_advantages
from visualthinker_ray.metrics import rollout_metrics
from visualthinker_ray.rollout.engine import Completion, SamplingSpec

log = logging.getLogger(__name__)


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


def connect_ray(cfg: Config) -> None:
    """Join the cluster under `ray job submit` (RAY_ADDRESS) or resources.ray_address; else start one."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("joined the Ray cluster at %s", address)
    else:
        # Logical CPUs for every actor the config asks for (oversubscribed on a small machine: the
        # actors share the cores), so nothing waits forever for a CPU that does not exist.
        wanted = cfg.rollout.num_workers + cfg.learner.num_workers + cfg.reward.num_workers + 1
        ray.init(
            num_cpus=max(os.cpu_count() or 1, wanted),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
        )
        log.info("started a local Ray instance (%s CPUs)", ray.cluster_resources().get("CPU"))


def check_groups(completions: list[Completion], records: list[PromptRecord], group_size: int) -> None:
    """The G completions of each prompt must be contiguous and in prompt order (graded groups were
    misaligned in the reference code); fail loudly rather than compute wrong advantages."""
    expected = [(r.id, k) for r in records for k in range(group_size)]
    got = [(c.prompt_id, c.sample_index) for c in completions]
    if got != expected:
        raise RuntimeError(
            f"completions are not grouped per prompt: expected {expected[:4]}..., got {got[:4]}..."
        )


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False):
        from visualthinker_ray.data.sat import load_train_records
        from visualthinker_ray.learner.group import LearnerGroup
        from visualthinker_ray.reward_pool import RewardPool
        from visualthinker_ray.rollout.pool import RolloutPool
        from visualthinker_ray.tracking import Tracker

        self.cfg = cfg
        alg = cfg.algorithm
        self.log_dir = Path(cfg.logging.dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir or self.log_dir / "checkpoints")
        resume_from = checkpoint.latest(self.ckpt_dir) if resume else None
        if resume and resume_from is None:
            log.warning("--resume: no complete checkpoint under %s; starting from step 0", self.ckpt_dir)

        data = load_train_records(cfg)
        self.records = data.records
        self.order = DataOrder(len(self.records), alg.prompts_per_step, seed=cfg.data.seed)
        per_epoch = self.order.batches_per_epoch
        self.total_steps = min(alg.max_steps or per_epoch * alg.epochs, per_epoch * alg.epochs)
        optimizer_steps = self.total_steps * cfg.learner.mini_batches * cfg.learner.update_epochs
        log.info(
            "%d training prompts, %d steps per epoch, %d steps in total",
            len(self.records),
            per_epoch,
            self.total_steps,
        )

        connect_ray(cfg)
        self.step = 0
        self.learner = LearnerGroup(cfg, total_optimizer_steps=optimizer_steps)
        if resume_from is not None:
            state = checkpoint.load_trainer_state(resume_from)
            self.learner.load_checkpoint(str(resume_from))
            self.order.load_state_dict(state["data_order"])
            self.step = state["step"]
            log.info("resumed from %s at step %d", resume_from, self.step)
        self.rollout = RolloutPool.from_config(cfg)
        self.rewards = RewardPool(cfg)
        # Resumed or not, the rollout workers start from model.path: give them the learner's weights.
        if self.step > 0:
            self.rollout.sync(self.learner, version=self.step)
        self.tracker = Tracker(self.log_dir, self.total_steps, start_step=self.step)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.log_dir / "config.yaml").write_text(dump_config(cfg))

    # -- one RL step ----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg, alg = self.cfg, self.cfg.algorithm
        timer = PhaseTimer()
        epoch, indices = self.order.next_batch()
        records = [self.records[i] for i in indices]

        with timer("generate"):
            sampling = SamplingSpec(
                n=alg.group_size,
                temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p,
                max_new_tokens=cfg.rollout.max_new_tokens,
                stop=tuple(cfg.rollout.stop),
                # the step's base seed; each prompt draws from its own stream (engine.prompt_seed)
                seed=cfg.data.seed * 1_000_003 + self.step,
            )
            completions, gen_stats = self.rollout.generate(records, sampling)
            check_groups(completions, records, alg.group_size)

        with timer("grade"):
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
            scores = graded.results

        rewards = torch.tensor([s["total"] for s in scores], dtype=torch.float32)
        adv = group_advantages(rewards, alg.group_size, alg.scale_adv_by_std, alg.adv_eps)

        with timer("update"):
            items = [
                {
                    "record": by_id[c.prompt_id].to_dict(),
                    "token_ids": c.token_ids,
                    "logprobs": c.logprobs,
                    "advantage": float(a),
                    "prompt_len": len(c.prompt_token_ids),
                }
                for c, a in zip(completions, adv.advantages.tolist(), strict=True)
            ]
            learner = self.learner.train_step(items)
            tail = learner.get("logprob_mismatch_p99", 0.0)
            if tail > cfg.logging.logprob_mismatch_warn:
                log.warning(
                    "step %d: engine and learner log-probs differ by %.3g at the 99th percentile (max %.3g, "
                    "threshold logging.logprob_mismatch_warn=%.3g): stale or wrongly loaded weights in the "
                    "rollout engine, or a dtype/kernel mismatch; the update is off-policy by that much",
                    self.step + 1, tail, learner.get("logprob_mismatch_max", 0.0), cfg.logging.logprob_mismatch_warn,
                )  # fmt: skip

        with timer("sync"):
            self.rollout.sync(self.learner, version=self.step + 1)

        tokens = sum(len(c.token_ids) for c in completions)
        metrics = rollout_metrics(
            [by_id[c.prompt_id].question_type for c in completions],
            [len(c.token_ids) for c in completions],
            [c.finish_reason == "length" for c in completions],
            scores,
            [bool(s.get("self_reflection")) for s in scores],
        )
        metrics.update({f"learner/{k}": v for k, v in learner.items()})
        metrics.update({f"time/{k}_s": v for k, v in timer.seconds.items()})
        metrics.update(
            {
                "time/step_s": sum(timer.seconds.values()),
                "throughput/generate_tokens_per_s": tokens / max(timer.seconds["generate"], 1e-9),
                "throughput/update_tokens_per_s": learner.get("tokens", 0)
                / max(timer.seconds["update"], 1e-9),
                "advantage/zero_std_group_frac": adv.num_zero_std_groups / max(1, adv.num_groups),
                "reward_pool/timeouts": graded.timeouts,
                "reward_pool/errors": graded.errors,
                "data/epoch": epoch,
            }
        )
        self._step_record = {"step": self.step + 1, "epoch": epoch, "prompt_ids": [r.id for r in records]}
        self._samples = [
            {"prompt_id": c.prompt_id, "gold": by_id[c.prompt_id].gold, "text": c.text, "total": s["total"]}
            for c, s in list(zip(completions, scores, strict=True))[:: alg.group_size][:4]
        ]
        return metrics

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        metrics: dict[str, float] = {}
        evaluated_at = None
        try:
            if cfg.eval.at_start and self.step == 0:
                self.evaluate()
                evaluated_at = 0
            while self.step < self.total_steps:
                metrics = self.train_step()
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
        finally:
            self.tracker.close()
        return metrics

    def save_checkpoint(self) -> Path:
        tmp = checkpoint.begin(self.ckpt_dir, self.step)
        self.learner.save_checkpoint(str(tmp))
        final = checkpoint.commit(
            tmp,
            {
                "step": self.step,
                "data_order": self.order.state_dict(),
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
        for pool in (self.rollout, self.rewards, self.learner):
            try:
                pool.shutdown()
            except Exception as e:  # shutting down after a failure must not hide the failure
                log.warning("shutdown of %s failed: %s", type(pool).__name__, e)
