"""One resolution rule for every path and URI (``ssvp.paths``, ``tuning.paths``):
flag > environment > config > default, relative paths against the launch directory,
nothing inside a Ray temporary folder, provenance captured on the submitting side."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssvp.config import Config
from ssvp.paths import (
    PathError,
    choose,
    data_root,
    git_state,
    ray_temp_reason,
    resolve_config_paths,
    resolve_dataset,
    resolve_tracking_uri,
    runtime_env,
)
from tuning.paths import resolve_locations, source_tags

REPO = Path(__file__).resolve().parents[1]
RAY_COPY = "/tmp/ray/session_2026-12-01_14-00-00_123456_789/runtime_resources/working_dir_files/_ray_pkg_0123abcd"


def test_precedence_flag_env_config_default():
    env = {"SSVP_STORAGE_PATH": "/env/ray"}
    assert choose("/flag", "--storage-path", "SSVP_STORAGE_PATH", "/cfg", "storage_path", "runs/ray", env).value == "/flag"
    c = choose(None, "--storage-path", "SSVP_STORAGE_PATH", "/cfg", "storage_path", "runs/ray", env)
    assert (c.value, c.origin) == ("/env/ray", "SSVP_STORAGE_PATH")
    c = choose(None, "--storage-path", "SSVP_STORAGE_PATH", "/cfg", "storage_path", "runs/ray", {})
    assert (c.value, c.origin) == ("/cfg", "config storage_path")
    assert choose("", "--storage-path", "SSVP_STORAGE_PATH", None, "storage_path", "runs/ray", {"SSVP_STORAGE_PATH": ""}).origin == "default"


def test_locations_follow_the_rule_and_resolve_against_the_launch_dir(tmp_path):
    env = {"SSVP_LAUNCH_DIR": str(tmp_path)}
    loc = resolve_locations(config_storage_path="runs/ray", environ=env)
    assert loc.storage_path == str(tmp_path / "runs" / "ray") and loc.storage_origin == "config storage_path"
    assert loc.tracking_uri == f"sqlite:///{tmp_path}/runs/mlflow.db" and loc.tracking_origin == "default"
    assert loc.artifact_location == str(tmp_path / "runs" / "mlartifacts")

    env.update(MLFLOW_TRACKING_URI="http://127.0.0.1:5000", SSVP_STORAGE_PATH="shared/ray")
    loc = resolve_locations(config_storage_path="runs/ray", config_tracking_uri="sqlite:///x.db", environ=env)
    assert loc.tracking_uri == "http://127.0.0.1:5000" and loc.tracking_origin == "MLFLOW_TRACKING_URI"
    assert loc.artifact_location is None  # the server's own (served) artifact root
    assert loc.storage_path == str(tmp_path / "shared" / "ray") and loc.storage_origin == "SSVP_STORAGE_PATH"

    s3 = "s3://bucket/ray-results?endpoint_override=127.0.0.1:9000&scheme=http"
    loc = resolve_locations(storage_path=s3, tracking_uri="sqlite:///rel/m.db", environ=env)
    assert loc.storage_path == s3 and loc.remote_storage and loc.storage_origin == "--storage-path"
    assert loc.tracking_uri == f"sqlite:///{tmp_path}/rel/m.db"


def test_tracking_uri_forms(tmp_path):
    env = {"SSVP_LAUNCH_DIR": str(tmp_path)}
    assert resolve_tracking_uri("x/mlflow.db", environ=env).value == f"sqlite:///{tmp_path}/x/mlflow.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db", environ=env).value == "sqlite:////abs/m.db"
    with pytest.raises(PathError, match="file store is not supported"):
        resolve_tracking_uri("file:///tmp/mlruns", environ=env)
    with pytest.raises(PathError, match="SQLite file"):
        resolve_tracking_uri("mlruns", environ=env)


@pytest.mark.parametrize("path, expected", [
    (f"{RAY_COPY}/runs/ray", "working-directory copy"),
    ("/tmp/raytmp/session_2026-12-01_14-00-00_123456_789/artifacts/x", "session folder"),
    ("/tmp/ray/anything", "temporary folder"),
    ("/mnt/ray-results", None),
    ("/tmp/pytest-of-me/x/ray_results", None),
])
def test_ray_temporary_folders_are_recognised(path, expected):
    reason = ray_temp_reason(path, {})
    assert (reason is None) if expected is None else (expected in reason)


def test_relative_stores_inside_a_ray_copy_are_refused_with_the_remedy(monkeypatch):
    env = {"SSVP_LAUNCH_DIR": RAY_COPY}
    monkeypatch.setattr(Path, "is_dir", lambda self: True)  # the copy "exists" on this node
    with pytest.raises(PathError) as exc:
        resolve_locations(config_storage_path="runs/ray", tracking_uri="http://mlflow:5000", environ=env)
    msg = str(exc.value)
    assert "runs/ray" in msg and "config storage_path" in msg and "working-directory copy" in msg
    assert "--storage-path" in msg and "SSVP_STORAGE_PATH" in msg
    with pytest.raises(PathError, match="--tracking-uri or set MLFLOW_TRACKING_URI"):
        resolve_locations(storage_path="/mnt/ray-results", environ=env)
    cfg = Config.tiny(feature_cache="features_cache")
    with pytest.raises(PathError, match="--feature-cache or set SSVP_FEATURE_CACHE"):
        resolve_config_paths(cfg, environ={**env, "SSVP_DATA_ROOT": "/data"})
    with pytest.raises(PathError, match="--data-root or set SSVP_DATA_ROOT"):
        resolve_config_paths(Config.tiny(), environ=env)
    # absolute dataset roots need no data root: the refused default does not matter then
    absolute = Config.tiny(source="synthetic:/d/domain_a", targets=["synthetic:/d/domain_b"])
    assert resolve_config_paths(absolute, environ=env).data.source == "synthetic:/d/domain_a"
    # given explicitly, the same launch works
    out = resolve_config_paths(cfg, environ={**env, "SSVP_DATA_ROOT": "/data", "SSVP_FEATURE_CACHE": "/mnt/f"})
    assert out.train.feature_cache == "/mnt/f"


def test_a_launch_dir_missing_on_this_node_is_named(tmp_path):
    env = {"SSVP_LAUNCH_DIR": str(tmp_path / "laptop" / "ssvp")}
    with pytest.raises(PathError, match="does not exist on this node.*SSVP_STORAGE_PATH"):
        resolve_locations(tracking_uri="http://m:5000", environ=env)


def test_dataset_roots_resolve_under_the_data_root(tmp_path):
    env = {"SSVP_LAUNCH_DIR": str(tmp_path), "SSVP_DATA_ROOT": "/data"}
    assert data_root(None, env) == Path("/data")
    assert data_root("/flag/data", env) == Path("/flag/data")
    assert data_root(None, {"SSVP_LAUNCH_DIR": str(tmp_path)}) == tmp_path / "data"
    root = Path("/data")
    assert resolve_dataset("visa:data/VisA", root, env) == "visa:/data/VisA"
    assert resolve_dataset("mvtec:/abs/mvtec", root, env) == "mvtec:/abs/mvtec"
    assert resolve_dataset("mvtec:photos/mvtec", root, env) == f"mvtec:{tmp_path}/photos/mvtec"
    cfg = Config.tiny(source="visa:data/VisA", targets=["mvtec:data/mvtec", "btad:/x/btad"],
                      feature_cache="fc", dino_weights="data/weights/dino")
    out = resolve_config_paths(cfg, environ=env)
    assert out.data.source == "visa:/data/VisA"
    assert out.data.targets == ["mvtec:/data/mvtec", "btad:/x/btad"]
    assert out.train.feature_cache == str(tmp_path / "fc")
    assert out.model.dino_weights == "/data/weights/dino"
    out = resolve_config_paths(cfg, feature_cache_flag="/flag/fc", environ={**env, "SSVP_FEATURE_CACHE": "/env/fc"})
    assert out.train.feature_cache == "/flag/fc"
    out = resolve_config_paths(cfg, environ={**env, "SSVP_FEATURE_CACHE": "/env/fc"})
    assert out.train.feature_cache == "/env/fc"
    from ssvp.paths import resolve_data_path

    assert resolve_data_path("data/synthetic", env) == Path("/data/synthetic")
    assert resolve_data_path("elsewhere/synthetic", env) == tmp_path / "elsewhere" / "synthetic"


def test_flags_go_into_the_environment_absolute(tmp_path, monkeypatch):
    from ssvp.paths import apply_flags

    monkeypatch.setenv("SSVP_LAUNCH_DIR", str(tmp_path))
    monkeypatch.setenv("SSVP_DATA_ROOT", "/env/data")
    monkeypatch.setenv("SSVP_FEATURE_CACHE", "")  # recorded, so the flag's value is undone after the test
    apply_flags(None, "fc")  # only flags given are applied
    import os

    assert os.environ["SSVP_DATA_ROOT"] == "/env/data" and os.environ["SSVP_FEATURE_CACHE"] == str(tmp_path / "fc")
    apply_flags("/flag/data", None)
    assert os.environ["SSVP_DATA_ROOT"] == "/flag/data"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                               "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}).stdout.strip()


def test_commit_and_dirty_flag_are_captured_and_win_from_the_environment(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.txt").write_text("1")
    _git(repo, "add", "a.txt")
    _git(repo, "commit", "-qm", "one")
    head = _git(repo, "rev-parse", "HEAD")
    assert git_state(repo, {}) == (head, False)
    (repo / "a.txt").write_text("2")
    assert git_state(repo, {}) == (head, True)
    assert git_state(tmp_path / "nowhere", {}) == ("unknown", None)
    assert git_state(tmp_path / "nowhere", {"SSVP_GIT_COMMIT": "abc", "SSVP_GIT_DIRTY": "0"}) == ("abc", False)

    env = runtime_env(repo, {"SSVP_GIT_COMMIT": "stale"}, cwd=repo,
                      env_vars={"SSVP_STORAGE_PATH": "rel/ray", "MLFLOW_TRACKING_URI": "http://h:5000"})["env_vars"]
    assert env == {"SSVP_GIT_COMMIT": head, "SSVP_GIT_DIRTY": "1", "SSVP_LAUNCH_DIR": str(repo),
                   "SSVP_STORAGE_PATH": str(repo / "rel" / "ray"), "MLFLOW_TRACKING_URI": "http://h:5000"}


def test_runtime_env_command_prints_json_for_ray_job_submit():
    out = subprocess.run([sys.executable, "-m", "ssvp.paths", "runtime-env", "SSVP_DATA_ROOT=data",
                          "MLFLOW_TRACKING_URI=runs/m.db"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    env = json.loads(out.stdout)["env_vars"]
    assert env["SSVP_GIT_COMMIT"] == _git(REPO, "rev-parse", "HEAD") and env["SSVP_LAUNCH_DIR"] == str(REPO)
    assert env["SSVP_DATA_ROOT"] == str(REPO / "data") and env["MLFLOW_TRACKING_URI"] == f"sqlite:///{REPO}/runs/m.db"
    bad = subprocess.run([sys.executable, "-m", "ssvp.paths", "runtime-env", "oops"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "NAME=VALUE" in bad.stderr


def test_source_tags_name_the_config_as_written_not_the_copy(tmp_path):
    env = {"SSVP_GIT_COMMIT": "c0ffee", "SSVP_GIT_DIRTY": "1", "SSVP_LAUNCH_DIR": str(tmp_path)}
    tags = source_tags(REPO / "tuning" / "configs" / "quick.yaml", env)
    assert tags["git_commit"] == tags["mlflow.source.git.commit"] == "c0ffee" and tags["git_dirty"] == "true"
    assert tags["config_file"] == "tuning/configs/quick.yaml"
    import hashlib

    assert tags["config_sha256"] == hashlib.sha256((REPO / "tuning/configs/quick.yaml").read_bytes()).hexdigest()
    mine = tmp_path / "sub" / "my.yaml"
    mine.parent.mkdir()
    mine.write_text("name: x\n")
    assert source_tags(mine, env)["config_file"] == "sub/my.yaml"
