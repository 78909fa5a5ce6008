"""Does the grounded warm-up teach the tiny model to SEE? Per-field accuracy of what it says.

Run: .venv/bin/python docs/experiments/bench_grounded_warmup.py [--steps 10000] [--lr 1e-3] [--eval-every 500]
     [--rope-theta 10] [--init fan_in] [--out artifacts/bench-grounded]

`warmup --reasoning grounded` (the project's own function, fresh synthetic questions every step)
from a new tiny model (`--init`, `--rope-theta`), its images the size of a small synthetic SAT set
written under --out. Every --eval-every steps, on 96 fixed held-out grounded examples, the share of
the grounding's numbers that the model predicts exactly under teacher forcing, by field:

  x, y   the cell (0-7) of a named object's centre: where it is
  size   the side of a square of its area in 4 px: how big it is
  count  any number in a count question's list ("I see red circle at X Y, ...")

and, for reference, the share a constant guess (the most common value of the field) gets on the
same examples. Prints a table, writes bench/results/grounded_warmup.json after every evaluation (so
a stopped run keeps what it measured) and leaves the warmed-up model in --out/warm-model (a start
model for `bench_learning.py --warm-model`).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from visualthinker_ray.models import load_processor
from visualthinker_ray.sequences import build_batch, encode_prompt
from visualthinker_ray.toy.synthetic import make_synthetic
from visualthinker_ray.toy.tiny_model import make_tiny_model
from visualthinker_ray.toy.warmup import grounded_batch, warmup

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 112
PIXELS = IMAGE_SIZE * IMAGE_SIZE
FIELDS = ("x", "y", "size", "count")


def field_of(question_type: str, before: list[str]) -> str | None:
    """Which grounding field a number token is, from the (stripped) tokens just before it."""
    if question_type.lower() == "count":
        return "count"
    if before[-1:] == ["size"]:
        return "size"
    if before[-2:] == ["a", "t"]:  # the tiny tokenizer splits " at" into " a" + "t"
        return "x"
    if len(before) >= 2 and before[-2] == "t" and before[-1].isdigit():
        return "y"
    return None


def heldout_batches(processor, n_batches: int = 6, batch_size: int = 16) -> list[tuple[list, dict]]:
    """Fixed held-out grounded examples (half in CV-Bench layout, as in the warm-up): per batch, the
    question types and the batch (build_batch's, completion mask included)."""
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    rng = random.Random("bench-grounded/heldout")
    out = []
    for b in range(n_batches):
        shown, texts = grounded_batch(
            rng, IMAGE_SIZE, batch_size, 10**7 + b * batch_size, lettered_fraction=0.5
        )
        ids = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
        prompts = [encode_prompt(processor, r, PIXELS, PIXELS) for r in shown]
        batch = build_batch(prompts, ids, tok.eos_token_id, image_id)
        out.append(([r.question_type for r in shown], batch))
    return out


def number_fields(processor, heldout) -> list[tuple[int, int, int, str, str]]:
    """(batch, row, label position, field, value) of every grounding number in the held-out targets."""
    tok = processor.tokenizer
    found = []
    for b, (qtypes, batch) in enumerate(heldout):
        mask, labels = batch["completion_mask"], batch["input_ids"][:, 1:]
        for r, qtype in enumerate(qtypes):
            positions = mask[r].nonzero().flatten().tolist()
            words = [tok.decode([labels[r, j]]).strip() for j in positions]
            for n, j in enumerate(positions):
                field = field_of(qtype, words[max(0, n - 3) : n]) if words[n].isdigit() else None
                if field:
                    found.append((b, r, j, field, words[n]))
    return found


def constant_guess(numbers) -> dict[str, float]:
    """The share of each field a constant answer (its most common value) gets."""
    by_field = defaultdict(list)
    for *_, field, value in numbers:
        by_field[field].append(value)
    return {f: Counter(v).most_common(1)[0][1] / len(v) for f, v in by_field.items()}


@torch.no_grad()
def field_accuracy(model, heldout, numbers) -> dict[str, float]:
    model.eval()
    hits = defaultdict(list)
    argmax = []
    for _, batch in heldout:
        inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
        argmax.append(model(**inputs, use_cache=False).logits[:, :-1].argmax(-1))
    for b, r, j, field, _ in numbers:
        hits[field].append(bool(argmax[b][r, j] == heldout[b][1]["input_ids"][r, j + 1]))
    model.train()
    return {f: round(sum(v) / len(v), 3) for f, v in hits.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--rope-theta", type=float, default=10.0)
    p.add_argument("--init", choices=("hf", "fan_in"), default="fan_in")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "artifacts" / "bench-grounded"))
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "grounded_warmup.json"))
    args = p.parse_args()
    out = Path(args.out)
    t0 = time.time()
    make_tiny_model(out / "tiny-model", seed=args.seed, init=args.init, rope_theta=args.rope_theta)
    make_synthetic(out / "data", n_train=16, n_test=8, seed=0, image_size=IMAGE_SIZE)  # the image size only
    processor = load_processor(str(out / "tiny-model"), PIXELS, PIXELS)
    heldout = heldout_batches(processor)
    numbers = number_fields(processor, heldout)
    result = {
        "args": {**vars(args), "machine": platform.platform(), "threads": torch.get_num_threads()},
        "constant_guess": constant_guess(numbers),
        "numbers": dict(Counter(f for *_, f, _ in numbers)),
        "curve": [],
    }
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"constant guess: {result['constant_guess']}  ({result['numbers']} numbers)", flush=True)

    def on_log(step: int, model) -> None:
        row = {"step": step, "seconds": round(time.time() - t0, 1), **field_accuracy(model, heldout, numbers)}
        result["curve"].append(row)
        print(f"[bench-grounded] {row}", flush=True)
        results_path.write_text(json.dumps(result, indent=2))

    summary = warmup(
        str(out / "tiny-model"), str(out / "data" / "SAT"), str(out / "warm-model"), steps=args.steps,
        lr=args.lr, batch_size=args.batch_size, seed=args.seed, reasoning="grounded",
        log_every=args.eval_every, on_log=on_log,
    )  # fmt: skip
    result["warmup"] = {
        k: summary[k] for k in ("initial_loss", "final_loss", "train_seconds", "chance_accuracy")
    }
    results_path.write_text(json.dumps(result, indent=2))
    print(f"\n| step | {' | '.join(FIELDS)} |\n|---|" + "---|" * len(FIELDS))
    print(
        "| constant guess | " + " | ".join(f"{result['constant_guess'].get(f, 0):.2f}" for f in FIELDS) + " |"
    )
    for row in result["curve"]:
        print(f"| {row['step']} | " + " | ".join(f"{row.get(f, 0):.2f}" for f in FIELDS) + " |")
    print(f"results written to {results_path}; model in {out / 'warm-model'}")


if __name__ == "__main__":
    main()
