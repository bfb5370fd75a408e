"""tuning.redact: secrets never reach the record (issue 11), everything else stays readable."""
from __future__ import annotations

import pytest

from tuning.redact import REDACTED, is_secret_name, redact, redact_text


@pytest.mark.parametrize("text, expected", [
    ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
    ("postgresql+psycopg2://optuna:s3c@r3t@db.example:5432/optuna?sslmode=require",
     "postgresql+psycopg2://optuna:***@db.example:5432/optuna?sslmode=require"),
    ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("mysql://u@h/db", "mysql://u@h/db"),  # no password: unchanged
    ("sqlite:////abs/path/mlflow.db", "sqlite:////abs/path/mlflow.db"),
    ("http://127.0.0.1:5000/#/experiments/1", "http://127.0.0.1:5000/#/experiments/1"),
    ("https://h/x?token=abc&page=2&api_key=zz", "https://h/x?token=***&page=2&api_key=***"),
    ("mlflow server --backend-store-uri postgresql://m:pw@127.0.0.1/ml --host 127.0.0.1",
     "mlflow server --backend-store-uri postgresql://m:***@127.0.0.1/ml --host 127.0.0.1"),
    ("PGPASSWORD=hunter2 psql -h db", "PGPASSWORD=*** psql -h db"),
    ("--password hunter2 --db-password=x2 --epochs 3", "--password *** --db-password=*** --epochs 3"),
    ('{"password": "x", "lr": 0.1, "n_latent_tokens": 2}', '{"password": "***", "lr": 0.1, "n_latent_tokens": 2}'),
    ("Authorization: Bearer abcdefghijkl123", "Authorization: Bearer ***"),
    ("optuna_storage: postgresql://u:pw@h/db", "optuna_storage: postgresql://u:***@h/db"),
    ("trial failed: could not connect to mysql://root:toor@10.0.0.5/optuna (timeout)",
     "trial failed: could not connect to mysql://root:***@10.0.0.5/optuna (timeout)"),
    ("nothing secret here: lr=0.001, gamma=0.5", "nothing secret here: lr=0.001, gamma=0.5"),
    # issue 25: a password holding '/' (and '@'), and the 'https:/' form pathlib.Path makes of a URL
    ("optuna_storage: postgresql://u:pa/ss@db/o", "optuna_storage: postgresql://u:***@db/o"),
    ("'mysql://u:p@ss/x@h/db'", "'mysql://u:***@h/db'"),
    ("FileNotFoundError: https:/u:tok3n@h.example/w.pt", "FileNotFoundError: https:/u:***@h.example/w.pt"),
    ("View run t00 at: http://admin:PW1@127.0.0.1:5000/#/experiments/1",
     "View run t00 at: http://admin:***@127.0.0.1:5000/#/experiments/1"),
    ("C:/x:y", "C:/x:y"),
])
def test_redact_text(text, expected):
    assert redact_text(text) == expected
    assert redact_text(expected) == expected  # idempotent


def test_redact_nested_params_tags_and_settings():
    settings = {
        "optuna_storage": "postgresql://optuna:pw@db/optuna",
        "mlflow": {"tracking_uri": "http://u:tok@mlflow:5000", "experiment": "ssvp"},
        "api_key": "abc123", "MLFLOW_TRACKING_TOKEN": "t0k", "db": {"password": 1234, "user": "optuna"},
        "model": {"n_latent_tokens": 2, "gamma": 0.5}, "uris": ["s3://bucket/x", "x://a:b@c/d"],
        "password_file": "/run/secrets/db", "flag": True, "empty_token": "",
    }
    out = redact(settings)
    assert out == {
        "optuna_storage": "postgresql://optuna:***@db/optuna",
        "mlflow": {"tracking_uri": "http://u:***@mlflow:5000", "experiment": "ssvp"},
        "api_key": REDACTED, "MLFLOW_TRACKING_TOKEN": REDACTED, "db": {"password": REDACTED, "user": "optuna"},
        "model": {"n_latent_tokens": 2, "gamma": 0.5}, "uris": ["s3://bucket/x", "x://a:***@c/d"],
        "password_file": "/run/secrets/db", "flag": True, "empty_token": "",
    }
    assert settings["api_key"] == "abc123"  # a copy: the input is untouched
    assert redact(("a://u:p@h/x", 3)) == ("a://u:***@h/x", 3)


@pytest.mark.parametrize("name, secret", [
    ("password", True), ("DB_PASSWORD", True), ("accessToken", True), ("api_key", True), ("apikey", True),
    ("AWS_SECRET_ACCESS_KEY", True), ("client_secret", True), ("auth", True),
    ("n_latent_tokens", False), ("tokenizer", False), ("sort_keys", False), ("monkey", False),
    ("keystone", False), ("password_file", False), ("lr_prompt", False), (3, False),
])
def test_secret_names(name, secret):
    assert is_secret_name(name) is secret


def test_sweep_tracker_records_no_secret(tmp_path, mlflow_db):
    """The tracker's params, tags, dict and text artifacts go through the redaction (real MLflow store)."""
    import json

    from tuning.tracking import SweepTracker

    url = "postgresql://optuna:hunter2@db.example/optuna"
    tr = SweepTracker(mlflow_db, "redact-test", "sweep-1",
                      artifact_location=str(tmp_path / "artifacts"))
    run_id = tr.start_parent("sweep-1", tags={"optuna_storage": url})
    tr.log_params(run_id, {"search.optuna_storage": url, "search.num_samples": 4})
    tr.log_dict(run_id, {"optuna_storage": url, "token": "abc"}, "sweep_settings.json")
    tr.log_text(run_id, f"connecting to {url}", "log.txt")
    run = tr.client.get_run(run_id)
    assert run.data.tags["optuna_storage"] == "postgresql://optuna:***@db.example/optuna"
    assert run.data.params["search.optuna_storage"] == "postgresql://optuna:***@db.example/optuna"
    assert run.data.params["search.num_samples"] == "4"
    local = tr.client.download_artifacts(run_id, "", str(tmp_path / "dl"))
    settings = json.loads((tmp_path / "dl" / "sweep_settings.json").read_text())
    assert settings == {"optuna_storage": "postgresql://optuna:***@db.example/optuna", "token": REDACTED}
    text = (tmp_path / "dl" / "log.txt").read_text()
    assert "hunter2" not in text and "hunter2" not in json.dumps(settings) and local


def test_redacting_client_redacts_error_tags_and_texts(tmp_path):
    """Trial ``error`` / ``retry_N_error`` tags and error texts go through the tracker's client, which
    redacts whatever it writes (issue 25: they reached MLflow in clear text)."""
    from mlflow import MlflowClient

    from tuning.redact import RedactingClient

    raw = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    client = RedactingClient(raw)
    run = client.create_run(client.create_experiment("e"))  # passes through
    client.set_tag(run.info.run_id, "retry_1_error", "OSError: https:/u:s3cr/et@h/w.pt unreachable")
    client.set_tag(run.info.run_id, "api_token", "abc")
    client.log_text(run.info.run_id, "connect postgresql://u:pa/ss@db/o failed", "error.txt")
    tags = raw.get_run(run.info.run_id).data.tags
    assert tags["retry_1_error"] == "OSError: https:/u:***@h/w.pt unreachable" and tags["api_token"] == REDACTED
    text = raw.download_artifacts(run.info.run_id, "error.txt", str(tmp_path / "dl"))
    assert open(text).read() == "connect postgresql://u:***@db/o failed"
    # the one-line cause (tags, results.md, the console) is redacted where it is made
    from tuning.tracking import error_summary

    trace = "Traceback (most recent call last):\n  ...\nFileNotFoundError: weights https:/u:pw/9x@h/w.pt missing"
    assert error_summary(trace) == "FileNotFoundError: weights https:/u:***@h/w.pt missing"


def test_errors_leave_a_trial_redacted_with_their_type_and_frames():
    """What a trial raises at its process boundary (Ray Train's worker, Tune's actor) holds no secret,
    keeps its class (the deterministic-error rule reads class names) and its frames, and drops the
    chained original; a clean error passes unchanged, chain included."""
    import traceback

    from ssvp.config import ConfigError
    from tuning.redact import errors_redacted

    def load():
        raise FileNotFoundError("weights https:/u:pw/9x@h/w.pt missing")

    with pytest.raises(ConfigError) as info:
        with errors_redacted():
            try:
                load()
            except FileNotFoundError as exc:
                raise ConfigError(f"clip_pretrained: {exc}") from exc
    text = "".join(traceback.format_exception(info.value))
    assert "pw/9x" not in text and "https:/u:***@h/w.pt" in text and "in load" not in text
    assert info.value.__cause__ is None and "errors_redacted" not in str(info.value)
    with pytest.raises(FileNotFoundError) as info:
        with errors_redacted():
            load()
    assert "in load" in "".join(traceback.format_exception(info.value))  # the frames are kept
    clean = ValueError("gamma must lie in [0, 1]")
    with pytest.raises(ValueError) as info:
        with errors_redacted():
            try:
                raise KeyError("gamma")
            except KeyError as exc:
                raise clean from exc
    assert info.value is clean and isinstance(info.value.__cause__, KeyError)
    # a secret two causes down is found too
    with pytest.raises(RuntimeError) as info:
        with errors_redacted():
            try:
                try:
                    load()
                except FileNotFoundError as exc:
                    raise KeyError("weights") from exc
            except KeyError as exc:
                raise RuntimeError("trial failed") from exc
    assert "pw/9x" not in "".join(traceback.format_exception(info.value)) and info.value.__cause__ is None


@pytest.mark.slow
def test_no_secret_reaches_any_copy_of_a_sweep(tmp_path, synthetic_root):
    """Issue 25: a distinct secret in each carrier: the tracking URI's password (an MLflow server behind
    a login), the Optuna storage URL, a weights URL in the sweep file and a ``--set`` weights URL (both
    with '/' in the password). A weights URL is refused before anything runs (exit 2, the field named,
    the password masked), so it can never reach a checkpoint's config.json; the sweep then runs with
    the other two. Nothing of the record holds any secret: stdout, stderr, the MLflow server's database
    and artifacts, the storage folder (Tune's pickles, launch.json, ssvp_sweep.json, checkpoints)."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from cluster_services import clean_env, mlflow_server

    repo = Path(__file__).resolve().parents[1]
    secrets = {"tracking": "trkPW_71c4-kq93x", "optuna": "optTOK_93b1", "weights": "wtsPW/58e2", "set": "setPW/26d0"}
    overrides = {
        "source": f"synthetic:{synthetic_root}/domain_a", "targets": [f"synthetic:{synthetic_root}/domain_b"],
        "epochs": 1, "max_steps_per_epoch": 1, "max_per_class": 2, "batch_size": 4, "progress": False}
    sweep = {
        "name": "sec",
        "base": {"preset": "tiny", "overrides": overrides},
        "space": {"gamma": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "search": {"algorithm": "optuna", "num_samples": 1, "seed": 0, "scheduler": "none",
                   "points_to_evaluate": "none",
                   "optuna_storage": f"sqlite:///file:{tmp_path}/optuna.db?mode=rwc&token={secrets['optuna']}&uri=true"},
        "resources": {"use_gpu": False, "cpus_per_worker": 0.5, "max_failures": 0},
        "target_eval": "none", "refit": False,
    }
    cfg, url_cfg = tmp_path / "s.yaml", tmp_path / "url.yaml"
    cfg.write_text(yaml.safe_dump(sweep))
    sweep["base"]["overrides"] = {**overrides, "dino_weights": f"https://u:{secrets['weights']}@127.0.0.1:9/dino.pt"}
    url_cfg.write_text(yaml.safe_dump(sweep))
    (tmp_path / "art").mkdir()
    env = clean_env(PYTHONPATH=str(repo), XDG_CONFIG_HOME=str(tmp_path / "config"))
    common = ["--local", "--num-cpus", "2", "--name", "sec", "--storage-path", str(tmp_path / "ray"), "--experiment", "sec"]
    outs = []
    with mlflow_server(tmp_path, str(tmp_path / "art"), env, password=secrets["tracking"]) as uri:
        login = uri.replace("http://", f"http://admin:{secrets['tracking']}@")
        for config, extra, code in [
            (url_cfg, [], 2),
            (cfg, ["--set", f"clip_pretrained=https://u:{secrets['set']}@127.0.0.1:9/clip.pt"], 2),
            (cfg, [], 0),
        ]:
            proc = subprocess.run(
                [sys.executable, str(repo / "tuning" / "sweep.py"), "--config", str(config), *common,
                 "--tracking-uri", login, *extra], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
            outs.append(proc.stdout + proc.stderr)
            assert proc.returncode == code, outs[-1][-4000:]
    assert "model.dino_weights" in outs[0] and "u:***@127.0.0.1:9/dino.pt" in outs[0], outs[0][-2000:]
    assert "model.clip_pretrained" in outs[1] and "u:***@127.0.0.1:9/clip.pt" in outs[1], outs[1][-2000:]
    found = {name: [] for name in secrets}
    for path in [p for p in tmp_path.rglob("*") if p.is_file()] + [None]:
        data = "".join(outs).encode() if path is None else path.read_bytes()
        for name, secret in secrets.items():
            if secret.encode() in data and path not in (cfg, url_cfg):
                found[name].append(str(path or "console"))
    assert not any(found.values()), found
    # the record is there (the greps above looked at something): Tune's state, the study, MLflow's
    # database, a trial checkpoint's config.json
    assert (tmp_path / "ray" / "sec" / "tuner.pkl").is_file() and (tmp_path / "optuna.db").is_file()
    assert (tmp_path / "mlflow.db").is_file() and list((tmp_path / "ray").rglob("config.json"))
