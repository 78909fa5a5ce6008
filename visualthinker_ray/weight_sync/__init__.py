"""Weight sync, learner rank 0 -> every rollout engine worker: one package, one transport.

- plan.py: pure planning (tensor metadata, buckets, update checks, the group handshake);
- transport.py: the broadcast group (gloo on the CPU, NCCL on the GPU), bounded everywhere;
- vllm_receiver.py: the receiving end inside vLLM's worker processes (a vLLM weight-transfer backend);
- coordinator.py: the driver's side (group membership and ranks, one sync end to end).

Changing the transport touches transport.py only.
"""

from visualthinker_ray.weight_sync.plan import (
    DEFAULT_BUCKET_BYTES,
    Bucket,
    Handshake,
    TensorMeta,
    WeightSyncError,
    check_update,
    params_digest,
    plan_buckets,
    tensor_metas,
)

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "Bucket",
    "Handshake",
    "TensorMeta",
    "WeightSyncError",
    "check_update",
    "params_digest",
    "plan_buckets",
    "tensor_metas",
]
