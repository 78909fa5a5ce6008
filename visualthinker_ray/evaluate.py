"""CV-Bench evaluation through the rollout workers: greedy decoding, the reference scoring.

Scoring (the reference run's): parse the first <answer>...</answer> (else the whole response); correct if it
is the gold letter ("A", "(A)", any case) or the gold choice text. Reported: accuracy per task and
per source, the overall micro average over rows (as the paper), and the official CV-Bench score
((ADE20K + COCO) / 2 + Omni3D) / 2.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

from visualthinker_ray.config import Config
from visualthinker_ray.data.records import LETTERS, PromptRecord
from visualthinker_ray.rewards import extract_answer, normalize_answer
from visualthinker_ray.rollout.engine import SamplingSpec

log = logging.getLogger(__name__)


def cvbench_correct(completion: str, gold: str, choices: list[str]) -> bool:
    answer = normalize_answer(extract_answer(completion))
    if not answer:
        return False
    if gold in choices:
        letter = LETTERS[choices.index(gold)].casefold()
        if answer in (letter, f"({letter})"):
            return True
    return answer == normalize_answer(gold)


def score_rows(rows: list[dict]) -> dict[str, float]:
    """rows: {"task", "source", "correct"}; accuracies per task and source, micro overall, official."""
    if not rows:
        return {}
    by_task: dict[str, list[bool]] = defaultdict(list)
    by_source: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r["correct"])
        by_source[r["source"]].append(r["correct"])
    out = {f"accuracy/{t}": sum(v) / len(v) for t, v in sorted(by_task.items())}
    out.update({f"source_accuracy/{s}": sum(v) / len(v) for s, v in sorted(by_source.items())})
    out["accuracy/overall"] = sum(r["correct"] for r in rows) / len(rows)
    src = {s: sum(v) / len(v) for s, v in by_source.items()}
    if all(s in src for s in ("ADE20K", "COCO", "Omni3D")):
        out["cvbench_score"] = ((src["ADE20K"] + src["COCO"]) / 2 + src["Omni3D"]) / 2
    return out


def load_eval_records(cfg: Config, source: str | None = None) -> list[PromptRecord]:
    from visualthinker_ray.data.cvbench import load_cvbench

    limit = cfg.eval.limit
    return load_cvbench(source or cfg.data.eval, limit=limit).records


def evaluate_records(rollout_pool, records: list[PromptRecord], cfg: Config) -> dict:
    sampling = SamplingSpec(n=1, temperature=0.0, max_new_tokens=cfg.rollout.eval_max_new_tokens)
    completions, _ = rollout_pool.generate(records, sampling)
    by_id = {r.id: r for r in records}
    rows = []
    for c in completions:
        rec = by_id[c.prompt_id]
        rows.append(
            {
                "id": rec.id,
                "task": rec.question_type,
                "source": rec.source,
                "gold": rec.gold,
                "response": c.text,
                "correct": cvbench_correct(c.text, rec.gold, list(rec.choices)),
            }
        )
    return {"scalars": score_rows(rows), "rows": rows}


def format_progress(evaluations: list[tuple[int, dict[str, float]]]) -> str:
    """The held-out accuracy at each evaluated step (overall, then per task) as a small table, with
    the change from the first evaluation to the last."""
    if not evaluations:
        return "no held-out evaluation was run (eval.at_start / eval.every / eval.at_end)"
    tasks = sorted(
        {k for _, s in evaluations for k in s if k.startswith("accuracy/") and k != "accuracy/overall"}
    )
    cols = ["accuracy/overall", *tasks]
    names = [c.split("/", 1)[1] for c in cols]
    lines = ["held-out accuracy", f"{'step':>6}" + "".join(f"{n:>10}" for n in names)]
    for step, s in evaluations:
        lines.append(f"{step:>6}" + "".join(f"{s[c]:>10.3f}" if c in s else f"{'-':>10}" for c in cols))
    (first, a), (last, b) = evaluations[0], evaluations[-1]
    if len(evaluations) > 1 and "accuracy/overall" in a and "accuracy/overall" in b:
        delta = 100 * (b["accuracy/overall"] - a["accuracy/overall"])
        lines.append(f"step {first} -> {last}: {delta:+.1f} points overall")
    return "\n".join(lines)


def format_report(scalars: dict[str, float], n: int) -> str:
    lines = [f"CV-Bench evaluation over {n} rows", f"{'metric':<32}{'value':>8}", "-" * 40]
    lines += [f"{k:<32}{v:>8.2%}" for k, v in scalars.items()]
    return "\n".join(lines)


def run_eval(cfg: Config, model: str, data: str, out: str | None = None) -> dict:
    from visualthinker_ray.ray_calls import connect_ray
    from visualthinker_ray.rollout.pool import RolloutPool

    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": model})})
    records = load_eval_records(cfg, data)
    connect_ray(cfg)
    pool = RolloutPool.from_config(cfg)
    try:
        result = evaluate_records(pool, records, cfg)
    finally:
        pool.shutdown()
    print(format_report(result["scalars"], len(records)))
    out_path = Path(out) if out else Path(cfg.logging.dir) / "cvbench_eval.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"model": model, "data": data, **result}, indent=2))
    print(f"\nper-row results written to {out_path}")
    return result
