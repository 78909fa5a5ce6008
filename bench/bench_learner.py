"""Learner throughput and memory: one GRPO train step on the tiny model at world size 1 and 2,
and at world size 1 with more torch threads per rank (`learner.cpu_threads`).

Run: .venv/bin/python bench/bench_learner.py [--prompts 8] [--group 8] [--tokens 64] [--steps 3]
     [--cpu-threads 2]
Prints a table and writes bench/results/learner.json. Every row runs in one invocation, so compare
the ratios, not absolute times (they depend on the machine; CI machines have 2 cores, so 2 ranks
share them, and 2 threads of one rank take both).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import ray

from visualthinker_ray.batches import TrainItem
from visualthinker_ray.config import load_config
from visualthinker_ray.data.sat import load_sat
from visualthinker_ray.learner.group import LearnerGroup
from visualthinker_ray.models import VISION_SPECIAL_TOKENS, load_processor
from visualthinker_ray.sequences import encode_prompt
from visualthinker_ray.toy.synthetic import make_synthetic
from visualthinker_ray.toy.tiny_model import make_tiny_model


def make_items(model_dir, data_dir, prompts, group, tokens, cfg):
    records = load_sat(str(data_dir / "SAT"), split="train", seed=0).records[:prompts]
    proc = load_processor(model_dir, cfg.model.min_pixels, cfg.model.max_pixels)
    banned = {proc.tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS}
    vocab = [i for i in range(len(proc.tokenizer)) if i not in banned]
    rng = random.Random(0)
    items = []
    for rec in records:
        plen = len(encode_prompt(proc, rec, cfg.model.min_pixels, cfg.model.max_pixels).input_ids)
        for _ in range(group):
            items.append(
                TrainItem(
                    record=rec,
                    token_ids=[rng.choice(vocab) for _ in range(tokens)],
                    advantage=rng.uniform(-1, 1),
                    prompt_len=plen,
                )
            )
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64, help="completion tokens per sequence")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--cpu-threads", type=int, nargs="*", default=[2], help="extra world-1 rows")
    ap.add_argument("--out", default="bench/results/learner.json")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-learner-"))
    model_dir = str(make_tiny_model(tmp / "model", seed=0))
    make_synthetic(tmp / "data", n_train=args.prompts * 2, n_test=8, seed=0)
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    setups = [(1, None), (2, None), *((1, t) for t in args.cpu_threads)]
    groups, items = [], None
    for world, threads in setups:
        cfg = load_config(
            None,
            [
                f"model.path={model_dir}",
                f"learner.num_workers={world}",
                "learner.micro_batch_tokens=4096",
                f"learner.cpu_threads={threads if threads else 'null'}",
                "algorithm.tis_cap=null",  # synthetic items: no engine log-probs to weight by
            ],
        )
        items = items or make_items(model_dir, tmp / "data", args.prompts, args.group, args.tokens, cfg)
        group = LearnerGroup(cfg, total_optimizer_steps=args.steps + 1)
        group.train_step(items)  # warm-up
        groups.append(group)
    # Interleaved: one step of each set-up per round, so a machine that slows down for a while
    # (shared cores) slows every set-up alike instead of whichever happened to run then.
    times = [[] for _ in groups]
    mems = [[] for _ in groups]
    tokens = 0
    for _ in range(args.steps):
        for k, group in enumerate(groups):
            t0 = time.perf_counter()
            m = group.train_step(items)
            times[k].append(time.perf_counter() - t0)
            mems[k].append(m["peak_mem_gb"])
            tokens = m["tokens"]
    rows = []
    for (world, _), group, ts, ms in zip(setups, groups, times, mems, strict=True):
        step = statistics.median(ts)
        rows.append(
            {
                "world_size": world,
                "torch_threads": group.rank_info[0]["torch_threads"],
                "sequences": len(items),
                "tokens_per_step": tokens,
                "step_s_median": round(step, 3),
                "tokens_per_s": round(tokens / step, 1),
                "peak_rss_gb_per_rank": round(max(ms), 3),
            }
        )
        group.shutdown()
    ray.shutdown()
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["throughput_vs_world1_one_thread"] = round(r["tokens_per_s"] / base, 3)
    header = f"{'world':>5} {'threads':>7} {'seqs':>5} {'tokens/step':>11} {'step s':>8} {'tokens/s':>9} {'vs w=1':>7} {'peak GB/rank':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['world_size']:>5} {r['torch_threads']:>7} {r['sequences']:>5} {r['tokens_per_step']:>11} {r['step_s_median']:>8.3f} "
            f"{r['tokens_per_s']:>9.1f} {r['throughput_vs_world1_one_thread']:>7.2f} {r['peak_rss_gb_per_rank']:>12.3f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "args": vars(args),
        "cpu_count": __import__("os").cpu_count(),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
