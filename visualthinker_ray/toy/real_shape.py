"""A random Qwen2-VL with Qwen/Qwen2-VL-2B's shapes, built from its published configuration (no download).

What the tiny model never exercises and this one does: a 151,936-row embedding tied to the output
layer (~467 MB in bf16, bigger than a sync bucket), hidden 1536 with 12 query and 2 KV heads
(head_dim 128), the 8,960-wide MLP, a 1280-wide vision tower with 16 heads (head_dim 80), the
real special-token ids (151643...), and hundreds of image tokens per prompt at the recipe's pixel
bounds. Depth is a parameter (Qwen2-VL-2B: 28 decoder layers, 32 vision blocks) so the CPU can run
the real width at reduced depth.

The tokenizer is the tiny byte-level BPE (same merges, so prompts tokenize the same way) laid out as
Qwen2's: ordinary tokens from id 0, never-produced filler tokens up to 151642, the special tokens at
Qwen2-VL's ids, filler again up to the model's 151,936 rows. One deviation from the real tokenizer
(151,657 entries): it names every embedding row, because a random model samples the last 279 rows
too, and a real one practically never does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from visualthinker_ray.errors import InputError

# Only torch, transformers and errors.py at import: bench/gpu_check.py takes the configuration from
# here on a GPU machine that has nothing else of the project's dependencies.

# Qwen/Qwen2-VL-2B config.json (the facts of the published model).
QWEN2_VL_2B = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "mrope_section": [16, 24, 24],
    "tie_word_embeddings": True,
    "vision": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}
# Qwen2's special tokens from id 151643, in order (the tiny tokenizer's eight among them).
QWEN2_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}


def real_vocab_tokenizer(vocab_size: int = QWEN2_VL_2B["vocab_size"]):
    """The tiny BPE re-laid to Qwen2's ids (module docstring), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from visualthinker_ray.toy.tiny_model import SPECIAL_TOKENS, build_tiny_tokenizer

    tiny = build_tiny_tokenizer()
    data = json.loads(tiny.backend_tokenizer.to_str())
    ordinary = [
        t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in SPECIAL_TOKENS
    ]
    first_special = min(QWEN2_SPECIAL_IDS.values())
    if vocab_size <= max(QWEN2_SPECIAL_IDS.values()):
        raise InputError(f"vocab_size must exceed {max(QWEN2_SPECIAL_IDS.values())} (Qwen2's special ids)")
    vocab = {t: i for i, t in enumerate(ordinary)}
    for i in range(len(ordinary), vocab_size):
        if not first_special <= i < first_special + len(QWEN2_SPECIAL_IDS):
            vocab[f"<filler{i}>"] = i  # no merge makes it: encoding never produces one
    vocab.update(QWEN2_SPECIAL_IDS)
    data["model"]["vocab"] = vocab
    data["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for t, i in QWEN2_SPECIAL_IDS.items()
    ]  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens={},
        model_max_length=QWEN2_VL_2B["max_position_embeddings"],
    )


def qwen2vl_config(text_config: dict, vision_config: dict, ids: dict[str, int], tie: bool = True):
    """A Qwen2VLConfig with the vision special tokens wired to `ids` (token -> id); the tiny model,
    this one and bench/gpu_check.py's small variant all build theirs here."""
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie,
    )


def save_checkpoint(
    model, processor, out: Path, meta_name: str, meta: dict, max_shard_size: str = "5GB"
) -> Path:
    """Write model (with a sampling generation config), processor and a provenance file to `out`."""
    from transformers import GenerationConfig

    text = model.config.text_config
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
        do_sample=True,
        temperature=1.0,
    )
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    processor.save_pretrained(out)
    (out / meta_name).write_text(json.dumps(meta, indent=2))
    return out


def real_shape_config(num_layers: int, vision_depth: int):
    q, v = QWEN2_VL_2B, QWEN2_VL_2B["vision"]
    if num_layers < 1 or vision_depth < 1:
        raise InputError(f"num_layers and vision_depth must be at least 1, got {num_layers}, {vision_depth}")
    ids = QWEN2_SPECIAL_IDS
    text_config = dict(
        vocab_size=q["vocab_size"],
        hidden_size=q["hidden_size"],
        intermediate_size=q["intermediate_size"],
        num_hidden_layers=num_layers,
        num_attention_heads=q["num_attention_heads"],
        num_key_value_heads=q["num_key_value_heads"],
        max_position_embeddings=q["max_position_embeddings"],
        rms_norm_eps=q["rms_norm_eps"],
        rope_parameters={
            "rope_type": "default",
            "rope_theta": q["rope_theta"],
            "mrope_section": q["mrope_section"],
        },
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = dict(v, depth=vision_depth, hidden_size=q["hidden_size"], in_channels=3)
    return qwen2vl_config(text_config, vision_config, ids, q["tie_word_embeddings"])


def make_real_shape_model(
    out_dir: str | Path,
    num_layers: int = QWEN2_VL_2B["num_hidden_layers"],
    vision_depth: int = QWEN2_VL_2B["vision"]["depth"],
    dtype: str = "bfloat16",
    seed: int = 0,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> Path:
    """Write a random Qwen2-VL-2B-shaped model (HF format, `dtype` weights) with its processor
    (pixel bounds: the tiny model's defaults unless given).

    Full depth is ~2.2B parameters: 4.4 GB in bf16 on disk and ~4.5 GB of memory while it is built
    (the weights are made in `dtype`, never in float32 first)."""
    from transformers import Qwen2VLForConditionalGeneration

    from visualthinker_ray.config import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
    from visualthinker_ray.toy.tiny_model import build_processor

    min_pixels = DEFAULT_MIN_PIXELS if min_pixels is None else min_pixels
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise InputError(
            f"dtype must be a floating-point torch dtype name (bfloat16, float32), got {dtype!r}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = real_vocab_tokenizer()
    processor = build_processor(
        tokenizer, min_pixels, max_pixels, QWEN2_VL_2B["vision"]["spatial_merge_size"]
    )
    config = real_shape_config(num_layers, vision_depth)
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch_dtype)
        try:
            model = Qwen2VLForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(previous)
    meta = {"seed": seed, "kind": "qwen2-vl-2b-shape", "layers": num_layers, "vision_depth": vision_depth}
    return save_checkpoint(
        model, processor, out, "visualthinker_real_shape.json", {**meta, "dtype": dtype}, max_shard_size="2GB"
    )
