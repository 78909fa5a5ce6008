"""Qwen2-VL-2B's shapes through the whole system on the CPU: a random model at the real width, GRPO
steps through Ray, vLLM, the learner, a grader and the weight sync, with each role's memory and time.

Run: .venv/bin/python bench/bench_real_size.py [--layers 2 --vision-depth 2] [--steps 2]
     [--image-size 616] [--dtype bfloat16] [--out /tmp/bench-real-size] [--results bench/results/real_size.json]

The model: toy/real_shape.py (Qwen/Qwen2-VL-2B's published configuration: hidden 1536, 12 query and
2 KV heads, the 8,960-wide MLP, a 151,936-token vocabulary tied to the output layer, a 1280-wide
vision tower; --layers decoder layers and --vision-depth vision blocks instead of 28 and 32), with
the recipe's pixel bounds (3,136-401,408) on synthetic SAT rows of --image-size px squares (616 px:
484 image tokens per prompt). The run: `Trainer` on a local Ray, one vLLM rollout worker
(multiprocess), one learner rank (FSDP2, fp32 master weights, --dtype compute), one grader,
synchronous GRPO (--group-size completions of --prompts prompts per step), the sync alarm's probe
after every sync. Then, with the engine and learner still up:
  - the weights vLLM serves against the learner's, tensor by tensor (vLLM's own loader on the
    learner's full state dict, exact equality);
  - a full sync (every parameter) against a raw broadcast of the same bytes by the same sender into
    the same worker processes, --repeats times each.
Memory: a sampler reads every process's resident set (RSS) every 0.2 s and sums it per role (the
learner actor; the rollout actor; vLLM's engine-core and worker processes; the grader; Ray's own
processes; this driver). RSS counts shared pages in each process that maps them.
The extrapolation to the full depth and to one H100 per role is arithmetic on the parameter counts
(printed with its assumptions); on this CPU bf16 is emulated on AVX2-only machines, so absolute
times are not a GPU's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visualthinker_ray.config import load_config  # noqa: E402
from visualthinker_ray.models import cpu_flags  # noqa: E402
from visualthinker_ray.ray_calls import wait_all  # noqa: E402
from visualthinker_ray.rollout.vllm_engine import hf_parameter_shapes  # noqa: E402
from visualthinker_ray.toy.real_shape import QWEN2_VL_2B, make_real_shape_model  # noqa: E402
from visualthinker_ray.toy.synthetic import make_synthetic  # noqa: E402
from visualthinker_ray.trainer import Trainer  # noqa: E402
from visualthinker_ray.weight_sync import WeightSyncError  # noqa: E402

MIN_PIXELS, MAX_PIXELS = 3136, 401408  # RECIPE
ROLES = (  # (role, substrings of a process's command line), first match wins
    ("learner", ("LearnerWorker",)),
    ("rollout actor", ("RolloutWorker",)),
    ("vLLM engine", ("VLLM::", "EngineCore")),
    ("grader", ("RewardWorker",)),
    ("ray", ("raylet", "gcs_server", "dashboard", "ray::IDLE", "log_monitor", "runtime_env", "monitor.py")),
)
GB = 1e9


class RoleMemory:
    """Peak summed RSS per role, sampled on a thread (process names: Ray's actor titles, vLLM's)."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.peak, self.now = interval_s, {}, {}
        self.phase = "start"  # peaks are kept per phase: {phase: {role: GB}}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="role-memory")
        self._thread.start()

    def role_of(self, proc: psutil.Process) -> str | None:
        if proc.pid == os.getpid():
            return "driver"
        try:
            text = " ".join(proc.cmdline()) or proc.name()
        except psutil.Error:
            return None
        return next((role for role, keys in ROLES if any(k in text for k in keys)), None)

    def sample(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for proc in psutil.process_iter():
            role = self.role_of(proc)
            if role is None:
                continue
            try:
                totals[role] = totals.get(role, 0.0) + proc.memory_info().rss / GB
            except psutil.Error:
                continue
        return totals

    def _run(self) -> None:
        while not self._stop.is_set():
            self.now = self.sample()
            peak = self.peak.setdefault(self.phase, {})
            for role, gb in self.now.items():
                peak[role] = max(peak.get(role, 0.0), gb)
            self._stop.wait(self.interval_s)

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return dict(self.peak)


def system_peak(peaks: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per role, the peak over the phases the system runs (the served-weights check's copies left out)."""
    out: dict[str, float] = {}
    for phase, roles in peaks.items():
        if phase != "served-weights check":
            for role, gb in roles.items():
                out[role] = max(out.get(role, 0.0), gb)
    return out


def parameter_counts(model_dir: str) -> dict[str, int]:
    """Parameters by part, from the checkpoint's shapes (tied lm_head counted once, in the embedding)."""
    shapes, _ = hf_parameter_shapes(model_dir)
    parts = {
        "embedding (tied lm_head)": 0,
        "decoder layers": 0,
        "vision blocks": 0,
        "vision other": 0,
        "other": 0,
    }
    for name, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        if "embed_tokens" in name:
            parts["embedding (tied lm_head)"] += n
        elif ".layers." in name:
            parts["decoder layers"] += n
        elif ".blocks." in name:
            parts["vision blocks"] += n
        elif "visual" in name:
            parts["vision other"] += n
        else:
            parts["other"] += n
    return parts


def full_depth_counts(measured: dict[str, int], layers: int, vision_depth: int) -> dict[str, int]:
    full = dict(measured)
    full["decoder layers"] = measured["decoder layers"] // layers * QWEN2_VL_2B["num_hidden_layers"]
    full["vision blocks"] = measured["vision blocks"] // vision_depth * QWEN2_VL_2B["vision"]["depth"]
    return full


def config(args, model_dir: Path, data_dir: Path, out: Path):
    return load_config(
        None,
        [
            f"model.path={model_dir}",
            f"model.dtype={args.dtype}",
            f"model.min_pixels={MIN_PIXELS}",
            f"model.max_pixels={MAX_PIXELS}",
            "model.gradient_checkpointing=true",  # RECIPE
            f"data.train={data_dir / 'SAT'}",
            f"data.eval={data_dir / 'CV-Bench'}",
            "rollout.engine=vllm",
            "rollout.num_workers=1",
            "rollout.max_model_len=2048",  # RECIPE
            f"rollout.max_new_tokens={args.max_new_tokens}",
            f"rollout.sync_bucket_mb={args.bucket_mb}",
            "learner.num_workers=1",
            "learner.lr=1e-5",
            "learner.micro_batch_tokens=4096",
            "reward.num_workers=1",
            f"algorithm.group_size={args.group_size}",
            f"algorithm.prompts_per_step={args.prompts}",
            "algorithm.max_staleness=0",  # synchronous: each phase timed alone
            f"algorithm.max_steps={args.steps}",
            "eval.at_start=false",
            "eval.at_end=false",
            "logging.probe_every=1",
            f"logging.probe_size={args.prompts}",
            f"logging.dir={out / 'run'}",
            f"checkpoint.dir={out / 'checkpoints'}",
            f"checkpoint.every={args.steps + 1}",
            "resources.collective_timeout_s=1800",
        ],
    )


def served_weights_check(trainer: Trainer, model_dir: Path, out: Path) -> dict:
    """vLLM's served tensors against what its own loader makes of the learner's full state dict."""
    from safetensors.torch import save_file

    _, tied = hf_parameter_shapes(str(model_dir))
    weights = trainer.learner.full_state_dict()
    path = out / "learner_weights.safetensors"
    save_file({**weights, **{a: weights[src].clone() for a, src in tied.items()}}, str(path))
    del weights
    per_rank = ray.get(trainer.rollout.workers[0].compare_weights.remote(str(path)), timeout=1800)
    path.unlink()
    return {
        "tensors": sum(r["tensors"] for r in per_rank),
        "unequal": [u for r in per_rank for u in r["unequal"]],
    }


def time_sync(trainer: Trainer, repeats: int) -> dict:
    """Syncs (every parameter: the whole model trains) and raw broadcasts of the same bytes."""
    pool, learner = trainer.rollout, trainer.learner
    full, raw, nbytes, buckets = [], [], 0, 0
    version = trainer.step
    for _ in range(repeats):
        version += 1
        t0 = time.monotonic()
        res = pool.sync(learner, version=version)
        full.append(time.monotonic() - t0)
        nbytes, buckets = res["bytes"], res.get("buckets", 0)
        numel = nbytes // 2  # bf16 wire elements (float32: half as many 4-byte ones, same bytes)
        t0 = time.monotonic()
        refs = {"sender": learner.workers[0].broadcast_flat.remote(numel, "bfloat16")}
        refs.update(
            {f"worker {i}": w.receive_flat.remote(numel, "bfloat16") for i, w in enumerate(pool.workers)}
        )
        wait_all(refs, 1800, "raw broadcast", WeightSyncError)
        raw.append(time.monotonic() - t0)
    return {
        "bytes": nbytes,
        "buckets": buckets,
        "full_sync_s": statistics.median(full),
        "raw_broadcast_s": statistics.median(raw),
        "full_all": full,
        "raw_all": raw,
    }


def extrapolate(measured: dict, counts: dict, full: dict) -> dict:
    """Memory and sync at Qwen2-VL-2B's full depth, from parameter counts (assumptions inline)."""
    p_small, p_full = sum(counts.values()), sum(full.values())
    extra = p_full - p_small
    # RECIPE: the whole model trains (freeze_vision false): fp32 master 4 + fp32 grad 4 + AdamW m, v 8
    # + bf16 reference 2 bytes per parameter
    learner_b = 4 + 4 + 8 + 2
    peak = measured["system_peak_gb"]
    bytes_full = 2 * p_full  # bf16 on the wire
    rates = {"H100 NVLink (~300 GB/s broadcast)": 300e9, "PCIe Gen5 x16 (~50 GB/s)": 50e9,
             "400 Gb/s InfiniBand (~45 GB/s)": 45e9}  # fmt: skip
    return {
        "parameters_full": p_full,
        "learner_gb": peak.get("learner", 0) + extra * learner_b / GB,
        "learner_state_bytes_per_param": learner_b,
        "vllm_weights_gb": 2 * p_full / GB,
        "vllm_gb_cpu_like": peak.get("vLLM engine", 0) + extra * 2 / GB,
        "sync_bytes": bytes_full,
        "sync_s_at": {k: bytes_full / r for k, r in rates.items()},
        "assumptions": [
            "learner: fp32 master + fp32 gradient + AdamW m, v for every parameter (16 B) and a bf16 "
            "reference (2 B) per parameter added to the measured peak; activations scale with the "
            "sequence, not the depth, under gradient checkpointing (one layer's at a time) and are "
            "in the measured peak",
            "vLLM: bf16 weights (2 B per parameter); the KV cache is what gpu_memory_utilization leaves",
            "sync: every parameter in bf16 once per step at the link's broadcast rate; vLLM's reload "
            "on a GPU is device copies, not the CPU work measured here",
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (Qwen2-VL-2B: 28)")
    ap.add_argument("--vision-depth", type=int, default=2, help="vision blocks (Qwen2-VL-2B: 32)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument(
        "--image-size", type=int, default=616, help="square synthetic images (616 px: 484 tokens)"
    )
    ap.add_argument("--bucket-mb", type=float, default=256.0, help="sync bucket (the default's 256 MiB)")
    ap.add_argument("--repeats", type=int, default=2, help="timed full syncs / raw broadcasts (median)")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--results", default="bench/results/real_size.json")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-real-size-"))
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    t0 = time.monotonic()
    model_dir = make_real_shape_model(
        out / "model",
        args.layers,
        args.vision_depth,
        dtype=args.dtype,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
    )
    times["build model"] = time.monotonic() - t0
    t0 = time.monotonic()
    data_dir = out / "data"
    make_synthetic(
        data_dir, n_train=8 * args.prompts * args.steps, n_test=4, seed=0, image_size=args.image_size
    )
    times["build data"] = time.monotonic() - t0
    counts = parameter_counts(str(model_dir))
    print(f"[real-size] model {sum(counts.values()) / 1e6:.0f}M parameters: {counts}", flush=True)

    memory = RoleMemory()
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    cfg = config(args, model_dir, data_dir, out)
    t0 = time.monotonic()
    trainer = Trainer(cfg)
    times["start (Ray actors, vLLM, learner)"] = time.monotonic() - t0
    steps = []
    try:
        while trainer.step < args.steps:
            memory.phase = f"step {trainer.step + 1}"
            t0 = time.monotonic()
            metrics = trainer.train_step()
            trainer.step += 1
            steps.append({k: float(v) for k, v in metrics.items()})
            print(
                f"[real-size] step {trainer.step}: {time.monotonic() - t0:.0f} s "
                f"(generate {metrics['time/generate_s']:.0f}, update {metrics['time/update_s']:.0f}, "
                f"sync {metrics['time/sync_s']:.1f}, probe {metrics.get('time/probe_s', 0):.0f}); "
                f"probe mismatch {metrics.get('sync/probe_mismatch_mean', float('nan')):.2e}",
                flush=True,
            )
        memory.phase = "served-weights check"  # the test's copies: not the system's memory
        t0 = time.monotonic()
        served = served_weights_check(trainer, model_dir, out)
        times["served-weights check"] = time.monotonic() - t0
        print(
            f"[real-size] served weights: {served['tensors']} tensors, unequal {served['unequal']}",
            flush=True,
        )
        memory.phase = "sync vs raw"
        sync = time_sync(trainer, args.repeats)
        learner_peak = ray.get(trainer.learner.workers[0].peak_memory_gb.remote(), timeout=60)
    finally:
        trainer.shutdown()
        peak = memory.stop()
        ray.shutdown()

    last = steps[-1]
    measured = {
        "memory_peak_gb": peak,
        "system_peak_gb": system_peak(peak),
        "learner_ru_maxrss_gb": learner_peak,
    }
    full = full_depth_counts(counts, args.layers, args.vision_depth)
    result = {
        "args": vars(args),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "bf16": "avx512_bf16" in cpu_flags(),
            "torch": torch.__version__,
        },  # fmt: skip
        "parameters": counts,
        "phase_s": {k: v for k, v in last.items() if k.startswith("time/")},
        "throughput": {k: v for k, v in last.items() if k.startswith("throughput/")},
        "tokens": {
            "learner_per_step": last.get("learner/tokens"),
            "image_tokens_per_prompt": (args.image_size // 28) ** 2,
        },
        "probe": {k: v for s in steps for k, v in s.items() if k.startswith("sync/probe")},
        "steps": steps,
        "times_s": times,
        "served_weights": served,
        "sync": sync,
        **measured,
        "full_depth": extrapolate(measured, counts, full),
    }
    print_table(result)
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


def print_table(r: dict) -> None:
    a = r["args"]
    print(f"\nQwen2-VL-2B width, {a['layers']} decoder layers + {a['vision_depth']} vision blocks, {a['dtype']}, "
          f"{sum(r['parameters'].values()) / 1e6:.0f}M parameters, {r['tokens']['image_tokens_per_prompt']} image "
          f"tokens per prompt")  # fmt: skip
    phases = list(r["memory_peak_gb"])
    print("peak RSS (GB) per role and phase; 'system' leaves out the check's copies")
    print(f"{'role':16}" + "".join(f"{p[:12]:>13}" for p in phases) + f"{'system':>9}")
    for role in sorted(r["system_peak_gb"]):
        cells = "".join(f"{r['memory_peak_gb'][p].get(role, 0):>13.2f}" for p in phases)
        print(f"{role:16}{cells}{r['system_peak_gb'][role]:>9.2f}")
    print(f"\n{'phase (last step)':28} {'seconds':>9}")
    for k, v in r["phase_s"].items():
        print(f"{k:28} {v:>9.1f}")
    for k, v in r["times_s"].items():
        print(f"{k:28} {v:>9.1f}")
    for k, v in r["throughput"].items():
        print(f"{k:40} {v:>9.1f}")
    s = r["sync"]
    print(f"\nsync: {s['bytes'] / 1e6:.0f} MB in {s['buckets']} buckets: full {s['full_sync_s']:.2f} s, raw broadcast "
          f"{s['raw_broadcast_s']:.2f} s, ratio {s['full_sync_s'] / s['raw_broadcast_s']:.2f}")  # fmt: skip
    print(f"probe: {r['probe']}")
    print(
        f"served weights: {r['served_weights']['tensors']} tensors, unequal: {r['served_weights']['unequal']}"
    )
    f = r["full_depth"]
    print(f"\nfull depth ({f['parameters_full'] / 1e9:.2f}B parameters): learner ~{f['learner_gb']:.1f} GB "
          f"({f['learner_state_bytes_per_param']} B/param), vLLM weights {f['vllm_weights_gb']:.1f} GB, sync "
          f"{f['sync_bytes'] / 1e9:.2f} GB")  # fmt: skip
    for k, v in f["sync_s_at"].items():
        print(f"  sync at {k}: {v:.3f} s")


if __name__ == "__main__":
    main()
