"""Steering a running job from outside it: a small named Ray actor that the driver creates and
reads once a step, so `python -m visualthinker_ray scale --rollout N` can find the job by name
(resources.job_name) through Ray and resize its rollout pool without a restart."""

from __future__ import annotations

import time

import ray

from visualthinker_ray.errors import InputError

NAMESPACE = "visualthinker_ray"


def control_name(job_name: str) -> str:
    return f"{job_name}-control"


class RunControl:
    """The job's mailbox: a pending resize request in, the pool's last status out."""

    def __init__(self):
        self._rollout: int | None = None
        self._status: dict = {}

    def request_rollout(self, n: int) -> dict:
        self._rollout = n
        return self._status

    def take_rollout_request(self) -> int | None:
        n, self._rollout = self._rollout, None
        return n

    def report(self, status: dict) -> None:
        self._status = status


def create_control(job_name: str, release_wait_s: float = 30.0):
    """The driver's control actor; a second live job with the same name is refused. A driver that
    was just killed (this is its retry) holds the name until Ray has noticed: wait that long."""
    deadline = time.monotonic() + release_wait_s
    while True:
        try:
            return (
                ray.remote(num_cpus=0)(RunControl)
                .options(name=control_name(job_name), namespace=NAMESPACE)
                .remote()
            )
        except ValueError as e:  # Ray: the name is taken
            if time.monotonic() >= deadline:
                raise InputError(
                    f"a job named {job_name!r} is already running on this Ray cluster ({e}); give "
                    "this one another resources.job_name"
                ) from e
            time.sleep(1.0)


def find_control(job_name: str, address: str | None):
    """The control actor of the running job `job_name` on the cluster at `address`."""
    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False)
    try:
        return ray.get_actor(control_name(job_name), namespace=NAMESPACE)
    except ValueError as e:
        raise InputError(
            f"no running job named {job_name!r} on the Ray cluster at {address or 'auto'}: is `train` "
            "running, and with this resources.job_name (--job)?"
        ) from e
