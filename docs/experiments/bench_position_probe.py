"""Can the tiny model see WHERE an object is? Gold answers on one-object scenes.

Run: .venv/bin/python docs/experiments/bench_position_probe.py [--steps 800] [--probes color side]
     [--variants default theta10 gradient]

Two probes, each one object in a 112 px scene, asked with the exact SAT training prompt:
  color  "What color is the object?" (3 options): can the model see WHAT is there (the control).
  side   "Is the object on the left or on the right?" (2 options; the object's centre is at least
         1/8 of the image away from the middle): can it see WHERE it is.
Relation and Distance, two of the four held-out CV-Bench families, need the second.

Variants of the default fan-in tiny model (bench_task_learnability's `default`, 16 vision tokens):
  default   as built by make-tiny-model: text M-RoPE theta 1e6, where the width axis of the vision
            tokens gets rotary frequencies of 1.8e-4 to 1.5e-6 rad per position.
  theta10   text rope_theta 10: width frequencies of 0.24 to 0.11 rad per position.
  gradient  default model; the background's red channel rises from 150 (left) to 250 (right), so a
            vision token's pixels themselves say where it is.

A fresh model per (probe, variant) is trained for --steps steps of 16 rows on gold answers, then
scored on held-out rows (exact completion under teacher forcing). Prints a table; writes
bench/results/position_probe.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from gold_training import background_png, print_table, train_and_score, write_results
from transformers import Qwen2VLForConditionalGeneration

from visualthinker_ray.data.sat import sat_record
from visualthinker_ray.toy.synthetic import (
    SyntheticQuestion,
    make_one_object_color_question,
    sat_row,
)
from visualthinker_ray.toy.tiny_model import (
    build_processor,
    build_tiny_tokenizer,
    fan_in_init_,
    tiny_model_config,
)

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 112
PIXELS = (IMAGE_SIZE * IMAGE_SIZE, IMAGE_SIZE * IMAGE_SIZE)
PROBES = ("color", "side")
VARIANTS = ("default", "theta10", "gradient")
WINDOW = 100


def side_question(rng: random.Random) -> SyntheticQuestion:
    """One object clearly in the left or right half; gold left/right 50/50 by rejection."""
    want = rng.choice(("left", "right"))
    for _ in range(1000):
        q = make_one_object_color_question(rng, IMAGE_SIZE)
        x = q.scenes[0].objects[0].x
        if abs(x - IMAGE_SIZE / 2) >= IMAGE_SIZE / 8 and (x < IMAGE_SIZE / 2) == (want == "left"):
            options = ("left", "right") if rng.random() < 0.5 else ("right", "left")
            question = "Is the object on the left or on the right?"
            return SyntheticQuestion("side", question, options, want, q.scenes)
    raise RuntimeError("no scene with the object clearly to one side")


def gradient_png(scene) -> bytes:
    """The scene with its background replaced by a left-to-right red ramp."""
    ramp = np.empty((scene.image_size, scene.image_size, 3), dtype=np.uint8)
    ramp[...] = (0, 235, 200)
    ramp[..., 0] = np.linspace(150, 250, scene.image_size).round().astype(np.uint8)[None, :]
    return background_png(scene, ramp)


def probe_records(probe: str, variant: str, n: int, split: str, seed: int) -> list:
    records = []
    for i in range(n):
        rng = random.Random(f"bench-position/{seed}/{split}/{probe}/{i}")
        q = side_question(rng) if probe == "side" else make_one_object_color_question(rng, IMAGE_SIZE)
        row = sat_row(q)
        if variant == "gradient":
            row["image_bytes"] = [{"bytes": gradient_png(q.scenes[0]), "path": None}]
        records.append(sat_record(row, i, split, seed=seed))
    return records


def build(variant: str, seed: int):
    tok = build_tiny_tokenizer()
    processor = build_processor(tok, *PIXELS)
    config = tiny_model_config(tok, rope_theta=10.0 if variant == "theta10" else 1_000_000.0)
    torch.manual_seed(seed)
    return fan_in_init_(Qwen2VLForConditionalGeneration(config)), processor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rows", type=int, default=2048, help="training rows per probe")
    p.add_argument("--heldout", type=int, default=256)
    p.add_argument("--probes", nargs="+", choices=PROBES, default=list(PROBES))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "position_probe.json"))
    args = p.parse_args()
    if args.steps < WINDOW:
        p.error(f"--steps must be at least {WINDOW}")

    results: dict[str, dict] = {}
    for probe in args.probes:
        results[probe] = {}
        for variant in args.variants:
            print(f"[position] {probe} / {variant}: {args.steps} steps ...", flush=True)
            t0 = time.time()
            train = probe_records(probe, variant, args.rows, "train", args.seed)
            heldout = probe_records(probe, variant, args.heldout, "heldout", args.seed)
            results[probe]["chance"] = round(statistics.fmean(1 / len(r.choices) for r in heldout), 3)
            model, processor = build(variant, args.seed)
            results[probe][variant] = cell = train_and_score(
                model, processor, train, heldout, args, WINDOW, PIXELS, t0
            )
            print(
                f"  held-out exact accuracy {cell['heldout']:.3f} (chance {results[probe]['chance']:.3f})",
                flush=True,
            )
            # After every cell, so a stopped run keeps what it measured.
            write_results(args.results, args, WINDOW, results)

    print_table("probe", results, args.variants, args)


if __name__ == "__main__":
    main()
