"""``tuning/sweep.py`` and ``ablations/grid.py`` as cluster users run them.

The cluster route, as cluster/README.md ("Trying the cluster path on one machine") runs it: a Ray
head (``ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1``, own temp dir), an
``mlflow server`` (SQLite backend, artifacts served into S3, basic-auth login) and an S3-compatible
server (moto), all on loopback. Jobs go in with ``ray job submit --working-dir .`` and a runtime env
from ``python -m ssvp.paths runtime-env`` holding only MLFLOW_TRACKING_URI, SSVP_STORAGE_PATH,
SSVP_DATA_ROOT and SSVP_FEATURE_CACHE (plus the commit it captures); the node environment holds the
MLflow login and the S3 endpoint, as the `ray up` config exports them. Every process is stopped by
killing exactly its own process group (``ray stop`` would also stop unrelated Ray instances).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_services import (
    clean_env,
    files_under,
    mlflow_server,
    ray_head,
    s3_keys,
    s3_server,
    wait_job,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
BUCKET = "ssvp-test"
PASSWORD = "admin-password-for-tests"  # >= 12 characters, as MLflow's basic-auth app requires


# ----------------------------------------------------------------------------- the cluster route
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """S3 (moto), MLflow (SQLite, artifacts served into s3://BUCKET/mlflow, login) and a Ray head on loopback."""
    work = tmp_path_factory.mktemp("cluster")
    with s3_server(work, BUCKET) as s3:
        node_env = clean_env(**s3, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=PASSWORD)
        with mlflow_server(work, f"s3://{BUCKET}/mlflow", node_env, password=PASSWORD) as uri:
            with ray_head(node_env) as head:
                yield {"work": work, "s3": s3, "tracking_uri": uri, "env": node_env, **head}


def locations(cluster: dict) -> dict[str, str]:
    """What cluster/README.md passes: the tracking server, S3 storage, the data root and the feature cache."""
    work = cluster["work"]
    return {"MLFLOW_TRACKING_URI": cluster["tracking_uri"], "SSVP_STORAGE_PATH": f"s3://{BUCKET}/ray-results",
            "SSVP_DATA_ROOT": str(work / "data"), "SSVP_FEATURE_CACHE": str(work / "features")}


def submit(cluster: dict, job_id: str, *command: str) -> str:
    """``ray job submit --working-dir . --runtime-env-json "$(python -m ssvp.paths runtime-env ...)" -- ...``
    from the repository root, as cluster/README.md does; returns the job's logs (asserts it succeeded)."""
    env = cluster["env"]
    runtime = subprocess.run([sys.executable, "-m", "ssvp.paths", "runtime-env",
                              *[f"{k}={v}" for k, v in locations(cluster).items()]],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    for _ in range(60):  # a freshly started head's job agent may not be up yet on a busy machine
        sub = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster["address"], "--submission-id", job_id,
             "--no-wait", "--working-dir", ".", "--runtime-env-json", runtime.strip(), "--", *command],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        if sub.returncode == 0 or "No available agent" not in sub.stderr:
            break
        time.sleep(5)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    status, logs = wait_job(cluster["client"], job_id, seconds=1500)
    assert str(status) == "SUCCEEDED", logs[-6000:]
    return logs


def authed_client(cluster: dict):
    from mlflow import MlflowClient

    os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=PASSWORD)
    return MlflowClient(tracking_uri=cluster["tracking_uri"])


def head_commit() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def shipped(path: Path) -> bool:
    """Whether ``path`` is, in a job's working-directory copy (``_ray_pkg_*``), a file the repository
    tracks, unchanged (e.g. a committed figure under bench/): part of the code, not something a job made."""
    pkg = next((i for i, part in enumerate(path.parts) if part.startswith("_ray_pkg_")), None)
    if pkg is None:
        return False
    source = REPO.joinpath(*path.parts[pkg + 1:])
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "--error-unmatch", str(source)],
                             capture_output=True).returncode == 0
    return tracked and source.read_bytes() == path.read_bytes()


def nothing_kept_in_ray_temp(temp_dir: Path, cluster: dict) -> None:
    """No record, checkpoint, data or feature file under Ray's temporary folder (the job's copy included).

    One exception, Ray Tune's own: with a remote storage path, Tune stages its experiment state
    (``tuner.pkl``, ``experiment_state-*.json``, the searcher's state) in the driver's
    ``session_*/artifacts/<time>/<experiment>/driver_artifacts`` and syncs that folder to
    ``<storage_path>/<experiment>``, which stays the source of truth (what ``--resume`` reads). Such
    a staged file is allowed only when its copy is in the S3 storage path.
    """
    kept = [p for p in temp_dir.rglob("*") if p.is_file() and (
        p.suffix in (".db", ".npy", ".pt", ".safetensors", ".png", ".jpg") or "checkpoint_" in str(p)
        or p.name in ("meta.json", "tuner.pkl", "ssvp_sweep.json", "records.jsonl")) and not shipped(p)]
    staged = [p for p in kept if "driver_artifacts" in p.parts]
    if staged:
        stored = set(s3_keys(cluster["s3"]["AWS_ENDPOINT_URL"], BUCKET, "ray-results/"))
        for p in staged:
            i = p.parts.index("driver_artifacts")
            key = "/".join((p.parts[i - 1], *p.parts[i + 1:]))  # <experiment>/<file> under the storage path
            assert any(k.endswith("/" + key) for k in stored), f"Ray staged {p}, but no {key} in s3://{BUCKET}/ray-results"
        kept = [p for p in kept if p not in staged]
    pkg_dirs = [p for p in temp_dir.rglob("_ray_pkg_*") if p.is_dir()]
    assert pkg_dirs, "the job ran in a working-directory copy"
    created = [p for d in pkg_dirs for p in (d / "runs", d / "data", d / "features_cache") if p.exists()]
    assert not kept and not created, (kept[:10], created)


def cache_files(cluster: dict) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in files_under(cluster["work"] / "features") if p.suffix == ".npy"}


def test_submitted_sweep_records_on_the_server_and_s3_and_a_second_job_reuses_the_features(cluster):
    commit = head_commit()
    small = ["--num-samples", "2", "--set", "epochs=2", "--set", "max_steps_per_epoch=2", "--set", "max_per_class=3",
             "--max-concurrent", "1", "--cpus-per-worker", "0.5", "--quiet"]
    logs = submit(cluster, "sweep-1", "python", "tuning/sweep.py", "--config", "tuning/configs/quick.yaml",
                  "--name", "s1", *small)
    assert "best trial" in logs
    # MLflow's own "View run … at <URL>" lines are silenced; the summary links the parent run on the server
    assert "View run" not in logs and PASSWORD not in logs
    assert f"view: {cluster['tracking_uri'].rstrip('/')}/#/experiments/" in logs and "workflowType=machine_learning" in logs

    client = authed_client(cluster)
    exp = client.get_experiment_by_name("ssvp-quick")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.sweep_id = 's1'")
    roles = sorted(r.data.tags.get("role") for r in runs if r.data.tags.get("role") != "refit")  # refit: optional phase
    assert roles == ["sweep", "target_eval", "trial", "trial"], roles
    states = [(r.data.tags.get("role"), r.info.status, r.data.tags.get("error")) for r in runs]
    assert all(r.info.status == "FINISHED" for r in runs), (states, logs[-5000:])
    parent = next(r for r in runs if r.data.tags["role"] == "sweep")
    for r in runs:  # the real commit, captured on the submitting side
        assert r.data.tags["git_commit"] == commit and r.data.tags.get("mlflow.source.git.commit") == commit
    assert parent.data.tags["config_file"] == "tuning/configs/quick.yaml"  # not the job's temporary copy
    assert all(client.get_metric_history(r.info.run_id, "val/objective")
               for r in runs if r.data.tags["role"] == "trial")
    data_root = cluster["work"] / "data"
    trial = next(r for r in runs if r.data.tags["role"] == "trial")
    assert trial.data.params["source"] == f"synthetic:{data_root}/synthetic/domain_a"
    assert (data_root / "synthetic" / "domain_a" / "meta.json").is_file()

    # artifacts went through the server into S3; checkpoints and Tune's state into the S3 storage path
    endpoint = cluster["s3"]["AWS_ENDPOINT_URL"]
    art = s3_keys(endpoint, BUCKET, f"mlflow/{exp.experiment_id}/{parent.info.run_id}/")
    assert any(k.endswith(".yaml") for k in art), art[:20]
    stored = s3_keys(endpoint, BUCKET, "ray-results/")
    assert any(k.startswith("ray-results/s1/") for k in stored), stored[:20]
    assert any(k.startswith("ray-results/s1.train/") and "/checkpoint_" in k for k in stored), stored[:20]
    nothing_kept_in_ray_temp(cluster["temp_dir"], cluster)
    first = cache_files(cluster)
    assert first, "the feature cache (SSVP_FEATURE_CACHE) was filled"

    # a second job with the same data and backbones: every feature read from the cache, none computed;
    # its trials run in reused Tune actors and write their checkpoints to S3 themselves
    submit(cluster, "sweep-2", "python", "tuning/sweep.py", "--config", "tuning/configs/quick.yaml",
           "--name", "s2", "--reuse-processes", *small)
    assert cache_files(cluster) == first  # no new feature file, none rewritten: no backbone forward
    runs2 = client.search_runs([exp.experiment_id], filter_string="tags.sweep_id = 's2'")
    assert sorted(r.data.tags.get("role") for r in runs2 if r.data.tags.get("role") != "refit") == [
        "sweep", "target_eval", "trial", "trial"]
    assert all(r.info.status == "FINISHED" for r in runs2)
    for r in runs2:
        if "feature_cache_misses" in r.data.metrics:
            assert r.data.metrics["feature_cache_misses"] == 0
    stored = s3_keys(endpoint, BUCKET, "ray-results/s2.train/")
    kept: dict[str, set] = {}  # trial folder -> its checkpoint folders (ASHA may stop one after epoch 1)
    for k in stored:
        parts = k.split("/")
        if len(parts) > 3 and parts[3].startswith("checkpoint_epoch_"):
            kept.setdefault(parts[2], set()).add(parts[3])
    trial_dirs = {p for p in kept if not p.startswith("refit")}
    assert len(trial_dirs) == 2 and all(len(kept[p]) == 1 for p in trial_dirs), kept  # keep 1: older ones pruned
    assert all(f"ray-results/s2.train/{p}/{next(iter(kept[p]))}/best/head.pt" in stored for p in trial_dirs), kept
    for r in runs2:
        if r.data.tags.get("role") == "trial":
            assert r.data.tags["checkpoint_path"].startswith("s3://")
            assert client.list_artifacts(r.info.run_id, "checkpoints/best"), r.info.run_name
    nothing_kept_in_ray_temp(cluster["temp_dir"], cluster)


def test_submitted_grid_records_on_the_server_and_a_resume_reads_the_checkpoints_back_from_s3(cluster):
    out = cluster["work"] / "ablations" / "quick"
    cmd = ["python", "ablations/grid.py", "--grid", "ablations/configs/quick.yaml", "--seeds", "1",
           "--variants", "full,concat", "--out", str(out), "--max-concurrent", "1", "--quiet"]
    submit(cluster, "grid-1", *cmd)
    state = json.loads((out / "grid.json").read_text())
    # where the user launched from and the grid file as they named it, not the job's temporary copy
    assert state["grid_file"] == "ablations/configs/quick.yaml" and state["launch_dir"] == str(REPO)
    client = authed_client(cluster)
    parent = client.get_run(state["parent_run_id"])
    assert parent.data.tags["git_commit"] == head_commit()
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    trials = [c for c in children if c.data.tags.get("role") == "trial"]
    assert sorted(c.data.tags["variant"] for c in trials) == ["concat", "full"]
    assert all(c.info.status == "FINISHED" for c in trials)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "ablation")}
    assert {"ablation/results.md", "ablation/records.jsonl"} <= arts
    endpoint = cluster["s3"]["AWS_ENDPOINT_URL"]
    assert any(k.endswith("ablation/results.md") for k in s3_keys(endpoint, BUCKET, "mlflow/"))
    records = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" and str(r["checkpoint"]).startswith("s3://") for r in records), records
    before = cache_files(cluster)

    # --resume --per-class: no trial runs again; each trial's best heads are read back from S3 and
    # evaluated per class, with every feature from the cache
    submit(cluster, "grid-2", *cmd, "--resume", "--per-class")
    state2 = json.loads((out / "grid.json").read_text())
    assert state2["parent_run_id"] == state["parent_run_id"]
    children2 = client.search_runs([parent.info.experiment_id],
                                   filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len([c for c in children2 if c.data.tags.get("role") == "trial"]) == 2
    records2 = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert all(not r.get("per_class_error") and "per_class" in next(iter(r["metrics"].values())) for r in records2)
    assert cache_files(cluster) == before
    nothing_kept_in_ray_temp(cluster["temp_dir"], cluster)
