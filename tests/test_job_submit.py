"""`jobs/submit.sh`: its request (with a stand-in `ray`), then a real job on a local Ray head.

The head's dashboard and job server listen on 127.0.0.1 only (Ray's own gRPC services bind every
interface whatever the flags: `ray start` replaces a loopback node IP with the machine's address),
token auth is disabled (RAY_AUTH_MODE=disabled), and every port is picked free, since other Ray
clusters may run on the same machine. The head runs as `ray start --block` in its own process group
and is torn down by signalling that group: `ray stop` would stop every Ray process on the machine,
not only this test's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "jobs" / "submit.sh"
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
TINY_CONFIG = "jobs/tiny_cpu.yaml"

# The job the real-cluster test submits, and a line its logs must contain: one training step of the
# tiny CPU job, whose driver must join the cluster it was submitted to (not start a Ray of its own).
# (Before `train` existed this was `["--command", "generate", TINY_CONFIG, "--prompts", "2"]`.)
JOB = (["--command", "train", TINY_CONFIG, "algorithm.max_steps=1"], "joined the Ray cluster at")

HEAD_START_S = 120  # `ray start` + dashboard + job agent ready (about 30 s on 2 cores)
JOB_TIMEOUT_S = 300  # upload, actors, one step of the tiny model: about 30 s here
STOP_GRACE_S = 3  # a graceful stop takes > 20 s here; nothing of this cluster needs to survive


def _run_submit(args, env, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SUBMIT), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


# -- the request, with a stand-in `ray` that prints its arguments (no cluster) ------------------------


@pytest.fixture
def fake_ray_env(tmp_path):
    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir()
    fake.write_text("#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _request(args, env) -> tuple[list[str], dict, list[str]]:
    """`ray`'s argv, the runtime env and the entrypoint words, as submit.sh would send them."""
    out = _run_submit(args, env)
    assert out.returncode == 0, out.stderr
    argv = json.loads(out.stdout)
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    return argv, runtime_env, argv[argv.index("--") + 1 :]


def test_submit_defaults(fake_ray_env):
    env = {k: v for k, v in fake_ray_env.items() if k not in ("RAY_ADDRESS", "VTR_PYTHON")}
    argv, runtime_env, entrypoint = _request([], env)
    assert argv[:2] == ["job", "submit"]
    assert argv[argv.index("--address") + 1] == "http://127.0.0.1:8265"
    assert argv[argv.index("--working-dir") + 1] == "."
    assert "--no-wait" not in argv
    for excluded in (".venv", "artifacts", "runs"):
        assert excluded in runtime_env["excludes"]
    assert entrypoint == ["python", "-m", "visualthinker_ray", "train", "--config", TINY_CONFIG]


def test_submit_passes_options_and_overrides(fake_ray_env):
    env = {**fake_ray_env, "RAY_ADDRESS": "http://10.0.0.1:8265", "VTR_PYTHON": "/opt/py/bin/python"}
    args = ["--no-wait", "jobs/sat_qwen2vl_2b.yaml", "--resume", "rollout.stop=[</answer>]", "a b=c"]
    argv, _, entrypoint = _request(args, env)
    assert argv[argv.index("--address") + 1] == "http://10.0.0.1:8265"
    assert argv.index("--no-wait") < argv.index("--")
    # Separate words, unchanged: `ray job submit` shell-quotes each one itself.
    assert entrypoint == [
        "/opt/py/bin/python", "-m", "visualthinker_ray", "train", "--config", "jobs/sat_qwen2vl_2b.yaml",
        "--resume", "rollout.stop=[</answer>]", "a b=c",
    ]  # fmt: skip
    _, _, entrypoint = _request(["--command", "generate", "algorithm.beta=0.0"], env)
    assert entrypoint[3:] == ["generate", "--config", TINY_CONFIG, "algorithm.beta=0.0"]


def test_submit_usage_and_errors(fake_ray_env):
    out = _run_submit(["-h"], fake_ray_env)
    assert out.returncode == 0 and out.stdout.startswith("Usage: jobs/submit.sh")
    out = _run_submit(["jobs/no_such_job.yaml"], fake_ray_env)
    assert out.returncode == 2 and "no_such_job.yaml" in out.stderr and out.stdout == ""


# -- a real job on a local head ----------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _http(url: str, data: dict | None = None, timeout: float = 10.0):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def _wait_job(base: str, job_id: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        info = _http(f"{base}/api/jobs/{job_id}")
        if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {info['status']} after {timeout_s} s")
        time.sleep(1.0)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the head: SIGTERM to its process group (the one `ray start` leads), SIGKILL after a grace."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while _group_alive(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    # The GCS, raylet and idle workers outlive a SIGTERM by many seconds.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head():
    """A local Ray head on loopback: yields (job server URL, env for jobs/submit.sh)."""
    if not RAY.exists():
        pytest.skip(f"no ray CLI next to {sys.executable}")
    names = [
        "port",
        "dashboard-port",
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
        "ray-client-server-port",
    ]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    # A short root: Ray's unix socket paths live under it and must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="vtr-ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(
        RAY_AUTH_MODE="disabled",  # Ray 2.60 turns token auth on by default for `ray start`
        RAY_USAGE_STATS_ENABLED="0",
        # A job's `python` is the first on the head's PATH: make it this venv's
        # (test_job_python_is_the_venv checks it; jobs/submit.sh also takes VTR_PYTHON).
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    cmd = [
        str(RAY), "start", "--head", "--block", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
        "--num-cpus=4", f"--temp-dir={temp_dir}",
        *(f"--{k}={v}" for k, v in ports.items()),
    ]  # fmt: skip
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        # Ready = the job agent accepts a job: submit a trivial one until it does, then let it finish.
        deadline = time.monotonic() + HEAD_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                ready_id = _http(f"{base}/api/jobs/", {"entrypoint": "echo ready"})["submission_id"]
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"Ray head not ready in {HEAD_START_S} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(1.0)
        assert _wait_job(base, ready_id, 60)["status"] == "SUCCEEDED"
        submit_env = {k: v for k, v in env.items() if k != "VTR_PYTHON"}
        submit_env["RAY_ADDRESS"] = base
        yield base, submit_env
    finally:
        with contextlib.suppress(Exception):  # stop jobs still running (a failed test), then the head
            for job in _http(f"{base}/api/jobs/", timeout=5):
                if job["status"] in ("PENDING", "RUNNING"):
                    _http(f"{base}/api/jobs/{job['submission_id']}/stop", {}, timeout=5)
        _kill_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_python_is_the_venv(ray_head):
    """`python` in a job is the interpreter the head was started with (its PATH), as submit.sh assumes."""
    base, env = ray_head
    job_id = _http(f"{base}/api/jobs/", {"entrypoint": "python -c 'import sys; print(sys.prefix)'"})[
        "submission_id"
    ]
    assert _wait_job(base, job_id, 60)["status"] == "SUCCEEDED"
    logs = _http(f"{base}/api/jobs/{job_id}/logs")["logs"]
    assert sys.prefix in logs, logs


def test_submit_tiny_job(ray_head, tiny_model_dir, synthetic_dir, tmp_path):
    base, env = ray_head
    args, expected = JOB
    overrides = [
        "algorithm.group_size=2",
        "rollout.engine=hf",
        "rollout.max_new_tokens=16",
        "rollout.eval_max_new_tokens=16",
        # Absolute paths: artifacts/ and runs/ are not uploaded; the head runs on this machine.
        f"model.path={tiny_model_dir}",
        f"data.train={Path(synthetic_dir) / 'SAT'}",
        f"data.eval={Path(synthetic_dir) / 'CV-Bench'}",
        f"logging.dir={tmp_path / 'runs'}",
    ]
    t0 = time.monotonic()
    out = _run_submit([*args, *overrides], env, timeout=JOB_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    found = re.search(r"raysubmit_\w+", out.stdout + out.stderr)
    assert found, f"no submission id in the output:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    info = _http(f"{base}/api/jobs/{found.group(0)}")
    logs = _http(f"{base}/api/jobs/{found.group(0)}/logs")["logs"]
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs[-4000:]}"
    assert out.returncode == 0, out.stderr[-3000:]
    assert expected in logs, logs[-4000:]
    print(f"tiny job: {elapsed:.1f} s from submit.sh to SUCCEEDED")
