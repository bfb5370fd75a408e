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
import os
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
    for cmds in (head_cmds, " ".join(cfg["worker_start_ray_commands"])):
        env = _exports(cmds)
        assert {"MLFLOW_TRACKING_URI", "SSVP_STORAGE_PATH", "SSVP_DATA_ROOT", "SSVP_FEATURE_CACHE"} <= set(env)
        assert env["MLFLOW_TRACKING_URI"].endswith(":5000") and env["SSVP_STORAGE_PATH"].startswith("s3://")
        assert ". /home/ray/ssvp-secrets.env" in cmds  # the MLflow login, from the env file
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "[platform]" in setup
    assert cfg["file_mounts"] == {"/home/ray/ssvp": ".", "/home/ray/ssvp-secrets.env": "cluster/secrets.env"}
    # anchored at the repository root: an unanchored "data" would also drop the package ssvp/data/
    for pattern in ("/data", "/runs"):
        assert pattern in cfg["rsync_exclude"]
    assert not [p for p in cfg["rsync_exclude"] if p in ("data", "runs", "mlruns", "mlartifacts")]


def _exports(command: str) -> dict[str, str]:
    """``NAME=VALUE`` words of the ``export`` in a shell command line (``$(...)`` kept as written)."""
    words = re.sub(r"\$\(([^)]*)\)", lambda m: "$(" + m.group(1).replace(" ", "\x00") + ")", command).split()
    start = words.index("export")
    env = {}
    for w in words[start + 1:]:
        if "=" not in w or w.startswith("-"):
            break
        name, _, value = w.partition("=")
        env[name] = value.replace("\x00", " ")
    return env


def _mlflow_server_args(command: str) -> list[str]:
    """The argument list after ``mlflow server`` in a shell command line (``$(...)`` -> a private IP)."""
    command = re.sub(r"\$\([^)]*\)", "10.0.0.1", command)
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


def test_mlflow_servers_ask_for_a_login_and_bind_only_where_needed():
    cfg = yaml.safe_load(AWS.read_text())
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    params = _check_mlflow_server(_mlflow_server_args(head_cmds))
    assert params["app_name"] == "basic-auth" and params["serve_artifacts"] and params["port"] == 5000
    assert params["host"] == "10.0.0.1", "the head's private address, not 0.0.0.0"
    assert params["backend_store_uri"] == "sqlite:////home/ray/mlflow/mlflow.db"
    assert "-v /home/ubuntu/mlflow:/home/ray/mlflow" in cfg["docker"]["head_run_options"]  # on the head's disk
    assert "MLFLOW_AUTH_ADMIN_PASSWORD=\"$MLFLOW_TRACKING_PASSWORD\"" in head_cmds
    # the basic-auth app needs mlflow[auth] (Flask-WTF) and a CSRF key, both provided
    assert '"mlflow[auth]==' in " ".join(cfg["setup_commands"]) and '"mlflow[auth]==' in (CLUSTER / "Dockerfile").read_text()
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY=CHANGE-ME" in (CLUSTER / "secrets.env.example").read_text()
    ini = (CLUSTER / "mlflow-auth.ini").read_text()
    assert "admin_username = admin" in ini and "admin_password" not in ini
    assert "MLFLOW_AUTH_CONFIG_PATH=/home/ray/ssvp/cluster/mlflow-auth.ini" in head_cmds

    docs = [d for _, d in _all_k8s()]
    deploy = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["mlflow", "server"]
    params = _check_mlflow_server(container["args"])
    assert params["app_name"] == "basic-auth" and params["port"] == 5000 and params["serve_artifacts"]
    assert "mlflow.ssvp.svc.cluster.local:*" in params["allowed_hosts"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == "postgresql://mlflow:$(POSTGRES_PASSWORD)@mlflow-db:5432/mlflow"
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "ssvp-secrets", "key": "POSTGRES_PASSWORD"}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "ssvp-secrets"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "ssvp-secrets"
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    assert policies["mlflow-from-namespace"]["spec"]["podSelector"]["matchLabels"] == {"app": "mlflow"}
    assert policies["mlflow-db-from-mlflow"]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"app": "mlflow"}
    # the Ray pods log in with the same Secret
    rc = next(d for d in docs if d["kind"] == "RayCluster")
    for t in _pod_templates(rc):
        names = {e["name"]: e for e in t["spec"]["containers"][0]["env"]}
        assert names["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "ssvp-secrets"


_CREDENTIAL_IN_URI = re.compile(r"://[^\s:/@]+:([^\s@]+)@")


def test_no_password_in_configs_or_command_lines():
    example = (CLUSTER / "secrets.env.example").read_text()
    assert "MLFLOW_TRACKING_PASSWORD=CHANGE-ME" in example and "POSTGRES_PASSWORD=CHANGE-ME" in example
    for path in [AWS, *sorted(K8S.glob("*.yaml"))]:
        text = path.read_text()
        assert "CHANGE-ME-db-password" not in text, path
        for m in _CREDENTIAL_IN_URI.finditer(text):
            assert m.group(1) == "$(POSTGRES_PASSWORD)", f"{path}: a credential in a URI: {m.group(0)}"
    for _, d in _all_k8s():
        assert d["kind"] != "Secret", "Secrets are created from cluster/secrets.env, not committed"
        if d["kind"] == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                words = " ".join(c.get("command", []) + c.get("args", []))
                assert "PASSWORD" not in words, f"{d['metadata']['name']}: a password on the command line"
    cfg = yaml.safe_load(AWS.read_text())
    every = json.dumps(cfg)
    assert "POSTGRES_PASSWORD" not in every and "PASSWORD=" not in every.replace("MLFLOW_AUTH_ADMIN_PASSWORD=", "")
    assert "/cluster/secrets.env" in (REPO / ".gitignore").read_text().splitlines()
    assert "cluster/secrets.env" in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()


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
    assert {"Namespace", "PersistentVolumeClaim", "ConfigMap", "Deployment", "Service", "NetworkPolicy", "RayCluster",
            "RayJob"} <= kinds
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


def test_ray_pods_take_traffic_only_from_the_namespace_and_the_operator():
    """The head binds its dashboard to 0.0.0.0 in the pod network: a NetworkPolicy selects every Ray pod
    of the cluster (KubeRay's ``ray.io/cluster`` label) and admits this namespace's pods, and the KubeRay
    operator's namespace only on the dashboard/job port."""
    docs = [d for _, d in _all_k8s()]
    rc = next(d for d in docs if d["kind"] == "RayCluster")
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    ray_policies = [d for d in docs if d["kind"] == "NetworkPolicy"
                    and d["spec"]["podSelector"].get("matchLabels") == {"ray.io/cluster": rc["metadata"]["name"]}]
    assert len(ray_policies) == 1
    spec = ray_policies[0]["spec"]
    assert spec["policyTypes"] == ["Ingress"] and ray_policies[0]["metadata"]["namespace"] == rc["metadata"]["namespace"]
    sources = [(rule["from"], rule.get("ports")) for rule in spec["ingress"]]
    assert ([{"podSelector": {}}], None) in sources  # the namespace's own pods, every port
    outside = [(f, p) for f, p in sources if f != [{"podSelector": {}}]]
    assert outside == [([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}}],
                        [{"protocol": "TCP", "port": 8265}])]
    assert "--namespace kuberay-system" in (CLUSTER / "README.md").read_text()  # where the operator is installed
    assert all("ipBlock" not in src for rule in spec["ingress"] for src in rule["from"])  # no address range


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
    env = {e["name"]: e.get("value", "") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "@mlflow-db:5432/" in env["MLFLOW_BACKEND_STORE_URI"]
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
    from tuning import sweep as sweep_cli

    argv = _entrypoint_argv(jobs["ssvp-sweep"])
    args = sweep_cli.build_parser().parse_args(argv[1:])
    assert (REPO / args.config).is_file()


# ----------------------------------------------------------------------------- where things land
def _container_mounts(template: dict) -> dict[str, bool]:
    """mountPath -> writable, of a pod template's first container."""
    c = template["spec"]["containers"][0]
    return {m["mountPath"]: not m.get("readOnly", False) for m in c.get("volumeMounts", [])}


def _under(path: str, mounts: dict[str, bool], writable: bool = False) -> bool:
    p = Path(path)
    return any((p == Path(m) or Path(m) in p.parents) and (w or not writable) for m, w in mounts.items())


def _job_locations(job: dict, head_env: dict[str, str]) -> dict[str, str]:
    """Every location a RayJob's launcher uses, resolved by ssvp.paths as the job would (launch dir = the
    entrypoint's cd, environment = the head pod's + the job's runtime env, flags and config as written)."""
    from ablations import grid as grid_cli
    from ablations.spec import load_grid
    from ssvp.paths import resolve_config_paths
    from tuning import sweep as sweep_cli
    from tuning.paths import resolve_locations

    env = {**head_env, **yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"], "SSVP_LAUNCH_DIR": "/home/ray/ssvp"}
    argv = _entrypoint_argv(job)
    script = argv[0]
    if script == "tuning/sweep.py":
        args = sweep_cli.build_parser().parse_args(argv[1:])
        sweep = yaml.safe_load((REPO / args.config).read_text())  # the file as written (no synthetic data here)
        from tuning.settings import build_base_config

        # the sweep's base as the launcher builds it (a preset file resolves beside the sweep file too)
        base = {k: v for k, v in (sweep.get("base") or {}).items() if k != "synthetic"}  # no data generated here
        cfg = build_base_config(base, str(REPO / args.config), REPO).override(dict(args.set))
        config_storage, config_tracking = sweep.get("storage_path"), (sweep.get("mlflow") or {}).get("tracking_uri")
        out = None
    else:
        args = grid_cli.build_parser().parse_args(argv[1:])
        grid = load_grid(REPO / args.grid)
        cfg = grid.base_config(dict(args.set))
        config_storage = config_tracking = None
        out = args.out
    loc = resolve_locations(tracking_uri=args.tracking_uri, storage_path=args.storage_path,
                            config_storage_path=config_storage, config_tracking_uri=config_tracking, environ=env)
    cfg = resolve_config_paths(cfg, data_root_flag=getattr(args, "data_root", None),
                               feature_cache_flag=getattr(args, "feature_cache", None), environ=env)
    found = {"tracking": loc.tracking_uri, "storage": loc.storage_path, "feature_cache": cfg.train.feature_cache,
             "source": cfg.data.source.partition(":")[2], "hf_home": env["HF_HOME"]}
    found.update({f"target{i}": t.partition(":")[2] for i, t in enumerate(cfg.data.targets)})
    if out is not None:
        from ssvp.paths import resolve_local

        found["out"] = str(resolve_local(out, what="--out", origin="--out", flag="--out", env=None, environ=env))
    return found


def test_every_path_in_the_manifests_lands_on_a_mounted_volume():
    docs = [d for _, d in _all_k8s()]
    rc = next(d for d in docs if d["kind"] == "RayCluster")
    head_t = rc["spec"]["headGroupSpec"]["template"]
    worker_t = rc["spec"]["workerGroupSpecs"][0]["template"]
    head_mounts, worker_mounts = _container_mounts(head_t), _container_mounts(worker_t)
    head_env = {e["name"]: e["value"] for e in head_t["spec"]["containers"][0]["env"] if "value" in e}
    worker_env = {e["name"]: e["value"] for e in worker_t["spec"]["containers"][0]["env"] if "value" in e}
    assert head_env == worker_env  # drivers and trials see the same locations
    jobs = [d for d in docs if d["kind"] == "RayJob"]
    assert len(jobs) >= 2
    for job in jobs:
        name = job["metadata"]["name"]
        where = _job_locations(job, head_env)
        assert where["tracking"] == "http://mlflow.ssvp.svc.cluster.local:5000", name
        for key, path in where.items():
            if key == "tracking":
                continue
            assert path and Path(path).is_absolute(), (name, key, path)
            assert _under(path, head_mounts, writable=True), f"{name}: {key} {path} is not on a volume of the head"
            if key in ("storage", "feature_cache", "hf_home"):  # trials write these
                assert _under(path, worker_mounts, writable=True), f"{name}: {key} {path} not writable on workers"
            if key.startswith(("source", "target")):  # trials read these
                assert _under(path, worker_mounts), f"{name}: {key} {path} is not on a volume of the workers"
        assert where["source"].startswith("/data/") and where["feature_cache"] == "/mnt/ray-results/feature-cache"


def test_ray_up_locations_are_on_the_shared_volume_or_s3():
    cfg = yaml.safe_load(AWS.read_text())
    mounts = [o.split()[1].split(":")[1] for o in cfg["docker"]["run_options"] if o.startswith("-v ")]
    assert "/mnt/ssvp" in mounts
    init = " ".join(cfg["initialization_commands"])
    assert "mount -t nfs4" in init and "/mnt/ssvp" in init
    head_init = " ".join(cfg["available_node_types"][cfg["head_node_type"]]["initialization_commands"])
    assert "mount -t nfs4" in head_init  # a node type's own list replaces the global one
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        env = _exports(" ".join(cmds))
        for key in ("SSVP_DATA_ROOT", "SSVP_FEATURE_CACHE"):
            assert any(Path(m) in Path(env[key]).parents for m in mounts), (key, env[key])
        assert env["SSVP_STORAGE_PATH"].startswith("s3://")


def _rsync_copy(dest: Path, excludes: list[str]) -> None:
    import shutil
    import subprocess

    if shutil.which("rsync") is None:
        if os.environ.get("SSVP_CI"):  # .ci/run installs it: a skip there would hide this check
            pytest.fail("rsync is not installed; .ci/run installs it (apt-get update && apt-get install rsync)")
        pytest.skip("rsync is not installed (apt-get install rsync)")
    cmd = ["rsync", "-a", *[a for e in excludes for a in ("--exclude", e)], f"{REPO}/", f"{dest}/"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)


@pytest.mark.slow  # rsync of the repo and a child importing every module
def test_ray_up_sync_with_the_configs_excludes_keeps_every_package_importable(tmp_path):
    """What `ray up` copies to the nodes (rsync with rsync_exclude) imports, from the copy itself."""
    import subprocess
    import sys

    cfg = yaml.safe_load(AWS.read_text())
    copy_dir = tmp_path / "ssvp"
    _rsync_copy(copy_dir, cfg["rsync_exclude"])
    assert (copy_dir / "ssvp" / "data" / "__init__.py").is_file()
    assert not (copy_dir / ".git").exists()
    modules = sorted(
        ".".join(p.relative_to(copy_dir).with_suffix("").parts).removesuffix(".__init__")
        for pkg in ("ssvp", "tuning", "ablations") for p in (copy_dir / pkg).rglob("*.py")
        if p.name != "__main__.py")
    assert "ssvp.data.readers" in modules and "tuning.sweep" in modules
    code = ("import importlib, json, sys; sys.path.insert(0, sys.argv[1]); "
            "mods = json.loads(sys.argv[2]); files = {m: importlib.import_module(m).__file__ for m in mods}; "
            "bad = {m: f for m, f in files.items() if not f.startswith(sys.argv[1])}; "
            "assert not bad, bad; print(len(files))")
    run = subprocess.run([sys.executable, "-c", code, str(copy_dir), json.dumps(modules)], cwd=copy_dir,
                         capture_output=True, text=True, timeout=600,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MPLBACKEND": "Agg",
                              "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout.split()[-1]) == len(modules)

    # the unanchored pattern this config used to hold drops the package ssvp/data/ as well
    broken = tmp_path / "broken"
    _rsync_copy(broken, ["data"])
    assert not (broken / "ssvp" / "data").exists()


# ----------------------------------------------------------------------------- cluster/README.md
def _readme_commands() -> list[str]:
    """Every shell command of cluster/README.md's code blocks, continuation lines joined."""
    text = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    out = []
    for b in blocks:
        joined = re.sub(r"\\\n\s*", " ", b)
        out += [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return out


def test_readme_submits_with_the_captured_commit_and_flags_the_launchers_accept():
    from ablations import grid as grid_cli
    from tuning import sweep as sweep_cli

    cmds = _readme_commands()
    submits = [c for c in cmds if c.startswith("ray job submit")]
    assert len(submits) >= 5
    for c in submits:
        assert "--working-dir ." in c
        assert '--runtime-env-json "$(python -m ssvp.paths runtime-env)"' in c or '--runtime-env-json "$ENV_JSON"' in c, c
        argv = shlex.split(c.split(" -- ", 1)[1].split("#")[0])
        assert argv[0] == "python" and (REPO / argv[1]).is_file(), c
        parser = sweep_cli.build_parser() if argv[1] == "tuning/sweep.py" else grid_cli.build_parser()
        args = parser.parse_args(argv[2:])
        assert (REPO / (args.config if argv[1] == "tuning/sweep.py" else args.grid)).is_file()
        # locations come from the environment; an --out is absolute on a cluster (relative one machine only)
        assert args.storage_path is None and args.tracking_uri is None, c
    one_machine = [c for c in cmds if c.startswith("ENV_JSON=")]
    assert one_machine and all(k in one_machine[0] for k in (
        "MLFLOW_TRACKING_URI=", "SSVP_STORAGE_PATH=", "SSVP_DATA_ROOT=", "SSVP_FEATURE_CACHE="))
    starts = [c for c in cmds if c.startswith("ray start --head")]
    assert starts and all("--node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1" in c for c in starts)
    assert any(c.startswith("kubectl -n ssvp create secret generic ssvp-secrets --from-env-file=cluster/secrets.env")
               for c in cmds)


def _one_machine_block() -> list[str]:
    """The shell lines of the README's "Trying the cluster path on one machine" block, continuations joined."""
    text = (CLUSTER / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "ray start --head --block" in b)
    return [ln.strip() for ln in re.sub(r"\\\n\s*", " ", block).splitlines() if ln.strip()]


def test_readme_stops_only_what_it_started():
    """No `ray stop` (it signals every Ray process on the host) and no `kill %1` (no job table in a
    script under sh): each background server's PID is written down and the last line signals those."""
    lines = _one_machine_block()
    assert not any(re.search(r"\bray stop\b|kill %", ln) for ln in lines)
    assert not any(re.search(r"^\s*ray stop\b|\bkill %", c) for c in _readme_commands())
    background = [i for i, ln in enumerate(lines) if ln.endswith("&")]
    assert [lines[i].split()[0] for i in background] == ["ray", "mlflow"]
    assert "ray start --head --block " in lines[background[0]]  # a process that stops its head on SIGTERM
    pid_files = [re.fullmatch(r"echo \$! > (\S+\.pid)", lines[i + 1]).group(1) for i in background]
    assert lines[-1] == "kill " + " ".join(f'"$(cat {f})"' for f in reversed(pid_files))


def _wait_for_start(start, server_dir: Path, seconds: float = 600) -> None:
    """Wait for the README's start lines (their `until` loop) to finish; fail at once, with the
    log, when a server they started has exited instead."""
    import time

    import psutil

    deadline = time.time() + seconds
    while start.poll() is None and time.time() < deadline:
        for name in ("ray-head", "mlflow"):
            pid_file = server_dir / f"{name}.pid"
            if pid_file.is_file() and pid_file.read_text().strip():
                pid = int(pid_file.read_text())
                if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    log = (server_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise AssertionError(f"{name} exited during start-up:\n{log}")
        time.sleep(2)
    assert start.returncode == 0, f"the start lines did not finish in {seconds:.0f} s"


@pytest.mark.slow
def test_readme_start_and_stop_lines_leave_another_head_running(tmp_path):
    """The README's start lines (free ports, the head's own --temp-dir), then its kill line: every
    process the two servers started ends; a second Ray head on the host keeps running."""
    import os
    import shutil
    import subprocess
    import time
    import urllib.request

    import psutil

    from cluster_services import clean_env, free_port, kill_group, ray_head

    lines = [ln for ln in _one_machine_block() if not ln.startswith(("ENV_JSON=", "ray job submit", "export "))]
    ports = {"6379": free_port(), "8265": free_port(), "5000": free_port()}
    temp_dir = f"/tmp/ssvp_readme_{os.getpid()}_{ports['6379']}"  # short: Ray's socket paths have a length limit
    isolate = " ".join(f"{flag} {free_port()}" for flag in (
        "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
        "--runtime-env-agent-port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port"))
    script = "\n".join(lines[:-1])
    for old, new in ports.items():
        script = script.replace(f"-port {old}", f"-port {new}").replace(f":{old}/", f":{new}/")
    script = script.replace("ray start --head --block", f"ray start --head --block --num-cpus 1 --temp-dir {temp_dir} "
                            f"--disable-usage-stats --include-dashboard true {isolate}")
    script = script.replace(f"--port {ports['5000']}", f"--port {ports['5000']} --workers 2")
    env = clean_env(RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT="300", RAY_DASHBOARD_STARTUP_TIMEOUT_S="300",
                    RAY_memory_monitor_refresh_ms="0")
    with ray_head(env, num_cpus=1) as other:  # someone else's head on the same host
        start = subprocess.Popen(["sh", "-c", script], cwd=tmp_path, env=env, start_new_session=True)
        started: list = []
        try:
            _wait_for_start(start, tmp_path / "runs" / "server")
            urllib.request.urlopen(f"http://127.0.0.1:{ports['5000']}/health", timeout=10).close()
            for name in ("ray-head.pid", "mlflow.pid"):
                root = psutil.Process(int((tmp_path / "runs" / "server" / name).read_text()))
                started += [root, *root.children(recursive=True)]
            assert len(started) > 4  # GCS, raylet, dashboard, ...; uvicorn and its workers
            stop = subprocess.run(["sh", "-c", lines[-1]], cwd=tmp_path, env=env, timeout=60)
            assert stop.returncode == 0
            gone, alive = psutil.wait_procs(started, timeout=120)
            assert not alive, f"left running: {[p.info if hasattr(p, 'info') else p for p in alive]}"
            assert other["client"].list_jobs() is not None  # the other head still answers
        finally:
            kill_group(start.pid)
            for p in started:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            shutil.rmtree(temp_dir, ignore_errors=True)
