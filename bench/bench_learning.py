"""The toy-scale learning run (issue 6), end to end, for several seeds.

Run: .venv/bin/python bench/bench_learning.py [--seeds 0 1 2] [--out artifacts/bench-learning]
     [--config jobs/tiny_cpu_all_families.yaml] [--eval-every 20] [--init hf|fan_in] [--warmup-steps 500]
     [--warmup-lr 5e-3] [--rope-theta 1e6] [--warmup-reasoning template|grounded] [--warm-model DIR]
     [--question-types size ...] [--cvbench-tasks Depth ...]
     [-- extra.train=overrides ...]

The defaults are the FIRST embedded default (all four families, template warm-up, its job file), so
the README's earlier measured runs stay reproducible; the README gives the options that reproduce
the current embedded default (jobs/tiny_cpu.yaml, Depth) from the quickstart's start model.

Per seed, through the project's own commands (so this is exactly what a user runs):
  make-tiny-model --seed S -> warmup --seed S (format, random answers) -> train with data.seed=S,
  (or, with --warm-model DIR, one given start model for every seed: then only `train` runs per seed),
  evaluating the held-out synthetic CV-Bench set before step 1, every --eval-every steps and at the end.
The synthetic data is built once (seed 0) and shared; --question-types / --cvbench-tasks narrow it
to some families (a focused run; an --out that already has data keeps it, so use a fresh --out per
family choice). Prints a table of start/end held-out accuracy, format and accuracy rewards and wall
times, the mean and spread over seeds, writes bench/results/learning.json and one PNG per seed (the
`plot` command) next to the run logs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from visualthinker_ray.tracking import read_scalars

ROOT = Path(__file__).resolve().parents[1]


def sh(args: list[str], log_file: Path) -> float:
    """Run one project command, its output appended to log_file; seconds taken. Raises on failure."""
    t0 = time.perf_counter()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as f:
        f.write(f"$ {' '.join(args)}\n")
        f.flush()
        done = subprocess.run(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"`{' '.join(args)}` failed (exit {done.returncode}); see {log_file}")
    return time.perf_counter() - t0


def first_last(scalars: dict, tag: str, window: int = 1) -> tuple[float, float]:
    """Mean of the first and of the last `window` logged values of a tag (nan if not logged)."""
    values = [v for _, v in scalars.get(tag, [])]
    if not values:
        return float("nan"), float("nan")
    w = min(window, len(values))
    return statistics.fmean(values[:w]), statistics.fmean(values[-w:])


def chance_of(data_dir: Path) -> float:
    """Expected accuracy of a uniform random option on the held-out set."""
    from visualthinker_ray.data.cvbench import load_cvbench

    records = load_cvbench(str(data_dir / "CV-Bench")).records
    return statistics.fmean(1.0 / len(r.choices) for r in records)


def start_settings(args) -> dict:
    """How the start model was made: the bench's own options, or a given model's warmup.json."""
    if not args.warm_model:
        keys = ("init", "rope_theta", "warmup_steps", "warmup_lr", "warmup_reasoning")
        return {k: getattr(args, k) for k in keys}
    record = Path(args.warm_model) / "warmup.json"
    settings = json.loads(record.read_text()).get("settings") if record.exists() else None
    return {"warm_model": args.warm_model, "warmup_settings": settings}


def run_seed(seed: int, args, data_dir: Path, py: str) -> dict:
    out = Path(args.out) / f"seed_{seed}"
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "commands.log"
    vtr = [py, "-m", "visualthinker_ray"]
    warm_model, t_model, t_warm = out / "warm-model", 0.0, 0.0
    if args.warm_model:  # one start model for every seed: the seeds vary the RL run only
        warm_model = Path(args.warm_model)
    else:
        t_model = sh(
            [*vtr, "make-tiny-model", "--out", str(out / "tiny-model"), "--seed", str(seed),
             "--init", args.init, "--rope-theta", str(args.rope_theta)],
            log_file,
        )  # fmt: skip
        t_warm = sh(
            [*vtr, "warmup", "--model", str(out / "tiny-model"), "--data", str(data_dir / "SAT"),
             "--out", str(warm_model), "--seed", str(seed), "--log-every", "100",
             "--steps", str(args.warmup_steps), "--lr", str(args.warmup_lr),
             "--reasoning", args.warmup_reasoning],
            log_file,
        )  # fmt: skip
    run_dir = out / "run"
    t_train = sh(
        [*vtr, "train", "--config", args.config,
         f"model.path={warm_model}", f"data.train={data_dir / 'SAT'}",
         f"data.eval={data_dir / 'CV-Bench'}", f"data.seed={seed}", f"logging.dir={run_dir}",
         f"eval.every={args.eval_every}", *args.overrides],
        log_file,
    )  # fmt: skip
    sh([*vtr, "plot", "--logdir", str(run_dir), "--out", str(out / "training.png")], log_file)
    s = read_scalars(run_dir)
    acc0, acc1 = first_last(s, "eval/accuracy/overall")
    fmt0, fmt1 = first_last(s, "reward/format", window=10)
    racc0, racc1 = first_last(s, "reward/accuracy", window=10)
    per_task = {
        tag.split("/", 2)[-1]: first_last(s, tag)
        for tag in s
        if tag.startswith("eval/accuracy/") and tag != "eval/accuracy/overall"
    }
    return {
        "seed": seed,
        "steps": max((st for st, _ in s.get("reward/total", [])), default=0),
        "eval_start": acc0,
        "eval_end": acc1,
        "eval_by_task": per_task,
        "format_start": fmt0,
        "format_end": fmt1,
        "train_acc_start": racc0,
        "train_acc_end": racc1,
        "model_s": round(t_model, 1),
        "warmup_s": round(t_warm, 1),
        "train_s": round(t_train, 1),
        "total_s": round(t_model + t_warm + t_train, 1),
        "plot": str(out / "training.png"),
    }


def mean_sd(values: list[float], fmt: str = ".3f") -> str:
    if len(values) < 2:
        return f"{values[0]:{fmt}}"
    return f"{statistics.fmean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="artifacts/bench-learning")
    p.add_argument("--config", default="jobs/tiny_cpu_all_families.yaml")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--train-rows", type=int, default=512)
    p.add_argument("--test-rows", type=int, default=128)
    p.add_argument("--init", choices=("hf", "fan_in"), default="hf", help="make-tiny-model --init")
    p.add_argument("--warmup-steps", type=int, default=500, help="warmup --steps")
    p.add_argument("--warmup-lr", type=float, default=5e-3, help="warmup --lr")
    p.add_argument("--rope-theta", type=float, default=1e6, help="make-tiny-model --rope-theta")
    p.add_argument("--warmup-reasoning", choices=("template", "grounded"), default="template",
                   help="warmup --reasoning")  # fmt: skip
    p.add_argument("--warm-model", help="an existing start model for every seed (skips model and warm-up)")
    p.add_argument("--question-types", nargs="+", help="make-synthetic --question-types (default: all)")
    p.add_argument("--cvbench-tasks", nargs="+", help="make-synthetic --cvbench-tasks (default: all)")
    p.add_argument("--same-shape-sizes", action="store_true", help="make-synthetic --same-shape-sizes")
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "learning.json"))
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for `train` (after --)")
    args = p.parse_args()
    py = sys.executable
    data_dir = Path(args.out) / "data"
    t0 = time.perf_counter()
    if not (data_dir / "SAT" / "SAT_train.parquet").exists():
        families = [*(["--question-types", *args.question_types] if args.question_types else []),
                    *(["--cvbench-tasks", *args.cvbench_tasks] if args.cvbench_tasks else []),
                    *(["--same-shape-sizes"] if args.same_shape_sizes else [])]  # fmt: skip
        sh(
            [py, "-m", "visualthinker_ray", "make-synthetic", "--out", str(data_dir),
             "--train", str(args.train_rows), "--test", str(args.test_rows), "--seed", "0", *families],
            Path(args.out) / "data.log",
        )  # fmt: skip
    chance = chance_of(data_dir)
    rows = []
    for seed in args.seeds:
        print(f"[bench-learning] seed {seed}: model, warm-up, training ...", flush=True)
        rows.append(run_seed(seed, args, data_dir, py))
        r = rows[-1]
        print(
            f"[bench-learning] seed {seed}: held-out {r['eval_start']:.3f} -> {r['eval_end']:.3f} "
            f"in {r['total_s']:.0f} s",
            flush=True,
        )

    print(
        f"\nheld-out synthetic CV-Bench, chance {chance:.3f}; config {args.config} {' '.join(args.overrides)}"
    )
    head = (
        "| seed | steps | held-out start | held-out end | format start→end | train acc start→end | total s |"
    )
    print(head)
    print("|" + "---|" * 7)
    for r in rows:
        print(
            f"| {r['seed']} | {r['steps']} | {r['eval_start']:.3f} | {r['eval_end']:.3f} | "
            f"{r['format_start']:.2f}→{r['format_end']:.2f} | "
            f"{r['train_acc_start']:.2f}→{r['train_acc_end']:.2f} | {r['total_s']:.0f} |"
        )
    summary = {
        "eval_start": mean_sd([r["eval_start"] for r in rows]),
        "eval_end": mean_sd([r["eval_end"] for r in rows]),
        "gain_over_chance_end": mean_sd([r["eval_end"] - chance for r in rows]),
        "total_s": mean_sd([r["total_s"] for r in rows], ".0f"),
    }
    print(
        f"| mean ± sd | | {summary['eval_start']} | {summary['eval_end']} | | | {summary['total_s']} |\n"
        f"end minus chance: {summary['gain_over_chance_end']} (target: >= 0.25)"
    )
    result = {
        "bench": "learning",
        "config": args.config,
        "overrides": args.overrides,
        "start": start_settings(args),
        "rows": {"train": args.train_rows, "test": args.test_rows},
        "families": {
            "question_types": args.question_types,
            "cvbench_tasks": args.cvbench_tasks,
            "same_shape_sizes": args.same_shape_sizes,
        },
        "chance": chance,
        "seeds": rows,
        "summary": summary,
        "wall_s": round(time.perf_counter() - t0, 1),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "command": " ".join(sys.argv),
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2))
    print(f"results written to {args.results}")


if __name__ == "__main__":
    main()
