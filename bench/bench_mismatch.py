"""Engine against learner on the default work, float32 against bf16: how far apart the two sides'
log-probs are, on the trained tokens and on the sync alarm's probe, and what the importance weights do.

Run: .venv/bin/python bench/bench_mismatch.py [--steps 4] [--out /tmp/bench-mismatch]
     [--dtypes float32 bfloat16] [--modes 0 1] [--results bench/results/mismatch.json]

Per (dtype, max_staleness) it runs `train` (the user's command) on jobs/tiny_cpu.yaml from the
shipped start model for --steps steps on freshly made synthetic data (the default's families), with
the probe after every sync, then reads the run's TensorBoard scalars:
  - trained tokens, same weights (fresh items): learner/logprob_mismatch (mean), _p99, _max;
  - trained tokens, engine vs proximal policy (every item, staleness included): learner/engine_abs_log_ratio,
    learner/engine_kl_k3;
  - the probe: sync/probe_mismatch_mean, _max;
  - importance weights pi_proximal / pi_engine: learner/is_weight_mean, _max, _min, is_truncated_frac.
Values are averaged over the steps (max: the largest). Prints a table, writes --results.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

from bench_learning import sh as run  # one project command, logged and timed

from visualthinker_ray.tracking import read_scalars

ROOT = Path(__file__).resolve().parents[1]
START_MODEL = ROOT / "start_models" / "tiny-depth-v1"
COLUMNS = (
    ("learner/logprob_mismatch", "mean"),
    ("learner/logprob_mismatch_p99", "mean"),
    ("learner/logprob_mismatch_max", "max"),
    ("learner/engine_abs_log_ratio", "mean"),
    ("learner/engine_kl_k3", "mean"),
    ("sync/probe_mismatch_mean", "mean"),
    ("sync/probe_mismatch_max", "max"),
    ("learner/is_weight_mean", "mean"),
    ("learner/is_weight_max", "max"),
    ("learner/is_weight_min", "min"),
    ("learner/is_truncated_frac", "mean"),
)


def summarise(scalars: dict, steps_from: int) -> dict[str, float]:
    out = {}
    for tag, how in COLUMNS:
        values = [v for s, v in scalars.get(tag, []) if s >= steps_from]
        if values:
            out[tag] = {"mean": statistics.fmean, "max": max, "min": min}[how](values)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--modes", type=int, nargs="+", default=[0, 1], help="algorithm.max_staleness values")
    ap.add_argument("--out", default="/tmp/bench-mismatch")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "mismatch.json"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    py, vtr = sys.executable, [sys.executable, "-m", "visualthinker_ray"]
    data = out / "data"
    if not (data / "SAT").exists():
        run([*vtr, "make-synthetic", "--out", str(data), "--train", "256", "--test", "32",
             "--question-types", "depth", "--cvbench-tasks", "Depth", "--same-shape-sizes"], log)  # fmt: skip
    rows = []
    for dtype in args.dtypes:
        for k in args.modes:
            run_dir = out / f"{dtype}_k{k}"
            seconds = run(
                [*vtr, "train", "--config", "jobs/tiny_cpu.yaml", f"model.path={START_MODEL}",
                 f"data.train={data / 'SAT'}", f"data.eval={data / 'CV-Bench'}", f"logging.dir={run_dir}",
                 f"model.dtype={dtype}", f"algorithm.max_staleness={k}", f"algorithm.max_steps={args.steps}",
                 "logging.probe_every=1", "eval.at_start=false", "eval.at_end=false",
                 f"checkpoint.every={args.steps}"],
                log,
            )  # fmt: skip
            # step 1 of a pipelined run is on-policy; its later steps show staleness on top of numerics
            rows.append({"dtype": dtype, "max_staleness": k, "train_s": round(seconds, 1),
                         **summarise(read_scalars(run_dir), 1)})  # fmt: skip
    short = {tag: tag.split("/", 1)[1].replace("logprob_mismatch", "mm") for tag, _ in COLUMNS}
    header = ["dtype", "k"] + [short[t] for t, _ in COLUMNS]
    print("  ".join(f"{h:>14}" for h in header))
    for r in rows:
        cells = [r["dtype"], str(r["max_staleness"])] + [f"{r.get(t, float('nan')):.3g}" for t, _ in COLUMNS]
        print("  ".join(f"{c:>14}" for c in cells))
    Path(args.results).write_text(
        json.dumps(
            {
                "command": " ".join([py, *sys.argv]),
                "platform": platform.platform(),
                "steps": args.steps,
                "rows": rows,
            },
            indent=2,
        )  # fmt: skip
        + "\n"
    )
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
