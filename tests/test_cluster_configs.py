"""Every cluster config parses and passes the validation its tool offers offline.

- ``cluster/ray-cluster.aws.yaml``: Ray's own cluster-config JSON schema (``ray/autoscaler/
  ray-schema.json``) and ``prepare_config`` + ``validate_config``, the steps ``ray up`` runs
  before it talks to the cloud.
- ``cluster/k8s/*.yaml``: core kinds against the Kubernetes 1.37 JSON schemas shipped by the
  ``kubernetes-validate`` package (strict: unknown fields fail); RayCluster / RayJob against the
  KubeRay v1 CRD fields written out below, with their pod templates validated as core
  ``v1/PodTemplate`` objects.
- Cross-references: every Service is ClusterIP, MLFLOW_TRACKING_URI names the MLflow Service,
  claimed PVCs exist, images and Ray versions agree, ``mlflow server`` and ``ablations/grid.py``
  accept the command lines the configs hold.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
K8S = CLUSTER / "k8s"
AWS = CLUSTER / "ray-cluster.aws.yaml"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_k8s() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml")) for d in _docs(p)]


def _ray_version() -> str:
    import ray

    return ray.__version__


# ----------------------------------------------------------------------------- ray up
def test_ray_cluster_config_passes_rays_schema_and_prepare():
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(AWS.read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # the raw file, as written
    prepared = prepare_config(copy.deepcopy(raw))  # defaults merged, as `ray up` does
    validate_config(prepared)

    # a mistake the schema must catch, so the check above is not vacuous
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["worker.gpu"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_ray_cluster_config_shape():
    cfg = yaml.safe_load(AWS.read_text())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert "GPU" not in head["resources"], "the head is a CPU node"
    gpu_workers = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_workers and all(t["max_workers"] >= 1 for t in gpu_workers)
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{_ray_version()}-")
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds, "the dashboard must not listen publicly"
    assert "MLFLOW_TRACKING_URI" in head_cmds and "MLFLOW_TRACKING_URI" in " ".join(cfg["worker_start_ray_commands"])
    assert "SSVP_STORAGE_PATH" in head_cmds
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "[platform]" in setup
    assert cfg["file_mounts"] == {"/home/ray/ssvp": "."}


def _mlflow_server_args(command: str) -> list[str]:
    """The argument list after ``mlflow server`` in a shell command line."""
    words = shlex.split(command.replace(";", " ; ").replace("&&", " ; "))
    start = next(i for i in range(len(words) - 1) if words[i].endswith("mlflow") and words[i + 1] == "server")
    args = []
    for w in words[start + 2:]:
        if w in (";", ">", "2>&1", "&", ")", "&);") or w.startswith(">"):
            break
        args.append(w)
    return args


def _check_mlflow_server(args: list[str]) -> dict:
    from mlflow.cli import server

    ctx = server.make_context("server", list(args))  # click parses and validates every option
    return ctx.params


def test_mlflow_server_command_lines_are_valid():
    cfg = yaml.safe_load(AWS.read_text())
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    params = _check_mlflow_server(_mlflow_server_args(head_cmds))
    assert params["backend_store_uri"].startswith("postgresql://") and "@127.0.0.1:5432/" in params["backend_store_uri"]
    assert params["port"] == 5000
    # the database container on the head binds to loopback only
    init = " ".join(cfg["available_node_types"][cfg["head_node_type"]]["initialization_commands"])
    assert "-p 127.0.0.1:5432:5432" in init and "postgres:" in init

    deploy = next(d for p, d in _all_k8s() if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    params = _check_mlflow_server(_mlflow_server_args(" ".join(container["args"])))
    assert params["backend_store_uri"].startswith("postgresql://")
    assert params["port"] == 5000 and params["serve_artifacts"]
    assert "mlflow.ssvp.svc.cluster.local:*" in params["allowed_hosts"]


# ----------------------------------------------------------------------------- kubernetes
# KubeRay v1 CRD fields (ray.io/v1 RayCluster and RayJob), the subset this project uses
# plus every other top-level field so that a typo fails.
_POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"metadata": {"type": "object"}, "spec": {"type": "object"}}}
_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
_HEAD_GROUP = {
    "type": "object",
    "required": ["template"],
    "additionalProperties": False,
    "properties": {
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
        "rayStartParams": _START_PARAMS,
        "template": _POD_TEMPLATE,
    },
}
_WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "template"],
    "additionalProperties": False,
    "properties": {
        "groupName": {"type": "string", "minLength": 1},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "idleTimeoutSeconds": {"type": "integer"},
        "numOfHosts": {"type": "integer", "minimum": 1},
        "suspend": {"type": "boolean"},
        "scaleStrategy": {"type": "object"},
        "rayStartParams": _START_PARAMS,
        "template": _POD_TEMPLATE,
    },
}
_RAYCLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object"},
        "headServiceAnnotations": {"type": "object"},
        "gcsFaultToleranceOptions": {"type": "object"},
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "headGroupSpec": _HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
    },
}
_RAYJOB_SPEC = {
    "type": "object",
    "required": ["entrypoint"],
    "additionalProperties": False,
    "properties": {
        "entrypoint": {"type": "string", "minLength": 1},
        "runtimeEnvYAML": {"type": "string"},
        "metadata": {"type": "object"},
        "jobId": {"type": "string"},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 0},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "rayClusterSpec": _RAYCLUSTER_SPEC,
        "clusterSelector": {"type": "object", "additionalProperties": {"type": "string"}},
        "submitterPodTemplate": _POD_TEMPLATE,
        "submitterConfig": {"type": "object"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "entrypointResources": {"type": "string"},
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "deletionStrategy": {"type": "object"},
    },
    "oneOf": [{"required": ["clusterSelector"]}, {"required": ["rayClusterSpec"]}],
}
_CR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "metadata": {"type": "object", "required": ["name"]},
    },
}
K8S_VERSION = "1.37.0"


def _kv():
    return pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate for offline k8s schemas")


def _pod_templates(doc: dict) -> list[dict]:
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        out = [spec["submitterPodTemplate"]] if "submitterPodTemplate" in spec else []
        spec = spec.get("rayClusterSpec")
        if spec is None:
            return out
    else:
        out = []
    out.append(spec["headGroupSpec"]["template"])
    out += [g["template"] for g in spec.get("workerGroupSpecs", [])]
    return out


def test_every_manifest_has_kind_apiversion_and_name():
    docs = _all_k8s()
    kinds = {d["kind"] for _, d in docs}
    assert {"Namespace", "Secret", "PersistentVolumeClaim", "Deployment", "Service", "RayCluster", "RayJob"} <= kinds
    for path, d in docs:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), path
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "ssvp", f"{path}: {d['kind']}/{d['metadata']['name']}"


def test_core_manifests_pass_kubernetes_schemas_strict():
    kv = _kv()
    checked = 0
    for path, d in _all_k8s():
        if d["apiVersion"].startswith("ray.io/"):
            continue
        kv.validate(d, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 9
    # the validator is strict: a misspelt field fails
    dep = copy.deepcopy(next(d for _, d in _all_k8s() if d["kind"] == "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, K8S_VERSION, strict=True)


def test_kuberay_resources_match_crd_fields_and_pod_templates_are_valid():
    kv = _kv()
    crs = [(p, d) for p, d in _all_k8s() if d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for _, d in crs} == {"RayCluster", "RayJob"}
    n_templates = 0
    for path, d in crs:
        jsonschema.validate(d, _CR)
        jsonschema.validate(d["spec"], _RAYCLUSTER_SPEC if d["kind"] == "RayCluster" else _RAYJOB_SPEC)
        for template in _pod_templates(d):
            kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template},
                        K8S_VERSION, strict=True)
            n_templates += 1
    assert n_templates >= 2
    # the CRD subset rejects a misspelt field
    rc = copy.deepcopy(next(d for _, d in crs if d["kind"] == "RayCluster"))
    rc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rc["spec"], _RAYCLUSTER_SPEC)


def test_raycluster_shape():
    rc = next(d for _, d in _all_k8s() if d["kind"] == "RayCluster")
    spec = rc["spec"]
    assert spec["rayVersion"] == _ray_version()
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    gpu = [g for g in spec["workerGroupSpecs"]
           if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") == "1"]
    assert gpu and gpu[0]["maxReplicas"] >= gpu[0]["minReplicas"]
    for template in _pod_templates(rc):
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
        assert env["SSVP_STORAGE_PATH"] == "/mnt/ray-results"
        mounts = {m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert "/mnt/ray-results" in mounts


def test_services_private_tracking_uri_and_claims_resolve():
    docs = [d for _, d in _all_k8s()]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for name, svc in services.items():
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", f"Service {name} must not be exposed"
    assert not [d for d in docs if d["kind"] == "Ingress"]
    mlflow = services["mlflow"]
    url = f"http://mlflow.{mlflow['metadata']['namespace']}.svc.cluster.local:{mlflow['spec']['ports'][0]['port']}"

    uris = []
    for d in docs:
        if d["kind"] == "RayCluster":
            for t in _pod_templates(d):
                uris += [e["value"] for e in t["spec"]["containers"][0]["env"] if e["name"] == "MLFLOW_TRACKING_URI"]
        if d["kind"] == "RayJob":
            env = yaml.safe_load(d["spec"]["runtimeEnvYAML"])["env_vars"]
            assert all(isinstance(v, str) for v in env.values())
            uris.append(env["MLFLOW_TRACKING_URI"])
    assert len(uris) >= 4 and set(uris) == {url}

    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    used = set()
    for d in docs:
        templates = _pod_templates(d) if d["kind"] in ("RayCluster", "RayJob") else (
            [d["spec"]["template"]] if d["kind"] == "Deployment" else [])
        for t in templates:
            used |= {v["persistentVolumeClaim"]["claimName"] for v in t["spec"].get("volumes", [])
                     if "persistentVolumeClaim" in v}
    assert used and used <= claims, f"claims used but not defined: {used - claims}"
    # the MLflow server reaches its database through the database Service
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    assert "@mlflow-db:5432/" in " ".join(dep["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "mlflow-db" in services


def test_images_and_ray_versions_agree():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    m = re.search(r"^ARG RAY_IMAGE=rayproject/ray:([0-9.]+)-py3\d+-gpu$", dockerfile, re.M)
    assert m and m.group(1) == _ray_version()
    assert 'pip install ".[platform]"' in dockerfile
    images = set()
    for _, d in _all_k8s():
        if d["kind"] in ("RayCluster", "RayJob"):
            images |= {c["image"] for t in _pod_templates(d) for c in t["spec"]["containers"]}
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow":
            images |= {c["image"] for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {"ssvp-platform:0.1.0"}
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f"ray[default,tune,train]=={_ray_version()}" in pyproject


def _entrypoint_argv(job: dict) -> list[str]:
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["cd", "/home/ray/ssvp", "&&"]
    assert words[3] == "python"
    return words[4:]


def test_rayjob_entrypoints_name_real_scripts_and_valid_flags():
    jobs = {d["metadata"]["name"]: d for _, d in _all_k8s() if d["kind"] == "RayJob"}
    assert {"ssvp-sweep", "ssvp-ablation-table3"} <= set(jobs)
    for job in jobs.values():
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "ssvp"}
        assert job["spec"]["shutdownAfterJobFinishes"] is False  # required with clusterSelector
        argv = _entrypoint_argv(job)
        assert (REPO / argv[0]).is_file(), f"{job['metadata']['name']}: {argv[0]} is not in the repo"

    from ablations import grid as grid_cli

    argv = _entrypoint_argv(jobs["ssvp-ablation-table3"])
    args = grid_cli.build_parser().parse_args(argv[1:])  # the launcher accepts these flags
    assert (REPO / args.grid).is_file() and args.seeds == 3 and args.resume
    assert args.storage_path == "/mnt/ray-results"
    from tuning import sweep as sweep_cli

    argv = _entrypoint_argv(jobs["ssvp-sweep"])
    args = sweep_cli.build_parser().parse_args(argv[1:])
    assert (REPO / args.config).is_file() and args.storage_path == "/mnt/ray-results"
