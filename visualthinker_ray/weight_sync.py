"""Weight sync: one sender (learner rank 0) broadcasts full weights to every rollout worker.

The group is rank 0 = sender, ranks 1..N = rollout workers, built from a `TCPStore` (the sender is
its master) plus a gloo group on the CPU or an NCCL group on the GPU. It is a standalone process
group, never the default one, so it lives beside vLLM's own world-size-1 group in the same process,
and a fresh group on a new port replaces it when workers are replaced or added.

A sync moves metadata once (names, shapes, dtypes: one remote call per worker) and bytes in large
flat dtype-homogeneous buckets (`plan_buckets`, a pure function both sides run on the same metas).
Every wait is bounded: a dead or stuck peer makes the sync raise `WeightSyncError` naming the
group, rank and bucket within `timeout_s`, never hang (PITFALLS.md, "Weight sync learner -> vLLM").
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch

DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024


class WeightSyncError(RuntimeError):
    """A sync group could not be built, or a transfer failed or timed out; the message says where."""

    dead = False  # set by the pool when a peer's actor died (replace it; a new port will not help)


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16": plain data across Ray

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


@dataclass(frozen=True)
class Bucket:
    dtype: str
    entries: tuple[tuple[int, int], ...]  # (index into metas, element offset in the flat buffer)
    numel: int

    @property
    def last_index(self) -> int:
        return max(i for i, _ in self.entries)


def tensor_metas(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[TensorMeta]:
    return [TensorMeta(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in named_tensors]


def plan_buckets(metas: list[TensorMeta], bucket_bytes: int) -> list[Bucket]:
    """Group tensors into flat single-dtype buckets of at most `bucket_bytes` (bigger tensors alone).

    Buckets are ordered by their last tensor's position in `metas`, so a sender streaming tensors
    in `metas` order can broadcast each bucket the moment it is full, holding at most one open bucket
    per dtype (one for a single-dtype model) besides the tensor it is copying.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[Bucket] = []
    open_: dict[str, tuple[list[tuple[int, int]], int]] = {}  # dtype -> (entries, numel so far)
    for i, m in enumerate(metas):
        if m.nbytes > bucket_bytes:
            buckets.append(Bucket(m.dtype, ((i, 0),), m.numel))
            continue
        entries, numel = open_.get(m.dtype, ([], 0))
        if entries and (numel + m.numel) * _itemsize(m.dtype) > bucket_bytes:
            buckets.append(Bucket(m.dtype, tuple(entries), numel))
            entries, numel = [], 0
        entries.append((i, numel))
        open_[m.dtype] = (entries, numel + m.numel)
    buckets += [Bucket(d, tuple(e), n) for d, (e, n) in open_.items() if e]
    return sorted(buckets, key=lambda b: b.last_index)


def check_update(
    names_shapes: list[tuple[str, tuple[int, ...]]],
    expected: dict[str, tuple[int, ...]],
    optional: dict[str, tuple[int, ...]] | None = None,
    who: str = "engine",
) -> None:
    """An update must name every expected parameter once, with its shape, and nothing unknown.

    Partial updates are refused: vLLM's layer-wise reload leaves a half-loaded fused layer
    (q without k, v) uninitialised, and a silently missing tensor means stale weights.
    """
    optional = optional or {}
    seen: set[str] = set()
    for name, shape in names_shapes:
        want = expected.get(name, optional.get(name))
        if want is None:
            close = difflib.get_close_matches(name, list(expected), n=2)
            raise WeightSyncError(
                f"{who}: unknown weight {name!r}"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + "; send the in-memory transformers names of the model's named_parameters()"
            )
        if tuple(shape) != tuple(want):
            raise WeightSyncError(
                f"{who}: weight {name!r} has shape {tuple(shape)}, the model's is {tuple(want)}"
            )
        if name in seen:
            raise WeightSyncError(f"{who}: weight {name!r} sent twice in one update")
        seen.add(name)
    missing = [n for n in expected if n not in seen]
    if missing:
        raise WeightSyncError(
            f"{who}: update is missing {len(missing)} of {len(expected)} weights (first: {missing[:3]}); "
            "a sync must carry every parameter"
        )


class SyncGroup:
    """This process's membership in one weight-sync group (rank 0 sends, ranks 1..N receive)."""

    def __init__(
        self,
        addr: str,
        port: int,
        world_size: int,
        rank: int,
        timeout_s: float,
        device: str | None = None,
    ):
        self.addr, self.port, self.world_size, self.rank, self.timeout_s = (
            addr,
            port,
            world_size,
            rank,
            timeout_s,
        )
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.name = f"weight-sync@{addr}:{port}"
        self.broken: str | None = None  # set after a failed collective: the group must be rebuilt
        timeout = timedelta(seconds=timeout_s)
        try:
            self.store = torch.distributed.TCPStore(
                addr, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False
            )
        except Exception as e:
            raise WeightSyncError(
                f"{self.name}: rank {rank} could not {'open' if rank == 0 else 'reach'} the group's store "
                f"within {timeout_s:.0f}s ({e}); is the sender (rank 0) alive and the port free?"
            ) from e
        self._rendezvous()
        store = torch.distributed.PrefixStore("pg", self.store)
        if self.device.startswith("cuda"):
            self.pg = _nccl_group(store, rank, world_size, timeout)
        else:
            self.pg = torch.distributed.ProcessGroupGloo(store, rank, world_size, timeout)

    def _rendezvous(self) -> None:
        """Every rank checks in; past the deadline the error names the ranks that never did."""
        deadline = time.monotonic() + self.timeout_s
        keys = [f"joined/{r}" for r in range(self.world_size)]
        try:
            self.store.set(f"joined/{self.rank}", b"1")
            while not self.store.check(keys):
                if time.monotonic() > deadline:
                    missing = [r for r in range(self.world_size) if not self.store.check([f"joined/{r}"])]
                    raise WeightSyncError(
                        f"{self.name}: rank(s) {missing} of {self.world_size} did not join within "
                        f"{self.timeout_s:.0f}s (seen from rank {self.rank}); the worker is dead, slow to "
                        "start or cannot reach the address: rebuild the group on a new port once it is replaced"
                    )
                time.sleep(0.02)
        except torch.distributed.DistError as e:
            raise WeightSyncError(
                f"{self.name}: rank {self.rank} lost the group's store while waiting for the other ranks "
                f"({e}); the sender (rank 0) gave up or died: rebuild the group on a new port"
            ) from e

    def broadcast(self, buf: torch.Tensor, what: str) -> None:
        if self.broken:
            raise WeightSyncError(f"{self.name} is broken ({self.broken}); rebuild it on a new port")
        t0 = time.monotonic()
        try:
            work = self.pg.broadcast(buf, 0)
            work.wait(timeout=timedelta(seconds=self.timeout_s))
        except Exception as e:
            self.broken = f"{what} failed on rank {self.rank}"
            raise WeightSyncError(
                f"{self.name}: {what} failed on rank {self.rank} after {time.monotonic() - t0:.1f}s "
                f"(timeout {self.timeout_s:.0f}s): {e}. A peer died or stopped taking part; rebuild the group."
            ) from e

    def close(self) -> None:
        # Dropping the references lets gloo close its sockets; the store closes with its last user.
        self.pg = None
        self.store = None


def _nccl_group(store, rank: int, world_size: int, timeout: timedelta):
    # UNTESTED on this project's CPU machines (no GPU, no NCCL build): the GPU path of the same group.
    opts = torch.distributed.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return torch.distributed.ProcessGroupNCCL(store, rank, world_size, opts)


class WeightSender:
    """Rank 0: streams (name, tensor) pairs into buckets and broadcasts each one as soon as it is full."""

    def __init__(
        self,
        addr: str,
        port: int,
        world_size: int,
        timeout_s: float,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        device: str | None = None,
    ):
        self.bucket_bytes = bucket_bytes
        self.group = SyncGroup(addr, port, world_size, 0, timeout_s, device)

    def send(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        metas: list[TensorMeta],
        plan: list[Bucket] | None = None,
    ) -> dict:
        """Broadcast the tensors (in `metas` order, e.g. gathered one at a time); returns transfer stats."""
        plan = plan if plan is not None else plan_buckets(metas, self.bucket_bytes)
        where = {i: (b, off) for b, bucket in enumerate(plan) for i, off in bucket.entries}
        filled = [0] * len(plan)
        buffers: dict[int, torch.Tensor] = {}
        sent, nbytes, t0 = 0, 0, time.monotonic()
        count = 0
        for i, (name, t) in enumerate(named_tensors):
            if i >= len(metas) or name != metas[i].name or tuple(t.shape) != metas[i].shape:
                expected = f"{metas[i].name} {metas[i].shape}" if i < len(metas) else "the end"
                raise WeightSyncError(
                    f"{self.group.name}: tensor #{i} is {name} {tuple(t.shape)} but the metadata sent to "
                    f"the workers says {expected}; the sender must stream exactly the tensors it described"
                )
            b, off = where[i]
            if b not in buffers:
                buffers[b] = torch.empty(plan[b].numel, dtype=_dtype(plan[b].dtype), device=self.group.device)
            buffers[b][off : off + t.numel()].copy_(t.detach().reshape(-1))
            filled[b] += 1
            count += 1
            if filled[b] == len(plan[b].entries):
                if b != sent:
                    raise WeightSyncError(
                        f"{self.group.name}: bucket {b} filled before bucket {sent} (bad plan)"
                    )
                buf = buffers.pop(b)
                self.group.broadcast(
                    buf, f"bucket {b + 1}/{len(plan)} ({buf.numel() * buf.element_size()} B)"
                )
                nbytes += buf.numel() * buf.element_size()
                sent += 1
        if count != len(metas):
            raise WeightSyncError(
                f"{self.group.name}: the sender streamed {count} tensors but described {len(metas)}; "
                "the workers are still waiting for the rest, rebuild the group"
            )
        return {"buckets": len(plan), "bytes": nbytes, "seconds": time.monotonic() - t0}

    def broadcast_flat(self, numel: int, dtype: str = "float32") -> float:
        """One raw broadcast of `numel` elements (the benchmark's baseline); returns seconds."""
        buf = torch.zeros(numel, dtype=_dtype(dtype), device=self.group.device)
        t0 = time.monotonic()
        self.group.broadcast(buf, f"flat buffer ({buf.numel() * buf.element_size()} B)")
        return time.monotonic() - t0

    def close(self) -> None:
        self.group.close()


class WeightReceiver:
    """Ranks 1..N: receive every bucket of a sync, then hand out (name, tensor) views."""

    def __init__(self, addr: str, port: int, world_size: int, rank: int, timeout_s: float, device=None):
        if rank < 1:
            raise ValueError(
                f"a receiver's rank must be 1..{world_size - 1} (rank 0 is the sender), got {rank}"
            )
        self.group = SyncGroup(addr, port, world_size, rank, timeout_s, device)

    def receive(self, metas: list[TensorMeta], plan: list[Bucket]) -> list[tuple[str, torch.Tensor]]:
        """All buckets first, then views in `metas` order: the engine never sees a half-received sync."""
        _check_plan(metas, plan)
        views: list[tuple[str, torch.Tensor] | None] = [None] * len(metas)
        for b, bucket in enumerate(plan):
            buf = torch.empty(bucket.numel, dtype=_dtype(bucket.dtype), device=self.group.device)
            self.group.broadcast(buf, f"bucket {b + 1}/{len(plan)} ({buf.numel() * buf.element_size()} B)")
            for i, off in bucket.entries:
                m = metas[i]
                views[i] = (m.name, buf[off : off + m.numel].view(m.shape))
        return views  # type: ignore[return-value]

    def receive_flat(self, numel: int, dtype: str = "float32") -> float:
        buf = torch.empty(numel, dtype=_dtype(dtype), device=self.group.device)
        t0 = time.monotonic()
        self.group.broadcast(buf, f"flat buffer ({buf.numel() * buf.element_size()} B)")
        return time.monotonic() - t0

    def close(self) -> None:
        self.group.close()


def _check_plan(metas: list[TensorMeta], plan: list[Bucket]) -> None:
    seen = sorted(i for b in plan for i, _ in b.entries)
    if seen != list(range(len(metas))):
        raise WeightSyncError(f"the bucket plan does not cover the {len(metas)} tensors exactly once")


def _itemsize(name: str) -> int:
    return _dtype(name).itemsize


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dt


class ModelWeightSource:
    """A stand-in sender (tests, benchmark): an HF model whose weights a fake 'learner update' perturbs.

    It exposes the methods the rollout pool expects of a sender actor; the FSDP learner's rank 0
    exposes the same ones with an iterator over gathered full tensors.
    """

    def __init__(self, model_path: str, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        from visualthinker_ray.models import load_model

        self.model = load_model(model_path).eval()
        self.bucket_bytes = bucket_bytes
        self.sender: WeightSender | None = None
        self.send_delay_s = 0.0

    def set_send_delay(self, seconds: float) -> None:
        """Pause before streaming (tests: a worker can be killed while it waits inside a sync)."""
        self.send_delay_s = seconds

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def perturb(self, seed: int, scale: float = 0.02) -> None:
        """A 'learner update': seeded noise on every parameter."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in self.model.named_parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)

    def weight_metas(self) -> list[TensorMeta]:
        return tensor_metas(self.model.named_parameters())

    def weights(self) -> dict[str, torch.Tensor]:
        """Every state_dict entry (tied aliases such as lm_head.weight included)."""
        return {n: t.detach().clone() for n, t in self.model.state_dict().items()}

    def init_sync_group(self, addr: str, port: int, world_size: int, timeout_s: float) -> None:
        if self.sender is not None:
            self.sender.close()
        self.sender = None
        self.sender = WeightSender(addr, port, world_size, timeout_s, self.bucket_bytes, device="cpu")

    def send_weights(self, plan: list[Bucket]) -> dict:
        if self.sender is None:
            raise WeightSyncError("the sender has no sync group; call init_sync_group first")
        time.sleep(self.send_delay_s)
        named = ((n, p.detach()) for n, p in self.model.named_parameters())
        return self.sender.send(named, self.weight_metas(), plan)

    def broadcast_flat(self, numel: int, dtype: str = "float32") -> float:
        return self.sender.broadcast_flat(numel, dtype)
