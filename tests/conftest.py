"""Shared test setup: offline hubs, loopback-only Ray, headless plotting, built-in synthetic data.

Tiers: ``python -m pytest -q -m "not slow"`` is the quick loop (unit and numerical tests of every
module, config validation, bad input); ``python -m pytest -q`` adds the ``slow`` tests (Ray, sweeps,
grids, learning runs, cluster and fault-injection end-to-end runs). Session fixtures hold what many
tests share: the synthetic benchmark and a migrated MLflow store (``mlflow_db`` copies it).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray port on 127.0.0.1
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TIRE = (REPO.parent / "shared" / "data" / "mvtec3d_tire_rgb").resolve()


def synthetic_config(root: Path, **overrides):
    """``Config.tiny`` trained on the synthetic ``root``'s domain_a, tested on its domain_b."""
    from ssvp.config import Config

    return Config.tiny(source=f"synthetic:{root}/domain_a", targets=[f"synthetic:{root}/domain_b"], **overrides)


def local_ray(**init_kwargs):
    """Generator body of a local-Ray fixture: a fresh loopback Ray with ``init_kwargs`` (object store
    300 MB), shut down afterwards with the environment variables init_ray set put back."""
    import ray

    from tuning.runner import init_ray

    saved = {k: os.environ.get(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    if ray.is_initialized():
        ray.shutdown()
    init_ray(object_store_memory=300 * 1024 * 1024, **init_kwargs)
    yield ray
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """Each test starts with the MLFLOW_* environment it was launched with: ``mlflow.set_tracking_uri``
    also writes ``MLFLOW_TRACKING_URI`` into ``os.environ`` (so subprocesses inherit it), which would
    otherwise send every later test's subprocesses to that test's store."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    import sys

    if "mlflow" in sys.modules and os.environ.get("MLFLOW_TRACKING_URI") != saved["MLFLOW_TRACKING_URI"]:
        import mlflow

        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """The built-in synthetic benchmark (two MVTec-layout domains), generated once per session."""
    from ssvp.data import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, seed=0)
    return root


@pytest.fixture(scope="session")
def tire_root() -> Path:
    if not (TIRE / "tire").is_dir():
        pytest.skip(f"real MVTec-layout photographs not present at {TIRE}")
    return TIRE


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with every schema migration applied, made once per session
    (creating a store runs MLflow's migrations: 2-3 s of CPU each time)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_db(_mlflow_template, tmp_path) -> str:
    """``sqlite:///<tmp_path>/mlflow.db``: a fresh store for this test, copied from the migrated template."""
    dst = tmp_path / "mlflow.db"
    shutil.copyfile(_mlflow_template, dst)
    return f"sqlite:///{dst}"
