"""``ssvp train`` / ``ssvp eval`` recorded in MLflow, under the names the sweeps use.

``ssvp/`` imports neither Ray nor MLflow; its CLI loads this module by name (``importlib``)
only when a run is to be recorded (``--mlflow``, or ``MLFLOW_TRACKING_URI`` set), and talks
to it through :class:`RunRecorder`'s four calls: ``on_epoch`` (``fit``'s callback),
``trained``, ``evaluated`` and ``end``. What lands in MLflow, as for a sweep's trial:

* params: the whole resolved config; tags ``role`` (``train`` | ``eval``), ``protocol``,
  ``seed``, ``git_commit`` (+ ``mlflow.source.git.commit``), ``mlflow.source.name``;
  datasets as run inputs (``training`` / ``evaluation``);
* per epoch (step = epoch): ``train/…``, ``val/…``, ``lr/…``;
* after training: ``best_val_objective``, ``best_epoch``, ``epochs_done``; the heads under
  ``checkpoints/best``;
* after evaluation: ``target/<dataset>/<metric>`` and the per-class table
  ``target_per_class.json``.

Store: ``MLFLOW_TRACKING_URI``, else ``sqlite:///<launch dir>/runs/mlflow.db``; experiment:
``MLFLOW_EXPERIMENT_NAME``, else ``ssvp-runs``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from .redact import error_line, redact_text
from .tracking import SweepTracker, mlflow_metric_name, normalize_tracking_uri

__all__ = ["RunRecorder", "start_run", "DEFAULT_EXPERIMENT"]

DEFAULT_EXPERIMENT = "ssvp-runs"


class RunRecorder:
    """One MLflow run of an ``ssvp train`` or ``ssvp eval`` command."""

    def __init__(self, tracker: SweepTracker, run_id: str, metric: str = "val_objective"):
        self.tracker, self.run_id, self.metric = tracker, run_id, metric

    @property
    def url(self) -> str:
        from .results import run_url

        return run_url(self.tracker.tracking_uri, self.tracker.experiment_id, self.run_id)

    def on_epoch(self, epoch: int, metrics: Mapping[str, Any], checkpoint: str | None = None) -> None:
        named = {mlflow_metric_name(k): v for k, v in metrics.items() if k != "epoch"}
        self.tracker.log_metrics(self.run_id, named, step=epoch)

    def trained(self, history: list[Mapping[str, Any]], best_epoch: int | None, heads: str | Path | None) -> None:
        """The summary metrics of a finished ``fit`` and its best heads."""
        values = {int(h["epoch"]): h.get(self.metric) for h in history if "epoch" in h}
        out = {"epochs_done": float(max(values, default=0))}
        if best_epoch in values and isinstance(values[best_epoch], (int, float)):
            out.update({f"best_{self.metric}": float(values[best_epoch]), "best_epoch": float(best_epoch)})
        self.tracker.log_metrics(self.run_id, out)
        if heads is not None and Path(heads).is_dir():
            self.tracker.log_artifacts(self.run_id, heads, "checkpoints/best")

    def evaluated(self, report: Mapping[str, Any]) -> None:
        from .trial import flatten_target_report

        self.tracker.log_metrics(self.run_id, flatten_target_report(report))
        self.tracker.log_dict(self.run_id, dict(report), "target_report.json")
        self.tracker.log_target_table(self.run_id, report)

    def end(self, status: str = "FINISHED") -> None:
        self.tracker.client.set_terminated(self.run_id, status=status)


def start_run(command: str, cfg, checkpoint: str | None = None, run_name: str | None = None) -> RunRecorder:
    """Open the MLflow run of ``ssvp <command>`` (``train`` | ``eval``) with ``cfg`` (an ``ssvp.config.Config``)."""
    from ssvp.paths import launch_dir

    uri = normalize_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"), launch_dir())
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    tracker = SweepTracker(uri, experiment, sweep_id="")
    tags = {"role": command, "protocol": cfg.train.protocol, "seed": cfg.train.seed,
            **tracker.source_tags(), "mlflow.source.name": f"ssvp {command}"}
    if checkpoint:
        tags["checkpoint"] = str(checkpoint)
    try:
        run = tracker.client.create_run(tracker.ensure_experiment(), run_name=run_name or f"{command} {cfg.train.protocol}",
                                        tags={k: str(v) for k, v in tags.items()})
    except Exception as exc:  # an unreachable server, a full disk, a locked or corrupt store: one line, exit 1
        raise OSError(redact_text(f"MLflow store {uri}: cannot open the run ({error_line(exc)})")) from None
    rec = RunRecorder(tracker, run.info.run_id)
    tracker.log_params(rec.run_id, cfg.flat())
    if command == "train":
        tracker.log_data(rec.run_id, [cfg.data.source], "training")
    tracker.log_data(rec.run_id, list(cfg.data.targets), "evaluation")
    return rec
