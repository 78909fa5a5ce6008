"""The tiny Qwen2-VL of the CPU runs and tests: a real Qwen2-VL checkpoint in HF format, only small,
so it loads through exactly the `from_pretrained` path (and vLLM's loader) that Qwen/Qwen2-VL-2B does."""

from __future__ import annotations

from pathlib import Path

import torch

from visualthinker_ray.config import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from visualthinker_ray.errors import InputError
from visualthinker_ray.toy.real_shape import qwen2vl_config, save_checkpoint

# Special tokens of Qwen2-VL, in the order the tiny tokenizer gives them ids 0..N-1.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# A ChatML template in Qwen2-VL's style, for the instruct prompt variant. The base-model prompt
# never goes through it (prompts.py renders that one directly).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Words the tiny tokenizer is trained on: the prompt template, the answer format, the synthetic
# questions' vocabulary and common reasoning words, so that short completions tokenize compactly.
_CORPUS_WORDS = """
A conversation between User and Assistant. The user asks a question about the image, and the Assistant
solves it. The assistant first thinks about the reasoning process in the mind and then provides the user
with the answer. User: Assistant: Let me solve this step by step. <think> </think> <answer> </answer>
Answer in natural language. Choose between the following options: or Select from the following choices.
(A) (B) (C) (D) (E) A B C D E
What colour color is the shape of object objects How many are there in image Is it left right above below
of Which bigger smaller larger closer farther to camera taking this photo these two the
red green blue yellow purple orange black white gray pink brown cyan
circle circles square squares triangle triangles star rectangle
0 1 2 3 4 5 6 7 8 9 10 zero one two three four five six seven eight nine ten
I see so therefore because wait but hmm let check verify again answer is think the it this that
first second then finally on side top bottom position size compare count number more less than
"""


def tiny_tokenizer_corpus() -> list[str]:
    lines = [line.strip() for line in _CORPUS_WORDS.strip().splitlines()]
    # Repeat with varied spacing/case so BPE learns both " word" and "word" merges.
    return lines * 4 + [line.lower() for line in lines] + [" ".join(lines)]


def build_tiny_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE trained locally (deterministic), wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_tokenizer_corpus(), trainer=trainer)
    # padding_side must go to the constructor: setting it afterwards is not saved.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens={},
        model_max_length=4096,
    )


def build_processor(tokenizer, min_pixels: int, max_pixels: int, merge_size: int = 2):
    """`merge_size` must match the model's `vision_config.spatial_merge_size` (Qwen2-VL: 2)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    sizes = dict(min_pixels=min_pixels, max_pixels=max_pixels, merge_size=merge_size)
    image_processor = Qwen2VLImageProcessor(**sizes)
    video_processor = Qwen2VLVideoProcessor(**sizes)
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_model_config(
    tokenizer,
    hidden_size: int = 128,
    num_layers: int = 2,
    vision_depth: int = 2,
    vision_embed_dim: int = 32,
    spatial_merge_size: int = 2,
    rope_theta: float = 1_000_000.0,
):
    """A Qwen2-VL config small enough for the CPU that vLLM's CPU backend still accepts.

    vLLM's CPU attention needs head_dim 64, and M-RoPE needs sum(mrope_section) == head_dim / 2.
    `rope_theta` (Qwen2-VL's 1e6 by default) sets the text M-RoPE base; the width axis of the
    vision tokens gets its lowest frequencies, theta^(-40/64) to theta^(-62/64) rad per position.
    """
    if rope_theta <= 1:
        raise InputError(f"rope_theta must be above 1, got {rope_theta}")
    head_dim = 64
    num_heads = hidden_size // head_dim
    if num_heads * head_dim != hidden_size:
        raise InputError(f"hidden_size {hidden_size} must be a multiple of {head_dim} (vLLM CPU head_dim)")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": float(rope_theta),
            "mrope_section": [8, 12, 12],
        },
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = dict(
        depth=vision_depth,
        embed_dim=vision_embed_dim,
        hidden_size=hidden_size,
        num_heads=max(1, vision_embed_dim // 16),
        mlp_ratio=2,
        patch_size=14,
        spatial_merge_size=spatial_merge_size,
        temporal_patch_size=2,
    )
    return qwen2vl_config(text_config, vision_config, ids)


INITS = ("hf", "fan_in")


def fan_in_init_(model: torch.nn.Module) -> torch.nn.Module:
    """Re-draw every weight matrix as N(0, 1/fan_in) and zero every bias; norms stay at 1.

    HF's init draws all weights with std 0.02 (`initializer_range`), tuned for widths in the
    thousands. At the tiny model's widths (32-wide vision tower, 128-wide language model) each layer
    then shrinks its input several-fold: at init the image barely moves the next-token distribution
    (mean total variation between images 0.008, against 0.049 with this init), and even "what
    colour is the one object?" stays at guessing for 800 supervised steps, where this init learns it
    (docs/experiments/bench_init.py). Embeddings count the hidden size as their fan-in; `lm_head` shares
    their tensor (tied), with the same fan-in, so both see one N(0, 1/hidden) draw.
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Embedding):
            fan_in = module.embedding_dim
        elif isinstance(module, torch.nn.Linear | torch.nn.Conv3d | torch.nn.Conv2d):
            fan_in = weight[0].numel()  # input channels x kernel size
        else:
            continue  # LayerNorm / RMSNorm keep their ones and zeros
        with torch.no_grad():
            weight.normal_(0.0, fan_in**-0.5)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    return model


def make_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    hidden_size: int = 128,
    num_layers: int = 2,
    vocab_size: int = 1024,
    vision_depth: int = 2,
    vision_embed_dim: int = 32,
    init: str = "hf",
    rope_theta: float = 1_000_000.0,
) -> Path:
    """Write a tiny random Qwen2-VL in HF format (model, processor, generation config) to `out_dir`.

    `init`: "hf" (the transformers default, std 0.02) or "fan_in" (`fan_in_init_`).
    `rope_theta`: the text M-RoPE base (`tiny_model_config`).
    """
    if init not in INITS:
        raise InputError(f"init must be one of {INITS}, got {init!r}")
    from transformers import Qwen2VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(vocab_size)
    processor = build_processor(tokenizer, min_pixels, max_pixels)
    config = tiny_model_config(
        tokenizer, hidden_size, num_layers, vision_depth, vision_embed_dim, rope_theta=rope_theta
    )
    # Seed a private generator state: the weights depend on `seed` only, not on what ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
        if init == "fan_in":
            fan_in_init_(model)
    meta = {"seed": seed, "kind": "tiny-qwen2-vl", "init": init}
    return save_checkpoint(model, processor, out, "visualthinker_tiny.json", meta)
