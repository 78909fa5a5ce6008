"""Gold-answer supervised training of a tiny model on SAT records: the upper bound of what RL could
teach it, shared by bench_init.py, bench_task_learnability.py and bench_position_probe.py (not a
benchmark itself), with the background recolouring their position-coded image variants share.

The loss is the warm-up's masked cross-entropy on the completion "</think>\\n<answer> {gold}</answer>"
after the exact SAT training prompt (`encode_prompt`, the path the engines and learner use). A
completion counts as right when every one of its tokens is the argmax under teacher forcing.
"""

from __future__ import annotations

import io
import json
import platform
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage

from visualthinker_ray.sequences import build_batch, encode_prompt
from visualthinker_ray.toy.synthetic import render_scene

WHITE = (255, 255, 255)  # no object colour is white: background pixels are exactly these


def background_png(scene, background: np.ndarray) -> bytes:
    """The scene drawn on white, then every background pixel taken from `background` (H x W x 3)."""
    pixels = np.array(render_scene(replace(scene, background=WHITE)))
    behind = (pixels == WHITE).all(-1)
    pixels[behind] = background[behind]
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def gold_target(tokenizer, record) -> list[int]:
    return tokenizer.encode(f"</think>\n<answer> {record.gold}</answer>", add_special_tokens=False)


def _batch(processor, encoded, targets, idx):
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    return build_batch([encoded[i] for i in idx], [targets[i] for i in idx], tok.eos_token_id, image_id)


def exact_hits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-row exact-completion hits) for a batch from build_batch (mask popped inside)."""
    mask = batch.pop("completion_mask")
    logits = model(**batch, use_cache=False).logits[:, :-1]
    labels = batch["input_ids"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    loss = (nll * mask).sum() / mask.sum()
    return loss, ((logits.argmax(-1) == labels) | (mask == 0)).all(-1)


def train_curve(
    model,
    processor,
    records: list,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    window: int,
    pixels: tuple[int, int],
) -> list[float]:
    """Train `model` in place; exact-completion accuracy on the training batches per `window` steps."""
    encoded = [encode_prompt(processor, r, *pixels) for r in records]
    targets = [gold_target(processor.tokenizer, r) for r in records]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    hits, curve = [], []
    for step in range(steps):
        idx = rng.sample(range(len(records)), batch_size)
        loss, exact = exact_hits(model, _batch(processor, encoded, targets, idx))
        opt.zero_grad()
        loss.backward()
        opt.step()
        hits.extend(exact.tolist())
        if (step + 1) % window == 0:
            curve.append(sum(hits[-window * batch_size :]) / (window * batch_size))
            print(f"  step {step + 1}: exact {curve[-1]:.3f}  loss {loss.item():.3f}", flush=True)
    return curve


@torch.no_grad()
def heldout_accuracy(model, processor, records: list, pixels: tuple[int, int], batch_size: int = 32) -> float:
    """Exact-completion accuracy on records the model never trained on."""
    encoded = [encode_prompt(processor, r, *pixels) for r in records]
    targets = [gold_target(processor.tokenizer, r) for r in records]
    model.eval()
    hits = []
    for start in range(0, len(records), batch_size):
        idx = list(range(start, min(start + batch_size, len(records))))
        hits.extend(exact_hits(model, _batch(processor, encoded, targets, idx))[1].tolist())
    return sum(hits) / len(hits)


def train_and_score(model, processor, train, heldout, args, window, pixels, t0: float) -> dict:
    """One bench cell: gold training with args.steps/lr/batch_size/seed, then held-out accuracy."""
    curve = train_curve(
        model, processor, train, args.steps, args.lr, args.batch_size, args.seed, window, pixels
    )
    acc = heldout_accuracy(model, processor, heldout, pixels)
    return {"train_curve": curve, "heldout": round(acc, 3), "seconds": round(time.time() - t0, 1)}


def print_table(what: str, results: dict, columns: list[str], args) -> None:
    """Held-out accuracy per row (with its chance) and column, as a Markdown table."""
    print(
        f"\nheld-out exact-completion accuracy after {args.steps} gold-answer steps of {args.batch_size} rows"
    )
    print(f"| {what} | chance | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for name, r in results.items():
        print(
            f"| {name} | {r['chance']:.2f} | " + " | ".join(f"{r[c]['heldout']:.2f}" for c in columns) + " |"
        )


def write_results(path: str, args, window: int, results: dict) -> None:
    """The bench's arguments (with machine and thread count), window and results as JSON."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "threads": torch.get_num_threads(), **vars(args)}
    out.write_text(json.dumps({"args": meta, "window": window, "results": results}, indent=2))
    print(f"results written to {out}")
