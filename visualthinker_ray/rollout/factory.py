"""Building the generation engine a config names (kept apart from engine.py, the contract both
engines import, so that neither engine module imports the other's)."""

from __future__ import annotations

from visualthinker_ray.errors import InputError
from visualthinker_ray.rollout.engine import Engine


def engine_kwargs(cfg) -> dict:
    """The engine options of a Config, for every place that builds an engine (the HF engine ignores
    the vLLM-only ones). The image limits come from model.*, the same ones the learner uses."""
    return dict(
        min_pixels=cfg.model.min_pixels,
        max_pixels=cfg.model.max_pixels,
        prompt_style=cfg.model.prompt_style,
        dtype=cfg.model.dtype,
        max_model_len=cfg.rollout.max_model_len,
        tensor_parallel_size=cfg.rollout.tensor_parallel_size,
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        seed=cfg.data.seed,
        device=None if cfg.resources.device == "auto" else cfg.resources.device,
    )


def make_engine(kind: str, model_path: str, **kwargs) -> Engine:
    """The engine named in the config: 'vllm' (needs vLLM installed) or 'hf'."""
    if kind == "vllm":
        from visualthinker_ray.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, **kwargs)
    if kind == "hf":
        from visualthinker_ray.rollout.hf_engine import HFEngine

        return HFEngine(model_path, **kwargs)
    raise InputError(f"unknown rollout engine {kind!r}; use 'vllm' or 'hf'")
