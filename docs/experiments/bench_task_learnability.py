"""Which held-out task families can the tiny model learn at all? Gold answers, per CV-Bench task.

Run: .venv/bin/python docs/experiments/bench_task_learnability.py [--steps 1500] [--tasks Depth Count ...]
     [--variants default one_token]

For each CV-Bench task of the synthetic held-out set (Count, Relation, Depth, Distance), a fresh
fan-in tiny model is trained with the warm-up's supervised loss on the GOLD answer (the most signal
any RL could ever give it) for --steps steps of 16 rows, with the exact SAT training prompt; then it
is scored on held-out rows it never saw. A family that supervision cannot teach in this budget, GRPO
cannot either: this separates "the RL loop is broken" from "the task is out of the model's reach".

Variants of the tiny model (same widths and depths; only the vision-to-text hand-over differs):
  default    patch 14, spatial merge 2: a 112 px image is 4 x 4 = 16 vision tokens, each the
             concatenation of 2 x 2 neighbouring patches. Where a token sits in the image reaches
             the language model only through M-RoPE.
  one_token  patch 14, spatial merge 8: the whole 8 x 8 patch grid is concatenated into ONE vision
             token, so every patch's position is explicit in that token's features.
  coded      default widths, text rope_theta 10, and a POSITION CODE in the pixels: the background
             of each vision token's 28 x 28 px square is its own light colour (red channel falls
             with the column, blue with the row), so a token's values say where it is.
  big_coded  the coded images and theta 10 with a 4x larger model: hidden 256 (4 heads), 4 layers,
             vision width 64.

--warmups: the default variant again, after the project's format warm-up (`warmup`, random
answers, on the same training rows) with STEPS@LR, to measure what the RL start keeps of the ability
to learn from the image.

Prints a table (held-out exact-completion accuracy per family and variant, with the chance of a
uniform guess among the options) and writes bench/results/task_learnability.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gold_training import background_png, print_table, train_and_score, write_results
from transformers import Qwen2VLForConditionalGeneration

from visualthinker_ray.data.sat import sat_record
from visualthinker_ray.toy.synthetic import make_cvbench_question, sat_row
from visualthinker_ray.toy.tiny_model import (
    build_processor,
    build_tiny_tokenizer,
    fan_in_init_,
    tiny_model_config,
)

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("Depth", "Count", "Relation", "Distance")


@dataclass(frozen=True)
class Variant:
    merge: int = 2  # spatial merge size
    rope_theta: float = 1_000_000.0
    hidden: int = 128
    layers: int = 2
    vision_dim: int = 32
    coded: bool = False  # position-coded backgrounds


VARIANTS = {
    "default": Variant(),
    "one_token": Variant(merge=8),
    "coded": Variant(rope_theta=10.0, coded=True),
    "big_coded": Variant(rope_theta=10.0, hidden=256, layers=4, vision_dim=64, coded=True),
}
IMAGE_SIZE = 112
CODE_CELL = 28  # px: one vision token's square (patch 14 x merge 2)
PIXELS = (IMAGE_SIZE * IMAGE_SIZE, IMAGE_SIZE * IMAGE_SIZE)  # every image exactly 112 x 112
WINDOW = 250


def build(variant: str, seed: int):
    """An in-memory fan-in tiny Qwen2-VL and its processor for a variant."""
    v = VARIANTS[variant]
    tok = build_tiny_tokenizer()
    processor = build_processor(tok, *PIXELS, merge_size=v.merge)
    config = tiny_model_config(
        tok,
        hidden_size=v.hidden,
        num_layers=v.layers,
        vision_embed_dim=v.vision_dim,
        spatial_merge_size=v.merge,
        rope_theta=v.rope_theta,
    )
    torch.manual_seed(seed)
    return fan_in_init_(Qwen2VLForConditionalGeneration(config)), processor


def position_coded_png(scene) -> bytes:
    """The scene with each 28 px square of background in its own colour (column in red, row in blue)."""
    level = 255 - 40 * (np.arange(scene.image_size) // CODE_CELL)  # per column, and per row (square)
    code = np.empty((scene.image_size, scene.image_size, 3), dtype=np.uint8)
    code[..., 0] = level[None, :]  # red falls with the column
    code[..., 1] = 235
    code[..., 2] = level[:, None]  # blue falls with the row
    return background_png(scene, code)


def task_rows(task: str, n: int, split: str, seed: int, coded: bool = False) -> list[dict]:
    """n SAT rows of one CV-Bench task (CV-Bench wording, SAT columns)."""
    rows = []
    for i in range(n):
        q = make_cvbench_question(random.Random(f"bench-tasks/{seed}/{split}/{task}/{i}"), task, IMAGE_SIZE)
        row = sat_row(q)
        if coded:
            row["image_bytes"] = [{"bytes": position_coded_png(q.scenes[0]), "path": None}]
        rows.append(row)
    return rows


def records_of(rows: list[dict], split: str, seed: int) -> list:
    return [sat_record(row, i, split, seed=seed) for i, row in enumerate(rows)]


def heldout_records(task: str, args, coded: bool) -> list:
    return records_of(task_rows(task, args.heldout, "heldout", args.seed, coded), "heldout", args.seed)


def warmed_default(rows: list[dict], steps: int, lr: float, seed: int, tmp: Path):
    """The default variant after the project's format warm-up (random answers) on these rows."""
    from visualthinker_ray.models import load_model
    from visualthinker_ray.toy.synthetic import sat_features, write_parquet
    from visualthinker_ray.toy.warmup import warmup

    model, processor = build("default", seed)
    model.save_pretrained(tmp / "model")
    processor.save_pretrained(tmp / "model")
    cols = {k: [r[k] for r in rows] for k in sat_features()}
    write_parquet(cols, sat_features(), tmp / "SAT" / "SAT_train.parquet")
    warmup(
        str(tmp / "model"), str(tmp / "SAT"), str(tmp / "warm"), steps=steps, lr=lr, seed=seed, log_every=100
    )
    return load_model(str(tmp / "warm")), processor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rows", type=int, default=4096, help="training rows per task")
    p.add_argument("--heldout", type=int, default=256, help="held-out rows per task")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--variants", nargs="*", choices=sorted(VARIANTS), default=["default", "one_token"])
    p.add_argument(
        "--warmups", nargs="*", default=[], metavar="STEPS@LR",
        help="also train the default variant after `warmup --steps STEPS --lr LR` (random answers)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "task_learnability.json"))
    args = p.parse_args()
    if args.steps < WINDOW:
        p.error(f"--steps must be at least {WINDOW}")

    try:
        warmups = [(int(w.split("@")[0]), float(w.split("@")[1])) for w in args.warmups]
    except (IndexError, ValueError):
        p.error(f"--warmups takes STEPS@LR items like 500@5e-3, got {args.warmups}")
    columns = [*args.variants, *(f"warm {w}" for w in args.warmups)]
    results: dict[str, dict] = {}
    for task in args.tasks:
        train_rows = task_rows(task, args.rows, "train", args.seed)
        sets = {False: (records_of(train_rows, "train", args.seed), heldout_records(task, args, coded=False))}
        chance = statistics.fmean(1 / len(r.choices) for r in sets[False][1])
        results[task] = {"chance": round(chance, 3)}
        for variant in columns:
            print(f"[tasks] {task} / {variant}: {args.steps} steps ...", flush=True)
            t0 = time.time()
            coded = variant in VARIANTS and VARIANTS[variant].coded
            if coded not in sets:  # the position-coded images, built once per task
                rows = task_rows(task, args.rows, "train", args.seed, coded=True)
                sets[coded] = (records_of(rows, "train", args.seed), heldout_records(task, args, coded=True))
            train, heldout = sets[coded]
            if variant in VARIANTS:
                model, processor = build(variant, args.seed)
            else:
                steps, lr = warmups[columns.index(variant) - len(args.variants)]
                with tempfile.TemporaryDirectory() as tmp:
                    model, processor = warmed_default(train_rows, steps, lr, args.seed, Path(tmp))
            results[task][variant] = cell = train_and_score(
                model, processor, train, heldout, args, WINDOW, PIXELS, t0
            )
            print(f"  held-out exact accuracy {cell['heldout']:.3f} (chance {chance:.3f})", flush=True)
            write_results(args.results, args, WINDOW, results)  # after every cell: a stopped run keeps it

    print_table("task", results, columns, args)


if __name__ == "__main__":
    main()
