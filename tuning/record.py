"""Phase 3, record: the sweep in MLflow (and the Optuna study's whereabouts).

- :func:`open_parent` before Tune starts: the experiment, the parent run (reopened on a
  resume) with the sweep's settings, space and base config, and ``ssvp_sweep.json`` (MLflow
  ids, so a resume finds the same runs).
- :func:`trial_callback`: the Tune callback that keeps one child run per trial
  (:class:`tuning.tracking.MLflowTrialCallback`).
- :func:`collect_trials` after Tune returns: each trial's final status reconciled with its
  child run, as :class:`tuning.results.TrialSummary` rows of a :class:`ResultSummary`.
- :func:`close_interrupted`: an interrupted sweep leaves its open runs KILLED, not RUNNING.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from .plan import Plan, expected_trials
from .results import ResultSummary, TrialSummary
from .tracking import (MLflowTrialCallback, SweepTracker, TrialRecordSettings, error_summary, normalize_tracking_uri,
                       trial_error_text)
from .trial import VARIANT_KEY

__all__ = ["open_parent", "trial_callback", "collect_trials", "close_interrupted", "settings_record", "log_artifacts"]

_TEXT_SUFFIXES = (".yaml", ".yml", ".json", ".txt", ".toml", ".cfg", ".ini", ".env", ".md", ".csv")
_PLACEHOLDER_ERRORS = ("", "unknown error", "trial failed (no error text)")


# --------------------------------------------------------------------------- before the run
def open_parent(plan: Plan) -> SweepTracker:
    """Create (or, on a resume, reopen) the sweep's MLflow parent run and write the state file."""
    tracker = _tracker(plan)
    tracker.start_parent(run_name=plan.name, tags=_parent_tags(plan), resume=plan.restoring)
    tracker.start_system_metrics()
    try:
        if plan.restoring:
            tracker.client.set_tag(tracker.parent_run_id, "interrupted", "false")  # until it is again
        else:
            _log_parent_setup(tracker, plan)
            if plan.sweep.description.strip():  # the sweep file's description: the run's (and a new experiment's)
                tracker.describe_run(tracker.parent_run_id, plan.sweep.description.strip())
                tracker.describe_experiment(plan.sweep.description.strip())
        plan.paths.experiment.mkdir(parents=True, exist_ok=True)
        plan.paths.state_file.write_text(json.dumps({  # JSON only: a resume never unpickles project state
            "name": plan.name, "tracking_uri": tracker.tracking_uri, "experiment": tracker.experiment,
            "experiment_id": tracker.experiment_id, "parent_run_id": tracker.parent_run_id,
        }, indent=2))
    except BaseException:
        tracker.end_parent("FAILED")  # never left RUNNING (e.g. an unwritable storage path)
        raise
    return tracker


def _tracker(plan: Plan) -> SweepTracker:
    """The tracker of this sweep; a resume keeps the store and experiment it started with."""
    mlflow = plan.sweep.mlflow
    tracking_uri, experiment = mlflow.tracking_uri, mlflow.experiment
    if plan.restoring and plan.paths.state_file.is_file():
        state = json.loads(plan.paths.state_file.read_text())
        tracking_uri, experiment = state["tracking_uri"], state["experiment"]
    tracker = SweepTracker(normalize_tracking_uri(tracking_uri), experiment, sweep_id=plan.name,
                           artifact_location=mlflow.artifact_location)
    tracker.ensure_experiment()
    return tracker


def _parent_tags(plan: Plan) -> dict[str, str]:
    search = plan.sweep.search.algorithm
    tags = {"search": search, "storage_path": str(plan.paths.experiment),
            **{k: str(v) for k, v in plan.sweep.mlflow.parent_tags.items()}}
    if search == "optuna":
        tags.update({"optuna_storage": plan.optuna_url, "optuna_study": plan.name})
    return tags


def settings_record(plan: Plan) -> dict[str, Any]:
    """The resolved run settings (``sweep_settings.json`` and the parent's ``search.*`` params)."""
    s, r = plan.sweep.search, plan.sweep.resources
    return {
        "name": plan.name, "search": s.algorithm, "num_samples": s.num_samples, "seed": s.seed,
        "metric": s.metric, "mode": s.mode, "scheduler": s.scheduler or "none", "grace_period": s.grace_period,
        "reduction_factor": s.reduction_factor, "max_concurrent_trials": plan.max_concurrent,
        "num_workers_per_trial": r.workers_per_trial, "use_gpu": plan.use_gpu,
        "cpus_per_worker": r.cpus_per_worker, "gpus_per_worker": r.gpus_per_worker,
        "resources_per_worker": dict(r.extra or {}), "max_failures": r.max_failures,
        "trial_max_failures": r.trial_max_failures, "reuse_processes": r.reuse_processes,
        "target_eval": plan.sweep.target_eval,
        "storage_path": str(plan.paths.storage), "points_to_evaluate": plan.points, "variants": plan.variants,
        "optuna_storage": plan.optuna_url if s.algorithm == "optuna" else "",
    }


def _log_parent_setup(tracker: SweepTracker, plan: Plan) -> None:
    run_id = tracker.parent_run_id
    settings = settings_record(plan)
    params = {f"search.{k}": v for k, v in settings.items() if not isinstance(v, (dict, list)) or k == "points_to_evaluate"}
    params.update({f"space.{k}": p.describe() for k, p in plan.space.params.items()})
    params.update(plan.sweep.mlflow.parent_params or {})
    tracker.log_params(run_id, params)
    tracker.log_dict(run_id, plan.space.to_dict(), "search_space.json")
    tracker.log_dict(run_id, plan.base.to_dict(), "base_config.json")
    tracker.log_dict(run_id, settings, "sweep_settings.json")
    log_artifacts(tracker, plan.sweep.mlflow.parent_artifacts, "extra parent artifact {path} does not exist")


def log_artifacts(tracker: SweepTracker, artifacts: Any, missing: str, dir_as_folder: bool = True) -> None:
    """Log ``{artifact_dir: path}`` or ``[path]`` (files or folders) on the parent run.

    A folder without an artifact dir goes under its own name (``dir_as_folder``) or to the
    top level; ``missing`` is the error message for a path that does not exist (``{path}``).
    """
    if isinstance(artifacts, Mapping):
        items = list(artifacts.items())
    else:
        items = [(None, p) for p in (artifacts or [])]
    for artifact_path, local in items:
        local = Path(local)
        if local.is_dir():
            default = local.name if dir_as_folder else None
            tracker.log_artifacts(tracker.parent_run_id, local, artifact_path or default)
        elif local.is_file() and local.suffix.lower() in _TEXT_SUFFIXES:  # redacted (secrets in a config)
            name = f"{artifact_path}/{local.name}" if artifact_path else local.name
            tracker.log_text(tracker.parent_run_id, local.read_text(errors="replace"), name)
        elif local.is_file():
            tracker.log_artifact(tracker.parent_run_id, local, artifact_path or None)
        else:
            raise FileNotFoundError(missing.format(path=local))


def trial_callback(plan: Plan, tracker: SweepTracker) -> MLflowTrialCallback:
    """The Tune callback that records each trial as a child run of the parent."""
    s = plan.sweep.search
    return MLflowTrialCallback(tracker, TrialRecordSettings(
        plan.base.to_dict(), plan.variants, epochs=plan.base.train.epochs, metric=s.metric, mode=s.mode,
        train_storage=str(plan.paths.train), run_labels=plan.sweep.mlflow.run_labels,
        number_offset=1 if s.algorithm == "optuna" else 0,
    ))


# --------------------------------------------------------------------------- after the run
def collect_trials(plan: Plan, tracker: SweepTracker, callback: MLflowTrialCallback, results) -> ResultSummary:
    """Reconcile every trial Tune knows with its child run; the sweep's :class:`ResultSummary`.

    On an interrupt (Ctrl+C / SIGUSR1) Tune saves the experiment state and only then stops the
    live trials, marking them TERMINATED in memory; the saved state still says which trials
    really ended (and which a resume will continue), so that is what is trusted.
    """
    trials = list(results._experiment_analysis.trials)  # Trial objects (status, config, errors)
    saved_status = _saved_trial_status(plan.paths.experiment)
    errors: dict[str, str] = {}
    summaries = []
    for trial in trials:
        status = _reconcile(trial, saved_status.get(trial.trial_id, trial.status), tracker, callback, errors)
        summaries.append(_trial_summary(plan, tracker, trial, status, errors.get(trial.trial_id)))
    _close_unknown(tracker, {t.trial_id for t in trials})
    interrupted = any(t.status == "KILLED" for t in summaries)
    if not interrupted and plan.sweep.search.time_budget_s is None:
        interrupted = len(trials) < expected_trials(plan)
    s = plan.sweep.search
    return ResultSummary(
        name=plan.name, experiment_path=str(plan.paths.experiment), tracking_uri=tracker.tracking_uri,
        experiment=tracker.experiment, experiment_id=tracker.experiment_id, parent_run_id=tracker.parent_run_id,
        metric=s.metric, mode=s.mode, trials=summaries, errors=errors, interrupted=interrupted,
        optuna_storage=plan.optuna_url if s.algorithm == "optuna" else None,
        objectives=s.objective_list(), modes=s.mode_list(),
    )


def _close_unknown(tracker: SweepTracker, known: set[str]) -> None:
    """Trial runs Tune no longer knows (its state was saved before the trial began and then the
    driver was killed; a resume samples it anew) end KILLED, tagged ``lost``: never left RUNNING."""
    for run in tracker.children(role="trial"):
        if run.info.status == "RUNNING" and run.data.tags.get("trial_id") not in known:
            tracker.client.set_tag(run.info.run_id, "lost", "not in Tune's saved experiment state (driver killed)")
            tracker.client.set_terminated(run.info.run_id, status="KILLED")


STOPPED_BEFORE_EPOCH = "search.time_budget_s ended the sweep before this trial's first epoch"


def _reconcile(trial, status: str, tracker: SweepTracker, callback: MLflowTrialCallback, errors: dict) -> str:
    """Close the trial's child run as Tune ended it; FINISHED | FAILED | KILLED (not ended) | STOPPED
    (ended by the time budget before its first epoch: run KILLED, tagged ``stopped``; Optuna FAIL)."""
    tid = trial.trial_id
    if status == "TERMINATED" and not (trial.last_result or {}).get("training_iteration"):
        # ended without a single report: the sweep's time budget ran out during its start-up
        run = tracker.find_child(tid)
        if run is None or run.info.status == "RUNNING":
            run_id = callback.finish_trial(trial, "KILLED")
            tracker.client.set_tag(run_id, "stopped", STOPPED_BEFORE_EPOCH)
        fail = getattr(callback.searcher, "fail_trial", None)
        if fail is not None:
            fail(tid)
        return "STOPPED"
    if status == "TERMINATED":
        run = tracker.find_child(tid)
        if run is None or run.info.status != "FINISHED":
            callback.finish_trial(trial, "FINISHED")
        return "FINISHED"
    if status == "ERROR":
        text = trial_error_text(trial)
        err = error_summary(text)
        run = tracker.find_child(tid)
        placeholder = run is not None and run.data.tags.get("error", "") in _PLACEHOLDER_ERRORS
        if run is None or run.info.status != "FAILED" or (placeholder and text):
            callback.finish_trial(trial, "FAILED", error=text or err)
        errors[tid] = err
        return "FAILED"
    return "KILLED"


def _trial_summary(plan: Plan, tracker: SweepTracker, trial, status: str, error: str | None) -> TrialSummary:
    from .storage import storage_path

    tid = trial.trial_id
    params = dict(trial.config)
    run = tracker.find_child(tid)
    metrics: dict[str, float] = {}
    checkpoint = None
    if run is not None:
        metrics = {k: v for k, v in run.data.metrics.items()
                   if k.startswith(("best_", "final_", "target/")) or k in ("epochs_done",)}
        if run.data.tags.get("early_stopped") == "true" and status == "FINISHED":
            status = "EARLY_STOPPED"
        ckpt = run.data.tags.get("checkpoint_path")
        if ckpt and (storage_path(ckpt) / "best").is_dir():
            checkpoint = str(storage_path(ckpt) / "best")
    trial_dir = plan.paths.train / tid
    objective = metrics.get(f"best_{plan.sweep.search.metric}")
    values = {plan.sweep.search.metric: objective} if objective is not None else {}
    if run is not None and plan.sweep.search.multi:  # the point on the front: every objective at the kept epoch
        from .front import trial_values

        values = trial_values(tracker.client, run, plan.sweep.search.objective_list(), metrics.get("best_epoch"))
    return TrialSummary(
        trial_id=tid, status=status, params=params, variant=params.get(VARIANT_KEY), metrics=metrics,
        objective=objective, checkpoint=checkpoint, values=values,
        run_id=run.info.run_id if run else None, error=error,
        placement=_read_json(trial_dir / "placement" / "rank0.json"),
        target_report=_read_json(trial_dir / "target_report.json") or {},
        trial_dir=str(trial_dir) if trial_dir.is_dir() else None,
        number=int(run.data.tags["trial_number"]) if run and run.data.tags.get("trial_number", "").isdigit() else None,
    )


def close_interrupted(summary: ResultSummary, tracker: SweepTracker, verbose: int) -> None:
    """Mark the open child runs and the parent KILLED; a resume reopens them."""
    tracker.close_open_children("KILLED")
    tracker.client.set_tag(tracker.parent_run_id, "interrupted", "true")
    tracker.end_parent("KILLED")
    if verbose:
        print(f"[tuning] sweep {summary.name!r} was interrupted; continue it with resume=True (--resume)", flush=True)


def _saved_trial_status(exp_path: Path) -> dict[str, str]:
    """Trial statuses in the newest experiment state Tune wrote to ``exp_path``."""
    try:
        from ray.tune import ExperimentAnalysis

        return {t.trial_id: t.status for t in ExperimentAnalysis(str(exp_path)).trials}
    except Exception:  # noqa: BLE001 - fall back to the in-memory statuses
        return {}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
