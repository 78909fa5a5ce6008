"""Loading Qwen2-VL processors and models (hub ids and local folders alike), and the vision
special tokens that generation must never sample. The tiny model of the CPU runs is built by
toy/tiny_model.py."""

from __future__ import annotations

from pathlib import Path

import torch

# Never sampled: a random or early model that writes one breaks the learner's forward
# ("Image features and image tokens do not match").
VISION_SPECIAL_TOKENS = [
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def load_processor(path: str, min_pixels: int, max_pixels: int):
    """The checkpoint's processor with the configured image limits (the engine and learner share them)."""
    from transformers import AutoProcessor

    _check_local_path(path)
    return AutoProcessor.from_pretrained(
        path, size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, padding_side="left"
    )


def load_model(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import AutoModelForImageTextToText

    _check_local_path(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    return model.to(device)


def banned_token_ids(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS]


def _check_local_path(path: str) -> None:
    """A path that looks local but is missing gets a clear error instead of a hub lookup."""
    p = Path(path)
    looks_local = path.startswith((".", "/", "~")) or p.exists() or path.count("/") != 1
    if looks_local and not p.expanduser().exists():
        raise FileNotFoundError(
            f"model path {path!r} does not exist. Give a local HF checkpoint folder (build the tiny one with "
            f"`python -m visualthinker_ray make-tiny-model --out {path}`) or a hub id like Qwen/Qwen2-VL-2B."
        )
