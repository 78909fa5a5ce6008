"""What a weight sync moves, decided without moving anything: pure functions over plain data.

Both ends of a sync run these on the same inputs, so they agree on every byte's place without
sending per-tensor messages: tensor metadata (name, full shape, wire dtype), flat single-dtype
buckets, the check that an update names exactly the model's parameters, and the handshake that a
group's ranks compare before any byte moves.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024


class WeightSyncError(RuntimeError):
    """A sync group could not be built, or a transfer failed or timed out; the message says where."""

    dead = False  # set by the pool when a peer's actor died (replace it; a new port will not help)


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # the WIRE dtype name without "torch.", e.g. "bfloat16": plain data across Ray

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


@dataclass(frozen=True)
class Bucket:
    dtype: str
    entries: tuple[tuple[int, int], ...]  # (index into metas, element offset in the flat buffer)
    numel: int

    @property
    def last_index(self) -> int:
        return max(i for i, _ in self.entries)


def wire_dtype(param_dtype: str, served: str | None) -> str:
    """The dtype a parameter travels in: the engine's served dtype for floating-point weights
    (bf16 on GPU halves fp32 master weights' bytes), its own dtype otherwise."""
    if served is None or not to_dtype(param_dtype).is_floating_point:
        return param_dtype
    return served


def tensor_metas(
    named_tensors: Iterable[tuple[str, torch.Tensor]], served_dtype: str | None = None
) -> list[TensorMeta]:
    """Metadata of (name, tensor) pairs, floating-point ones announced in `served_dtype`.
    Reads only .shape/.dtype, so FSDP2 shards (DTensors) report their full shape without a gather."""
    return [
        TensorMeta(n, tuple(t.shape), wire_dtype(str(t.dtype).removeprefix("torch."), served_dtype))
        for n, t in named_tensors
    ]


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
        if entries and (numel + m.numel) * itemsize(m.dtype) > bucket_bytes:
            buckets.append(Bucket(m.dtype, tuple(entries), numel))
            entries, numel = [], 0
        entries.append((i, numel))
        open_[m.dtype] = (entries, numel + m.numel)
    buckets += [Bucket(d, tuple(e), n) for d, (e, n) in open_.items() if e]
    return sorted(buckets, key=lambda b: b.last_index)


def check_plan(metas: list[TensorMeta], plan: list[Bucket]) -> None:
    seen = sorted(i for b in plan for i, _ in b.entries)
    if seen != list(range(len(metas))):
        raise WeightSyncError(f"the bucket plan does not cover the {len(metas)} tensors exactly once")


def check_update(
    names_shapes: list[tuple[str, tuple[int, ...]]],
    expected: dict[str, tuple[int, ...]],
    optional: dict[str, tuple[int, ...]] | None = None,
    who: str = "engine",
    may_skip: Iterable[str] = (),
) -> None:
    """An update must name every expected parameter once, with its shape, and nothing unknown.

    Partial updates are refused: vLLM's layer-wise reload leaves a half-loaded fused layer
    (q without k, v) uninitialised, and a silently missing tensor means stale weights. The one
    exception is `may_skip`: parameters that never change (a frozen vision tower, whole layers),
    which a sync leaves out once the engine has received them.
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
    skip = set(may_skip) - seen
    # vLLM fuses the weights of one block (q/k/v, gate/up) into one layer: a block is sent whole or
    # left out whole, or the layer would be rebuilt from a partial load.
    partial = sorted({_block(n) for n in skip if n in expected} & {_block(n) for n in seen})
    if partial:
        raise WeightSyncError(
            f"{who}: the update leaves out only some weights of {partial[:3]}; frozen parameters must "
            "be whole blocks (freeze a module, not single tensors of a fused layer)"
        )
    missing = [n for n in expected if n not in seen and n not in skip]
    if missing:
        raise WeightSyncError(
            f"{who}: update is missing {len(missing)} of {len(expected)} weights (first: {missing[:3]}); "
            "a sync must carry every parameter that can change"
        )


def _block(name: str) -> str:
    """The module two levels above a parameter ('m.layers.0.self_attn.q_proj.weight' ->
    'm.layers.0.self_attn'): the unit inside which vLLM fuses weights."""
    return name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""


@dataclass(frozen=True)
class Handshake:
    """What every rank of a sync group must agree on before any byte moves.

    Each rank builds its own from what it knows (the sender from its model, a receiver from the
    engine's model config), so a wrong checkpoint, dtype or world size fails at group creation
    with the differing field named, not as garbage weights or a hang in the first broadcast.
    """

    backend: str  # "gloo" or "nccl"
    world_size: int
    wire_dtype: str  # floating-point weights travel in this dtype
    params: str  # digest of the model's parameter names and shapes (params_digest)
    version: int  # the policy version the driver built this group at

    def mine(self, shapes: dict[str, tuple[int, ...]]) -> Handshake:
        """This rank's own handshake: the driver's fields, with the digest of the model it holds."""
        return Handshake(self.backend, self.world_size, self.wire_dtype, params_digest(shapes), self.version)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Handshake:
        return cls(**json.loads(text))


def params_digest(shapes: dict[str, tuple[int, ...]]) -> str:
    """A short digest of {parameter name: shape}, the same in every process for the same model."""
    text = json.dumps(sorted((n, list(s)) for n, s in shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def handshake_mismatch(mine: Handshake, theirs: Handshake) -> list[str]:
    """The fields in which two ranks' handshakes differ, as 'field: mine != theirs' lines."""
    a, b = asdict(mine), asdict(theirs)
    return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k]]


def itemsize(name: str) -> int:
    return to_dtype(name).itemsize


def to_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dt
