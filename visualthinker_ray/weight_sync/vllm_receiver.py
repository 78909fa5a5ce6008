"""The receiving end inside vLLM's worker processes: a backend of vLLM's native weight-transfer API.

vLLM (0.32) builds one `WeightTransferEngine` per worker process (per tensor-parallel rank) from
`LLM(weight_transfer_config=WeightTransferConfig(backend=BACKEND))` and drives it through the
four-phase protocol `init_weight_transfer_engine` / `start_weight_update` / `update_weights` /
`finish_weight_update`, called by name through `collective_rpc` with plain-dict arguments. Every
worker joins the project's sync group (transport.py) itself and receives the buckets; only
metadata crosses the RPC, never a tensor, so the same code serves the in-process engine, the
multiprocess engine core and tensor parallelism.

The backend is registered in every vLLM process by the `vllm.general_plugins` entry point
`visualthinker_ray = visualthinker_ray.weight_sync.vllm_receiver:register` (setup.cfg); the
rollout actor also registers it before it builds the engine.

Why not vLLM's own "nccl" backend: it has no CPU transport to test with (the CPU is where this
project's tests run), its broadcast has no timeout, and it carries no handshake, wire-dtype plan
or frozen-parameter skipping. This backend keeps vLLM's lifecycle (layer-wise reload in
checkpoint format, so vLLM renames, fuses and shards the weights) and swaps only the transport.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

BACKEND = "visualthinker_broadcast"


def register() -> None:
    """Register the backend with vLLM's factory (idempotent: plugins load once per process,
    but the rollout actor calls this too)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, _engine_class())


@dataclass
class GroupInitInfo:
    addr: str
    port: int
    rank_offset: int  # this engine's first rank in the sync group; each TP rank adds its own
    timeout_s: float
    handshake: str  # Handshake.to_json() as the driver built it for this engine


@dataclass
class GroupUpdateInfo:
    metas: list  # [name, shape, wire dtype] per tensor, transformers names
    plan: list  # [dtype, [[meta index, offset], ...], numel] per bucket
    aliases: dict = field(default_factory=dict)  # tied alias -> the parameter whose tensor it is
    skipped: int = 0  # parameters left out of this sync (frozen ones, whole layers)


def buffer_only_classes(model: torch.nn.Module) -> set[str]:
    """Class names of the layers that hold buffers and never a parameter (rotary caches, the image
    mean/std of the fused input norm): no checkpoint carries them, so vLLM's reload warns "Failed to
    load weights" for each of them on every sync, and keeps them, which is right."""
    with_params = {
        type(m).__name__ for m in model.modules() if next(m.parameters(recurse=False), None) is not None
    }
    with_buffers = {
        type(m).__name__ for m in model.modules() if next(m.buffers(recurse=False), None) is not None
    }
    return with_buffers - with_params


class _SilenceSkippedLayers(logging.Filter):
    # vLLM's reload warns "<Layer>: Failed to load weights" for each layer a sync did not fill, every
    # sync, and puts the layer's old tensors back. Expected for buffer-only layers (always) and for
    # the layers a sync leaves out on purpose (frozen ones: while such a sync runs). Any other layer
    # kept stale weights: that warning stays.
    def __init__(self, always: set[str]):
        super().__init__()
        self.always = always
        self.active = False
        self.silenced: dict[str, int] = {}  # layer class -> warnings dropped
        self.passed: list[str] = []  # layer classes that kept stale weights

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.endswith(": Failed to load weights"):
            return True
        layer = message.split(":", 1)[0]
        if self.active or layer in self.always:
            self.silenced[layer] = self.silenced.get(layer, 0) + 1
            return False
        self.passed.append(layer)
        return True


def _engine_class():
    from vllm.distributed.weight_transfer.base import WeightTransferEngine
    from vllm.model_executor.model_loader.reload import (
        finalize_layerwise_reload,
        initialize_layerwise_reload,
    )

    from visualthinker_ray.weight_sync.plan import Bucket, Handshake, TensorMeta, WeightSyncError
    from visualthinker_ray.weight_sync.transport import SyncGroup, receive_buckets

    class GroupBroadcastEngine(WeightTransferEngine[GroupInitInfo, GroupUpdateInfo]):
        init_info_cls = GroupInitInfo
        update_info_cls = GroupUpdateInfo
        supports_draft_weight_update = False

        def __init__(self, config, vllm_config, device, model):
            super().__init__(config, vllm_config, device, model)
            self.group: SyncGroup | None = None
            self.quiet = _SilenceSkippedLayers(buffer_only_classes(model))
            logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(self.quiet)

        @property
        def sync_rank(self) -> int:
            pc = self.parallel_config
            return self.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank

        def init_transfer_engine(self, init_info: GroupInitInfo) -> None:
            self.shutdown()
            self.rank_offset = init_info.rank_offset
            self.group = SyncGroup(
                init_info.addr,
                init_info.port,
                Handshake.from_json(init_info.handshake),
                self.sync_rank,
                init_info.timeout_s,
                self.device,
            )

        def start_weight_update(self) -> None:
            initialize_layerwise_reload(self.model)

        def update_weights(self, update_info: dict) -> None:
            # The base class ends with torch.accelerator.synchronize(); the broadcast waits already.
            self.receive_weights(self.parse_update_info(update_info))

        def receive_weights(self, update_info: GroupUpdateInfo) -> None:
            if self.group is None:
                raise WeightSyncError("this vLLM worker has no sync group: init_weight_transfer_engine first")
            metas = [TensorMeta(n, tuple(s), d) for n, s, d in update_info.metas]
            plan = [Bucket(d, tuple(tuple(e) for e in entries), n) for d, entries, n in update_info.plan]
            aliases = update_info.aliases
            served = self.model_config.dtype
            self.quiet.active = update_info.skipped > 0
            try:
                for named in receive_buckets(self.group, metas, plan):
                    items = [(n, t.to(served)) for n, t in named]
                    items += [(a, t) for n, t in items for a, src in aliases.items() if src == n]
                    self.model.load_weights(items)
            except BaseException:
                # vLLM drops the update session without finishing the layer-wise reload: finish it
                # here, so untouched layers get their tensors back and no layer keeps half a load
                # buffered into the next sync. Half-loaded layers now hold partial weights: the
                # engine must get a full sync (a failed sync makes the coordinator rebuild the group,
                # and the first sync over a group carries every parameter).
                finalize_layerwise_reload(self.model, self.model_config)
                raise

        def finish_weight_update(self) -> None:
            finalize_layerwise_reload(self.model, self.model_config)
            self.quiet.active = False

        def shutdown(self) -> None:
            if self.group is not None:
                self.group.close()
                self.group = None

    return GroupBroadcastEngine


def _read_served_weights(worker) -> dict[str, torch.Tensor]:
    """Inside a vLLM worker: its served weights by vLLM name, on the CPU, as the kernels use them.

    The CPU build repacks linear weights into opaque GEMM handles and leaves empty parameters;
    those are recovered exactly by running the layer on an identity matrix (products with 1 and
    sums of zeros are exact). Each tensor-parallel rank reads its own shard. Tests and debugging
    only: one K x K matmul per linear layer.
    """
    model = worker.model_runner.model
    out = {}
    with torch.no_grad():
        for mname, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            method = getattr(mod, "quant_method", None)
            if isinstance(w, torch.Tensor) and w.numel() == 0 and hasattr(mod, "input_size_per_partition"):
                eye = torch.eye(mod.input_size_per_partition, dtype=mod.params_dtype, device=w.device)
                out[f"{mname}.weight"] = method.apply(mod, eye, None).t().contiguous().cpu()
            elif mname.endswith("lm_head") and method is not None and isinstance(w, torch.Tensor):
                # Tied to the embedding but with its own packed GEMM on the CPU: read what it computes.
                eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
                out[f"{mname}.weight"] = method.apply(mod, eye).t().contiguous().cpu()
        for name, p in model.named_parameters():
            if p.numel() > 0:
                out[name] = p.detach().cpu().clone()
    return out


class WorkerExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`): methods called by name through
    `collective_rpc`, so no callable is pickled. Benchmarks and tests only; the sync itself needs
    nothing beyond the weight-transfer backend."""

    def vtr_receive_flat(self, numel: int, dtype: str) -> float:
        from visualthinker_ray.weight_sync.transport import receive_flat

        return receive_flat(self.weight_transfer_engine.group, numel, dtype)

    def vtr_read_served_weights(self) -> dict[str, tuple[bytes, list[int], str]]:
        """As raw bytes, shape and dtype: vLLM's RPC encoder turns tensors into lists otherwise."""
        return {
            n: (
                t.contiguous().view(torch.uint8).numpy().tobytes(),
                list(t.shape),
                str(t.dtype).removeprefix("torch."),
            )
            for n, t in _read_served_weights(self).items()
        }

    def vtr_reload_warnings(self) -> dict:
        """vLLM's "Failed to load weights" warnings in this worker since it started: those silenced
        by layer class, and the layers that passed the filter (stale weights)."""
        quiet = self.weight_transfer_engine.quiet
        return {"silenced": dict(quiet.silenced), "passed": list(quiet.passed)}

    def vtr_compare_with_checkpoint(self, path: str) -> dict:
        """Are this worker's served weights exactly those that vLLM's own loader makes of the
        safetensors file at `path` (the learner's full state dict, transformers names)?

        Reads the served weights, reloads the file through the worker's checkpoint-format reload
        (which renames, fuses and shards for this tensor-parallel rank), reads again and compares
        tensor by tensor. Equal weights are left as they were; unequal ones are replaced by the
        file's, so this is a check for tests, never for a serving engine. Only a path crosses the RPC.
        """
        from safetensors.torch import load_file

        before = _read_served_weights(self)
        weights = load_file(path)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        after = _read_served_weights(self)
        unequal = {}
        for n, t in after.items():
            if n not in before or before[n].shape != t.shape:
                unequal[n] = float("inf")
            elif not torch.equal(before[n], t):
                unequal[n] = float((before[n].float() - t.float()).abs().max())
        return {"rank": self.parallel_config.rank, "tensors": len(after), "unequal": unequal}


WORKER_EXTENSION = f"{__name__}.WorkerExtension"
