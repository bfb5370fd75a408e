"""Phase 4, finish: what happens after the search, once every trial has ended.

:func:`finish` runs, in order:

1. :func:`pick_best`: the best trial by the source-validation objective, and its resolved config;
2. :func:`evaluate_targets`: the best heads on the *target* datasets (``target_eval="best"``,
   a Ray task recorded as a ``role=target_eval`` child run), or the best trial's own
   ``target_*`` metrics (``target_eval="all"``);
3. :func:`report_parent`: the results table, plots, importance and best config on the parent run;
4. :func:`call_hook`: the launcher's ``on_results(summary)`` (its artifacts on the parent);
5. the parent run is closed FINISHED.

Selection uses only the source-domain validation split; target metrics never feed back.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Callable

from ssvp.config import Config

from .plan import Plan
from .record import log_artifacts
from .results import ResultSummary
from .tracking import SweepTracker, error_summary
from .trial import flatten_target_report, resolve_trial_config

__all__ = ["finish", "pick_best", "evaluate_targets", "report_parent", "call_hook"]


def finish(summary: ResultSummary, plan: Plan, tracker: SweepTracker, started: float,
           on_results: Callable | None = None) -> None:
    best_cfg = pick_best(summary, plan)
    if best_cfg is not None:
        evaluate_targets(summary, plan, tracker, best_cfg)
    report_parent(summary, tracker, plan, started)
    call_hook(summary, tracker, on_results)
    tracker.end_parent("FINISHED")


def pick_best(summary: ResultSummary, plan: Plan) -> Config | None:
    """Set ``summary.best`` / ``best_config``; the best trial's resolved config (None: no finite objective)."""
    finite = [t for t in summary.trials if t.objective is not None and math.isfinite(t.objective)]
    if not finite:
        return None
    pick = max if summary.mode == "max" else min
    summary.best = pick(finite, key=lambda t: t.objective)
    best_cfg, _ = resolve_trial_config(plan.base.to_dict(), summary.best.params, plan.variants)
    summary.best_config = best_cfg.to_dict()
    return best_cfg


def evaluate_targets(summary: ResultSummary, plan: Plan, tracker: SweepTracker, best_cfg: Config) -> None:
    """The best configuration on the target datasets, as ``target_eval`` says."""
    mode = plan.sweep.target_eval
    if mode == "best" and summary.best.checkpoint:
        _target_eval_run(summary, plan, tracker, best_cfg)
    elif mode == "all":
        summary.target_metrics = {k: v for k, v in summary.best.metrics.items() if k.startswith("target_")}
        summary.target_run_id = summary.best.run_id


def _evaluate_task(cfg_dict: dict, checkpoint: str, use_gpu: bool) -> dict:
    import torch

    from ssvp import engine

    from .storage import local_copy

    device = "cuda:0" if use_gpu and torch.cuda.is_available() else "cpu"
    cfg = Config.from_dict(cfg_dict).override({"device": device})
    with local_copy(checkpoint) as local:  # a local folder, or downloaded from s3://
        return engine.evaluate(cfg, str(local))


def _target_eval_run(summary: ResultSummary, plan: Plan, tracker: SweepTracker, cfg: Config) -> None:
    """Evaluate the best heads in a Ray task holding one worker's resources; a ``role=target_eval`` run."""
    import ray

    best = summary.best
    existing = [r for r in tracker.children(role="target_eval") if r.data.tags.get("trial_id") == best.trial_id]
    if existing and existing[0].info.status == "FINISHED":  # a resumed sweep evaluated it already
        summary.target_run_id = existing[0].info.run_id
        summary.target_metrics = {k: v for k, v in existing[0].data.metrics.items() if k.startswith("target_")}
        return
    run_id = existing[0].info.run_id if existing else tracker.start_child(
        run_name=f"{summary.name}/target_eval",
        tags={"role": "target_eval", "trial_id": best.trial_id, "variant": best.variant or "", "seed": cfg.train.seed},
    )
    if existing:
        tracker.client.update_run(run_id, status="RUNNING")
    res = plan.sweep.resources
    try:
        tracker.log_params(run_id, {**cfg.flat(), "checkpoint": best.checkpoint})
        remote = ray.remote(_evaluate_task).options(
            num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker if plan.use_gpu else 0,
            resources=dict(res.extra or {}) or None,
        )
        report = ray.get(remote.remote(cfg.to_dict(), best.checkpoint, plan.use_gpu))
        summary.target_report = report
        summary.target_metrics = flatten_target_report(report)
        tracker.log_metrics(run_id, summary.target_metrics)
        tracker.log_dict(run_id, report, "target_report.json")
        tracker.client.set_terminated(run_id, "FINISHED")
    except Exception as exc:  # noqa: BLE001 - the sweep itself succeeded; record and go on
        tracker.client.set_tag(run_id, "error", error_summary(str(exc)))
        tracker.log_text(run_id, repr(exc), "error.txt")
        tracker.client.set_terminated(run_id, "FAILED")
        summary.errors["target_eval"] = error_summary(str(exc))
    summary.target_run_id = run_id
    tracker.client.set_tag(tracker.parent_run_id, "target_eval_run_id", run_id)


def report_parent(summary: ResultSummary, tracker: SweepTracker, plan: Plan, started: float) -> None:
    """Results table, plots, importance, best config, counts and best-trial tags on the parent run."""
    run_id = tracker.parent_run_id
    with tempfile.TemporaryDirectory() as tmp:
        for f in _write_report_files(summary, plan, Path(tmp)):
            tracker.log_artifact(run_id, f)
    summary.table_path = f"{tracker.client.get_run(run_id).info.artifact_uri}/results.csv"
    trials = summary.trials
    metrics = {
        "n_trials": len(trials),
        "n_finished": sum(t.status in ("FINISHED", "EARLY_STOPPED") for t in trials),
        "n_early_stopped": sum(t.status == "EARLY_STOPPED" for t in trials),
        "n_failed": sum(t.status == "FAILED" for t in trials),
        "sweep_seconds": time.time() - started,
    }
    if summary.best is not None:
        metrics[f"best_{summary.metric}"] = summary.best.objective
        _tag_best(summary, tracker)
    tracker.log_metrics(run_id, metrics)


def _write_report_files(summary: ResultSummary, plan: Plan, tmp: Path) -> list[Path]:
    from .report import param_importance, plot_importance, plot_objective, write_table

    objectives = [t.objective for t in summary.trials]
    write_table(summary.rows(), tmp / "results.csv", tmp / "results.md")
    plot_objective(objectives, [t.trial_id for t in summary.trials], summary.metric, summary.mode,
                   tmp / "objective_vs_trial.png")
    imp, method = param_importance([t.params for t in summary.trials], objectives, plan.space.params, summary.mode)
    plot_importance(imp, method, tmp / "param_importance.png")
    (tmp / "param_importance.json").write_text(json.dumps({"method": method, "importance": imp}, indent=2))
    if summary.best is not None:
        (tmp / "best_config.json").write_text(json.dumps(summary.best_config, indent=2))
    return list(tmp.iterdir())


def _tag_best(summary: ResultSummary, tracker: SweepTracker) -> None:
    client, run_id, best = tracker.client, tracker.parent_run_id, summary.best
    client.set_tag(run_id, "best_trial_id", best.trial_id)
    client.set_tag(run_id, "best_run_id", best.run_id or "")
    for key, value in best.params.items():
        client.set_tag(run_id, f"best.{key}", str(value))
    if best.checkpoint:
        client.set_tag(run_id, "best_checkpoint", best.checkpoint)


def call_hook(summary: ResultSummary, tracker: SweepTracker, on_results: Callable | None) -> None:
    """``on_results(summary) -> {artifact_dir: path}``: logged on the parent (``""`` = top level)."""
    if on_results is None:
        return
    extra = on_results(summary) or {}
    log_artifacts(tracker, dict(extra), "on_results returned {path}, which does not exist", dir_as_folder=False)
