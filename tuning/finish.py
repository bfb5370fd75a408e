"""Phase 4, finish: what happens after the search, once every trial has ended.

:func:`finish` runs, in order:

1. :func:`pick_best`: the best trial by the source-validation objective (trials run
   ``train.protocol=select``: held-out source classes pick the epoch), and its resolved config;
2. :func:`refit`: that configuration trained again on *all* source classes with the paper
   protocol (``train.protocol=paper``: all epochs, the last epoch is the model), a Ray task
   recorded as a ``role=refit`` child run (``refit: false`` or ``target_eval="all"``: skipped);
3. :func:`evaluate_targets`: the refit model (or, without a refit, the best trial's heads) on
   the *target* datasets (``target_eval="best"``, a Ray task recorded as a ``role=target_eval``
   child run), or the best trial's own ``target_*`` metrics (``target_eval="all"``);
4. :func:`report_parent`: the results table, plots, importance and best config on the parent run;
5. :func:`call_hook`: the launcher's ``on_results(summary)`` (its artifacts on the parent);
6. the parent run is closed FINISHED.

Every run carries a ``protocol`` tag (``select`` for the trials, ``paper`` for the refit and
the target evaluation of the refit model), so the record says which protocol produced what.

Selection uses only the source-domain validation split; target metrics never feed back.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable

from ssvp.config import Config

from .plan import Plan
from .record import log_artifacts
from .results import ResultSummary
from .storage import join, local_copy
from .tracking import SweepTracker, error_summary
from .trial import flatten_target_report, resolve_trial_config

__all__ = ["finish", "pick_best", "refit", "evaluate_targets", "report_parent", "call_hook", "log_model"]


def finish(summary: ResultSummary, plan: Plan, tracker: SweepTracker, started: float,
           on_results: Callable | None = None) -> None:
    best_cfg = pick_best(summary, plan)
    if best_cfg is not None:
        model_cfg = refit(summary, plan, tracker, best_cfg)
        evaluate_targets(summary, plan, tracker, model_cfg or best_cfg)
    if is_grid(plan) and plan.sweep.mlflow.register_model:
        register_cells(summary, plan, tracker)
    report_parent(summary, tracker, plan, started)
    call_hook(summary, tracker, on_results)
    tracker.end_parent("FINISHED")


def pick_best(summary: ResultSummary, plan: Plan) -> Config | None:
    """Set ``summary.best`` / ``best_config`` by ``refit.pick`` (``tuning.front``: knee of the front, best on
    one objective, or a trial by number; one objective: the best trial); its resolved config (None: no
    trial with a finite point)."""
    from .front import pick_trial
    from .pareto import PickError

    try:
        summary.best = pick_trial(summary, plan.sweep.refit_pick)
    except PickError as exc:  # trial:<n> that did not finish: the knee instead, and say so
        summary.errors["refit_pick"] = f"{exc}; picked the knee instead"
        summary.best = pick_trial(summary, "knee")
    if summary.best is None:
        return None
    best_cfg, _ = resolve_trial_config(plan.base.to_dict(), summary.best.params, plan.variants)
    summary.best_config = best_cfg.to_dict()
    return best_cfg


# --------------------------------------------------------------------------- refit
def refit(summary: ResultSummary, plan: Plan, tracker: SweepTracker, best_cfg: Config) -> Config | None:
    """Train the best configuration on all source classes with the paper protocol (a Ray task).

    Recorded as a ``role=refit`` child run named ``refit best=<trial>``: the paper-protocol
    config as params, per-epoch ``train/…`` metrics (step = epoch), the heads as
    ``checkpoints/final`` and as an MLflow model. Sets ``summary.refit_run_id`` /
    ``refit_checkpoint`` and returns the refit config (None: no refit, or it failed; the target
    evaluation then takes the best trial's own heads).
    """
    import ray

    if not plan.sweep.refit or plan.sweep.target_eval == "all":
        return None
    cfg = best_cfg.override({"protocol": "paper"})
    best = summary.best
    out = plan.paths.train / f"refit-{best.trial_id}"
    found = [r for r in tracker.children(role="refit") if r.data.tags.get("trial_id") == best.trial_id]
    if found and found[0].info.status == "FINISHED" and (out / "last").is_dir():  # a resumed sweep refit it already
        summary.refit_run_id, summary.refit_checkpoint = found[0].info.run_id, str(out / "last")
        return cfg
    run_id = found[0].info.run_id if found else tracker.start_child(
        run_name=f"refit best={summary.best.label}", tags=_refit_tags(best, cfg))
    tracker.client.update_run(run_id, status="RUNNING")
    try:
        tracker.log_params(run_id, {**cfg.flat(), "refit_of": best.trial_id})
        tracker.log_data(run_id, [cfg.data.source], "training")
        history = ray.get(_remote(plan, _refit_task).remote(cfg.to_dict(), str(out), plan.use_gpu))
        _log_history(tracker, run_id, history)
        with local_copy(out / "last") as heads:  # a local folder, or downloaded from s3://
            tracker.log_artifacts(run_id, heads, "checkpoints/final")
            log_model(summary, tracker, run_id, heads, plan.sweep.mlflow.register_model, cfg)
        tracker.client.set_terminated(run_id, "FINISHED")
    except Exception as exc:  # noqa: BLE001 - the search itself succeeded; record and go on
        _fail_run(summary, tracker, run_id, "refit", exc)
        return None
    summary.refit_run_id, summary.refit_checkpoint = run_id, str(out / "last")
    tracker.client.set_tag(tracker.parent_run_id, "refit_run_id", run_id)
    return cfg


def _refit_tags(best, cfg: Config) -> dict:
    """``source_run_id``: the run of the trial whose configuration was refit."""
    return {"role": "refit", "trial_id": best.trial_id, "variant": best.variant or "", "seed": cfg.train.seed,
            "protocol": "paper", "selected_with": "select", "source_run_id": best.run_id or ""}


def _refit_task(cfg_dict: dict, out: str, use_gpu: bool) -> list[dict]:
    """``fit`` (paper protocol) into a local folder, its ``last/`` copied to ``out`` (a shared folder
    or an object-store URI); the per-epoch history."""
    import pyarrow.fs as pafs
    import torch

    from ssvp import engine

    from .storage import filesystem

    device = "cuda:0" if use_gpu and torch.cuda.is_available() else "cpu"
    cfg = Config.from_dict(cfg_dict).override({"device": device})
    with tempfile.TemporaryDirectory(prefix="ssvp-refit-") as work:
        result = engine.fit(cfg, checkpoint_dir=work)
        fs, path = filesystem(join(out, "last"))
        fs.create_dir(path, recursive=True)
        pafs.copy_files(str(Path(work) / "last"), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return [{k: float(v) for k, v in h.items() if isinstance(v, (int, float))} for h in result.history]


def _remote(plan: Plan, fn: Callable):
    """``fn`` as a Ray task holding one trial worker's resources."""
    import ray

    res = plan.sweep.resources
    return ray.remote(fn).options(
        num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker if plan.use_gpu else 0,
        resources=dict(res.extra or {}) or None,
    )


def _log_history(tracker: SweepTracker, run_id: str, history: list[dict]) -> None:
    from .tracking import mlflow_metric_name

    for h in history:  # step = epoch: no separate ``epoch`` metric
        epoch = int(h.get("epoch", 0))
        tracker.log_metrics(run_id, {mlflow_metric_name(k): v for k, v in h.items() if k != "epoch"}, step=epoch)
    if history:
        tracker.log_metrics(run_id, {"epochs_done": float(len(history))})


def _fail_run(summary: ResultSummary, tracker: SweepTracker, run_id: str, key: str, exc: Exception) -> None:
    tracker.client.set_tag(run_id, "error", error_summary(str(exc)))
    tracker.log_text(run_id, repr(exc), "error.txt")
    tracker.client.set_terminated(run_id, "FAILED")
    summary.errors[key] = error_summary(str(exc))


def log_model(summary: ResultSummary, tracker: SweepTracker, run_id: str, heads: Path, register_as: str,
              cfg: Config) -> None:
    """The heads as the MLflow LoggedModel ``model`` of the refit run (``models:/<model id>``), registered
    as ``register_as`` when given (``models:/<name>/<version>``); the URIs go on the summary and the parent."""
    from .mlflow_model import log_heads_model

    info = log_heads_model(heads, tracker.tracking_uri, run_id, register_as or None, example_image(cfg))
    summary.model_uri = info.model_uri
    tracker.client.set_tag(tracker.parent_run_id, "model_uri", info.model_uri)
    version = getattr(info, "registered_model_version", None)
    if register_as and version is not None:
        summary.registered_model = f"models:/{register_as}/{version}"
        tracker.client.set_tag(tracker.parent_run_id, "registered_model", summary.registered_model)


def register_cells(summary: ResultSummary, plan: Plan, tracker: SweepTracker) -> None:
    """An ablation grid (no refit): each finished cell's best heads as the LoggedModel ``model`` of its
    trial run, registered as a version of ``register_model`` tagged with the cell's variant and seed."""
    from .mlflow_model import log_heads_model
    from .storage import local_copy

    name = plan.sweep.mlflow.register_model
    for t in summary.trials:
        if t.status != "FINISHED" or not t.checkpoint or not t.run_id:
            continue
        cfg, _ = resolve_trial_config(plan.base.to_dict(), t.params, plan.variants)
        with local_copy(t.checkpoint) as heads:
            info = log_heads_model(heads, tracker.tracking_uri, t.run_id, name, example_image(cfg))
        version = getattr(info, "registered_model_version", None)
        if version is not None:
            for key, value in (("variant", t.variant or ""), ("seed", cfg.train.seed), ("trial", t.label)):
                tracker.client.set_model_version_tag(name, str(version), key, str(value))


def example_image(cfg: Config) -> str | None:
    """One image of the first target (else the source) dataset: the model's input example."""
    for spec in [*cfg.data.targets, cfg.data.source]:
        root = Path(spec.partition(":")[2])
        if root.is_dir():
            for path in root.rglob("*"):
                masks = {"ground_truth", "masks", "mask"} & set(path.parts)
                if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff") and not masks:
                    return str(path)
    return None


# --------------------------------------------------------------------------- targets
def evaluate_targets(summary: ResultSummary, plan: Plan, tracker: SweepTracker, best_cfg: Config) -> None:
    """The refit model (or the best trial's heads) on the target datasets, as ``target_eval`` says."""
    mode = plan.sweep.target_eval
    if mode == "best" and (summary.refit_checkpoint or summary.best.checkpoint):
        _target_eval_run(summary, plan, tracker, best_cfg)
    elif mode == "all":
        summary.target_metrics = {k: v for k, v in summary.best.metrics.items() if k.startswith("target/")}
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
    heads = summary.refit_checkpoint or best.checkpoint
    protocol = "paper" if summary.refit_checkpoint else "select"
    existing = [r for r in tracker.children(role="target_eval") if r.data.tags.get("trial_id") == best.trial_id]
    if existing and existing[0].info.status == "FINISHED":  # a resumed sweep evaluated it already
        summary.target_run_id = existing[0].info.run_id
        summary.target_metrics = {k: v for k, v in existing[0].data.metrics.items() if k.startswith("target/")}
        return
    run_id = existing[0].info.run_id if existing else tracker.start_child(
        run_name=f"target-eval best={summary.best.label}",
        tags={"role": "target_eval", "trial_id": best.trial_id, "variant": best.variant or "", "seed": cfg.train.seed,
              "protocol": protocol, "model": "refit" if summary.refit_checkpoint else "best_trial",
              "model_run_id": summary.refit_run_id or best.run_id or ""},
    )
    if existing:
        tracker.client.update_run(run_id, status="RUNNING")
    try:
        tracker.log_params(run_id, {**cfg.flat(), "checkpoint": heads})
        tracker.log_data(run_id, list(cfg.data.targets), "evaluation")
        report = ray.get(_remote(plan, _evaluate_task).remote(cfg.to_dict(), heads, plan.use_gpu))
        summary.target_report = report
        summary.target_metrics = flatten_target_report(report)
        tracker.log_metrics(run_id, summary.target_metrics)
        tracker.log_dict(run_id, report, "target_report.json")
        tracker.log_target_table(run_id, report)
        tracker.client.set_terminated(run_id, "FINISHED")
    except Exception as exc:  # noqa: BLE001 - the sweep itself succeeded; record and go on
        _fail_run(summary, tracker, run_id, "target_eval", exc)
    summary.target_run_id = run_id
    tracker.client.set_tag(tracker.parent_run_id, "target_eval_run_id", run_id)


def report_parent(summary: ResultSummary, tracker: SweepTracker, plan: Plan, started: float) -> None:
    """Results table, plots, importance, best config, counts and best-trial tags on the parent run.

    An ablation grid's parent (``role_detail=ablation_grid``) gets only ``results.csv`` and the
    counts: its tables are the grid's own (``ablation/``), and no cell is "best"."""
    run_id = tracker.parent_run_id
    grid = is_grid(plan)
    with tempfile.TemporaryDirectory() as tmp:
        for f in _write_report_files(summary, plan, Path(tmp), grid):
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
    if summary.best is not None and not grid:
        metrics[f"best_{summary.metric}"] = summary.best.objective
        _tag_best(summary, tracker)
    if summary.objectives and not grid:
        from .front import tag_front

        tag_front(summary, tracker)
    tracker.log_metrics(run_id, metrics)
    if not grid:
        tracker.describe_run(run_id, _overview(summary, plan))


def is_grid(plan: Plan) -> bool:
    """An ablation grid (``ablations/grid.py``), not a search."""
    return plan.sweep.mlflow.parent_tags.get("role_detail") == "ablation_grid"


OVERVIEW_ROWS = 25  # trials in the parent's overview table (a run description holds at most 8000 characters)


def _overview(summary: ResultSummary, plan: Plan) -> str:
    """The parent run's description (its Overview in the MLflow UI): the sweep's description and results."""
    from .report import markdown_table

    parts = [plan.sweep.description.strip()] if plan.sweep.description.strip() else []
    rows = summary.rows(full=False)
    shown = f"best {OVERVIEW_ROWS} shown; all in `results.csv`" if len(rows) > OVERVIEW_ROWS else "best first"
    parts.append(f"**{len(summary.trials)} trials**, objective `best_{summary.metric}` ({summary.mode}), {shown}.")
    parts.append(markdown_table(rows[:OVERVIEW_ROWS]))
    if summary.target_metrics:
        model = "refit model" if summary.refit_checkpoint else "best heads"
        parts.append(f"Target evaluation of the {model}:\n\n" + markdown_table(summary.target_rows()))
    return "\n\n".join(parts)


def _write_report_files(summary: ResultSummary, plan: Plan, tmp: Path, grid: bool = False) -> list[Path]:
    from .report import write_table

    write_table(summary.rows(), tmp / "results.csv")
    if grid:
        return [tmp / "results.csv"]
    write_table(summary.rows(full=False), None, tmp / "results.md")
    _write_importance(summary, plan, tmp)
    if summary.best is not None:
        (tmp / "best_config.json").write_text(json.dumps(summary.best_config, indent=2))
    if len(summary.objectives) > 1:
        from .front import front_files

        front_files(summary, tmp, _study(plan))
    return list(tmp.iterdir())


def _write_importance(summary: ResultSummary, plan: Plan, tmp: Path) -> None:
    """``objective_vs_trial.png``, ``param_importance.png`` / ``.json`` (Optuna's evaluator on the
    sweep's study, else on the finished trials: :func:`tuning.report.param_importance`)."""
    from .report import param_importance, plot_importance, plot_objective

    objectives = [t.objective for t in summary.trials]
    plot_objective(objectives, [t.label for t in summary.trials], f"best_{summary.metric}", summary.mode,
                   tmp / "objective_vs_trial.png")
    finished = [t for t in summary.trials if t.status == "FINISHED"]  # Optuna's COMPLETE trials
    imp = param_importance([t.params for t in finished], [t.objective for t in finished], plan.space.params,
                           summary.mode, study=None if plan.sweep.search.multi else _study(plan))
    plot_importance(imp["importance"], imp["method"], tmp / "param_importance.png", imp.get("note", ""))
    (tmp / "param_importance.json").write_text(json.dumps(imp, indent=2))


def _study(plan: Plan):
    """The sweep's Optuna study (None: not an Optuna sweep, or not in a store)."""
    if plan.sweep.search.algorithm != "optuna" or not plan.optuna_url:
        return None
    try:
        import optuna

        return optuna.load_study(study_name=plan.name, storage=plan.optuna_url)
    except Exception:  # noqa: BLE001 - the finished trials stand in for it
        return None


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
