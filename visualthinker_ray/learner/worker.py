"""LearnerWorker: one Ray actor per GPU (per CPU process in tests) holding an FSDP2 shard of the policy.

Thin on purpose: the loss, log-probs and batching are the pure functions of grpo.py and
sequences.py; this class holds the model, the frozen reference, the optimizer and the process
group. The group (group.py) decides which sequences each rank gets and in how many micro-batches,
so every rank runs the same number of forward/backward passes (FSDP's collectives need that).
"""

from __future__ import annotations

import datetime
import os
import resource
import time

import torch
import torch.distributed as dist

from visualthinker_ray.batches import TrainItem
from visualthinker_ray.config import Config
from visualthinker_ray.errors import InputError
from visualthinker_ray.grpo import masked_mean, mismatch_stats, policy_loss
from visualthinker_ray.learner.schedule import lr_factor
from visualthinker_ray.models import (
    banned_token_ids,
    check_cpu_dtype,
    load_model,
    load_processor,
    resolve_dtype,
)
from visualthinker_ray.sequences import build_batch, completion_logprobs, encode_prompt


def shard_model(model, mp_policy=None) -> None:
    """FSDP2: each decoder layer and vision block is its own unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for block in model.model.visual.blocks:
        fully_shard(block, **kwargs)
    for layer in model.model.language_model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (a collective: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class LearnerWorker:
    def __init__(self, cfg: dict, rank: int, world_size: int, total_optimizer_steps: int):
        self.cfg = Config.model_validate(cfg)
        self.rank, self.world_size = rank, world_size
        self.total_optimizer_steps = max(1, total_optimizer_steps)
        if self.cfg.resources.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"learner rank {rank}: resources.device=cuda but this process sees no GPU "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); give the learner "
                "GPUs (learner.gpus_per_worker: 1) or set resources.device=cpu"
            )
        self.on_gpu = torch.cuda.is_available() and self.cfg.resources.device != "cpu"
        self.device = torch.device("cuda", 0) if self.on_gpu else torch.device("cpu")
        self.optimizer_steps = 0

    # -- set-up -----------------------------------------------------------------------------------
    def node_ip(self) -> str:
        return _node_ip()

    def node_address(self) -> tuple[str, int]:
        """Where rank 0 listens for the learner process group.

        Rank 0 opens the rendezvous store here, on a port the OS picks, and keeps it open until
        `setup`: picking a "free" port and binding it later could lose it to another process.
        """
        ip = self.node_ip()
        self._store = dist.TCPStore(
            ip, 0, self.world_size, is_master=True, timeout=self._timeout(), wait_for_workers=False
        )
        return ip, self._store.port

    def _timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.cfg.resources.collective_timeout_s)

    def setup(self, master_addr: str, master_port: int) -> dict:
        cfg = self.cfg
        timeout = self._timeout()
        if self.rank == 0:
            store = self._store
        else:
            store = dist.TCPStore(master_addr, master_port, self.world_size, is_master=False, timeout=timeout)
        dist.init_process_group(
            backend="nccl" if self.on_gpu else "gloo",
            store=store,
            rank=self.rank,
            world_size=self.world_size,
            timeout=timeout,
        )
        if not self.on_gpu:
            threads, cores = cpu_plan(
                cfg.learner.cpu_threads,
                cfg.learner.cpu_affinity,
                cfg.algorithm.max_staleness,
                self.world_size,
                os.cpu_count() or 1,
            )
            if cores:
                pin_process(cores)
            torch.set_num_threads(threads)
        check_cpu_dtype(cfg.model.dtype, self.device.type)
        self.processor = load_processor(cfg.model.path, cfg.model.min_pixels, cfg.model.max_pixels)
        self.banned = banned_token_ids(self.processor.tokenizer)
        self.model = self._build_model(trainable=True)
        self.ref_model = self._build_model(trainable=False) if cfg.algorithm.beta > 0 else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        lc = cfg.learner
        self.optimizer = torch.optim.AdamW(
            params, lr=lc.lr, betas=lc.adam_betas, weight_decay=lc.weight_decay, eps=1e-8
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, self.total_optimizer_steps, lc.warmup_steps, lc.lr_schedule),
        )
        return {
            "rank": self.rank,
            "trainable_params": sum(p.numel() for p in params),
            "reference": self.ref_model is not None,
            "gradient_checkpointing": bool(getattr(self.model, "is_gradient_checkpointing", False)),
            "torch_threads": torch.get_num_threads(),
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "reference_dtype": _param_dtype(self.ref_model),
        }

    def _build_model(self, trainable: bool):
        cfg = self.cfg
        # fp32 master weights (and so fp32 optimizer state); bf16 compute through FSDP2's
        # mixed-precision policy, on the CPU exactly as on the GPU (model.dtype=bfloat16). The frozen
        # reference has no master to keep: stored in the compute dtype it computes exactly what an
        # fp32 copy cast by the policy would (the same rounding), in half the memory (4.4 GB at 2B).
        self.compute_dtype = resolve_dtype(cfg.model.dtype, self.device.type)
        model = load_model(
            cfg.model.path, torch.float32 if trainable else self.compute_dtype, str(self.device)
        )
        mp_policy = None
        if self.compute_dtype == torch.bfloat16:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if trainable:
            model.train()
            if cfg.model.freeze_vision:
                # The reference's freeze_vision assigned `requires_grad_ = False` (a no-op); call it.
                model.model.visual.requires_grad_(False)
            if cfg.model.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.eval().requires_grad_(False)
        shard_model(model, mp_policy)
        return model

    # -- one rank's share of a batch ---------------------------------------------------------------
    def _encode(self, items: list[TrainItem]) -> list:
        """Prompts re-processed from the image bytes, once per distinct prompt."""
        cache: dict[str, object] = {}
        out = []
        for it in items:
            rec = it.record
            if rec.id not in cache:
                cache[rec.id] = encode_prompt(
                    self.processor,
                    rec,
                    self.cfg.model.min_pixels,
                    self.cfg.model.max_pixels,
                    self.cfg.model.prompt_style,
                )
            check_prompt_len(cache[rec.id], it, self.model.config.image_token_id)
            out.append(cache[rec.id])
        return out

    def _batch(self, items: list[TrainItem], encoded: list, idx: list[int]) -> dict[str, torch.Tensor]:
        tok = self.processor.tokenizer
        batch = build_batch(
            [encoded[i] for i in idx],
            [items[i].token_ids for i in idx],
            pad_token_id=tok.pad_token_id,
            image_token_id=self.model.config.image_token_id,
            video_token_id=self.model.config.video_token_id,
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def _logprobs(self, model, batch, with_entropy=False, raw=False):
        if raw:  # log_softmax of the raw logits, as vLLM's prompt log-probs (the probe)
            return completion_logprobs(model, batch, 1.0, None, with_entropy=with_entropy)
        return completion_logprobs(
            model, batch, self.cfg.rollout.temperature, self.banned, with_entropy=with_entropy
        )

    @torch.no_grad()
    def compute_logprobs(
        self,
        items: list[TrainItem],
        micro_batches: list[list[int]],
        use_reference: bool = False,
        raw: bool = False,
    ):
        """Per-sequence completion log-probs (lists of floats) under the policy or the reference;
        raw: temperature 1 and no token bans (what an engine's prompt log-probs are)."""
        model = self.ref_model if use_reference else self.model
        if model is None:
            raise RuntimeError("no reference model: it is only built when algorithm.beta > 0")
        encoded = self._encode(items)
        out: list[list[float] | None] = [None] * len(items)
        for mb in micro_batches:
            batch = self._batch(items, encoded, [i for i in mb if i >= 0] or [0])  # padding still runs
            logp = self._logprobs(model, batch, raw=raw)
            mask = batch["completion_mask"].bool()
            for row, i in enumerate(i for i in mb if i >= 0):
                out[i] = logp[row][mask[row]].tolist()
        return out

    def train_step(
        self, items: list[TrainItem], mini_batches: list[list[list[int]]], denominators: list[float]
    ) -> dict:
        """One or more optimizer steps over this rank's items.

        mini_batches[m] is this rank's list of micro-batches (indices into items) for optimizer step
        m; index -1 marks a padding micro-batch that runs with zero weight so that every rank makes
        the same number of forward/backward passes. denominators[m] is the loss denominator of the
        whole mini-batch across all ranks (grpo.loss_denominator).

        The decoupled objective (grpo.policy_loss): every item's PPO ratio is taken against the
        proximal policy, these weights before the update (logp.detach() when the batch gets one
        optimizer step; recomputed first when it gets several), fresh or stale; with
        algorithm.tis_cap every token's term is weighted by the bounded importance weight
        pi_proximal / pi_engine, which corrects the engine's staleness and its numerics at once.
        """
        cfg, alg = self.cfg, self.cfg.algorithm
        t0 = time.time()
        encoded = self._encode(items)
        on_policy = len(mini_batches) == 1 and cfg.learner.update_epochs == 1
        missing = [i for i, it in enumerate(items) if it.behaviour_logprobs is None]
        if alg.tis_cap is not None and missing:
            raise ValueError(
                f"algorithm.tis_cap weights tokens by the engine's log-probs, but {len(missing)} item(s) "
                "carry none (TrainItem.behaviour_logprobs); set algorithm.tis_cap=null to train without"
            )
        use_behaviour = not missing
        # Old log-probs come from the weights before the first update (unneeded when on-policy:
        # then the ratio is exp(logp - logp.detach())); reference log-probs never change.
        all_mbs = [mb for mini in mini_batches for mb in mini]
        old = None if on_policy else self.compute_logprobs(items, all_mbs)
        ref = self.compute_logprobs(items, all_mbs, use_reference=True) if alg.beta > 0 else None
        sums: dict[str, float] = {}
        weight_total = 0.0
        grad_norms, n_tokens = [], 0
        mismatch: list[torch.Tensor] = []  # |engine - learner| log-prob per completion token
        for _epoch in range(cfg.learner.update_epochs):
            for mini, denom in zip(mini_batches, denominators, strict=True):
                self.optimizer.zero_grad(set_to_none=True)
                for mb in mini:
                    real = [i for i in mb if i >= 0]
                    batch = self._batch(
                        items, encoded, real or [0]
                    )  # padding: any real sequence, zero weight
                    mask = batch["completion_mask"] if real else torch.zeros_like(batch["completion_mask"])
                    logp, entropy = self._logprobs(self.model, batch, with_entropy=True)
                    adv = torch.tensor([items[i].advantage for i in real] or [0.0], device=self.device)
                    old_logp = self._aligned(old, real, mask, logp) if old is not None else logp.detach()
                    behaviour = None
                    if use_behaviour:
                        behaviour = self._aligned(
                            [items[i].behaviour_logprobs for i in real], range(len(real)), mask, logp
                        )
                    loss, metrics = policy_loss(
                        logp,
                        old_logp,
                        self._aligned(ref, real, mask, logp) if ref is not None else None,
                        adv,
                        mask,
                        beta=alg.beta,
                        clip_low=alg.clip_low,
                        clip_high=alg.clip_high,
                        agg=alg.loss_agg,
                        norm_constant=cfg.rollout.max_new_tokens,
                        global_denominator=denom,
                        ratio_level=alg.ratio_level,
                        behaviour_logp=behaviour,
                        tis_cap=alg.tis_cap,
                        is_level=alg.is_level,
                        is_mode=alg.is_mode,
                        is_low=alg.is_low,
                    )
                    # FSDP averages gradients over ranks; scale up so the sum over ranks and
                    # micro-batches is the gradient of the whole mini-batch's loss.
                    (loss * self.world_size).backward()
                    if real:
                        w = float(len(real))
                        metrics["entropy"] = masked_mean(entropy, mask.bool()).item()
                        # engine vs learner on the same weights: fresh items only (a stale one
                        # differs by the updates since it was sampled)
                        fresh = [r for r, i in enumerate(real) if items[i].staleness == 0]
                        if (
                            on_policy
                            and _epoch == 0
                            and fresh
                            and items[real[0]].behaviour_logprobs is not None
                        ):
                            engine = self._aligned(
                                [items[i].behaviour_logprobs for i in real], range(len(real)), mask, logp
                            )
                            diff = (logp.detach() - engine).abs()[fresh]
                            mismatch.append(diff[mask[fresh].bool()].float().cpu())
                        for k, v in metrics.items():
                            sums[k] = sums.get(k, 0.0) + w * v
                        weight_total += w
                        n_tokens += int(batch["attention_mask"].sum())
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad], cfg.learner.grad_clip
                )
                grad_norms.append(full_tensor(grad_norm).item())
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer_steps += 1
        out = {k: v / weight_total for k, v in sums.items()} if weight_total else {}
        if old is not None:
            # Engine vs learner on the same weights (before the first update): the sampling mismatch.
            mismatch = [
                (torch.tensor(it.behaviour_logprobs) - torch.tensor(lp)).abs()
                for it, lp in zip(items, old, strict=True)
                if it.staleness == 0 and it.behaviour_logprobs is not None
            ]
        if mismatch:
            out.update({f"logprob_mismatch{k}": v for k, v in mismatch_stats(torch.cat(mismatch)).items()})
        out.update(
            grad_norm=sum(grad_norms) / len(grad_norms),
            lr=self.scheduler.get_last_lr()[0],
            sequences=weight_total,
            tokens=n_tokens,
            step_s=time.time() - t0,
            peak_mem_gb=self.peak_memory_gb(),
        )
        return out

    def _aligned(
        self, per_seq: list, real: list[int], mask: torch.Tensor, like: torch.Tensor
    ) -> torch.Tensor:
        """Scatter per-sequence log-prob lists into the [B, L-1] layout of this micro-batch."""
        out = torch.zeros_like(like)
        for row, i in enumerate(real):
            pos = mask[row].nonzero().squeeze(-1)
            out[row, pos] = torch.tensor(per_seq[i], dtype=like.dtype, device=like.device)
        return out

    # -- weights -----------------------------------------------------------------------------------
    def iter_full_params(self, reference: bool = False, names: set[str] | None = None):
        """(name, full tensor) per parameter (only `names`, if given), gathered one at a time;
        every rank must iterate, with the same `names`."""
        model = self.ref_model if reference else self.model
        for name, p in model.named_parameters():
            if names is None or name in names:
                yield name, full_tensor(p.detach())

    def weight_metas(self, served_dtype: str | None = None, trainable_only: bool = False) -> list:
        """Names, full shapes and wire dtypes of the parameters to send, without gathering anything:
        all of them, or only those the optimizer can change."""
        from visualthinker_ray.weight_sync import tensor_metas

        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad or not trainable_only]
        return tensor_metas(named, served_dtype)

    def init_sync_group(self, addr: str, port: int, handshake: str, timeout_s: float) -> None:
        """Rank 0 joins the weight-sync group as its sender (rank 0 of that group). A failure here
        (a peer that never joins, a handshake that differs) raises and leaves this rank usable."""
        from visualthinker_ray.weight_sync import Handshake
        from visualthinker_ray.weight_sync.transport import WeightSender

        if self.rank != 0:
            return
        if getattr(self, "sync_sender", None) is not None:
            self.sync_sender.close()
        self.sync_sender = None
        bucket_bytes = int(self.cfg.rollout.sync_bucket_mb * 1024 * 1024)
        mine = Handshake.from_json(handshake).mine(
            {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        )
        self.sync_sender = WeightSender(addr, port, mine, timeout_s, self.device, bucket_bytes)

    def broadcast_flat(self, numel: int, dtype: str) -> float:
        """Rank 0: one raw broadcast of `numel` elements over the sync group (benchmarks: the
        baseline a sync of the same bytes is measured against); returns seconds."""
        if self.rank != 0 or getattr(self, "sync_sender", None) is None:
            raise RuntimeError(f"learner rank {self.rank} is not the sender of a sync group")
        return self.sync_sender.broadcast_flat(numel, dtype)

    def send_weights(self, metas: list, plan) -> dict:
        """Every rank gathers the described parameters one by one; rank 0 casts each to its wire
        dtype into the sync buckets and broadcasts them as they fill."""
        named = self.iter_full_params(names={m.name for m in metas})
        if self.rank != 0:
            for _ in named:
                pass
            return {}
        try:
            if getattr(self, "sync_sender", None) is None:
                raise RuntimeError(
                    "learner rank 0 has no weight-sync group; the rollout pool must build it first"
                )
            return self.sync_sender.send(named, metas, plan)
        except BaseException:
            # The other ranks gather every described parameter (a collective each): finish the
            # gathers rank 0 has not joined yet, or they wait for it and the next collective pairs
            # with the wrong one.
            for _ in named:
                pass
            raise

    def full_state_dict(self, reference: bool = False) -> dict[str, torch.Tensor] | None:
        """The full parameters on CPU on rank 0 (None elsewhere): for tests and HF export."""
        out = {}
        for name, t in self.iter_full_params(reference):
            if self.rank == 0:
                out[name] = t.cpu().clone()
        return out if self.rank == 0 else None

    def training_state(self) -> dict | None:
        """What a resume must restore besides the weights, gathered on rank 0 (None elsewhere):
        the optimizer's full state by parameter name, the scheduler's state and the current lr."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optim = get_optimizer_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.rank != 0:
            return None
        return {
            "optim": {name: dict(s) for name, s in optim["state"].items()},
            "scheduler": self.scheduler.state_dict(),
            "lr": self.optimizer.param_groups[0]["lr"],
            "optimizer_steps": self.optimizer_steps,
        }

    # -- checkpoints and export --------------------------------------------------------------------
    def save_checkpoint(self, path: str) -> None:
        """Every rank writes its shard of the model and optimizer state (torch.distributed.checkpoint)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(path, "learner"))
        if self.rank == 0:
            extra = {"scheduler": self.scheduler.state_dict(), "optimizer_steps": self.optimizer_steps}
            torch.save(extra, os.path.join(path, "learner_extra.pt"))
        dist.barrier()

    def load_checkpoint(self, path: str) -> int:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(path, "learner"))
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        extra = torch.load(os.path.join(path, "learner_extra.pt"), weights_only=True)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.optimizer_steps = extra["optimizer_steps"]
        return self.optimizer_steps

    def export_hf(self, out_dir: str) -> str | None:
        """An HF-format copy of the policy (model + processor) written by rank 0, loadable by
        transformers and vLLM. Parameters are gathered one at a time into a CPU model."""
        target = None
        if self.rank == 0:
            target = load_model(self.cfg.model.path, torch.float32, "cpu")
            params = dict(target.named_parameters())
        for name, t in self.iter_full_params():
            if target is not None:
                params[name].data.copy_(t.detach().to("cpu", torch.float32))
        if target is None:
            return None
        target.save_pretrained(out_dir, safe_serialization=True)
        self.processor.save_pretrained(out_dir)
        return out_dir

    def peak_memory_gb(self) -> float:
        if self.on_gpu:
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _param_dtype(model) -> str | None:
    return None if model is None else str(next(model.parameters()).dtype).removeprefix("torch.")


def check_prompt_len(encoded, item: TrainItem, image_token_id: int) -> None:
    """The learner's prompt must be the engine's: a different image-token count (the processors'
    pixel bounds differ) would train on other positions than the ones sampled, silently."""
    if len(encoded.input_ids) != item.prompt_len:
        images = encoded.input_ids.count(image_token_id)
        raise InputError(
            f"prompt {item.record.id!r}: the engine's prompt has {item.prompt_len} tokens, the learner's "
            f"{len(encoded.input_ids)} ({images} of them image tokens). Both sides must process images "
            "the same way: the same model.path processor, model.min_pixels / model.max_pixels and "
            "model.prompt_style for the rollout engines and the learner"
        )


def cpu_plan(
    threads: int | None, affinity: list[int] | None, max_staleness: int, world_size: int, cores: int
) -> tuple[int, list[int] | None]:
    """(torch threads, cores to pin to) of one learner rank on the CPU; set keys win, else by mode.

    Synchronous, generation and update take turns: the ranks share every core. Pipelined, vLLM's CPU
    worker generates while the learner updates and binds its OpenMP threads from core 0 up: a single
    rank takes the upper half of the cores, pinned there (measured on 2 cores, one-step-off: 1.64 and
    1.51 s a step pinned to core 1 against 1.89 and 2.18 with 2 unpinned threads); several ranks
    split what is left unpinned. Never more threads than the machine has.
    """
    if threads is None:
        if max_staleness == 0:
            threads = max(1, cores // world_size)
        else:
            threads = max(1, cores // (world_size + 1)) if world_size > 1 else max(1, cores // 2)
            if affinity is None and world_size == 1 and cores > 1:
                affinity = list(range(cores - threads, cores))
    return min(threads, cores), affinity


def pin_process(cores: list[int]) -> None:
    """Keep every thread of this process (torch's pool included) on `cores`: pipelined on one machine,
    the learner then stays off the core vLLM's CPU worker binds its OpenMP threads to."""
    available = os.sched_getaffinity(0)
    if not set(cores) <= available:
        raise InputError(
            f"learner.cpu_affinity={cores} names cores this process may not use (allowed: {sorted(available)})"
        )
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), cores)


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return os.environ.get("MASTER_ADDR", "127.0.0.1")
