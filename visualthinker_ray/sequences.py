"""Prompt + completion batches for Qwen2-VL, and their per-token log-probs.

The learner re-processes a record's image bytes with the same processor settings as the engine, so
the prompt token ids (image placeholders included) agree; M-RoPE positions are left to the model,
which derives them from `image_grid_thw` and the attention mask (hand-built positions broke
packing in other frameworks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visualthinker_ray.data.prompts import build_prompt, load_images
from visualthinker_ray.data.records import PromptRecord


@dataclass
class EncodedPrompt:
    input_ids: list[int]
    pixel_values: torch.Tensor | None  # [patches, dim], None for a text-only prompt
    image_grid_thw: torch.Tensor | None  # [images, 3]


def encode_prompt(processor, record: PromptRecord, min_pixels: int, max_pixels: int, style: str = "base"):
    """The prompt's token ids and vision inputs, exactly as the engines see them."""
    images = load_images(record, min_pixels, max_pixels)
    out = processor(text=[build_prompt(record, style, processor)], images=images or None, return_tensors="pt")
    return EncodedPrompt(
        input_ids=out["input_ids"][0].tolist(),
        pixel_values=out.get("pixel_values"),
        image_grid_thw=out.get("image_grid_thw"),
    )


def build_batch(
    prompts: list[EncodedPrompt],
    completions: list[list[int]],
    pad_token_id: int,
    image_token_id: int,
    video_token_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion sequences with a mask over the completion targets.

    `completion_mask[b, t]` is 1 where `input_ids[b, t + 1]` is a completion token, i.e. where the
    logits at position t predict a token the engine sampled.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    lengths = [len(p.input_ids) + len(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(lengths)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    completion_mask = torch.zeros((len(prompts), width - 1), dtype=torch.float32)
    for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids = p.input_ids + list(c)
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention_mask[b, : len(ids)] = 1
        completion_mask[b, len(p.input_ids) - 1 : len(ids) - 1] = 1
    mm_types = (input_ids == image_token_id).long()
    if video_token_id is not None:
        mm_types[input_ids == video_token_id] = 2
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": mm_types,
        "completion_mask": completion_mask,
    }
    pixels = [p.pixel_values for p in prompts if p.pixel_values is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
        batch["image_grid_thw"] = torch.cat(
            [p.image_grid_thw for p in prompts if p.image_grid_thw is not None]
        )
    return batch


def completion_logprobs(
    model,
    batch: dict[str, torch.Tensor],
    temperature: float = 1.0,
    banned_ids: list[int] | None = None,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(masked logits / T) at each next token: [B, L-1], meaningful where completion_mask is 1
    (0 before the first completion target of the batch).

    The same quantity the engines report (rollout/engine.py), so ratios and mismatch are well defined.
    With `with_entropy`, also the per-token entropy of that distribution (no grad; for metrics).

    The output layer runs only from the batch's first completion target on (`logits_to_keep`): at
    Qwen2-VL-2B's 151,936-token vocabulary the prompt's ~600 positions (~500 of them image tokens)
    would otherwise make B x 600 x 152k float logits, and the copies masking and log_softmax take,
    for nothing.
    """
    from visualthinker_ray.grpo import token_entropy, token_logprobs

    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    start = first_target(batch["completion_mask"])  # logits at t predict token t + 1
    width = batch["input_ids"].shape[1]
    logits = model(**inputs, use_cache=False, logits_to_keep=width - start).logits[:, :-1]
    if banned_ids:
        ban = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        ban[banned_ids] = True
        logits = logits.masked_fill(ban, float("-inf"))
    logp = _left_pad(token_logprobs(logits, batch["input_ids"][:, start + 1 :], temperature), start)
    if not with_entropy:
        return logp
    with torch.no_grad():
        entropy = _left_pad(token_entropy(logits.detach(), temperature), start)
    return logp, entropy


def first_target(completion_mask: torch.Tensor) -> int:
    """The first position whose logits any row of the batch needs (0 for an all-zero mask)."""
    hits = completion_mask.any(dim=0).nonzero()
    return int(hits[0]) if len(hits) else 0


def _left_pad(values: torch.Tensor, start: int) -> torch.Tensor:
    """[B, n] -> [B, start + n], zeros in front: back to one value per position of the batch."""
    return torch.nn.functional.pad(values, (start, 0))
