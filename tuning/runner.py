"""The Tune runner: :func:`run_trials` runs one :class:`~tuning.settings.SweepConfig` in four named phases.

::

    sweep = load_sweep("tuning/configs/quick.yaml")       # or SweepConfig(...) built in code
    summary = run_trials(sweep, resume=False, on_results=None)

1. **plan** (:mod:`tuning.plan`): validate the sweep, connect to Ray, resolve resources,
   paths and resume state -> :class:`~tuning.plan.Plan`;
2. **record**, opening (:mod:`tuning.record`): the MLflow parent run and the Tune callback
   that keeps one child run per trial;
3. **run** (:func:`run_tuner`): ``Tuner(trial_driver, param_space, TuneConfig(search_alg,
   scheduler), RunConfig(callbacks))`` or ``Tuner.restore``; each trial a Ray Train
   ``TorchTrainer`` (:mod:`tuning.trial`);
4. **record**, closing: every trial reconciled with its child run -> :class:`ResultSummary`
   (an interrupted sweep stops here, its runs KILLED, resumable);
5. **finish** (:mod:`tuning.finish`): best trial, target evaluation, parent report, the
   ``on_results`` hook, parent closed.

Selection uses only the source-domain validation split (``val_objective`` from ``fit``);
target metrics never feed back into the search. ``resume=True`` continues an interrupted
sweep: finished and failed trials are kept, unfinished ones continue from their last Ray
Train checkpoint, and MLflow runs are reopened rather than duplicated.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Callable, Mapping

from .finish import finish
from .integrity import SigningCallback, StateSigner, verify_sweep_state
from .plan import STATE_FILE, Plan, SweepExistsError, absolutize_paths, make_plan
from .ray_session import free_port, init_ray
from .record import close_interrupted, collect_trials, open_parent, trial_callback
from .results import ResultSummary, TrialSummary, mlflow_ui_command
from .settings import SweepConfig

__all__ = [
    "run_trials",
    "run_tuner",
    "refit_only",
    "summary_from_record",
    "ResultSummary",
    "TrialSummary",
    "SweepConfig",
    "SweepExistsError",
    "init_ray",
    "free_port",
    "absolutize_paths",
    "mlflow_ui_command",
    "STATE_FILE",
]

OnResults = Callable[[ResultSummary], "Mapping[str, str] | None"]


def run_trials(sweep: SweepConfig, *, resume: bool = False, on_results: OnResults | None = None) -> ResultSummary:
    """Run (or, with ``resume``, continue) the sweep on Ray and record it in MLflow.

    ``on_results(summary)`` is called after the sweep's own report, before the parent run is
    closed, and may return ``{artifact_dir: path}`` to log on the parent (not called for an
    interrupted sweep). Failed trials do not raise: they are in ``summary.errors`` (FAILED in
    MLflow with the reason). A bad sweep raises ``SweepConfigError`` / ``SpaceError`` before
    any trial starts.
    """
    plan = make_plan(sweep, resume=resume)  # plan
    # a resume loads Ray's pickled state: only when this user's key signed it (tuning.integrity)
    signer = StateSigner(plan.paths.experiment, verify_sweep_state(plan.paths.experiment) if plan.restoring else None)
    tracker = open_parent(plan)  # record: parent run
    callback = trial_callback(plan, tracker)
    started = time.time()
    try:
        results = run_tuner(plan, callback, signer)  # run
        summary = collect_trials(plan, tracker, callback, results)  # record: trials
        if summary.interrupted:
            close_interrupted(summary, tracker, sweep.verbose)
            return summary
        finish(summary, plan, tracker, started, on_results)  # finish
    except BaseException as exc:  # however it ends, nothing stays RUNNING
        close_on_error(tracker, exc)
        raise
    return summary


def refit_only(sweep: SweepConfig, pick: str) -> ResultSummary:
    """Refit another point of a finished sweep without searching again (``sweep.py --refit-only --pick``).

    The trials are read back from the sweep's MLflow record (its parent run, found through
    ``ssvp_sweep.json``); ``pick`` (``knee`` | ``best:<metric>`` | ``trial:<n>``) chooses the trial whose
    configuration is refit with the paper protocol and evaluated on the targets (``target_eval: best``),
    as new ``role=refit`` / ``role=target_eval`` runs under the same parent, which records the rule and
    the point (``refit_pick``, ``refit_point``). Raises ``PickError`` (a ValueError) when ``pick`` names
    no finished trial, before anything is trained.
    """
    from .finish import evaluate_targets, pick_best, refit
    from .front import pick_trial, tag_front
    from .pareto import parse_pick

    sweep = sweep.replace(refit=True, refit_pick=pick)
    parse_pick(pick, sweep.search.objective_list())
    plan = make_plan(sweep, resume=True)
    if not plan.restoring:
        raise ValueError(f"--refit-only: no finished sweep {plan.name!r} at {plan.paths.experiment}")
    tracker = open_parent(plan)
    try:
        summary = summary_from_record(plan, tracker)
        pick_trial(summary, pick)  # PickError now, not a silent knee
        best_cfg = pick_best(summary, plan)
        if best_cfg is not None:
            model_cfg = refit(summary, plan, tracker, best_cfg)
            evaluate_targets(summary, plan, tracker, model_cfg or best_cfg)
        tag_front(summary, tracker)
        tracker.end_parent("FINISHED")
    except BaseException as exc:
        close_on_error(tracker, exc)
        raise
    return summary


def summary_from_record(plan: Plan, tracker) -> ResultSummary:
    """The sweep's trials as its MLflow record holds them (child runs with ``role=trial``)."""
    import json
    import tempfile
    from types import SimpleNamespace

    from .record import _trial_summary

    s = plan.sweep.search
    trials = []
    for run in sorted(tracker.children(role="trial"), key=lambda r: r.info.start_time):
        with tempfile.TemporaryDirectory() as tmp:
            params = json.loads(Path(tracker.client.download_artifacts(
                run.info.run_id, "config/trial_params.json", tmp)).read_text())
        status = {"FINISHED": "FINISHED", "FAILED": "FAILED"}.get(run.info.status, "KILLED")
        trial = SimpleNamespace(trial_id=run.data.tags["trial_id"], config=params)
        trials.append(_trial_summary(plan, tracker, trial, status, run.data.tags.get("error")))
    return ResultSummary(
        name=plan.name, experiment_path=str(plan.paths.experiment), tracking_uri=tracker.tracking_uri,
        experiment=tracker.experiment, experiment_id=tracker.experiment_id, parent_run_id=tracker.parent_run_id,
        metric=s.metric, mode=s.mode, trials=trials, optuna_storage=plan.optuna_url if s.algorithm == "optuna" else None,
        objectives=s.objective_list(), modes=s.mode_list(),
    )


def close_on_error(tracker, exc: BaseException) -> None:
    """Open child runs KILLED, the parent KILLED (Ctrl+C: resumable) or FAILED with the reason.

    Best effort: when the tracking store itself is the problem the original error is raised.
    """
    from .redact import redact_text
    from .tracking import error_summary

    interrupted = isinstance(exc, KeyboardInterrupt)
    reason = "true" if interrupted else redact_text(error_summary(f"{type(exc).__name__}: {exc}"))[:5000]
    steps = (
        lambda: tracker.close_open_children("KILLED"),
        lambda: tracker.client.set_tag(tracker.parent_run_id, "interrupted" if interrupted else "error", reason),
        lambda: tracker.end_parent("KILLED" if interrupted else "FAILED"),
    )
    for step in steps:
        try:
            step()
        except Exception:  # noqa: BLE001 - keep closing what can be closed
            pass


def run_tuner(plan: Plan, callback, signer: StateSigner | None = None):
    """Build the Tuner (or restore it) and run every trial; Tune's ``ResultGrid``.

    ``signer`` signs what Tune pickles (``tuner.pkl``, searcher and experiment state) so that a later
    resume can check it was this user's sweep that wrote it (:mod:`tuning.integrity`)."""
    from ray import tune

    from .plan import TRIAL_DRIVER_CPU, make_scheduler, make_search, make_trial_settings, own_metrics, tune_space
    from .trial import trial_driver

    settings = make_trial_settings(plan)
    # the trial's actor: a sliver of CPU (it waits on its TorchTrainer, whose workers hold the resources),
    # or with reuse_processes the one worker's resources, since the actor trains the trial itself
    resources = settings.resources_per_worker() if settings.reuse_processes else {"cpu": TRIAL_DRIVER_CPU}
    trainable = tune.with_resources(tune.with_parameters(trial_driver, settings=settings), resources)
    if plan.restoring:
        from .search import remember_storage_url

        remember_storage_url(plan.optuna_url)  # the study's password comes from the config, not the pickle
        tuner = tune.Tuner.restore(str(plan.paths.experiment), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False)
        reattach(tuner, [callback, SigningCallback(signer)] if signer else [callback])
        with _tune_output(plan.sweep.verbose):
            results = tuner.fit()
        getattr(_restored_searcher(tuner), "fail_orphans", lambda: None)()
        return results
    s = plan.sweep.search
    search = make_search(plan)
    if hasattr(search, "observe"):  # Optuna records every result MLflow records (ASHA's last one too)
        callback.attach_searcher(search)
    tuner = tune.Tuner(
        trainable,
        param_space=tune_space(plan),
        tune_config=tune.TuneConfig(
            # several objectives / ASHA on its own metric: the searcher and the scheduler hold theirs
            metric=None if own_metrics(plan) else s.metric,
            mode=None if own_metrics(plan) else s.mode,
            search_alg=search,
            scheduler=make_scheduler(plan),
            num_samples=s.num_samples,
            max_concurrent_trials=plan.max_concurrent if s.algorithm == "optuna" else None,
            time_budget_s=s.time_budget_s,
            trial_dirname_creator=lambda trial: trial.trial_id,
            # reuse_processes: each trial actor lives on and trains the next trial itself
            reuse_actors=plan.sweep.resources.reuse_processes,
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=str(plan.paths.storage),
            callbacks=[callback, *console_callbacks(plan), *([SigningCallback(signer)] if signer else [])],
            failure_config=tune.FailureConfig(max_failures=plan.sweep.resources.trial_max_failures),
            verbose=max(0, plan.sweep.verbose - 1),  # Tune's own table only with --verbose
        ),
    )
    if signer is not None:
        signer.sign_storage()  # the Tuner has just written tuner.pkl
    with _tune_output(plan.sweep.verbose):
        return tuner.fit()


def reattach(tuner, fresh: list) -> None:
    """After ``Tuner.restore``: this run's callbacks (``fresh``, the MLflow callback first) replace the
    unpickled copies of the same classes in the restored run config, and the restored Optuna searcher
    is attached to the MLflow callback again, so every epoch MLflow logs (back-filled ones included)
    reaches the study as on a first run. Tune restores the searcher's state into this same object
    when ``fit`` starts."""
    internal = tuner._local_tuner  # Ray keeps the restored configs there (no public accessor)
    run_config = internal.get_run_config()
    kinds = {type(c): c for c in fresh}
    callbacks = [kinds.pop(type(c), c) for c in (run_config.callbacks or [])]
    run_config.callbacks = [*callbacks, *kinds.values()]
    searcher = _restored_searcher(tuner)
    if hasattr(searcher, "observe"):
        fresh[0].attach_searcher(searcher)


def _restored_searcher(tuner):
    """The searcher of a restored ``tuner`` (Ray keeps it in its private tune config; a
    ConcurrencyLimiter wraps it)."""
    search = tuner._local_tuner._tune_config.search_alg
    return getattr(search, "searcher", search)


@contextlib.contextmanager
def _tune_output(verbose: int):
    """Below ``verbose=2`` Tune prints nothing of its own: its newer console output prints the
    experiment's header box even at verbosity 0, the older one (``RAY_AIR_NEW_OUTPUT=0``) does not;
    its INFO log lines (``ray.tune`` logger) are held back too."""
    if verbose >= 2:
        yield
        return
    import logging

    saved = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # "Wrote the latest version of all result files ..." at the end; with --quiet (verbose 0) also the
    # failed trials' tracebacks (their causes are in the summary and in MLflow)
    logs = [logging.getLogger(name) for name in ("ray.tune", "ray.train")]
    levels = [log.level for log in logs]
    for log, level in zip(logs, levels):
        log.setLevel(max(level, logging.WARNING if verbose >= 1 else logging.CRITICAL))
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
        if saved is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = saved


def console_callbacks(plan: Plan) -> list:
    """``verbose >= 1``: one line per finished trial (:class:`tuning.console.SweepConsole`)."""
    if plan.sweep.verbose < 1:
        return []
    from .console import SweepConsole
    from .plan import expected_trials

    s = plan.sweep.search
    return [SweepConsole(s.metric, s.mode, expected_trials(plan), plan.base.train.epochs,
                         number_offset=1 if s.algorithm == "optuna" else 0,
                         variant_labels=plan.sweep.mlflow.run_labels)]
