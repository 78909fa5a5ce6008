"""Which held-out task families can the tiny model learn at all? Gold answers, per CV-Bench task.

Run: .venv/bin/python bench/bench_task_learnability.py [--steps 1500] [--tasks Depth Count ...]
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
from pathlib import Path

import torch
from gold_training import print_table, train_and_score, write_results
from transformers import Qwen2VLForConditionalGeneration

from visualthinker_ray.data.sat import sat_record
from visualthinker_ray.data.synthetic import make_cvbench_question, sat_row
from visualthinker_ray.models import build_processor, build_tiny_tokenizer, fan_in_init_, tiny_model_config

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("Depth", "Count", "Relation", "Distance")
VARIANTS = {"default": 2, "one_token": 8}  # name -> spatial merge size
IMAGE_SIZE = 112
PIXELS = (IMAGE_SIZE * IMAGE_SIZE, IMAGE_SIZE * IMAGE_SIZE)  # every image exactly 112 x 112
WINDOW = 250


def build(variant: str, seed: int):
    """An in-memory fan-in tiny Qwen2-VL and its processor for a variant."""
    merge = VARIANTS[variant]
    tok = build_tiny_tokenizer()
    processor = build_processor(tok, *PIXELS, merge_size=merge)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(tiny_model_config(tok, spatial_merge_size=merge))
    return fan_in_init_(model), processor


def task_rows(task: str, n: int, split: str, seed: int) -> list[dict]:
    """n SAT rows of one CV-Bench task (CV-Bench wording, SAT columns)."""
    rngs = (random.Random(f"bench-tasks/{seed}/{split}/{task}/{i}") for i in range(n))
    return [sat_row(make_cvbench_question(rng, task, IMAGE_SIZE)) for rng in rngs]


def records_of(rows: list[dict], split: str, seed: int) -> list:
    return [sat_record(row, i, split, seed=seed) for i, row in enumerate(rows)]


def warmed_default(rows: list[dict], steps: int, lr: float, seed: int, tmp: Path):
    """The default variant after the project's format warm-up (random answers) on these rows."""
    from visualthinker_ray.data.synthetic import sat_features, write_parquet
    from visualthinker_ray.models import load_model
    from visualthinker_ray.warmup import warmup

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
    p.add_argument("--variants", nargs="*", choices=sorted(VARIANTS), default=sorted(VARIANTS))
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
        train = records_of(train_rows, "train", args.seed)
        heldout = records_of(task_rows(task, args.heldout, "heldout", args.seed), "heldout", args.seed)
        chance = statistics.fmean(1 / len(r.choices) for r in heldout)
        results[task] = {"chance": round(chance, 3)}
        for variant in columns:
            print(f"[tasks] {task} / {variant}: {args.steps} steps ...", flush=True)
            t0 = time.time()
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

    print_table("task", results, columns, args)
    write_results(args.results, args, WINDOW, results)


if __name__ == "__main__":
    main()
