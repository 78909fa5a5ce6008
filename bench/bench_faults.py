"""A training run under faults against the same run without them, side by side in one invocation.

Run: .venv/bin/python bench/bench_faults.py [--config jobs/tiny_cpu.yaml] [--max-steps 480]
     [--eval-limit N] [--out artifacts/bench-faults] [--results bench/results/faults.json]
     [-- extra.key=value ...]

The faulty run gets, spread over its steps (tests/fault_injection.py does each for real: SIGKILL,
SIGSTOP, the `scale` command): five rollout faults in different phases (two workers killed while
they generate, a vLLM engine-core process killed, a worker stopped, a worker killed as a weight sync
starts), one grader killed, one scale-up to two rollout workers and one scale-down to one. Reported
per run: the steps trained and lost (goal: none lost), wall time, the extra wall time per fault,
held-out accuracy before and after, and the fault counters the run logged. The data build and the
start model are the quickstart's (scripts/build_artifacts.sh).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' fault injector

from tests.fault_injection import FaultyTrainer  # noqa: E402
from visualthinker_ray.config import load_config  # noqa: E402
from visualthinker_ray.tracking import read_scalars  # noqa: E402

# Where each fault lands, as a fraction of the run (the scale-up precedes a fault on two workers).
SCHEDULE = [
    (0.10, "kill_generating"),
    (0.20, "kill_grader"),
    (0.25, "scale:2"),
    (0.35, "kill_engine"),
    (0.45, "stop_generating"),
    (0.55, "kill_at_sync"),
    (0.65, "scale:1"),
    (0.80, "kill_generating"),
]


def schedule_for(steps: int) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for frac, fault in SCHEDULE:
        out.setdefault(max(2, round(frac * steps)), []).append(fault)
    return out


def run(name: str, args, overrides: list[str], schedule: dict[int, list[str]]) -> dict:
    log_dir = Path(args.out) / name
    cfg = load_config(
        args.config,
        [
            *overrides,
            f"logging.dir={log_dir}",
            f"resources.job_name=bench-faults-{name}",
            "rollout.max_restarts=10",  # five injected, with room: the run must not stop on them
            "rollout.hang_timeout_s=30",
            *([f"algorithm.max_steps={args.max_steps}"] if args.max_steps else []),
            *([f"eval.limit={args.eval_limit}"] if args.eval_limit else []),
        ],
    )
    print(f"[bench-faults] {name}: {sum(map(len, schedule.values()))} faults at steps {sorted(schedule)}")
    t0 = time.perf_counter()
    trainer = FaultyTrainer(cfg, schedule)
    try:
        trainer.fit()
    finally:
        trainer.shutdown()
    wall = time.perf_counter() - t0
    steps = [json.loads(line)["step"] for line in (log_dir / "steps.jsonl").read_text().splitlines()]
    scalars = {k: [v for _, v in series] for k, series in read_scalars(log_dir).items()}
    evals = [(step, s.get("accuracy/overall", float("nan"))) for step, s in trainer.evaluations]
    return {
        "name": name,
        "steps_expected": trainer.total_steps,
        "steps_trained": len(set(steps)),
        "steps_lost": len(set(range(1, trainer.total_steps + 1)) - set(steps)),
        "wall_s": round(wall, 1),
        "eval_start": evals[0][1] if evals else None,
        "eval_end": evals[-1][1] if evals else None,
        "evaluations": evals,
        "rollout_replaced": scalars.get("faults/rollout_replaced", [0])[-1],
        "grader_restarts": scalars.get("faults/grader_restarts", [0])[-1],
        "pool_size_max": max(scalars.get("rollout/pool_size", [1])),
        "injected": trainer.injected,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "jobs/tiny_cpu.yaml"))
    p.add_argument("--max-steps", type=int, help="shorter runs than the job's (same schedule, scaled)")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N held-out rows")
    p.add_argument("--out", default="artifacts/bench-faults")
    p.add_argument("--results", default=str(ROOT / "bench/results/faults.json"))
    p.add_argument("overrides", nargs="*", help="extra config overrides (after --)")
    args = p.parse_args()

    steps = args.max_steps or load_config(args.config, args.overrides).algorithm.max_steps
    schedule = schedule_for(steps)
    rows = [run("clean", args, args.overrides, {}), run("faulty", args, args.overrides, schedule)]
    clean, faulty = rows
    faults = sum(1 for _, f in faulty["injected"] if not f.startswith("scale"))
    extra = (faulty["wall_s"] - clean["wall_s"]) / max(1, faults)

    print(f"\n{'run':<8} {'steps':>7} {'lost':>5} {'wall s':>8} {'held-out start -> end':>22} "
          f"{'replaced':>9} {'grader':>7} {'pool max':>9}")  # fmt: skip
    for r in rows:
        print(f"{r['name']:<8} {r['steps_trained']:>7} {r['steps_lost']:>5} {r['wall_s']:>8.0f} "
              f"{r['eval_start']:>10.3f} -> {r['eval_end']:<9.3f} {r['rollout_replaced']:>9.0f} "
              f"{r['grader_restarts']:>7.0f} {r['pool_size_max']:>9.0f}")  # fmt: skip
    print(f"\n{faults} faults (+2 resizes): {extra:+.1f} s of wall time per fault; held-out accuracy "
          f"{faulty['eval_end'] - clean['eval_end']:+.3f} against the clean run")  # fmt: skip

    out = {
        "bench": "faults",
        "config": args.config,
        "overrides": args.overrides,
        "max_steps": steps,
        "eval_limit": args.eval_limit,
        "schedule": {str(k): v for k, v in schedule.items()},
        "runs": rows,
        "faults": faults,
        "extra_wall_s_per_fault": round(extra, 1),
        "eval_end_difference": faulty["eval_end"] - clean["eval_end"],
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "command": " ".join(sys.argv),
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(out, indent=1))
    print(f"results: {args.results}")
    return 0 if all(r["steps_lost"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
