"""The KubeRay manifests in cluster/ agree with the GPU job config and with the command line.

No Kubernetes here: the manifests are parsed as YAML and checked against the KubeRay ray.io/v1
field names, the resource names and pool sizes of jobs/sat_qwen2vl_2b.yaml, and the real CLI; and
they are secure and elastic by default (token authentication, a dashboard reachable only inside the
cluster, an autoscaled rollout group, the raylet subreaper for vLLM's processes).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from visualthinker_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
GPU_JOB = REPO / "jobs" / "sat_qwen2vl_2b.yaml"
# The image holds the repository here (cluster/README.md, "Build the image"); the head's working dir.
IMAGE_APP_DIR = "/app"
POOLS = ("rollout", "learner", "reward")

# The fields the manifests may use, per object: those of the KubeRay ray.io/v1 CRDs of release v1.5.1,
# the first with `authOptions` (ray-project/kuberay, tag v1.5.1, ray-operator/config/crd/bases/
# ray.io_rayclusters.yaml and ray.io_rayjobs.yaml; v1.7.0 still has every one of them). The API server
# silently drops a field its CRD does not know, so a misspelt or misplaced `authOptions` would leave
# the cluster without authentication: every key is checked, not only the ones looked up below.
KUBERAY_MIN_VERSION = "1.5.1"
RAYCLUSTER_SPEC_FIELDS = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP_FIELDS = {
    "enableIngress", "headService", "labels", "rayStartParams", "resources", "serviceType", "template",
}  # fmt: skip
WORKER_GROUP_FIELDS = {
    "groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts",
    "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template",
}  # fmt: skip
WORKER_GROUP_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "template"}
AUTOSCALER_OPTIONS = {  # field: allowed values (None: any value of the field's type)
    "env": None, "envFrom": None, "idleTimeoutSeconds": None, "image": None, "imagePullPolicy": None,
    "resources": None, "securityContext": None, "volumeMounts": None,
    "upscalingMode": {"Default", "Aggressive", "Conservative"},
    "version": {"v1", "v2"},
}  # fmt: skip
AUTH_OPTIONS = {"mode": {"disabled", "token"}}
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
    "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}  # fmt: skip
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)  # KubeRay refuses authOptions.mode=token below this rayVersion
# vLLM's engine core and workers are grandchildren of a rollout actor; with this the raylet reaps them
# when the actor dies (scale-down, a crash) instead of leaving them on the GPU.
SUBREAPER_ENV = "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]


def _one(name: str, kind: str) -> dict:
    docs = [d for d in _docs(name) if d.get("kind") == kind]
    assert len(docs) == 1, f"{name}: expected one {kind}, found {len(docs)}"
    return docs[0]


@pytest.fixture(scope="module")
def cfg():
    return load_config(GPU_JOB)


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return _one("raycluster.yaml", "RayCluster")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _one("rayjob.yaml", "RayJob")


@pytest.fixture(scope="module", params=["raycluster.yaml", "rayjob.yaml"])
def cluster_spec(request, raycluster, rayjob) -> dict:
    return raycluster["spec"] if request.param == "raycluster.yaml" else rayjob["spec"]["rayClusterSpec"]


def _groups(spec: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def _custom_resources(group: dict) -> dict[str, float]:
    """Custom Ray resources of a group: rayStartParams.resources ('"{\\"name\\": n}"') and/or the
    structured `resources` map of KubeRay >= 1.5."""
    out: dict[str, float] = {}
    raw = group.get("rayStartParams", {}).get("resources")
    if raw is not None:
        assert isinstance(raw, str), "rayStartParams values must be strings"
        text = raw.strip()
        if text.startswith('"') and text.endswith('"'):
            text = text[1:-1].replace('\\"', '"')
        out.update({k: float(v) for k, v in json.loads(text).items()})
    out.update({k: float(v) for k, v in (group.get("resources") or {}).items()})
    return out


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _ray_pods(spec: dict) -> dict[str, dict]:
    """The head and every worker group, by name."""
    return {"head": spec["headGroupSpec"], **_groups(spec)}


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _limit(group: dict, key: str) -> float:
    value = _containers(group)[0].get("resources", {}).get("limits", {}).get(key, 0)
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# -- shape ---------------------------------------------------------------------------------------------


def test_manifests_parse_with_kuberay_v1_kinds():
    kinds = {}
    for path in sorted(CLUSTER.glob("*.yaml")):
        for doc in _docs(path.name):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path.name
            kinds.setdefault(doc["kind"], []).append(doc["apiVersion"])
    assert kinds["RayCluster"] == ["ray.io/v1"]
    assert kinds["RayJob"] == ["ray.io/v1"]


def test_rayjob_runs_on_the_same_cluster_spec(raycluster, rayjob):
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]


def test_head_takes_no_actors_and_no_gpus(cluster_spec):
    head = cluster_spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0"
    assert "nvidia.com/gpu" not in str(head["template"]["spec"]["containers"][0].get("resources", {}))
    assert _custom_resources(head) == {}


def test_three_independent_worker_groups(cluster_spec):
    groups = _groups(cluster_spec)
    assert sorted(groups) == sorted(POOLS)
    for name, g in groups.items():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
        for key, value in g.get("rayStartParams", {}).items():
            assert isinstance(value, str), f"{name}: rayStartParams.{key} must be a string"


def test_every_pod_mounts_the_shared_volume(cluster_spec, cfg):
    claim = _one("pvc.yaml", "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for pod in [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]:
        spec = pod["template"]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert claims.get(mounts.get("/mnt/shared")) == claim["metadata"]["name"]
    for path in (cfg.logging.dir, cfg.checkpoint.dir):
        assert path.startswith("/mnt/shared/"), path


def test_images_are_one_well_formed_name(raycluster, rayjob):
    images = set()

    def collect(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "image":
                    images.add(v)
                else:
                    collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)

    collect(raycluster)
    collect(rayjob)
    assert len(images) == 1, images
    (image,) = images
    assert re.fullmatch(
        r"[a-z0-9]+([.-][a-z0-9]+)*(:\d+)?(/[a-z0-9]+([._-][a-z0-9]+)*)+:[\w][\w.-]{0,127}", image
    )
    assert "visualthinker-ray" in image


# -- KubeRay fields ------------------------------------------------------------------------------------


def _check_options(name: str, given: dict, allowed: dict) -> None:
    assert set(given) <= set(allowed), (
        f"{name}: not KubeRay {KUBERAY_MIN_VERSION} fields: {set(given) - set(allowed)}"
    )
    for key, values in allowed.items():
        if values is not None and key in given:
            assert given[key] in values, f"{name}.{key}={given[key]!r} is not one of {sorted(values)}"


def test_only_kuberay_fields(cluster_spec, rayjob):
    assert set(cluster_spec) <= RAYCLUSTER_SPEC_FIELDS, set(cluster_spec) - RAYCLUSTER_SPEC_FIELDS
    head = cluster_spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_FIELDS, set(head) - HEAD_GROUP_FIELDS
    for name, group in _groups(cluster_spec).items():
        assert WORKER_GROUP_REQUIRED <= set(group) <= WORKER_GROUP_FIELDS, (name, sorted(group))
    _check_options("autoscalerOptions", cluster_spec.get("autoscalerOptions", {}), AUTOSCALER_OPTIONS)
    _check_options("authOptions", cluster_spec.get("authOptions", {}), AUTH_OPTIONS)
    assert set(rayjob["spec"]) <= RAYJOB_SPEC_FIELDS, set(rayjob["spec"]) - RAYJOB_SPEC_FIELDS


# -- secure by default ---------------------------------------------------------------------------------


def test_token_authentication_is_on(cluster_spec, rayjob):
    assert cluster_spec.get("authOptions", {}).get("mode") == "token"
    version = tuple(int(x) for x in re.findall(r"\d+", cluster_spec["rayVersion"])[:3])
    assert version >= MIN_RAY_FOR_TOKEN_AUTH, cluster_spec["rayVersion"]
    # KubeRay only adds RAY_AUTH_MODE / RAY_AUTH_TOKEN where a container does not set them: a value
    # here (RAY_AUTH_MODE=disabled, a token in plain text) would win over the operator's.
    containers = [
        c for pod in _ray_pods(cluster_spec).values() for c in pod["template"]["spec"]["containers"]
    ]
    containers += rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"]
    for container in containers:
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(_env(container)), (
            container["name"]
        )
    assert "RAY_AUTH" not in str(cluster_spec.get("autoscalerOptions", {}))


def test_dashboard_stays_inside_the_cluster(cluster_spec):
    head = cluster_spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    for path in sorted(CLUSTER.glob("*.yaml")):
        for doc in _docs(path.name):
            assert doc["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute"), path.name
            if doc["kind"] == "Service":
                assert doc.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", path.name


def test_every_ray_container_reaps_vllm_processes(cluster_spec):
    for name, pod in _ray_pods(cluster_spec).items():
        env = _env(pod["template"]["spec"]["containers"][0])  # the Ray container (KubeRay: index 0)
        assert env.get(SUBREAPER_ENV, {}).get("value") == "true", name


# -- the elastic rollout pool ----------------------------------------------------------------------------


def test_autoscaler_is_on(cluster_spec):
    assert cluster_spec["enableInTreeAutoscaling"] is True
    options = cluster_spec["autoscalerOptions"]
    idle = options["idleTimeoutSeconds"]
    # Long enough not to drop a GPU pod between two scale requests, short enough to free it.
    assert isinstance(idle, int) and 60 <= idle <= 3600, idle


def test_rollout_group_scales_between_its_bounds(cluster_spec, cfg):
    group = _groups(cluster_spec)["rollout"]
    name = cfg.resources.rollout_resource
    units_per_pod = _custom_resources(group).get(name, 0)
    workers_per_pod = int(units_per_pod)  # each rollout actor asks for one unit of `name`
    assert workers_per_pod >= 1, f"the rollout group must advertise {name}"
    # Room for the configured workers at the start, and room to grow beyond them (`scale --rollout N`).
    assert group["minReplicas"] * workers_per_pod <= cfg.rollout.num_workers
    assert group["maxReplicas"] * workers_per_pod > cfg.rollout.num_workers
    assert group.get("idleTimeoutSeconds") is None or group["idleTimeoutSeconds"] > 0


# -- agreement with jobs/sat_qwen2vl_2b.yaml ------------------------------------------------------------


def test_groups_advertise_the_configured_resource_names(cluster_spec, cfg):
    groups = _groups(cluster_spec)
    expected = {
        "rollout": cfg.resources.rollout_resource,
        "learner": cfg.resources.learner_resource,
        "reward": cfg.resources.reward_resource,
    }
    for pool, name in expected.items():
        assert name, f"resources.{pool}_resource is not set in {GPU_JOB.name}"
        assert set(_custom_resources(groups[pool])) == {name}, pool


@pytest.mark.parametrize("pool", ["rollout", "learner"])
def test_gpu_groups_hold_the_configured_workers(cluster_spec, cfg, pool):
    group = _groups(cluster_spec)[pool]
    section = getattr(cfg, pool)
    name = getattr(cfg.resources, f"{pool}_resource")
    gpus_per_pod = _limit(group, "nvidia.com/gpu")
    requests = _containers(group)[0]["resources"].get("requests", {})
    assert str(requests.get("nvidia.com/gpu", gpus_per_pod)) == str(
        _containers(group)[0]["resources"]["limits"]["nvidia.com/gpu"]
    )
    units_per_pod = _custom_resources(group).get(name, 0)
    assert section.gpus_per_worker > 0
    assert units_per_pod == gpus_per_pod, f"{pool}: {name} must equal the GPUs per pod"
    # A worker never spans pods, and the group at `replicas` has GPUs and resource units for all.
    assert section.gpus_per_worker <= gpus_per_pod
    workers_per_pod = int(gpus_per_pod // section.gpus_per_worker)
    assert group["replicas"] * workers_per_pod >= section.num_workers, pool
    assert group["replicas"] * units_per_pod >= section.num_workers, pool  # one unit per actor


def test_reward_group_holds_the_configured_graders(cluster_spec, cfg):
    group = _groups(cluster_spec)["reward"]
    units_per_pod = _custom_resources(group).get(cfg.resources.reward_resource, 0)
    assert _limit(group, "nvidia.com/gpu") == 0
    assert units_per_pod <= _limit(group, "cpu"), "one CPU per grader"
    assert group["replicas"] * units_per_pod >= cfg.reward.num_workers


# -- the RayJob entrypoint ------------------------------------------------------------------------------


def _train_parser() -> argparse.ArgumentParser:
    """The project's parser when it has `train`; until then, the agreed `train` CLI:
    `python -m visualthinker_ray train --config FILE [--resume] [key=value ...]`."""
    from visualthinker_ray.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "train" in sub.choices:
        return parser
    stand_in = argparse.ArgumentParser(prog="visualthinker-ray")
    train = stand_in.add_subparsers(dest="command", required=True).add_parser("train")
    train.add_argument("--config", required=True)
    train.add_argument("--resume", action="store_true")
    train.add_argument("overrides", nargs="*")
    return stand_in


def test_rayjob_entrypoint_uses_the_real_cli(rayjob):
    spec = rayjob["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "visualthinker_ray"], argv
    args = _train_parser().parse_args(argv[3:])
    assert args.command == "train"
    assert args.resume, "a retried (preempted) RayJob must continue from the latest checkpoint"
    given = Path(args.config)
    if given.is_absolute():  # a path inside the image
        config = given.relative_to(IMAGE_APP_DIR)
    else:  # resolved in the job's working dir: the head's, which must be the repository in the image
        config = given
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head.get("workingDir") == IMAGE_APP_DIR and "working_dir" not in spec.get("runtimeEnvYAML", "")
    assert (REPO / config).is_file(), f"{args.config} is not a file of the repository"
    load_config(REPO / config, list(getattr(args, "overrides", []) or []))
    assert isinstance(yaml.safe_load(spec.get("runtimeEnvYAML") or "{}"), dict)


def test_rayjob_lifecycle(rayjob):
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 24 * 3600
    assert spec["backoffLimit"] >= 1
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never"
    assert "nvidia.com/gpu" not in str(submitter)


# -- every job config validates -------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_configs_validate(path):
    load_config(path)
