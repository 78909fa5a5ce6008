"""How fast can the tiny model learn to see? HF init vs fan-in init (make-tiny-model --init).

Run: .venv/bin/python docs/experiments/bench_init.py [--steps 800] [--seed 0]

The simplest perception readout there is: one object on a plain background, "What color is the
object?" with three colour options, in the exact SAT training prompt (R1-Zero template, 112 px
image, 16 vision tokens). Each init trains the same tiny model (same seed, same batches) with the
warm-up's supervised loss on the GOLD answer, and reports the share of batches whose whole
completion (format and answer) is predicted exactly, per 100-step window. With the format
learned, guessing scores 1/6 (any of the six colours) to 1/3 (one of the three options). Prints a
table and writes bench/results/init.json.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from gold_training import train_curve, write_results  # bench/ is on sys.path when a bench script runs

from visualthinker_ray.config import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from visualthinker_ray.data.sat import sat_record
from visualthinker_ray.models import load_model, load_processor
from visualthinker_ray.toy.synthetic import make_one_object_color_question, sat_row
from visualthinker_ray.toy.tiny_model import INITS, make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
WINDOW = 100


def color_records(n: int, seed: int) -> list:
    questions = [make_one_object_color_question(random.Random(f"bench-init/{seed}/{i}")) for i in range(n)]
    return [sat_record(sat_row(q), i, "train", seed=seed) for i, q in enumerate(questions)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "init.json"))
    args = p.parse_args()
    if args.steps < WINDOW:
        p.error(f"--steps must be at least {WINDOW}")

    records = color_records(args.rows, args.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for init in INITS:
            print(f"[bench_init] init={init}: {args.steps} steps ...", flush=True)
            model_dir = str(make_tiny_model(Path(tmp) / init, seed=args.seed, init=init))
            t0 = time.time()
            processor = load_processor(model_dir, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
            torch.manual_seed(args.seed)
            curve = train_curve(
                load_model(model_dir), processor, records, args.steps, args.lr, args.batch_size,
                args.seed, WINDOW, (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS),
            )  # fmt: skip
            results[init] = {"curve": curve, "seconds": round(time.time() - t0, 1)}

    ends = [f"{(i + 1) * WINDOW}" for i in range(args.steps // WINDOW)]
    print("\nexact-completion accuracy (format + answer) per 100-step window; guessing: 1/6 to 1/3")
    print("| init | " + " | ".join(ends) + " | seconds |")
    print("|---|" + "---|" * (len(ends) + 1))
    for init, r in results.items():
        print(f"| {init} | " + " | ".join(f"{a:.2f}" for a in r["curve"]) + f" | {r['seconds']} |")
    write_results(args.results, args, WINDOW, results)


if __name__ == "__main__":
    main()
