"""The one transport of weight sync: a broadcast group, gloo on the CPU and NCCL on the GPU.

Rank 0 is the sender (learner rank 0); ranks 1..N are receivers: every vLLM worker process of
every rollout engine (each tensor-parallel rank), or the HF engine's actor. The group is built
from a `TCPStore` (the sender is its master) and is never the default process group, so it lives
beside vLLM's and FSDP's own groups in the same process; a fresh group on a new port replaces it
when workers are replaced or added.

Every phase is bounded: the rendezvous, the handshake, NCCL's lazy connection (made inside the
first collective, which `work.wait(timeout)` does not cover) and each broadcast. On a timeout the
group is aborted and `WeightSyncError` names the group, the rank and what it was doing; the
process (a learner rank above all) stays alive and can build a new group on a new port.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta

import torch

from visualthinker_ray.weight_sync.plan import (
    DEFAULT_BUCKET_BYTES,
    Bucket,
    Handshake,
    TensorMeta,
    WeightSyncError,
    check_plan,
    handshake_mismatch,
    plan_buckets,
    to_dtype,
)


def backend_for(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


class SyncGroup:
    """This process's membership in one weight-sync group (rank 0 sends, ranks 1..N receive)."""

    def __init__(self, addr: str, port: int, handshake: Handshake, rank: int, timeout_s: float, device):
        self.addr, self.port, self.rank, self.timeout_s = addr, port, rank, timeout_s
        self.world_size = handshake.world_size
        self.device = torch.device(device)
        self.name = f"weight-sync@{addr}:{port}"
        self.broken: str | None = None  # set after a failed collective: the group must be rebuilt
        self.pg = None
        if handshake.backend != backend_for(str(self.device)):
            raise WeightSyncError(
                f"{self.name}: rank {rank} runs on {self.device} but the group's backend is "
                f"{handshake.backend}; every rank of a group must be on the same kind of device"
            )
        timeout = timedelta(seconds=timeout_s)
        try:
            self.store = torch.distributed.TCPStore(
                addr, port, self.world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False
            )
        except Exception as e:
            raise WeightSyncError(
                f"{self.name}: rank {rank} could not {'open' if rank == 0 else 'reach'} the group's store "
                f"within {timeout_s:.0f}s ({e}); is the sender (rank 0) alive and the port free?"
            ) from e
        self._rendezvous(handshake)
        store = torch.distributed.PrefixStore("pg", self.store)
        try:
            if handshake.backend == "nccl":
                self.pg = _nccl_group(store, rank, self.world_size, timeout, self.device)
            else:
                self.pg = torch.distributed.ProcessGroupGloo(store, rank, self.world_size, timeout)
        except Exception as e:  # gloo connects here; a peer that checked in and then died times out
            raise WeightSyncError(
                f"{self.name}: rank {rank} could not connect the {handshake.backend} group within "
                f"{timeout_s:.0f}s ({str(e)[:300]}); a peer joined and then died or stopped: rebuild "
                "the group on a new port once it is replaced"
            ) from e
        if handshake.backend == "nccl":
            # NCCL connects inside the first collective: make it here, under the same bound.
            self.broadcast(torch.zeros(1, device=self.device), "the connection check")

    def _rendezvous(self, handshake: Handshake) -> None:
        """Every rank checks in with its handshake and compares it with rank 0's; past the deadline
        the error names the ranks that never did."""
        deadline = time.monotonic() + self.timeout_s
        keys = [f"joined/{r}" for r in range(self.world_size)]
        try:
            self.store.set(f"joined/{self.rank}", handshake.to_json())
            while not self.store.check(keys):
                if time.monotonic() > deadline:
                    missing = [r for r in range(self.world_size) if not self.store.check([f"joined/{r}"])]
                    raise WeightSyncError(
                        f"{self.name}: rank(s) {missing} of {self.world_size} did not join within "
                        f"{self.timeout_s:.0f}s (seen from rank {self.rank}); the worker is dead, slow to "
                        "start or cannot reach the address: rebuild the group on a new port once it is replaced"
                    )
                time.sleep(0.02)
            others = (
                {
                    r: Handshake.from_json(self.store.get(f"joined/{r}").decode())
                    for r in range(1, self.world_size)
                }
                if self.rank == 0
                else {0: Handshake.from_json(self.store.get("joined/0").decode())}
            )
        except torch.distributed.DistError as e:
            raise WeightSyncError(
                f"{self.name}: rank {self.rank} lost the group's store while waiting for the other ranks "
                f"({e}); the sender (rank 0) gave up or died: rebuild the group on a new port"
            ) from e
        for r, theirs in others.items():
            diff = handshake_mismatch(handshake, theirs)
            if diff:
                raise WeightSyncError(
                    f"{self.name}: rank {self.rank} and rank {r} disagree on the sync ({'; '.join(diff)}; "
                    "this rank's value first). Same checkpoint, dtype and group on both ends?"
                )

    def broadcast(self, buf: torch.Tensor, what: str) -> None:
        self.start_broadcast(buf, what)()

    def start_broadcast(self, buf: torch.Tensor, what: str) -> Callable[[], None]:
        """Post a broadcast of `buf` (from rank 0) and return the call that waits for it, bounded.

        Posting the next bucket before waiting for, or loading, the current one lets the bytes of one
        bucket move while the other is filled or loaded. Keep `buf` alive until the wait returns."""
        if self.broken:
            raise WeightSyncError(f"{self.name} is broken ({self.broken}); rebuild it on a new port")
        t0 = time.monotonic()
        cuda = self.device.type == "cuda"
        works: list = []
        try:
            if cuda:
                # NCCL connects inside the first collective, outside any wait's timeout, and an NCCL
                # wait can outlive its timeout: run both where a deadline can fire, abort on expiry.
                _within(self.timeout_s, lambda: works.append(self.pg.broadcast(buf, 0)))
            else:
                works.append(self.pg.broadcast(buf, 0))
        except Exception as e:
            self._fail(what, t0, e)

        def wait() -> None:
            bound = timedelta(seconds=self.timeout_s)
            try:
                if cuda:
                    # With a timeout, an NCCL work's wait blocks this thread until the collective is
                    # done and raises on expiry (without one it only orders streams and returns).
                    _within(self.timeout_s + 5, lambda: works[0].wait(timeout=bound))
                else:
                    works[0].wait(timeout=bound)
            except Exception as e:
                self._fail(what, t0, e)

        return wait

    def _fail(self, what: str, t0: float, e: Exception):
        self.broken = f"{what} failed on rank {self.rank}"
        self.abort()
        raise WeightSyncError(
            f"{self.name}: {what} failed on rank {self.rank} after {time.monotonic() - t0:.1f}s "
            f"(timeout {self.timeout_s:.0f}s): {e}. A peer died or stopped taking part; rebuild the group."
        ) from e

    def abort(self) -> None:
        """Tear the communicator down now, without waiting for peers (NCCL: ncclCommAbort)."""
        pg, self.pg = self.pg, None
        abort = getattr(pg, "abort", None)
        if callable(abort):
            with contextlib.suppress(Exception):  # best effort: the group is being thrown away
                abort()

    def close(self) -> None:
        # Dropping the references lets gloo close its sockets; an NCCL group is shut down explicitly
        # (its communicators hold GPU memory); the store closes with its last user.
        if self.broken:
            self.abort()
        elif self.pg is not None and self.device.type == "cuda":
            with contextlib.suppress(Exception):
                self.pg.shutdown()
        self.pg = None
        self.store = None


class _Expired(TimeoutError):
    pass


def _within(timeout_s: float, fn: Callable[[], object]) -> None:
    """Run `fn` on a daemon thread; raise if it has not returned within `timeout_s`."""
    box: list[BaseException] = []

    def run():
        try:
            fn()
        except BaseException as e:  # handed to the caller's thread
            box.append(e)

    t = threading.Thread(target=run, daemon=True, name="weight-sync-collective")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise _Expired(f"no completion within {timeout_s:.0f}s")
    if box:
        raise box[0]


def _nccl_group(store, rank: int, world_size: int, timeout: timedelta, device: torch.device):
    # UNTESTED on this project's CPU machines (no GPU, no NCCL build); bench/gpu_check.py exercises the
    # same calls on a GPU. NCCL's watchdog tears the whole process down on a collective timeout by
    # default (3, SkipCleanUp, tears down too); 2 = CleanUpOnly: abort the communicators, keep the
    # process, so a learner survives a dead rollout worker (this class also aborts and raises itself).
    # Read when the group is constructed, so it is set just around that, for this group alone.
    previous = os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"
    try:
        opts = torch.distributed.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        torch.cuda.set_device(device)
        return torch.distributed.ProcessGroupNCCL(store, rank, world_size, opts)
    finally:
        if previous is None:
            os.environ.pop("TORCH_NCCL_ASYNC_ERROR_HANDLING", None)
        else:
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = previous


class WeightSender:
    """Rank 0: streams (name, tensor) pairs into wire-dtype buckets, broadcasting each one when full."""

    def __init__(
        self,
        addr: str,
        port: int,
        handshake: Handshake,
        timeout_s: float,
        device,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ):
        self.bucket_bytes = bucket_bytes
        self.group = SyncGroup(addr, port, handshake, 0, timeout_s, device)

    def send(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        metas: list[TensorMeta],
        plan: list[Bucket] | None = None,
    ) -> dict:
        """Broadcast the tensors (in `metas` order, e.g. gathered one at a time), each cast to its
        meta's wire dtype as it is copied into its bucket; returns transfer stats."""
        plan = plan if plan is not None else plan_buckets(metas, self.bucket_bytes)
        where = {i: (b, off) for b, bucket in enumerate(plan) for i, off in bucket.entries}
        filled = [0] * len(plan)
        buffers: dict[int, torch.Tensor] = {}
        sent, nbytes, count, t0 = 0, 0, 0, time.monotonic()
        inflight: Callable[[], None] | None = None
        on_wire = None
        for i, (name, t) in enumerate(named_tensors):
            if i >= len(metas) or name != metas[i].name or tuple(t.shape) != metas[i].shape:
                expected = f"{metas[i].name} {metas[i].shape}" if i < len(metas) else "the end"
                self.group.broken = "the sender's stream differed from its metadata"
                raise WeightSyncError(
                    f"{self.group.name}: tensor #{i} is {name} {tuple(t.shape)} but the metadata sent to "
                    f"the workers says {expected}; the sender must stream exactly the tensors it described"
                )
            b, off = where[i]
            if b not in buffers:
                buffers[b] = torch.empty(
                    plan[b].numel, dtype=to_dtype(plan[b].dtype), device=self.group.device
                )
            buffers[b][off : off + t.numel()].copy_(t.detach().reshape(-1))  # casts to the wire dtype
            filled[b] += 1
            count += 1
            if filled[b] == len(plan[b].entries):
                if b != sent:
                    self.group.broken = "a bad bucket plan"
                    raise WeightSyncError(
                        f"{self.group.name}: bucket {b} filled before bucket {sent} (bad plan)"
                    )
                buf = buffers.pop(b)
                if inflight is not None:
                    inflight()  # at most one bucket on the wire while the next one fills
                inflight = self.group.start_broadcast(
                    buf, f"bucket {b + 1}/{len(plan)} ({buf.numel() * buf.element_size()} B)"
                )
                on_wire = buf  # referenced until its wait returns
                nbytes += buf.numel() * buf.element_size()
                sent += 1
        if inflight is not None:
            inflight()
        del on_wire
        if count != len(metas):
            self.group.broken = "the sender streamed fewer tensors than it described"
            raise WeightSyncError(
                f"{self.group.name}: the sender streamed {count} tensors but described {len(metas)}; "
                "the workers are still waiting for the rest, rebuild the group"
            )
        return {"buckets": len(plan), "bytes": nbytes, "seconds": time.monotonic() - t0}

    def broadcast_flat(self, numel: int, dtype: str = "float32") -> float:
        """One raw broadcast of `numel` elements (the benchmark's baseline); returns seconds."""
        buf = torch.zeros(numel, dtype=to_dtype(dtype), device=self.group.device)
        t0 = time.monotonic()
        self.group.broadcast(buf, f"flat buffer ({buf.numel() * buf.element_size()} B)")
        return time.monotonic() - t0

    def close(self) -> None:
        self.group.close()


def receive_buckets(
    group: SyncGroup, metas: list[TensorMeta], plan: list[Bucket]
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Ranks 1..N: each bucket's (name, view) pairs, in plan order, as soon as the bucket arrives.

    A consumer that loads bucket by bucket holds one bucket's buffer at a time; the views are only
    valid until the next bucket is asked for unless the consumer keeps a reference."""
    check_plan(metas, plan)

    def post(b: int):
        buf = torch.empty(plan[b].numel, dtype=to_dtype(plan[b].dtype), device=group.device)
        what = f"bucket {b + 1}/{len(plan)} ({buf.numel() * buf.element_size()} B)"
        return buf, group.start_broadcast(buf, what)

    pending = post(0) if plan else None
    for b, bucket in enumerate(plan):
        buf, wait = pending
        wait()
        # the next bucket moves while the consumer loads this one
        pending = post(b + 1) if b + 1 < len(plan) else None
        yield [
            (metas[i].name, buf[off : off + metas[i].numel].view(metas[i].shape)) for i, off in bucket.entries
        ]


def receive_flat(group: SyncGroup, numel: int, dtype: str = "float32") -> float:
    """One raw broadcast into a scratch buffer (the benchmark's baseline); returns seconds."""
    buf = torch.empty(numel, dtype=to_dtype(dtype), device=group.device)
    t0 = time.monotonic()
    group.broadcast(buf, f"flat buffer ({buf.numel() * buf.element_size()} B)")
    return time.monotonic() - t0
