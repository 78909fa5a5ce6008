"""The GPU check of the learner and the weight-sync transport: one command, under 8 minutes on one GPU.

Run on a GPU machine (needs only torch and transformers: no Ray, no vLLM, no download):
    python3 bench/gpu_check.py                      # full check, writes bench/results/gpu_check.json
    python3 bench/gpu_check.py --device cpu --small # a dry run of the same code on the CPU (gloo)

What it measures, on a random model with Qwen2-VL-2B's configuration (no weights are downloaded):
1. the learner step: FSDP2 (world 1, NCCL) with fp32 master weights and bf16 compute, activation
   checkpointing, a frozen reference, the project's GRPO loss (visualthinker_ray.grpo) over G=8
   completions at the paper's lengths (a max_pixels=401408 image: 506 visual tokens, a ~100-token
   prompt, 700 completion tokens), in micro-batches: peak memory, tokens/s and MFU;
2. the sync bytes: the model's parameters packed and cast into bf16 buckets by the project's
   WeightSender over an NCCL group (world 1: the pack and the collective, no peer), bytes and GB/s,
   against fp32;
3. a bounded NCCL failure: a peer that joins the group's store and dies before NCCL connects; the
   sender's group creation must raise WeightSyncError within its timeout and the process must stay
   usable (a new group, a CUDA op). One GPU cannot host two NCCL ranks, so a peer dying in the
   middle of a broadcast is not checked here (the CPU tests check it with gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visualthinker_ray.grpo import policy_loss, token_logprobs  # noqa: E402
from visualthinker_ray.toy.real_shape import QWEN2_SPECIAL_IDS, QWEN2_VL_2B, qwen2vl_config, real_shape_config  # noqa: E402
from visualthinker_ray.weight_sync.plan import Handshake, WeightSyncError, plan_buckets, tensor_metas  # noqa: E402
from visualthinker_ray.weight_sync.transport import WeightSender  # noqa: E402

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = (
    QWEN2_SPECIAL_IDS[t] for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
)
QWEN2VL_2B_VISION = dict(QWEN2_VL_2B["vision"], in_chans=3)
# The smallest variant for --small (a dry run of the code path, not a measurement).
SMALL_TEXT = dict(vocab_size=QWEN2_VL_2B["vocab_size"], hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32768,
                  rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [8, 12, 12]})  # fmt: skip
SMALL_VISION = dict(QWEN2VL_2B_VISION, depth=2, embed_dim=32, num_heads=2, hidden_size=128)

BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, per GPU


def build_model(device: torch.device, small: bool, dtype: torch.dtype = torch.float32):
    """Qwen2-VL-2B from its published configuration (toy/real_shape.py), or the --small variant."""
    from transformers import Qwen2VLForConditionalGeneration

    if small:
        cfg = qwen2vl_config(SMALL_TEXT, SMALL_VISION, QWEN2_SPECIAL_IDS)
    else:
        cfg = real_shape_config(QWEN2_VL_2B["num_hidden_layers"], QWEN2_VL_2B["vision"]["depth"])
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(cfg).to(dtype)
    return model


def shard(model, bf16: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mp_policy": mp} if mp else {}
    for block in model.model.visual.blocks:
        fully_shard(block, **kwargs)
    for layer in model.model.language_model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def make_batch(n: int, grid: tuple[int, int, int], prompt_text: int, completion: int, device, vision_cfg):
    """n sequences: [vision_start, image pads, vision_end, prompt text, completion], one image each."""
    t, h, w = grid
    patches = t * h * w
    pads = patches // (vision_cfg["spatial_merge_size"] ** 2)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 150000, (n, prompt_text + completion), generator=g)
    prefix = torch.tensor([VISION_START] + [IMAGE_TOKEN] * pads + [VISION_END]).repeat(n, 1)
    ids = torch.cat([prefix, text], dim=1)
    patch_dim = vision_cfg["in_chans"] * vision_cfg["temporal_patch_size"] * vision_cfg["patch_size"] ** 2
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == IMAGE_TOKEN).long(),
        "pixel_values": torch.randn(n * patches, patch_dim, generator=g),
        "image_grid_thw": torch.tensor([list(grid)] * n),
    }
    mask = torch.ones(n, completion)  # over the completion's positions (logprobs' window)
    return {k: v.to(device) for k, v in batch.items()}, mask.to(device)


def logprobs(model, batch, completion: int):
    """The completion's log-probs, the output layer run on its positions only, as the learner does
    (sequences.completion_logprobs): at a 152k vocabulary the prompt's logits cost GBs for nothing."""
    logits = model(**batch, use_cache=False, logits_to_keep=completion + 1).logits[:, :-1]
    return token_logprobs(logits, batch["input_ids"][:, -completion:], 1.0)


def check_learner(args, device) -> dict:
    bf16 = device.type == "cuda"
    model = build_model(device, args.small)
    # stored in the compute dtype, as the learner stores it (no master weights to keep)
    reference = build_model(device, args.small, torch.bfloat16 if bf16 else torch.float32)
    reference.eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    shard(model, bf16)
    shard(reference, bf16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    vision = SMALL_VISION if args.small else QWEN2VL_2B_VISION
    micro = [make_batch(args.micro_batch, args.grid, args.prompt_tokens, args.completion_tokens, device, vision)
             for _ in range(args.group // args.micro_batch)]  # fmt: skip
    tokens_per_step = sum(b["attention_mask"].numel() for b, _ in micro)

    def step():
        opt.zero_grad(set_to_none=True)
        for batch, mask in micro:
            with torch.no_grad():
                ref = logprobs(reference, batch, args.completion_tokens)
            logp = logprobs(model, batch, args.completion_tokens)
            adv = torch.randn(mask.shape[0], device=device)
            loss, _ = policy_loss(logp, logp.detach(), ref, adv, mask, beta=0.04)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - t0) / args.steps
    # FLOPs: policy forward + backward (6N per token; +2N for the checkpointed re-forward) and the
    # reference forward (2N per token). Attention's quadratic term is left out (small at ~1.3k tokens).
    flops = (8 + 2) * n_params * tokens_per_step
    peak = BF16_PEAK_FLOPS.get(_gpu_kind(device), float("nan"))
    out = {
        "params": n_params,
        "sequences_per_step": args.group,
        "tokens_per_sequence": micro[0][0]["input_ids"].shape[1],
        "step_s": seconds,
        "tokens_per_s": tokens_per_step / seconds,
        "achieved_tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    out["sync"] = check_sync_bytes(model, device, args)
    return out


def check_sync_bytes(model, device, args) -> dict:
    """Pack the model into wire-dtype buckets and broadcast them over a world-1 group."""
    named = [(n, p) for n, p in model.named_parameters()]
    fp32 = sum(m.nbytes for m in tensor_metas(named))
    result = {"fp32_bytes": fp32}
    for wire in ("bfloat16", "float32"):
        metas = tensor_metas(named, wire)
        plan = plan_buckets(metas, int(args.bucket_mb * 2**20))
        hs = Handshake(_backend(device), 1, wire, "gpu-check", 0)
        sender = WeightSender("127.0.0.1", free_port(), hs, args.timeout, device, int(args.bucket_mb * 2**20))
        full = ((n, p.full_tensor() if hasattr(p, "full_tensor") else p) for n, p in model.named_parameters())
        _sync(device)
        cuda = device.type == "cuda"
        if cuda:  # what a sync adds on the sender's GPU: the wire buckets (and, sharded, a gathered tensor)
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        stats = sender.send((x for x in full), metas, plan)
        _sync(device)
        seconds = time.perf_counter() - t0
        extra = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else None
        sender.close()
        result[wire] = {"bytes": stats["bytes"], "buckets": stats["buckets"], "seconds": seconds,
                        "gb_per_s": stats["bytes"] / seconds / 1e9, "sender_extra_gib": extra}  # fmt: skip
    result["bf16_over_fp32_bytes"] = result["bfloat16"]["bytes"] / fp32
    return result


PEER = """
import sys, time, datetime, torch.distributed as dist
from visualthinker_ray.weight_sync.plan import Handshake
port, hs = int(sys.argv[1]), sys.argv[2]
store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=datetime.timedelta(seconds=60))
store.set("joined/1", Handshake.from_json(hs).to_json())
time.sleep(0.5)
import os; os._exit(1)  # joined the store, then died before NCCL connects
"""


def check_dead_peer(args, device) -> dict:
    hs = Handshake(_backend(device), 2, "bfloat16", "gpu-check", 0)
    port = free_port()
    root = str(Path(__file__).resolve().parents[1])
    peer = subprocess.Popen([sys.executable, "-c", PEER, str(port), hs.to_json()], cwd=root,
                            env={**os.environ, "PYTHONPATH": root})  # fmt: skip
    t0 = time.monotonic()
    error = None
    try:
        WeightSender("127.0.0.1", port, hs, args.timeout, device)
    except WeightSyncError as e:
        error = str(e)
    elapsed = time.monotonic() - t0
    peer.wait(timeout=60)
    # still usable: a CUDA op and a fresh group
    x = torch.ones(1024, device=device).sum().item()
    fresh = WeightSender("127.0.0.1", free_port(), Handshake(_backend(device), 1, "bfloat16", "gpu-check", 0),
                         args.timeout, device)  # fmt: skip
    fresh.broadcast_flat(1024, "bfloat16")
    fresh.close()
    return {"raised": error is not None, "error": error, "elapsed_s": elapsed, "timeout_s": args.timeout,
            "within_bound": error is not None and elapsed < args.timeout + 10, "process_usable_after": x == 1024}  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _gpu_kind(device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return next((k for k in BF16_PEAK_FLOPS if k in name), name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument(
        "--small", action="store_true", help="a tiny config: checks the code path, measures nothing"
    )
    ap.add_argument("--group", type=int, default=8, help="completions per update (G)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grid", type=int, nargs=3, default=[1, 46, 44], help="image patch grid (t, h, w)")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--completion-tokens", type=int, default=700)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=256)
    ap.add_argument("--timeout", type=float, default=20.0, help="collective timeout of the sync checks (s)")
    ap.add_argument("--out", default="bench/results/gpu_check.json")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu_check.py: no GPU visible; run it on a GPU machine, or pass --device cpu --small")
    if args.small:
        args.grid, args.prompt_tokens, args.completion_tokens = [1, 4, 4], 8, 16
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group(_backend(device), rank=0, world_size=1, timeout=timedelta(seconds=120))
    t0 = time.monotonic()
    learner = check_learner(args, device)
    print(f"[gpu_check] learner done in {time.monotonic() - t0:.0f} s", flush=True)
    dead = check_dead_peer(args, device)
    dist.destroy_process_group()

    result = {
        "command": "python3 " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "args": vars(args),
        "learner": learner,
        "dead_peer": dead,
        "wall_s": time.monotonic() - t0,
    }
    s = learner["sync"]
    rows = [
        ("params", f"{learner['params'] / 1e9:.3f} B"),
        ("tokens / sequence", learner["tokens_per_sequence"]),
        (f"update step (G={args.group})", f"{learner['step_s']:.2f} s"),
        ("tokens/s", f"{learner['tokens_per_s']:.0f}"),
        ("MFU (bf16 dense peak)", f"{learner['mfu']:.1%}"),
        ("peak memory", f"{learner['peak_memory_gib']:.1f} GiB" if learner["peak_memory_gib"] else "n/a"),
        ("sync bytes bf16 / fp32", f"{s['bfloat16']['bytes'] / 1e9:.2f} / {s['fp32_bytes'] / 1e9:.2f} GB"),
        ("sync pack+send bf16", f"{s['bfloat16']['gb_per_s']:.1f} GB/s"),
        ("sync: sender GPU memory added", f"{s['bfloat16']['sender_extra_gib'] or float('nan'):.2f} GiB"),
        (
            "dead peer raised in",
            f"{dead['elapsed_s']:.1f} s (bound {args.timeout + 10:.0f} s): {dead['within_bound']}",
        ),
        ("process usable after", dead["process_usable_after"]),
    ]
    for k, v in rows:
        print(f"{k:28} {v}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
