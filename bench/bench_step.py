"""Seconds per RL step: the synchronous loop against the pipelined one (algorithm.max_staleness 0, 1,
2), with each phase's time and the CPU-seconds the whole machine spent in it.

Run: .venv/bin/python bench/bench_step.py [--steps 8] [--warmup 2] [--work identical default]
     [--default-model start_models/tiny-depth-v1]
Prints a table and writes bench/results/step.json. Every row runs in one invocation (compare ratios).

Works:
- identical: the peer comparison's work (a 0.64M-parameter tiny Qwen2-VL, 64 two-option spatial
  questions on 112x112 images, 8 prompts x 8 completions, 64 new tokens, temperature 1, beta 0.04,
  lr 1e-5, fp32), real Ray, vLLM in multiprocess mode, an FSDP2 learner over gloo.
- default: the embedded default job (jobs/tiny_cpu.yaml) on --default-model (the shipped start
  model by default).

The core split on 2 cores: vLLM's CPU worker binds its OpenMP threads to core 0 (vLLM keeps the
other core for its engine-core process); the synchronous loop gives the learner 2 torch threads (it
runs while generation is idle); the pipelined one gives it 1 (2 would fight vLLM's bound thread
while both run). `bound_s` is the synchronous step's work in CPU-seconds (the engine's processes while
generating, the learner's while updating, the machine's while grading and syncing) over 2 cores:
what a perfect overlap of the same work could reach here. `cpu s` is the whole machine's
CPU-seconds per step, `eng`/`lrn` the engine's and learner's processes'.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import ray

from visualthinker_ray import trainer as trainer_module
from visualthinker_ray.config import load_config
from visualthinker_ray.toy.synthetic import make_synthetic
from visualthinker_ray.toy.tiny_model import make_tiny_model

PHASES = ("generate", "grade", "update", "sync")


def machine_cpu_s() -> float:
    """CPU-seconds the whole machine has spent busy (every process: driver, actors, vLLM)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / 100.0  # USER_HZ


def role_of(proc: psutil.Process) -> str | None:
    """engine: the rollout actor and vLLM's processes; learner: the learner ranks."""
    try:
        title = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return None
    if "RolloutWorker" in title or "VLLM" in title or "EngineCore" in title:
        return "engine"
    if "LearnerWorker" in title:
        return "learner"
    return None


class RoleClock:
    """CPU-seconds so far of the engine's and the learner's processes, and of the whole machine."""

    def __init__(self):
        self.procs = [(p, r) for p in psutil.process_iter() if (r := role_of(p))]

    def read(self) -> dict[str, float]:
        out = {"engine": 0.0, "learner": 0.0, "machine": machine_cpu_s()}
        for proc, role in self.procs:
            try:
                t = proc.cpu_times()
                out[role] += t.user + t.system
            except psutil.Error:
                pass
        return out


class CpuPhaseTimer(trainer_module.PhaseTimer):
    """The trainer's phase timer, also adding up CPU-seconds per phase: the machine's, and those of
    the engine's and the learner's processes."""

    clock: RoleClock | None = None

    def __init__(self):
        super().__init__()
        self.cpu: dict[str, dict[str, float]] = {}

    @contextmanager
    def __call__(self, phase: str):
        c0 = self.clock.read()
        with super().__call__(phase):
            yield
        c1 = self.clock.read()
        acc = self.cpu.setdefault(phase, {})
        for k in c1:
            acc[k] = acc.get(k, 0.0) + c1[k] - c0[k]


def run_mode(cfg, steps: int, warmup: int) -> list[dict]:
    """One trainer, `warmup` untimed steps, then `steps` timed ones: each step's metrics and CPU."""
    timers: list[CpuPhaseTimer] = []

    def make_timer():
        timers.append(CpuPhaseTimer())
        return timers[-1]

    trainer_module.PhaseTimer = make_timer  # the bench's timer inside the unchanged train_step
    trainer = trainer_module.Trainer(cfg)
    CpuPhaseTimer.clock = clock = RoleClock()
    out = []
    try:
        for i in range(warmup + steps):
            c0, t0 = clock.read(), time.perf_counter()
            metrics = trainer.train_step()
            trainer.step += 1
            c1 = clock.read()
            if i >= warmup:
                out.append(
                    {
                        "wall": time.perf_counter() - t0,
                        "metrics": metrics,
                        "cpu": {k: c1[k] - c0[k] for k in c1},
                        "cpu_by_phase": timers[-1].cpu,
                    }
                )
    finally:
        trainer.shutdown()
        trainer_module.PhaseTimer = CpuPhaseTimer.__mro__[1]
    return out


def summarize(steps: list[dict]) -> dict:
    """Medians over the timed steps of every round."""

    def med(values):
        return statistics.median(values)

    def metric(key):
        return med([s["metrics"].get(key, 0.0) for s in steps])

    roles = ("engine", "learner", "machine")
    return {
        "steps_timed": len(steps),
        "step_s": med([s["wall"] for s in steps]),
        "wait_generate_s": metric("time/generate_s"),
        "generate_busy_s": metric("time/generate_busy_s"),
        "grade_s": metric("time/grade_s"),
        "update_s": metric("time/update_s"),
        "sync_s": metric("time/sync_s"),
        "cpu_s_per_step": med([s["cpu"]["machine"] for s in steps]),
        "cpu_s_by_role": {r: med([s["cpu"][r] for s in steps]) for r in roles},
        "cpu_s_by_phase": {
            p: {r: med([s["cpu_by_phase"].get(p, {}).get(r, 0.0) for s in steps]) for r in roles}
            for p in PHASES
        },
        "staleness_mean": statistics.mean(s["metrics"]["offpolicy/staleness_mean"] for s in steps),
        "completion_tokens_mean": metric("response_length/mean"),
    }


def work_config(work: str, root: Path, default_model: str | None, k: int, log_dir: Path, pin: bool):
    threads = 2 if k == 0 else 1
    common = [
        # (set both ways: the job file may pin the learner for its own mode)
        "learner.cpu_affinity=" + ("[1]" if pin and k > 0 else "null"),
        f"logging.dir={log_dir}",
        f"algorithm.max_staleness={k}",
        f"learner.cpu_threads={threads}",
        "eval.at_start=false",
        "eval.at_end=false",
        "checkpoint.every=100000",
        "algorithm.max_steps=1000",  # the schedule's length only; the bench runs --warmup + --steps
    ]
    if work == "identical":
        return load_config(
            None,
            [
                f"model.path={root / 'tiny-model'}",
                f"data.train={root / 'data' / 'SAT'}",
                f"data.eval={root / 'data' / 'CV-Bench'}",
                "algorithm.prompts_per_step=8",
                "algorithm.group_size=8",
                "algorithm.beta=0.04",
                "rollout.max_new_tokens=64",
                "rollout.temperature=1.0",
                "learner.lr=1e-5",
                "model.dtype=float32",
                *common,
            ],
        )
    model = default_model if default_model and Path(default_model).exists() else str(root / "tiny-model")
    return load_config("jobs/tiny_cpu.yaml", [f"model.path={model}", *common])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (engine and caches warm up)")
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", nargs="+", default=["identical", "default"], choices=["identical", "default"])
    ap.add_argument("--default-model", default="start_models/tiny-depth-v1")
    ap.add_argument("--out", default="bench/results/step.json")
    ap.add_argument("--rounds", type=int, default=2, help="passes over every mode, interleaved")
    ap.add_argument(
        "--no-pin", dest="pin", action="store_false", help="pipelined: leave the learner unpinned"
    )
    args = ap.parse_args()

    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tiny_model(root / "tiny-model", seed=0)
        make_synthetic(
            root / "data", n_train=64, n_test=16, seed=0, question_types=("depth",), same_shape_sizes=True
        )
        if "default" in args.work and not Path(args.default_model).exists():
            # the default's data, on the tiny model (see the module docstring)
            make_synthetic(root / "default-data", n_train=512, n_test=16, seed=0, question_types=("depth",))
        runs: dict[tuple[str, int], list[dict]] = {}
        configs = {}
        for round_ in range(args.rounds):  # rounds interleave the modes: the shared machine drifts
            for work in args.work:
                for k in args.staleness:
                    cfg = work_config(
                        work, root, args.default_model, k, root / f"log-{work}-{k}-{round_}", args.pin
                    )
                    if work == "default" and not Path(args.default_model).exists():
                        cfg.data.train = str(root / "default-data" / "SAT")
                        cfg.data.eval = str(root / "default-data" / "CV-Bench")
                    print(
                        f"[bench_step] round {round_}: {work}, max_staleness={k} ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    runs.setdefault((work, k), []).extend(run_mode(cfg, args.steps, args.warmup))
                    configs[(work, k)] = cfg
        for (work, k), steps in runs.items():
            cfg = configs[(work, k)]
            rows.append(
                {
                    "work": work,
                    "max_staleness": k,
                    "model": cfg.model.path.split("/")[-1],
                    "learner_threads": cfg.learner.cpu_threads,
                    "learner_affinity": cfg.learner.cpu_affinity,
                    **summarize(steps),
                }
            )
    ray.shutdown()

    by_work = {}
    for r in rows:
        by_work.setdefault(r["work"], {})[r["max_staleness"]] = r
    for modes in by_work.values():
        sync = modes.get(0)
        for r in modes.values():
            if sync:
                r["vs_sync"] = r["step_s"] / sync["step_s"]
                # the synchronous step's work in CPU-seconds: the engine's while generating, the
                # learner's while updating, the machine's while grading and syncing; over 2 cores
                ph = sync["cpu_s_by_phase"]
                work_cpu = (
                    ph["generate"]["engine"]
                    + ph["update"]["learner"]
                    + ph["grade"]["machine"]
                    + ph["sync"]["machine"]
                )
                r["bound_s"] = work_cpu / 2
                r["vs_max_gen_update"] = r["step_s"] / max(sync["generate_busy_s"], sync["update_s"])
    header = (
        f"{'work':<10}{'k':>3}{'step s':>8}{'x sync':>8}{'wait gen':>9}{'gen busy':>9}{'update':>8}{'sync':>7}"
        f"{'grade':>7}{'cpu s':>7}{'eng':>6}{'lrn':>6}{'bound':>7}{'x max(g,u)':>11}{'stale':>6}{'tokens':>7}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['work']:<10}{r['max_staleness']:>3}{r['step_s']:>8.2f}{r.get('vs_sync', float('nan')):>8.2f}"
            f"{r['wait_generate_s']:>9.2f}{r['generate_busy_s']:>9.2f}{r['update_s']:>8.2f}{r['sync_s']:>7.2f}"
            f"{r['grade_s']:>7.3f}{r['cpu_s_per_step']:>7.2f}{r['cpu_s_by_role']['engine']:>6.2f}"
            f"{r['cpu_s_by_role']['learner']:>6.2f}{r.get('bound_s', float('nan')):>7.2f}"
            f"{r.get('vs_max_gen_update', float('nan')):>11.2f}{r['staleness_mean']:>6.2f}"
            f"{r['completion_tokens_mean']:>7.1f}"
        )
    result = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "steps": args.steps,
        "warmup": args.warmup,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
