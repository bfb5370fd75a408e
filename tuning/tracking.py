"""MLflow recording of sweeps: one parent run per sweep, one child run per Tune trial.

Everything is logged from the Tune *driver* by :class:`MLflowTrialCallback` (a Tune
``Callback``), keyed by trial id, so that

* a trial's run is created when it starts (params = the whole resolved config, tags
  ``sweep_id``, ``trial_id``, ``role=trial``, ``variant``, ``seed``, ``git_commit``,
  ``mlflow.parentRunId``; the resolved config as an artifact),
* each epoch's metrics are logged with ``step = epoch`` exactly once (on a resumed or
  restarted trial, epochs at or below the last logged one are skipped: the last
  logged epoch is read back from MLflow, the source of truth),
* a finished trial gets its final / best source-validation metrics, its best
  checkpoint (heads) and worker placement records as artifacts and ends FINISHED,
* a failed trial ends FAILED with the reason (tag ``error`` and ``error.txt``),
* nothing stays RUNNING: :meth:`SweepTracker.close_open_children` marks what an
  interrupted sweep left running as KILLED, and ``--resume`` reopens those runs
  (found again by their ``trial_id`` tag, never duplicated).

Tracking store: SQLite by default (``sqlite:////ABS/runs/mlflow.db``, absolute because
trials run in their own working directories) with artifacts in a local folder
(``ABS/runs/mlartifacts``); any ``--tracking-uri`` (e.g. ``http://server:5000``) works.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .redact import RedactingClient, redact, redact_text

try:  # the callback base class; tracking helpers also work without a Ray session
    from ray.tune import Callback as _TuneCallback
except Exception:  # noqa: BLE001
    _TuneCallback = object  # type: ignore[assignment,misc]

__all__ = [
    "default_tracking_uri",
    "default_artifact_location",
    "normalize_tracking_uri",
    "is_local_store",
    "git_commit",
    "error_summary",
    "trial_error_text",
    "SweepTracker",
    "MLflowTrialCallback",
    "TrialRecordSettings",
    "TUNE_AUTO_KEYS",
]

PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # a run's / an experiment's description in the MLflow UI
NOTE_LIMIT = 8000  # MLflow's longest tag value
# the MLflow UI opens an experiment with this tag in its model-training view (not the GenAI one)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# keys Tune adds to every result; everything else numeric in a result is a metric of the run
TUNE_AUTO_KEYS = {
    "timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
    "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "config",
    "time_since_restore", "iterations_since_restore", "experiment_tag", "checkpoint_path",
    "should_checkpoint", "experiment_id", "episodes_total", "timesteps_total", "timesteps_since_restore",
    "target_eval_done", "epoch",
}
_WRAPPER_ERRORS = {
    "TrainingFailedError", "WorkerGroupError", "RayTaskError", "TuneError", "ActorDiedError",
    "RayActorError", "ControllerError", "RayTaskError(TrainingFailedError)",
}


# --------------------------------------------------------------------------- metric names
def mlflow_metric_name(key: str) -> str:
    """The MLflow name of a metric ``fit`` reports: one namespaced name per quantity.

    ``train_loss`` -> ``train/loss``, ``val_objective`` -> ``val/objective``, ``lr_prompt`` ->
    ``lr/prompt`` (so the metric never shares a name with the ``lr_prompt`` parameter);
    anything else (``target_*``, ``epoch``) is kept.
    """
    for prefix in ("train_", "val_", "lr_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return key


def trial_number(trial, offset: int = 0) -> int | None:
    """The running number Tune gave a trial: the counter its ``experiment_tag`` starts with
    (``"4_gamma=..."``), less ``offset`` (1 for a search algorithm, whose counter starts at 1, so
    that the number is Optuna's trial number)."""
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return int(head) - offset if head.isdigit() else None


_SYMBOLS = {"gamma": "γ", "xi": "ξ", "beta": "β", "lambda1": "λ1", "lambda2": "λ2", "tau": "τ",
            "focal_lambda": "λf", "lr_prompt": "lr_p", "lr_head": "lr_h"}


def param_text(params: Mapping[str, Any], limit: int | None = None) -> str:
    """``γ=0.94 ξ=0.73 ...``: sampled keys with the paper's symbols, floats to 3 significant digits."""
    items = [(k, v) for k, v in params.items() if k != "variant"][:limit]
    return " ".join(f"{_SYMBOLS.get(k, k)}={v:.3g}" if isinstance(v, float) else f"{_SYMBOLS.get(k, k)}={v}"
                    for k, v in items)


def trial_run_name(number: int | None, trial_id: str, params: Mapping[str, Any], variant: str | None = None,
                   label: str | None = None, max_params: int = 3) -> str:
    """A readable run name: ``t03 γ=0.94 ξ=0.73`` (search), ``E/full seed=1`` (a grid cell, with
    ``label`` = the variant's letter/name)."""
    head = label or variant or (f"t{number:02d}" if number is not None else str(trial_id))
    return f"{head} {param_text(params, None if (label or variant) else max_params)}".strip()


def filter_equals(key: str, value: str) -> str:
    """An MLflow filter clause matching ``key`` = ``value`` for any value, quotes included.

    MLflow's filter strings have no escape character: a value holding ``'`` is written in
    double quotes and one holding ``"`` in single quotes; one holding both becomes a
    ``LIKE`` pattern with ``_`` for each quote (a wider match), so callers compare
    the runs found with the value exactly.
    """
    value = str(value)
    if "'" not in value:
        return f"{key} = '{value}'"
    if '"' not in value:
        return f'{key} = "{value}"'
    pattern = value.replace("'", "_").replace('"', "_")  # % and _ match themselves too
    return f"{key} LIKE '{pattern}'"


def target_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``{spec: {"per_class": {cls: {...}}, "mean": {...}}}`` -> rows ``{dataset, class, metric: value}``."""
    from tuning.trial import target_metric_name

    rows = []
    for spec, table in report.items():
        if not isinstance(table, Mapping):
            continue
        dataset = target_metric_name(spec, "").split("/")[1]
        classes = dict(table.get("per_class") or {})
        classes["mean"] = table.get("mean") or {}
        for cls, values in classes.items():
            if isinstance(values, Mapping):
                rows.append({"dataset": dataset, "class": cls,
                             **{k: float(v) for k, v in values.items() if _finite(v) or isinstance(v, float)}})
    return rows


# --------------------------------------------------------------------------- locations
def default_tracking_uri(base_dir: str | os.PathLike | None = None) -> str:
    """``sqlite:////ABS/runs/mlflow.db`` under ``base_dir`` (default: the working directory)."""
    root = Path(base_dir or os.getcwd()).resolve() / "runs"
    return f"sqlite:///{root / 'mlflow.db'}"


def default_artifact_location(base_dir: str | os.PathLike | None = None) -> str:
    return str(Path(base_dir or os.getcwd()).resolve() / "runs" / "mlartifacts")


def normalize_tracking_uri(uri: str | None, base_dir: str | os.PathLike | None = None) -> str:
    """Absolute tracking URI: ``None``/"" -> the default SQLite file; a bare path -> ``sqlite:///ABS``.

    ``sqlite:///relative.db`` is made absolute; ``file:`` stores are refused (MLflow 3
    needs ``MLFLOW_ALLOW_FILE_STORE``; use SQLite or a server).
    """
    if not uri:
        return default_tracking_uri(base_dir)
    if uri.startswith("file:") or (("://" not in uri) and Path(uri).suffix not in (".db", ".sqlite")):
        raise ValueError(
            f"tracking URI {uri!r}: use a SQLite file (sqlite:////abs/path/mlflow.db or a path ending in .db) "
            "or a tracking server (http://host:5000); MLflow's file store is not supported"
        )
    if "://" not in uri:
        path = Path(uri)
        if not path.is_absolute():
            path = Path(base_dir or os.getcwd()).resolve() / path
        return f"sqlite:///{path}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        return f"sqlite:///{(Path(base_dir or os.getcwd()).resolve() / rel)}"
    return uri


def _artifacts_beside(uri: str) -> str:
    """``DIR/mlartifacts`` next to the SQLite file ``DIR/x.db`` of a local tracking URI."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts")
    return default_artifact_location()


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:")


def _ensure_sqlite_dir(uri: str) -> None:
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)


def git_commit(repo: str | os.PathLike | None = None) -> str:
    """The repository's HEAD commit (``SSVP_GIT_COMMIT`` wins; ``unknown`` outside a git checkout)."""
    from ssvp.paths import git_state

    return git_state(repo)[0]


def error_summary(trace: str | None) -> str:
    """The most telling ``SomeError: message`` line of a (nested Ray) traceback, secrets redacted
    (it reaches tags, ``results.md`` and the console)."""
    if not trace:
        return "unknown error"
    lines = [ln.strip() for ln in redact_text(str(trace)).splitlines() if ln.strip()]
    pattern = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit))(?:\([^)]*\))?: (.+)$")
    hits = [(m.group(1).rsplit(".", 1)[-1], ln) for ln in lines if (m := pattern.match(ln))]
    # the last non-wrapper exception is the one the user code raised (earlier ones are its causes)
    for name, line in reversed(hits):
        if name not in _WRAPPER_ERRORS:
            return line[:2000]
    if hits:
        return hits[-1][1][:2000]
    return lines[-1][:2000] if lines else "unknown error"


def trial_error_text(trial) -> str | None:
    """The traceback text of a Tune trial's latest error.

    Read from the driver's staging copy first (``trial.error_file``): right after a failure
    the copy in the storage path, which ``trial.get_error()`` reads, may not be synced yet.
    """
    path = getattr(trial, "error_file", None)
    if path:
        try:
            text = Path(path).read_text()
            if text.strip():
                return text
        except OSError:
            pass
    try:
        return trial.get_error()
    except Exception:  # noqa: BLE001
        return None


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _dataset_entity(spec: str):
    """MLflow ``Dataset`` entity of a data spec ``fmt:root``: digest over the file names and sizes."""
    import hashlib
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    fmt, _, root = spec.partition(":")
    h = hashlib.sha256(spec.encode())
    path = Path(root)
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.is_file():
                h.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(root or spec)
    name = f"{path.name or fmt} ({fmt})"
    return MetaDataset(source, name=name, digest=h.hexdigest()[:16])._to_mlflow_entity()


# --------------------------------------------------------------------------- tracker
class SweepTracker:
    """MLflow bookkeeping of one sweep (parent run + child runs); picklable, client made lazily."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        sweep_id: str,
        artifact_location: str | None = None,
        parent_run_id: str | None = None,
        experiment_id: str | None = None,
    ):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.sweep_id = sweep_id
        self.artifact_location = artifact_location
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self._client = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_source"] = None
        state["_monitor"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            _ensure_sqlite_dir(self.tracking_uri)
            self._client = RedactingClient(MlflowClient(tracking_uri=self.tracking_uri))  # every tag/text redacted
        return self._client

    def source_tags(self) -> dict[str, str]:
        """``git_commit``, ``git_dirty``, ``mlflow.source.git.commit`` (the UI's Version column) and
        ``mlflow.source.name`` / ``.type``; the commit as :mod:`tuning.paths` reads it
        (``SSVP_GIT_COMMIT`` / ``SSVP_GIT_DIRTY`` from the submitting side win)."""
        if getattr(self, "_source", None) is None:
            from .paths import source_tags

            self._source = {**source_tags(), "mlflow.source.name": "tuning/sweep.py", "mlflow.source.type": "LOCAL"}
        return dict(self._source)

    # ----- experiment and parent
    def ensure_experiment(self) -> str:
        """Create the experiment (in the driver) if missing; returns its id."""
        if self.experiment_id:
            return self.experiment_id
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            location = None
            if is_local_store(self.tracking_uri):
                root = Path(self.artifact_location or _artifacts_beside(self.tracking_uri)).resolve()
                root.mkdir(parents=True, exist_ok=True)
                location = (root / re.sub(r"[^A-Za-z0-9_.-]+", "_", self.experiment)).as_uri()
            try:
                self.experiment_id = self.client.create_experiment(
                    self.experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except Exception:  # noqa: BLE001 - created concurrently by another driver
                exp = self.client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
                self.experiment_id = exp.experiment_id
        else:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            self.experiment_id = exp.experiment_id
            if EXPERIMENT_KIND_TAG not in exp.tags:  # created before the tag was set
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return self.experiment_id

    def find_parent(self):
        runs = self.client.search_runs(
            [self.ensure_experiment()],
            filter_string=f"{filter_equals('tags.sweep_id', self.sweep_id)} and tags.role = 'sweep'",
            max_results=50,
        )
        runs = [r for r in runs if r.data.tags.get("sweep_id") == self.sweep_id]  # exact (see filter_equals)
        return runs[0] if runs else None

    def start_parent(self, run_name: str, tags: Mapping[str, str] | None = None, resume: bool = False) -> str:
        """Create the sweep's parent run (or reopen it on resume); returns its id."""
        existing = self.find_parent()
        if existing is not None:
            if not resume:
                raise RuntimeError(
                    f"MLflow experiment {self.experiment!r} already has a sweep with id {self.sweep_id!r} "
                    f"(run {existing.info.run_id}); resume it or choose another sweep name"
                )
            self.parent_run_id = existing.info.run_id
            self.client.update_run(self.parent_run_id, status="RUNNING")
            self.client.set_tag(self.parent_run_id, "resumed", "true")
            return self.parent_run_id
        all_tags = {"sweep_id": self.sweep_id, "role": "sweep", **self.source_tags(), **(tags or {})}
        run = self.client.create_run(self.ensure_experiment(), run_name=run_name,
                                     tags={k: str(v) for k, v in redact(all_tags).items()})
        self.parent_run_id = run.info.run_id
        return self.parent_run_id

    def describe_run(self, run_id: str, text: str) -> None:
        """The run's description (``mlflow.note.content``: Markdown, its Overview in the MLflow UI)."""
        self.client.set_tag(run_id, NOTE_TAG, redact_text(text)[:NOTE_LIMIT])

    def describe_experiment(self, text: str) -> None:
        """The experiment's description, unless it has one (an experiment may hold many sweeps)."""
        exp = self.client.get_experiment(self.ensure_experiment())
        if text and not exp.tags.get(NOTE_TAG):
            self.client.set_experiment_tag(exp.experiment_id, NOTE_TAG, redact_text(text))

    def end_parent(self, status: str = "FINISHED") -> None:
        self.stop_system_metrics()
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status=status)

    def start_system_metrics(self, interval_s: float = 5.0) -> None:
        """CPU, memory, disk, network (and GPU with ``nvidia-ml-py``) of the driver's machine, every
        ``interval_s``, as ``system/…`` metrics of the parent run (MLflow's System metrics tab)."""
        try:
            import logging

            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines

            self._monitor = SystemMetricsMonitor(self.parent_run_id, sampling_interval=interval_s,
                                                 resume_logging=True, tracking_uri=self.tracking_uri)
            self._monitor.start()
        except Exception:  # noqa: BLE001 - psutil missing: no system metrics, the sweep goes on
            self._monitor = None

    def stop_system_metrics(self) -> None:
        monitor, self._monitor = getattr(self, "_monitor", None), None
        if monitor is not None:
            monitor.finish()

    # ----- logging helpers
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        items = [Param(str(k), _param_value(v)) for k, v in redact(dict(params)).items() if str(k) not in existing]
        for start in range(0, len(items), 90):
            self.client.log_batch(run_id, params=items[start : start + 90])

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(str(k), float(v), now, int(step or 0))
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start : start + 500])

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, redact(obj), artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, redact_text(text), artifact_file)

    def log_target_table(self, run_id: str, report: Mapping[str, Any]) -> None:
        """``evaluate()``'s per-class target report as the MLflow table ``target_per_class.json`` (one row
        per dataset and class, the class mean included; the run's Artifacts tab and ``mlflow.load_table``)."""
        rows = target_rows(report)
        if rows:
            import pandas as pd

            self.client.log_table(run_id, pd.DataFrame(rows), "target_per_class.json")

    def log_artifacts(self, run_id: str, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_artifact(self, run_id: str, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(local_path), artifact_path)

    # ----- children
    def children(self, role: str | None = None) -> list:
        filt = f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'"
        if role:
            filt += f" and tags.role = '{role}'"
        out, token = [], None
        while True:
            page = self.client.search_runs([self.ensure_experiment()], filter_string=filt, max_results=1000, page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                return out

    def find_child(self, trial_id: str):
        runs = self.client.search_runs(
            [self.ensure_experiment()],
            filter_string=(
                f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.trial_id = '{trial_id}' and tags.role = 'trial'"
            ),
            max_results=5,
        )
        return runs[0] if runs else None

    def start_child(self, run_name: str, tags: Mapping[str, Any]) -> str:
        all_tags = {PARENT_TAG: self.parent_run_id, "sweep_id": self.sweep_id, **self.source_tags(), **tags}
        run = self.client.create_run(
            self.ensure_experiment(), run_name=run_name, tags={k: str(v) for k, v in redact(all_tags).items()}
        )
        return run.info.run_id

    def log_data(self, run_id: str, specs: list[str], context: str) -> None:
        """The datasets a run used as MLflow run inputs (``mlflow.data``; the UI's Datasets column):
        name = the dataset folder, source = its location, digest = a fingerprint of its files."""
        try:
            from mlflow.entities import DatasetInput, InputTag

            inputs = [DatasetInput(_dataset_entity(spec), [InputTag("mlflow.data.context", context)])
                      for spec in specs]
            self.client.log_inputs(run_id, datasets=inputs)
        except Exception:  # noqa: BLE001 - provenance only: never fail a sweep over it
            pass

    def last_logged_step(self, run_id: str, key: str) -> int:
        history = self.client.get_metric_history(run_id, key)
        return max((m.step for m in history), default=0)

    def close_open_children(self, status: str = "KILLED") -> list[str]:
        """Mark child runs still RUNNING as ``status`` (an interrupted sweep); returns their ids."""
        closed = []
        for run in self.children():
            if run.info.status == "RUNNING":
                self.client.set_tag(run.info.run_id, "interrupted", "true")
                self.client.set_terminated(run.info.run_id, status=status)
                closed.append(run.info.run_id)
        return closed


# --------------------------------------------------------------------------- Tune callback
@dataclass
class TrialRecordSettings:
    """What :class:`MLflowTrialCallback` needs to know of the sweep (built by ``tuning.record.trial_callback``).

    ``base`` is the base config dict and ``variants`` the named override bundles, so the
    callback can log each trial's fully resolved config; ``epochs`` tells an early-stopped
    trial (ASHA) from a complete one; ``metric``/``mode`` the objective (``fit``'s key, e.g.
    ``val_objective``); ``train_storage`` the Ray Train folder (checkpoints, placement);
    ``run_labels`` variant -> run-name label (grid cells: ``E/full``); ``number_offset`` 1 with
    Optuna (``t00`` = Optuna's trial 0).
    """

    base: Mapping[str, Any]
    variants: Mapping[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    metric: str = "val_objective"
    mode: str = "max"
    train_storage: str | None = None
    run_labels: Mapping[str, str] = field(default_factory=dict)
    number_offset: int = 0


class MLflowTrialCallback(_TuneCallback):
    """Tune callback (driver side) that records every trial as a child run of the sweep's parent
    (what it knows of the sweep: :class:`TrialRecordSettings`)."""

    def __init__(self, tracker: SweepTracker, settings: TrialRecordSettings):
        self.settings = settings
        self.number_offset = settings.number_offset
        self.searcher = None  # set by the runner: the Optuna searcher sees every result logged here
        self.train_storage = settings.train_storage
        self.run_labels = dict(settings.run_labels or {})
        self.tracker = tracker
        self.base = dict(settings.base)
        self.variants = dict(settings.variants or {})
        self.epochs = settings.epochs
        self.metric = settings.metric
        self.mode = settings.mode
        self._runs: dict[str, str] = {}
        self._last_epoch: dict[str, int] = {}
        self._best: dict[str, tuple[float, int]] = {}
        self._checkpoint: dict[str, str] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_runs", "_last_epoch", "_best", "_checkpoint"):
            state[key] = {}
        state["searcher"] = None
        state["_ended_ids"] = None
        # pickled into Tune's tuner.pkl on the shared storage path: no secret of the config (weights URLs);
        # a resume gets this run's callback back (tuning.runner.reattach), not this copy
        state["base"] = redact(self.base)
        state["settings"] = dataclasses.replace(self.settings, base=state["base"])
        return state

    def attach_searcher(self, searcher) -> None:
        """Pass every result logged here on to ``searcher`` (Optuna), and name the sweep and its MLflow
        parent run on the study (``sweep_name``, ``mlflow_parent_run_id``, ``mlflow_experiment_id``)."""
        self.searcher = searcher
        attrs = getattr(searcher, "study_user_attrs", None)
        if attrs is not None:
            attrs.update({"sweep_name": self.tracker.sweep_id, "mlflow_parent_run_id": self.tracker.parent_run_id or "",
                          "mlflow_experiment_id": self.tracker.experiment_id or ""})

    # Tune's own callback checkpointing: MLflow is the source of truth, keep nothing
    def get_state(self):
        return None

    # ----- helpers
    def _resolved(self, trial) -> tuple[dict, str | None]:
        from tuning.trial import resolve_trial_config

        cfg, variant = resolve_trial_config(self.base, trial.config, self.variants)
        return cfg, variant

    def run_id(self, trial) -> str:
        """The trial's child run, created (or found again after a resume) on first use."""
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        tr = self.tracker
        existing = tr.find_child(tid)
        if existing is not None:
            run_id = existing.info.run_id
            if existing.info.status != "RUNNING":
                tr.client.update_run(run_id, status="RUNNING")
            self._last_epoch[tid] = tr.last_logged_step(run_id, mlflow_metric_name(self.metric))
            self._runs[tid] = run_id
            return run_id
        try:
            cfg, variant = self._resolved(trial)
            params = cfg.flat()
            seed = cfg.train.seed
        except Exception as exc:  # noqa: BLE001 - a config the trial will refuse too
            cfg, variant, params, seed = None, trial.config.get("variant"), dict(trial.config), "?"
            params["config_error"] = str(exc)
        tags = {"trial_id": tid, "role": "trial", "variant": variant or "", "seed": seed, "trial_name": str(trial)}
        tags["protocol"] = params.get("protocol", "")  # select: held-out source classes pick the epoch
        number = trial_number(trial, self.number_offset)
        tags["trial_number"] = "" if number is None else number
        name = trial_run_name(number, tid, dict(trial.config), variant, self.run_labels.get(variant or ""))
        run_id = tr.start_child(run_name=name, tags=tags)
        tr.log_params(run_id, {**params, **({"variant": variant} if variant else {})})
        tr.log_dict(run_id, dict(trial.config), "config/trial_params.json")
        if cfg is not None:
            tr.log_dict(run_id, cfg.to_dict(), "config/config.json")
            tr.log_data(run_id, [cfg.data.source], "training")  # trains on part, selects on held-out classes
        self._runs[tid] = run_id
        self._last_epoch[tid] = 0
        return run_id

    # ----- Tune hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        self._ended().discard(trial.trial_id)
        self.run_id(trial)
        self._resume_record(trial)

    def on_trial_restore(self, iteration, trials, trial, **info):
        self._ended().discard(trial.trial_id)
        self.run_id(trial)
        self._resume_record(trial)

    def _resume_record(self, trial) -> None:
        """A resumed trial continues from its newest complete checkpoint on disk (``tuning.trial._restore``),
        which may hold epochs whose reports died with the previous driver (it may even have trained its
        last epoch then, and now reports nothing): log them now (MLflow and Optuna), and make that
        checkpoint the trial's, so it ends on it rather than on the stale one Tune saved (which Train
        may have deleted since). A fresh trial has no checkpoint on disk: nothing happens."""
        tid = trial.trial_id
        ckpt = self._newest_checkpoint(trial, self._checkpoint.get(tid))
        if ckpt:
            self._checkpoint[tid] = ckpt

    def _ended(self) -> set:
        """Trials Tune has ended: a result that arrives after ASHA stopped a trial (its workers ran
        on meanwhile) is not the trial's, for Tune's scheduler and searcher, so not for MLflow either."""
        if getattr(self, "_ended_ids", None) is None:
            self._ended_ids = set()
        return self._ended_ids

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid = trial.trial_id
        if tid in self._ended():
            return
        run_id = self.run_id(trial)
        if result.get("checkpoint_path"):
            self._checkpoint[tid] = str(result["checkpoint_path"])
        metrics = {
            k: v for k, v in result.items()
            if k not in TUNE_AUTO_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if result.get("target_eval_done"):
            target = {k: v for k, v in metrics.items() if k.startswith("target/")}
            self.tracker.log_metrics(run_id, target)
            return
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        if epoch <= self._last_epoch.get(tid, 0):
            return  # already logged (resumed or restarted trial)
        self.backfill(trial, result.get("checkpoint_path"), before=epoch)
        named = {mlflow_metric_name(k): v for k, v in metrics.items()}
        self.tracker.log_metrics(run_id, named, step=epoch)  # step = epoch: no ``epoch`` metric
        if getattr(self, "searcher", None) is not None:
            self.searcher.observe(tid, result, run_id)
        self._last_epoch[tid] = epoch

    def backfill(self, trial, checkpoint: str | None, before: int | None = None) -> int:
        """Log the epochs a checkpoint's ``history.json`` holds that the run lacks (each once).

        Ray Train can register a checkpoint whose report never reached this driver (driver
        killed or interrupted in between); the resumed trial continues after it, and without
        this its run would miss those epochs. Returns how many epochs were added.
        """
        from tuning.trial import read_history

        tid = trial.trial_id
        run_id = self.run_id(trial)
        history, _ = read_history(checkpoint) if checkpoint else ([], None)
        added = 0
        for row in sorted(history, key=lambda r: r.get("epoch", 0)):
            epoch = int(row.get("epoch", 0))
            if epoch <= self._last_epoch.get(tid, 0) or (before is not None and epoch >= before):
                continue
            named = {mlflow_metric_name(k): v for k, v in row.items() if k not in TUNE_AUTO_KEYS}
            self.tracker.log_metrics(run_id, named, step=epoch)
            if getattr(self, "searcher", None) is not None:  # Optuna holds what MLflow holds
                self.searcher.observe(tid, row, run_id)
            self._last_epoch[tid] = epoch
            added += 1
        if added:
            done = int(self.tracker.client.get_run(run_id).data.tags.get("backfilled_epochs", "0"))
            self.tracker.client.set_tag(run_id, "backfilled_epochs", str(done + added))
        return added

    def _newest_checkpoint(self, trial, ckpt: str | None) -> str | None:
        """The trial's checkpoint holding the most epochs (local storage), else ``ckpt``; back-fills from it."""
        from tuning.trial import newest_checkpoint

        trial_dir = self.trial_dir(trial.trial_id)
        if not isinstance(trial_dir, Path):  # object store: Ray's reported checkpoint
            return ckpt
        newest = newest_checkpoint(trial_dir, ckpt if ckpt and Path(ckpt).is_dir() else None)
        if newest is not None:
            ckpt = str(newest)
            self.backfill(trial, ckpt)
        return ckpt

    def _record_restarts(self, run_id: str, trial_id: str) -> None:
        """Worker-group starts (a Train restart after a worker died, or a resumed trial) on the run."""
        from tuning.trial import read_starts

        trial_dir = self.trial_dir(trial_id)
        starts = read_starts(str(trial_dir)) if trial_dir is not None else []  # local or s3://
        if starts:
            self.tracker.client.set_tag(run_id, "restarts", str(len(starts) - 1))
            self.tracker.log_metrics(run_id, {"restarts": len(starts) - 1})

    def on_trial_recover(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        retries = int(self.tracker.client.get_run(run_id).data.tags.get("retries", "0")) + 1
        self.tracker.client.set_tag(run_id, "retries", str(retries))
        self.tracker.client.set_tag(run_id, f"retry_{retries}_error", error_summary(trial_error_text(trial)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended().add(trial.trial_id)
        self._release(trial)
        # ended live by Tune: its last result is the trial's (what ASHA and Optuna saw); epochs the
        # workers trained after ASHA stopped it are not back-filled from newer checkpoints
        self.finish_trial(trial, status="FINISHED", newest=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended().add(trial.trial_id)
        self._release(trial)
        self.finish_trial(trial, status="FAILED", error=trial_error_text(trial) or "trial failed (no error text)")

    def trial_dir(self, trial_id: str):
        """The trial's Ray Train run folder (checkpoints, placement records, target report): a local
        ``Path`` or a ``tuning.storage.RemotePath`` on an object store."""
        from tuning.storage import storage_path

        if not self.train_storage:
            return None
        path = storage_path(self.train_storage) / trial_id
        return path if path.is_dir() else None

    def _release(self, trial) -> None:
        if self.train_storage:
            from tuning.trial import release_trial_placement_group

            release_trial_placement_group(self.train_storage, trial.trial_id)

    # ----- completion (also used by the runner to reconcile after a resume)
    def finish_trial(self, trial, status: str, error: str | None = None, checkpoint_path: str | None = None,
                     newest: bool = True) -> str:
        from tuning.trial import read_history

        tr = self.tracker
        tid = trial.trial_id
        run_id = self.run_id(trial)
        ckpt = checkpoint_path or self._checkpoint.get(tid) or (trial.last_result or {}).get("checkpoint_path")
        if newest:  # a report may have been lost (driver killed, resumed): every epoch trained
            ckpt = self._newest_checkpoint(trial, ckpt)
        self._record_restarts(run_id, tid)
        summary = self.final_metrics(run_id, read_history(ckpt)[1] if ckpt else None)
        if summary:
            tr.log_metrics(run_id, summary)
            best_epoch = int(summary["best_epoch"]) if "best_epoch" in summary else None
            tr.log_dict(run_id, self.epoch_summary(run_id, best_epoch), "summary.json")
        # every trial says whether ASHA stopped it before its last epoch (a failed one: false)
        done = (summary or {}).get("epochs_done", 0)
        early = status == "FINISHED" and bool(summary) and bool(self.epochs) and done < self.epochs
        tr.client.set_tag(run_id, "early_stopped", "true" if early else "false")
        from tuning.storage import as_uri, local_copy, storage_path

        ckpt = as_uri(ckpt, self.train_storage) if ckpt else None  # Ray reports s3 paths without the scheme
        if ckpt and storage_path(ckpt).is_dir():
            tr.client.set_tag(run_id, "checkpoint_path", str(ckpt))
            best = storage_path(ckpt) / "best"
            try:
                if best.is_dir() and not tr.client.list_artifacts(run_id, "checkpoints/best"):
                    with local_copy(best) as local:
                        tr.log_artifacts(run_id, local, "checkpoints/best")
            except FileNotFoundError as exc:
                # Train deleted it under us (num_to_keep: workers still running after Tune stopped the
                # trial registered newer checkpoints): the trial's result stands, its heads are gone
                tr.client.delete_tag(run_id, "checkpoint_path")
                tr.client.set_tag(run_id, "checkpoint_missing", f"{ckpt}: removed by Ray Train before it was copied "
                                  f"({error_summary(str(exc))[:300]})")
        trial_dir = self.trial_dir(tid)
        if trial_dir is not None:
            placement = trial_dir / "placement"
            if placement.is_dir() and not tr.client.list_artifacts(run_id, "placement"):
                with local_copy(placement) as local:
                    tr.log_artifacts(run_id, local, "placement")
            report = trial_dir / "target_report.json"
            if report.is_file() and not tr.client.list_artifacts(run_id, "target_report.json"):
                with local_copy(report) as local:
                    tr.log_artifact(run_id, local)
        if error:
            tr.client.set_tag(run_id, "error", error_summary(error))
            tr.log_text(run_id, str(error), "error.txt")
        tr.client.set_terminated(run_id, status=status)
        return run_id

    def final_metrics(self, run_id: str, best_epoch: int | None = None) -> dict[str, float]:
        """The run's summary metrics: ``best_<metric>``, ``best_epoch`` and ``epochs_done``.

        ``best_epoch``: the epoch of the checkpoint logged as ``checkpoints/best`` when known;
        the best values are then that epoch's, so they always describe the heads stored.

        Per-epoch values stay one chart per quantity (``train/…``, ``val/…``); the values at the
        best and at the last epoch go to ``summary.json`` (:meth:`epoch_summary`), not to extra metrics.
        """
        history = self.tracker.client.get_metric_history(run_id, mlflow_metric_name(self.metric))
        if not history:
            return {}
        by_step = {m.step: m.value for m in sorted(history, key=lambda m: m.step)}
        finite = {s: v for s, v in by_step.items() if _finite(v)}
        out: dict[str, float] = {"epochs_done": float(max(by_step))}
        if best_epoch in finite:
            finite = {best_epoch: finite[best_epoch]}
        if finite:
            pick = max if self.mode == "max" else min
            best_step = pick(finite, key=lambda s: finite[s])
            out[f"best_{self.metric}"] = finite[best_step]
            out["best_epoch"] = float(best_step)
        return out

    def epoch_summary(self, run_id: str, best_epoch: int | None) -> dict[str, Any]:
        """``{"best_epoch", "at_best_epoch": {name: value}, "last_epoch", "at_last_epoch": {...}}``
        of every per-epoch metric (``summary.json`` on the run)."""
        client = self.tracker.client
        keys = [k for k in client.get_run(run_id).data.metrics if k.startswith(("train/", "val/", "lr/"))]
        hist = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in keys}
        last = max((max(h) for h in hist.values() if h), default=None)
        return {
            "best_epoch": best_epoch, "at_best_epoch": {k: h[best_epoch] for k, h in hist.items() if best_epoch in h},
            "last_epoch": last, "at_last_epoch": {k: h[last] for k, h in hist.items() if last in h},
        }
