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


def test_sweep_tracker_records_no_secret(tmp_path):
    """The tracker's params, tags, dict and text artifacts go through the redaction (real MLflow store)."""
    import json

    from tuning.tracking import SweepTracker

    url = "postgresql://optuna:hunter2@db.example/optuna"
    tr = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "redact-test", "sweep-1",
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
