"""A stand-in sender for the weight-sync tests and benchmark: an HF model whose weights a fake
'learner update' perturbs. It has the sender methods of learner rank 0 (weight_sync/coordinator.py)."""

from __future__ import annotations

import itertools
import time

import torch

from visualthinker_ray.weight_sync import (
    DEFAULT_BUCKET_BYTES,
    Handshake,
    TensorMeta,
    WeightSyncError,
    tensor_metas,
)
from visualthinker_ray.weight_sync.transport import WeightSender


class ModelWeightSource:
    def __init__(
        self, model_path: str, bucket_bytes: int = DEFAULT_BUCKET_BYTES, freeze_vision: bool = False
    ):
        from visualthinker_ray.models import load_model

        self.model = load_model(model_path).eval()
        if freeze_vision:
            self.model.model.visual.requires_grad_(False)
        self.bucket_bytes = bucket_bytes
        self.sender: WeightSender | None = None
        self.send_delay_s = 0.0
        self.fail_after: int | None = None  # the next send stops after this many tensors
        self.sends: list[int] = []  # tensors per send, for tests

    def set_send_delay(self, seconds: float) -> None:
        """Pause before streaming (tests: a worker can be killed while it waits inside a sync)."""
        self.send_delay_s = seconds

    def fail_next_send(self, after_tensors: int) -> None:
        """The next send streams its first `after_tensors` tensors (the full buckets among them reach
        the workers, who load them) and then fails, as a sender that crashes mid-sync: the workers
        wait for the rest until the group's timeout. Once; the sends after it are whole."""
        self.fail_after = after_tensors

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def perturb(self, seed: int, scale: float = 0.02) -> None:
        """A 'learner update': seeded noise on every parameter that can change."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in self.model.named_parameters():
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale
                if p.requires_grad:
                    p.add_(noise)

    def weight_metas(self, served_dtype: str | None = None, trainable_only: bool = False) -> list[TensorMeta]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad or not trainable_only]
        return tensor_metas(named, served_dtype)

    def weights(self) -> dict[str, torch.Tensor]:
        """Every state_dict entry (tied aliases such as lm_head.weight included)."""
        return {n: t.detach().clone() for n, t in self.model.state_dict().items()}

    def save_weights(self, path: str) -> str:
        from safetensors.torch import save_file

        # Tied aliases (lm_head.weight) too, as the sync sends them; cloned: safetensors refuses shared storage.
        save_file({n: t.detach().clone().contiguous() for n, t in self.model.state_dict().items()}, path)
        return path

    def init_sync_group(self, addr: str, port: int, handshake: str, timeout_s: float) -> None:
        if self.sender is not None:
            self.sender.close()
        self.sender = None
        mine = Handshake.from_json(handshake).mine(
            {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        )
        self.sender = WeightSender(addr, port, mine, timeout_s, "cpu", self.bucket_bytes)

    def send_weights(self, metas: list[TensorMeta], plan) -> dict:
        if self.sender is None:
            raise WeightSyncError("the sender has no sync group; call init_sync_group first")
        time.sleep(self.send_delay_s)
        wanted = {m.name for m in metas}
        self.sends.append(len(metas))
        named = ((n, p.detach()) for n, p in self.model.named_parameters() if n in wanted)
        if self.fail_after is not None:
            named, self.fail_after = itertools.islice(named, self.fail_after), None
        return self.sender.send(named, metas, plan)

    def send_counts(self) -> list[int]:
        return list(self.sends)

    def broadcast_flat(self, numel: int, dtype: str = "float32") -> float:
        return self.sender.broadcast_flat(numel, dtype)
