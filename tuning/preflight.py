"""Pre-flight: everything a sweep can check before Ray starts (and, once connected, the resources).

:func:`check_before_ray` (called by :func:`tuning.plan.make_plan` before it connects to Ray):

* every dataset spec of the base config and of each variant: known format, root folder exists;
* the storage path (local folder): can be created and written;
* the resource numbers: CPUs per worker finite and > 0, GPUs and custom resources finite and >= 0;
* the Optuna study store (``search.optuna_storage``): a SQLite file's folder can be written, a
  database answers with its driver installed;
* the MLflow tracking store: a SQLite file's folder can be written; a tracking server answers
  ``/health`` within a few seconds (an unreachable one fails here in seconds, with one line,
  instead of MLflow's retries taking minutes).

:func:`check_resources` (after Ray is connected): a trial's worker group fits the cluster
(CPUs, GPUs, custom resources); otherwise its trials would wait forever for resources.

Each failure raises :class:`PreflightError` (a ``ValueError``) naming the field and the value
(secrets redacted).
"""
from __future__ import annotations

import math
import os
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from .redact import error_line, redact_text

__all__ = ["PreflightError", "check_before_ray", "check_writable", "check_data", "check_storage", "check_tracking",
           "check_resources", "check_resource_numbers", "check_optuna_storage"]

TRACKING_TIMEOUT_S = 5.0


class PreflightError(ValueError):
    """Something a sweep needs is missing or unreachable; found before any trial started."""


def check_before_ray(sweep) -> None:
    """Resource numbers, data specs, storage path, tracking store and Optuna study store of ``sweep``
    (a :class:`~tuning.settings.SweepConfig`)."""
    check_resource_numbers(sweep.resources)
    check_data(sweep.base, sweep.variants)
    check_storage(sweep.storage_path)
    if sweep.search.algorithm == "optuna":
        check_optuna_storage(sweep.search.optuna_storage)
    check_tracking(sweep.mlflow.tracking_uri)  # last: it creates a SQLite store, which only a sweep that starts needs


def check_resource_numbers(res) -> None:
    """CPUs per worker finite and > 0, GPUs and custom resources finite and >= 0: a negative amount fails
    deep inside Ray, a NaN one leaves the trial pending forever."""
    amounts = [("cpus_per_worker", res.cpus_per_worker, False), ("gpus_per_worker", res.gpus_per_worker, True)]
    amounts += [(f"extra.{k}", v, True) for k, v in (res.extra or {}).items()]
    for name, value, zero_ok in amounts:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or number < 0 or (number == 0 and not zero_ok):
            need = ">= 0" if zero_ok else "> 0"
            raise PreflightError(f"resources.{name} must be a finite number {need}, got {value!r}")


def check_optuna_storage(url: str | None, timeout: float = TRACKING_TIMEOUT_S) -> None:
    """The Optuna study store opens: a SQLite file's folder is writable, a database answers within
    ``timeout`` s, its driver is installed (else the sweep would fail after its parent run opened)."""
    if not url:
        return
    shown = redact_text(url)
    try:
        import sqlalchemy

        parsed = sqlalchemy.engine.make_url(url)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy.exc.ArgumentError: not a database URL
        raise PreflightError(f"search.optuna_storage {shown} is not a database URL ({type(exc).__name__})") from None
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database or ""
        if db.startswith("file:"):
            db = db[len("file:"):]
        if db and db != ":memory:":
            check_writable(Path(db).expanduser().absolute().parent, "search.optuna_storage folder")
        return
    try:
        args = {"connect_timeout": int(timeout)} if parsed.get_backend_name() in ("postgresql", "mysql") else {}
        engine = sqlalchemy.create_engine(parsed, connect_args=args)
        with engine.connect():
            pass
        engine.dispose()
    except ImportError as exc:
        raise PreflightError(f"search.optuna_storage {shown}: its database driver is not installed ({exc.name or exc})") from None
    except Exception as exc:  # noqa: BLE001 - OperationalError: unreachable, refused, bad login
        raise PreflightError(f"search.optuna_storage {shown} cannot be opened ({type(exc).__name__}: {error_line(exc)})") from None


def check_data(base, variants: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Each source / target spec of ``base`` and of every variant: known format, existing root."""
    from ssvp.config import ConfigError
    from ssvp.data import DatasetError, dataset_root, parse_spec

    configs = [("base", base)]
    for name, overrides in (variants or {}).items():
        try:
            configs.append((f"variant {name!r}", base.override(dict(overrides or {}))))
        except ConfigError as exc:
            raise PreflightError(f"variant {name!r}: {exc}") from None
    seen: set[str] = set()
    for where, cfg in configs:
        for field, spec in [("data.source", cfg.data.source)] + [("data.targets", t) for t in cfg.data.targets]:
            if spec in seen:
                continue
            seen.add(spec)
            try:
                parse_spec(spec)
                root = dataset_root(spec)
            except DatasetError as exc:
                raise PreflightError(f"{where}: {field}: {exc}") from None
            if not root.exists():
                raise PreflightError(f"{where}: {field}: dataset root {root} (from {spec!r}) does not exist")


def check_writable(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ssvp-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PreflightError(f"{what} {folder} is not writable: {exc.strerror or exc}") from None


def check_storage(storage_path: str | os.PathLike) -> None:
    """A local storage folder can be created and written (object stores are checked by Ray)."""
    text = str(storage_path)
    if "://" in text:
        return
    check_writable(Path(text).expanduser().absolute(), "storage_path")


def _create_sqlite_store(uri: str) -> None:
    """Create (or migrate) the SQLite store now, once, in the driver, before Ray starts: no trial or
    callback process then runs MLflow's schema migration on the same file concurrently."""
    from mlflow import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - not an MLflow database, locked, unreadable
        raise PreflightError(f"MLflow tracking store {uri}: cannot be opened ({type(exc).__name__}: {error_line(exc)})") from None


def check_tracking(uri: str | None, timeout: float = TRACKING_TIMEOUT_S) -> None:
    """A SQLite store's folder is writable; a tracking server answers ``/health`` within ``timeout`` s."""
    if not uri:
        return
    if uri.startswith("sqlite:///"):
        check_writable(Path(uri[len("sqlite:///"):]).parent, "MLflow tracking store folder")
        _create_sqlite_store(uri)
        return
    if not uri.startswith(("http://", "https://")):
        return
    shown = redact_text(uri)
    parts = urlsplit(uri)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise PreflightError(
            f"MLflow tracking server {shown} is not reachable ({exc.strerror or exc}); start it, or pass "
            "--tracking-uri sqlite:////abs/path/mlflow.db"
        ) from None
    health = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout) as resp:  # noqa: S310 - http(s) only
            resp.read(64)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise PreflightError(f"MLflow tracking server {shown} answers {exc.code} on /health") from None
    except (OSError, ValueError) as exc:
        raise PreflightError(f"MLflow tracking server {shown} does not answer within {timeout:.0f} s ({exc})") from None


def check_resources(res, use_gpu: bool, cluster: Mapping[str, float]) -> None:
    """A trial's worker group (``res``: :class:`~tuning.settings.ResourceSettings`) fits ``cluster``."""
    need = {"CPU": res.workers_per_trial * float(res.cpus_per_worker)}
    if use_gpu:
        need["GPU"] = res.workers_per_trial * float(res.gpus_per_worker)
    for name, amount in (res.extra or {}).items():
        need[name] = res.workers_per_trial * float(amount)
    for name, amount in need.items():
        have = float(cluster.get(name, 0))
        if amount > have:
            raise PreflightError(
                f"resources: a trial needs {amount:g} {name} ({res.workers_per_trial} worker(s)) but the Ray "
                f"cluster has {have:g}; lower workers_per_trial / cpus_per_worker / gpus_per_worker or add nodes"
            )
