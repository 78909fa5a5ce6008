"""`jobs/submit.sh`: its request (with a stand-in `ray`), then real jobs on a local Ray head.

The head runs with token authentication on (RAY_AUTH_MODE=token and a token made by the test), as
the KubeRay manifests in cluster/ run it: submissions without the token are refused, submit.sh sends
the token it is given. The head's dashboard and job server listen on 127.0.0.1 only (Ray's own gRPC
services bind every interface whatever the flags: `ray start` replaces a loopback node IP with the
machine's address), and every port is picked free, since other Ray clusters may run on the same
machine. The head runs as `ray start --block` in its own process group and is torn down by
signalling that group: `ray stop` would stop every Ray process on the machine, not only this test's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

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
CLI_TIMEOUT_S = 90  # one `ray job submit` of a one-line job, or a refused one (the CLI starts in ~3 s)


def _run_submit(args, env, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SUBMIT), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _without_auth(env: dict) -> dict:
    """`env` without any Ray token setting of the caller's (RAY_AUTH_MODE, _TOKEN, _TOKEN_PATH)."""
    return {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_")}


# -- the request, with a stand-in `ray` that prints its arguments (no cluster) ------------------------

# `ray get-auth-token` prints $FAKE_RAY_TOKEN (fails without it, as with no ~/.ray/auth_token);
# `ray job submit` prints its argv and the RAY_AUTH_MODE it was run with, as JSON.
FAKE_RAY = """#!/usr/bin/env python3
import json, os, sys
if sys.argv[1:2] == ["get-auth-token"]:
    token = os.environ.get("FAKE_RAY_TOKEN")
    if not token:
        sys.exit("Error: No authentication token found.")
    print(token)
else:
    print(json.dumps({"argv": sys.argv[1:], "auth_mode": os.environ.get("RAY_AUTH_MODE")}))
"""


@pytest.fixture
def fake_ray_env(tmp_path):
    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir()
    fake.write_text(FAKE_RAY)
    fake.chmod(0o755)
    env = _without_auth(os.environ)
    env.pop("FAKE_RAY_TOKEN", None)
    return {**env, "PATH": f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _sent(args, env) -> dict:
    """What the stand-in `ray job submit` received: {"argv": [...], "auth_mode": ...}."""
    out = _run_submit(args, env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _request(args, env) -> tuple[list[str], dict, list[str]]:
    """`ray`'s argv, the runtime env and the entrypoint words, as submit.sh would send them."""
    argv = _sent(args, env)["argv"]
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


# -- the token, with the stand-in `ray` and a stand-in head that only answers its auth mode ---------


class _AuthModeHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # the http.server API names it so
        if self.path != "/api/authentication_mode":
            self.send_error(404)
            return
        body = json.dumps({"authentication_mode": self.server.auth_mode}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def stub_head():
    """A stand-in for a head's /api/authentication_mode: set `.auth_mode`; `.url` is its address."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AuthModeHandler)
    server.auth_mode = "token"
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("source", ["RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "ray get-auth-token"])
def test_submit_sends_the_token_it_is_given(fake_ray_env, stub_head, tmp_path, source):
    token = secrets.token_hex(16)
    env = {**fake_ray_env, "RAY_ADDRESS": stub_head.url}
    if source == "RAY_AUTH_TOKEN":
        env["RAY_AUTH_TOKEN"] = token
    elif source == "RAY_AUTH_TOKEN_PATH":
        (tmp_path / "token").write_text(token)
        env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "token")
    else:
        env["FAKE_RAY_TOKEN"] = token
    out = _run_submit([], env)
    assert out.returncode == 0, out.stderr
    # The Ray CLI sends a token only in token mode: submit.sh must have turned it on.
    assert json.loads(out.stdout)["auth_mode"] == "token"
    assert source in out.stderr
    assert token not in out.stderr + out.stdout, "submit.sh must not print the token"


def test_submit_refuses_to_go_without_a_token_the_head_requires(fake_ray_env, stub_head):
    env = {**fake_ray_env, "RAY_ADDRESS": stub_head.url}
    out = _run_submit([], env)
    assert out.returncode == 2, out.stderr
    assert out.stdout == "", "`ray job submit` must not run"
    assert "requires token authentication" in out.stderr and stub_head.url in out.stderr
    for hint in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "kubectl get secret"):
        assert hint in out.stderr, hint
    # RAY_AUTH_MODE=disabled on the client side does not get past a head that requires a token.
    out = _run_submit([], {**env, "RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"})
    assert out.returncode == 2 and out.stdout == "" and "RAY_AUTH_MODE=disabled" in out.stderr


def test_submit_token_errors_without_a_head(fake_ray_env, tmp_path):
    env = {**fake_ray_env, "RAY_ADDRESS": f"http://127.0.0.1:{_free_ports(1)[0]}"}  # nothing listens
    out = _run_submit([], {**env, "RAY_AUTH_MODE": "token"})  # token mode asked for, no token
    assert out.returncode == 2 and out.stdout == "" and "no token was given" in out.stderr
    missing = tmp_path / "no-such-token"
    out = _run_submit([], {**env, "RAY_AUTH_TOKEN_PATH": str(missing)})
    assert out.returncode == 2 and out.stdout == "" and str(missing) in out.stderr
    # No head to ask and no token: submit as before and let `ray` report what it finds.
    assert _sent([], env)["auth_mode"] is None


def test_submit_sends_no_token_to_a_head_without_token_auth(fake_ray_env, stub_head):
    stub_head.auth_mode = "disabled"
    env = {**fake_ray_env, "RAY_ADDRESS": stub_head.url, "FAKE_RAY_TOKEN": "t"}
    out = _run_submit([], env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["auth_mode"] is None and "token" not in out.stderr


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


def _http(url: str, data: dict | None = None, timeout: float = 10.0, token: str | None = None):
    body = None if data is None else json.dumps(data).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def _wait_job(base: str, job_id: str, timeout_s: float, token: str | None = None) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        info = _http(f"{base}/api/jobs/{job_id}", token=token)
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


class LocalHead(NamedTuple):
    base: str  # the job server / dashboard URL
    env: dict  # for jobs/submit.sh: RAY_ADDRESS, and the token in a file named by RAY_AUTH_TOKEN_PATH
    token: str  # the head's token


@pytest.fixture(scope="module")
def ray_head():
    """A local Ray head on loopback with token authentication on."""
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
    token = secrets.token_hex(32)
    token_file = Path(temp_dir) / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = _without_auth({k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")})
    env.update(
        # The head, and every job's driver (it inherits the head's environment), use this token.
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
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
                ready_id = _http(f"{base}/api/jobs/", {"entrypoint": "echo ready"}, token=token)[
                    "submission_id"
                ]
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"Ray head not ready in {HEAD_START_S} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(1.0)
        assert _wait_job(base, ready_id, 60, token)["status"] == "SUCCEEDED"
        assert _http(f"{base}/api/authentication_mode") == {"authentication_mode": "token"}
        # submit.sh gets the token only as a file: it must turn token mode on for `ray` itself.
        submit_env = _without_auth({k: v for k, v in env.items() if k != "VTR_PYTHON"})
        submit_env.update(RAY_ADDRESS=base, RAY_AUTH_TOKEN_PATH=str(token_file))
        yield LocalHead(base, submit_env, token)
    finally:
        with contextlib.suppress(Exception):  # stop jobs still running (a failed test), then the head
            for job in _http(f"{base}/api/jobs/", timeout=5, token=token):
                if job["status"] in ("PENDING", "RUNNING"):
                    _http(f"{base}/api/jobs/{job['submission_id']}/stop", {}, timeout=5, token=token)
        _kill_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_python_is_the_venv(ray_head):
    """`python` in a job is the interpreter the head was started with (its PATH), as submit.sh assumes."""
    base, _, token = ray_head
    entrypoint = {"entrypoint": "python -c 'import sys; print(sys.prefix)'"}
    job_id = _http(f"{base}/api/jobs/", entrypoint, token=token)["submission_id"]
    assert _wait_job(base, job_id, 60, token)["status"] == "SUCCEEDED"
    logs = _http(f"{base}/api/jobs/{job_id}/logs", token=token)["logs"]
    assert sys.prefix in logs, logs


def _no_token_env(head: LocalHead, home: Path) -> dict:
    """The submitter's env with no token anywhere: no RAY_AUTH_* and a HOME without ~/.ray/auth_token."""
    return {**_without_auth(head.env), "HOME": str(home)}


def _ray_job_submit(head: LocalHead, env: dict, entrypoint: list[str]) -> subprocess.CompletedProcess:
    cmd = [str(RAY), "job", "submit", "--address", head.base, "--", *entrypoint]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)


def _jobs_with(head: LocalHead, text: str) -> list[dict]:
    """The head's jobs whose entrypoint contains `text` (asked with the token)."""
    return [j for j in _http(f"{head.base}/api/jobs/", token=head.token) if text in j["entrypoint"]]


def test_head_refuses_a_job_without_its_token(ray_head, tmp_path):
    """`ray job submit` with no token, or a wrong one, is refused and runs nothing; with the token the
    same submission runs and succeeds."""
    marker = f"vtr-auth-marker-{secrets.token_hex(4)}"
    entrypoint = ["python", "-c", f"print('{marker}')"]
    no_token = _no_token_env(ray_head, tmp_path)

    out = _ray_job_submit(ray_head, no_token, entrypoint)
    assert out.returncode != 0, out.stdout[-2000:]
    assert "Authentication required" in out.stderr + out.stdout, out.stderr[-2000:]

    wrong = {**no_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    out = _ray_job_submit(ray_head, wrong, entrypoint)
    assert out.returncode != 0, out.stdout[-2000:]
    assert "Authentication failed" in out.stderr + out.stdout, out.stderr[-2000:]
    assert _jobs_with(ray_head, marker) == [], "a refused submission must not create a job"

    right = {**no_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_head.token}
    out = _ray_job_submit(ray_head, right, entrypoint)
    assert out.returncode == 0, out.stderr[-2000:]
    (job,) = _jobs_with(ray_head, marker)
    assert job["status"] == "SUCCEEDED", job
    assert (
        marker in _http(f"{ray_head.base}/api/jobs/{job['submission_id']}/logs", token=ray_head.token)["logs"]
    )


def test_submit_sh_stops_before_submitting_without_the_token(ray_head, tmp_path):
    """jobs/submit.sh against the token head: with no token it stops with a clear error before
    submitting (with one it runs: test_submit_tiny_job sends it from a token file)."""
    marker = f"/tmp/vtr-auth-marker-{secrets.token_hex(4)}"  # printed back by show-config
    args = ["--command", "show-config", TINY_CONFIG, f"logging.dir={marker}"]
    no_token = _no_token_env(ray_head, tmp_path)

    out = _run_submit(args, no_token, timeout=CLI_TIMEOUT_S)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "requires token authentication" in out.stderr and "RAY_AUTH_TOKEN" in out.stderr
    assert _jobs_with(ray_head, marker) == []


def test_submit_tiny_job(ray_head, tiny_model_dir, synthetic_dir, tmp_path):
    base, env, token = ray_head
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
    info = _http(f"{base}/api/jobs/{found.group(0)}", token=token)
    logs = _http(f"{base}/api/jobs/{found.group(0)}/logs", token=token)["logs"]
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs[-4000:]}"
    assert out.returncode == 0, out.stderr[-3000:]
    assert expected in logs, logs[-4000:]
    print(f"tiny job: {elapsed:.1f} s from submit.sh to SUCCEEDED")
