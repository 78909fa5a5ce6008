"""Weight sync into vLLM running as on GPUs (multiprocess engine), tensor parallel 1 and 2, against a
raw broadcast of the same bytes over the same group.

Run: .venv/bin/python bench/bench_weight_sync.py [--repeats 5] [--big-hidden 1024 --big-layers 6]
Prints a table and writes bench/results/weight_sync.json.

Two models: the tiny test model (~1.9 MB, where fixed costs dominate) and a synthetic Qwen2-VL of
~200 MB (same architecture, wider and deeper: bandwidth dominates). For each model and TP size:
- full sync: one `RolloutPool.sync` timed at the driver: metadata calls, the bucketed broadcast into
  every vLLM worker process, vLLM's layer-wise reload (rename, fuse, shard, repack) and the cache
  resets. Every sync carries every parameter (sync_skip_frozen off).
- raw broadcast: the same number of bytes in one flat buffer, broadcast by the same sender into the
  same worker processes over the same group, also timed at the driver.
The figure of merit is full / raw. Everything runs in one invocation on one machine: compare ratios,
not absolute times (2 shared cores run the sender, Ray and every vLLM process here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' stand-in sender

from tests.weight_source import ModelWeightSource  # noqa: E402
from visualthinker_ray.models import make_tiny_model  # noqa: E402
from visualthinker_ray.ray_calls import wait_all  # noqa: E402
from visualthinker_ray.rollout.pool import RolloutPool  # noqa: E402
from visualthinker_ray.weight_sync import WeightSyncError  # noqa: E402

MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 16


def time_sync(pool: RolloutPool, source, repeats: int) -> dict:
    """Full syncs and raw broadcasts of the same bytes, interleaved (the shared machine drifts)."""
    full, raw, update, finish, nbytes = [], [], [], [], 0
    pool.sync(source, version=1)  # builds the group; first reload warms vLLM's reload path
    for k in range(repeats):
        ray.get(source.perturb.remote(seed=k), timeout=600)
        out = pool.sync(source, version=2 + k)
        full.append(out["seconds"])
        nbytes = out["bytes"]
        worker = next(v for label, v in out["results"].items() if label.startswith("worker"))
        update.append(worker["update_s"])
        finish.append(worker["finish_s"])
        t0 = time.monotonic()
        refs = {"sender": source.broadcast_flat.remote(nbytes // 4)}  # float32: the same bytes, one buffer
        refs.update({f"worker {i}": w.receive_flat.remote(nbytes // 4) for i, w in enumerate(pool.workers)})
        wait_all(refs, pool.timeout_s + 30, "raw broadcast", WeightSyncError)
        raw.append(time.monotonic() - t0)
    f, r = statistics.median(full), statistics.median(raw)
    return {
        "bytes": nbytes,
        "full_sync_s": f,
        "raw_broadcast_s": r,
        "ratio": f / r,
        "receive_and_load_s": statistics.median(update),  # vLLM's update phase: buckets in, loaded
        "finish_s": statistics.median(finish),  # vLLM's finish phase: layer-wise reload finalised
        "full_all": full,
        "raw_all": raw,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="timed syncs / raw broadcasts (median)")
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--big-hidden", type=int, default=1024, help="hidden size of the ~200 MB model")
    ap.add_argument("--big-layers", type=int, default=6, help="decoder layers of the ~200 MB model")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="bench/results/weight_sync.json")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    models = {
        "tiny": str(make_tiny_model(tmp / "tiny", seed=0)),
        "synthetic-200MB": str(
            make_tiny_model(tmp / "big", seed=0, hidden_size=args.big_hidden, num_layers=args.big_layers)
        ),
    }
    bucket_bytes = int(args.bucket_mb * 1024 * 1024)
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    rows = []
    for name, model_dir in models.items():
        source = ray.remote(num_cpus=1)(ModelWeightSource).remote(model_dir, bucket_bytes)
        for tp in args.tp:
            kwargs = dict(
                min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, max_model_len=512, tensor_parallel_size=tp
            )
            t0 = time.monotonic()
            pool = RolloutPool(
                model_dir, ["vllm"], kwargs, timeout_s=300, bucket_bytes=bucket_bytes, skip_frozen=False
            )
            start_s = time.monotonic() - t0
            rows.append(
                {"model": name, "tp": tp, "engine_start_s": start_s, **time_sync(pool, source, args.repeats)}
            )
            pool.shutdown()
            print(f"done: {name} tp={tp}", flush=True)
        ray.kill(source)
    ray.shutdown()

    header = (
        f"{'model':16} {'tp':>3} {'MB':>8} {'full sync ms':>13} {'raw bcast ms':>13} {'ratio':>6} "
        f"{'receive+load ms':>16} {'finish ms':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:16} {r['tp']:>3} {r['bytes'] / 1e6:>8.1f} {r['full_sync_s'] * 1e3:>13.1f} "
            f"{r['raw_broadcast_s'] * 1e3:>13.1f} {r['ratio']:>6.2f} {r['receive_and_load_s'] * 1e3:>16.1f} "
            f"{r['finish_s'] * 1e3:>10.1f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
    out.write_text(json.dumps({"args": vars(args), "machine": machine, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
