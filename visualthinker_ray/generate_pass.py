"""A graded generation pass: load prompts, generate G completions each, grade, print a table.

A quick end-to-end check of data -> prompt -> engine -> rewards, without training.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import torch

from visualthinker_ray.config import Config
from visualthinker_ray.data.sat import load_train_records
from visualthinker_ray.rewards import reward_fns_from_config, score_completion
from visualthinker_ray.rollout.engine import SamplingSpec
from visualthinker_ray.rollout.factory import engine_kwargs, make_engine

log = logging.getLogger(__name__)


def summarize(rows: list[dict]) -> list[dict]:
    """Per question type and overall: prompts, completions, mean rewards, length, truncated share."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["question_type"]].append(r)
    out = []
    for name, items in sorted(groups.items()) + [("ALL", rows)]:
        n = len(items)
        out.append(
            {
                "question_type": name,
                "prompts": len({r["prompt_id"] for r in items}),
                "completions": n,
                "format": sum(r["format"] for r in items) / n,
                "accuracy": sum(r["accuracy"] for r in items) / n,
                "total": sum(r["total"] for r in items) / n,
                "mean_len": sum(r["length"] for r in items) / n,
                "truncated": sum(r["truncated"] for r in items) / n,
            }
        )
    return out


def format_table(summary: list[dict]) -> str:
    header = f"{'question_type':<16}{'prompts':>8}{'compl.':>8}{'format':>8}{'acc.':>8}{'reward':>8}{'len':>7}{'trunc.':>8}"
    lines = [header, "-" * len(header)]
    for s in summary:
        lines.append(
            f"{s['question_type']:<16}{s['prompts']:>8}{s['completions']:>8}{s['format']:>8.3f}{s['accuracy']:>8.3f}"
            f"{s['total']:>8.3f}{s['mean_len']:>7.1f}{s['truncated']:>8.1%}"
        )
    return "\n".join(lines)


def run_generation_pass(cfg: Config, num_prompts: int = 16, show_samples: int = 2) -> list[dict]:
    data = load_train_records(cfg)
    records = data.records[:num_prompts]
    log.info("loaded %d prompts from %s (%d rows read)", len(records), cfg.data.train, data.rows_read)
    t0 = time.time()
    engine = make_engine(cfg.rollout.engine, cfg.model.path, **engine_kwargs(cfg))
    log.info("%s engine ready in %.1f s", cfg.rollout.engine, time.time() - t0)
    sampling = SamplingSpec(
        n=cfg.algorithm.group_size,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        max_new_tokens=cfg.rollout.max_new_tokens,
        stop=tuple(cfg.rollout.stop),
        seed=cfg.data.seed,
    )
    t0 = time.time()
    completions = engine.generate(records, sampling)
    gen_s = time.time() - t0
    by_id = {r.id: r for r in records}
    reward_fns = reward_fns_from_config(cfg.reward)
    rows = []
    for c in completions:
        rec = by_id[c.prompt_id]
        scores = score_completion(c.text, rec.gold, list(rec.choices), reward_fns)
        rows.append(
            {
                "prompt_id": c.prompt_id,
                "question_type": rec.question_type,
                "length": len(c.token_ids),
                "truncated": c.finish_reason == "length",
                **scores,
            }
        )
    n_tokens = sum(len(c.token_ids) for c in completions)
    print(format_table(summarize(rows)))
    print(
        f"\n{len(completions)} completions, {n_tokens} tokens in {gen_s:.2f} s "
        f"({n_tokens / max(gen_s, 1e-9):.0f} tokens/s, engine={cfg.rollout.engine}, "
        f"torch threads={torch.get_num_threads()})"
    )
    for c in completions[:show_samples]:
        print(f"\n--- {c.prompt_id} sample {c.sample_index} ({c.finish_reason}) ---\n{c.text}")
    return rows
