"""Can the tiny model learn the synthetic task at all? The diagnostic behind issue 6's finding.

Run: .venv/bin/python docs/experiments/probe_learnability.py [--model artifacts/tiny-model]
     [--data artifacts/data/SAT] [--steps 500] [--out artifacts/probe-learnability]

GRPO can only reinforce what the policy can represent. This trains the same tiny model twice with
the warm-up's supervised loss on the same records, once with RANDOM answers (the RL start) and once
with the GOLD answers (a supervised upper bound for what RL could reach), then measures on held-out
SAT val rows:

- per question type, teacher-forced accuracy: the option with the highest log-probability after a
  fixed reasoning text (no sampling noise);
- the same with every image replaced by a blank one: what the text alone gives. If the gold model
  scores the same with and without the image, it learned text priors, not to look;
- the mean cosine similarity between the vision tower's output tokens of one image (1.0: the tower
  maps every patch to the same vector and the language model sees nothing).

Prints a table and writes bench/results/probe_learnability.json.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from visualthinker_ray.data.sat import load_sat
from visualthinker_ray.models import load_model, load_processor
from visualthinker_ray.sequences import build_batch, completion_logprobs, encode_prompt
from visualthinker_ray.toy import warmup as wu

ROOT = Path(__file__).resolve().parents[2]


def blank_like(image_bytes: bytes) -> bytes:
    size = Image.open(io.BytesIO(image_bytes)).size
    buf = io.BytesIO()
    Image.new("RGB", size, (245, 245, 240)).save(buf, format="PNG")
    return buf.getvalue()


def load(model_dir: str):
    """The processor and the model (eval mode) of a checkpoint, loaded once for all probes."""
    proc = load_processor(model_dir, wu.DEFAULT_MIN_PIXELS, wu.DEFAULT_MAX_PIXELS)
    return proc, load_model(model_dir).eval()


@torch.no_grad()
def option_accuracy(proc, model, records, blank: bool) -> dict[str, float]:
    """Teacher-forced accuracy per question type (argmax over options of the answer's log-prob)."""
    tok = proc.tokenizer
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    right: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        if blank:
            r = replace(r, images=tuple(blank_like(b) for b in r.images))
        enc = encode_prompt(proc, r, wu.DEFAULT_MIN_PIXELS, wu.DEFAULT_MAX_PIXELS)
        reasoning = wu.reasoning_text(r, random.Random(0))  # the same text before every option
        comps = [
            tok.encode(f"{reasoning}</think>\n<answer> {o}</answer>", add_special_tokens=False)
            for o in r.choices
        ]
        batch = build_batch([enc] * len(comps), comps, tok.eos_token_id, image_id)
        token_logp = completion_logprobs(model, batch)
        best = int((token_logp * batch["completion_mask"]).sum(-1).argmax())
        right[r.question_type].append(r.choices[best] == r.gold)
    out = {t: statistics.fmean(v) for t, v in sorted(right.items())}
    out["overall"] = statistics.fmean(x for v in right.values() for x in v)
    return out


@torch.no_grad()
def vision_token_cosine(proc, model, records) -> float:
    """Mean pairwise cosine between the vision tower's output tokens, averaged over images."""
    values = []
    for r in records:
        enc = encode_prompt(proc, r, wu.DEFAULT_MIN_PIXELS, wu.DEFAULT_MAX_PIXELS)
        feats = model.model.visual(enc.pixel_values, grid_thw=enc.image_grid_thw)
        feats = getattr(feats, "pooler_output", feats)
        f = torch.nn.functional.normalize(feats.float(), dim=-1)
        n = f.shape[0]
        values.append(((f @ f.T).sum() - n) / (n * (n - 1)))
    return float(torch.stack(values).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="artifacts/tiny-model")
    p.add_argument("--data", default="artifacts/data/SAT")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--val-rows", type=int, default=128)
    p.add_argument("--out", default="artifacts/probe-learnability")
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "probe_learnability.json"))
    args = p.parse_args()
    t0 = time.perf_counter()
    val = [r for r in load_sat(args.data, "val", limit=args.val_rows).records if r.choices]
    rows = {"start (random init)": args.model}
    for name, gold in (("random answers (RL start)", False), ("GOLD answers (upper bound)", True)):
        out = str(Path(args.out) / ("gold" if gold else "random"))
        print(f"[probe] warm-up with {name}: {args.steps} steps ...", flush=True)
        wu.warmup(args.model, args.data, out, steps=args.steps, lr=args.lr, gold_answers=gold, log_every=100)
        rows[name] = out
    results = {}
    for name, model_dir in rows.items():
        print(f"[probe] measuring {name} ...", flush=True)
        proc, model = load(model_dir)
        results[name] = {
            "with_image": option_accuracy(proc, model, val, blank=False),
            "blank_image": option_accuracy(proc, model, val, blank=True),
            "vision_token_cosine": vision_token_cosine(proc, model, val[:16]),
        }
    types = list(next(iter(results.values()))["with_image"])
    print(f"\nteacher-forced accuracy on {len(val)} held-out SAT rows; chance {wu.chance_accuracy(val):.3f}")
    print("| model | image | " + " | ".join(types) + " | vision-token cosine |")
    print("|---|---|" + "---|" * len(types) + "---|")
    for name, res in results.items():
        for key, label in (("with_image", "real"), ("blank_image", "blank")):
            cells = " | ".join(f"{res[key].get(t, float('nan')):.3f}" for t in types)
            cos = f"{res['vision_token_cosine']:.4f}" if key == "with_image" else ""
            print(f"| {name} | {label} | {cells} | {cos} |")
    record = {
        "bench": "probe_learnability",
        "settings": vars(args),
        "chance": wu.chance_accuracy(val),
        "results": results,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(record, indent=2))
    print(f"results written to {args.results}")


if __name__ == "__main__":
    main()
