"""Driving Ray from the driver: joining or starting the cluster, bounded waits with errors naming
each failed call, free ports."""

from __future__ import annotations

import logging
import os
import socket

import ray

log = logging.getLogger(__name__)


def wait_all(refs: dict, timeout_s: float, what: str, error: type[Exception] = RuntimeError) -> dict:
    """Wait for every labelled call within `timeout_s`; results by label in the order given.

    One `error` lists every call that failed and why (a dead actor, an exception, no answer in
    time), never a hang; `err.dead` tells whether an actor died (replace it before retrying).
    """
    labels = {ref: label for label, ref in refs.items()}
    ready, pending = ray.wait(list(labels), num_returns=len(labels), timeout=timeout_s)
    results, failures, dead = {}, [], False
    for ref in ready:
        try:
            results[labels[ref]] = ray.get(ref)
        except ray.exceptions.ActorDiedError as e:
            dead = True
            failures.append(f"{labels[ref]}: actor died ({str(e).splitlines()[0]}){_creation_error(e)}")
        except ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None) or e
            failures.append(f"{labels[ref]}: {type(cause).__name__}: {str(cause).strip()[:500]}")
    failures += [f"{labels[ref]}: no answer within {timeout_s:.0f}s" for ref in pending]
    if failures:
        err = error(f"{what} failed:\n  " + "\n  ".join(failures))
        err.dead = dead
        raise err
    return {label: results[label] for label in refs}


def _creation_error(e: Exception) -> str:
    """The exception an actor's constructor raised, when that is why it died ('' otherwise)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    raised = [ln for ln in lines if ln.split(":")[0].endswith(("Error", "Exception"))]
    return f"; it raised {raised[-1][:500]}" if "creation task" in str(e) and raised else ""


def free_port(addr: str = "127.0.0.1") -> int:
    """A port free on this machine right now (whoever binds it later retries on a clash)."""
    with socket.socket() as s:
        s.bind(("" if addr not in ("127.0.0.1", "localhost") else addr, 0))
        return s.getsockname()[1]


def connect_ray(cfg) -> None:
    """Join the cluster under `ray job submit` (RAY_ADDRESS) or resources.ray_address; else start one."""
    if ray.is_initialized():
        return
    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("joined the Ray cluster at %s", address)
    else:
        # Logical CPUs for every actor the config asks for (oversubscribed on a small machine: the
        # actors share the cores), so nothing waits forever for a CPU that does not exist.
        wanted = cfg.rollout.num_workers + cfg.learner.num_workers + cfg.reward.num_workers + 1
        ray.init(
            num_cpus=max(os.cpu_count() or 1, wanted),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
        )
        log.info("started a local Ray instance (%s CPUs)", ray.cluster_resources().get("CPU"))


def split_evenly(items: list, n: int) -> list[list]:
    """`n` contiguous chunks whose sizes differ by at most one (concatenated, the original order; some
    are empty when there are fewer items than chunks): the fan-out of work over a pool of actors."""
    q, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + q + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out
