"""What a sweep returns: :class:`ResultSummary` (the sweep) and :class:`TrialSummary` (one trial)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .trial import VARIANT_KEY

__all__ = ["ResultSummary", "TrialSummary", "mlflow_ui_command"]


@dataclass
class TrialSummary:
    trial_id: str
    status: str  # FINISHED | FAILED | KILLED (interrupted) | EARLY_STOPPED
    params: dict[str, Any]  # the sampled keys (and variant)
    variant: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # best_/final_ source-val metrics (+ target_ with target_eval=all)
    objective: float | None = None  # best value of the metric over epochs
    checkpoint: str | None = None  # directory of the best heads (head.pt + config.json)
    run_id: str | None = None
    error: str | None = None
    placement: dict[str, Any] | None = None  # rank-0 worker: node_id, hostname, gpu_ids, device, ...
    target_report: dict[str, Any] = field(default_factory=dict)  # per-class target tables (target_eval="all")
    trial_dir: str | None = None  # the trial's Ray Train run folder
    number: int | None = None  # Tune's running number (Optuna's trial number with Optuna)

    @property
    def label(self) -> str:
        """``t03`` (as run names and the console show the trial), else its trial id."""
        return f"t{self.number:02d}" if self.number is not None else self.trial_id


@dataclass
class ResultSummary:
    name: str
    experiment_path: str  # Tune experiment directory (resume from here)
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    metric: str
    mode: str
    trials: list[TrialSummary] = field(default_factory=list)
    best: TrialSummary | None = None
    best_config: dict[str, Any] = field(default_factory=dict)  # resolved config of the best trial (nested)
    target_metrics: dict[str, float] = field(default_factory=dict)
    target_report: dict[str, Any] = field(default_factory=dict)
    target_run_id: str | None = None
    refit_run_id: str | None = None  # the best config retrained with the paper protocol (role=refit)
    refit_checkpoint: str | None = None  # its heads (what the target evaluation evaluated)
    errors: dict[str, str] = field(default_factory=dict)  # trial_id -> reason
    interrupted: bool = False
    optuna_storage: str | None = None
    table_path: str | None = None

    @property
    def mlflow_ui(self) -> str:
        return mlflow_ui_command(self.tracking_uri)

    def ranked(self) -> list[TrialSummary]:
        """The trials best objective first (trials without one last, in start order)."""
        have = [t for t in self.trials if t.objective is not None and math.isfinite(t.objective)]
        have.sort(key=lambda t: t.objective, reverse=self.mode == "max")
        return have + [t for t in self.trials if t not in have]

    def rows(self, full: bool = True) -> list[dict[str, Any]]:
        """One flat dict per trial, best first, the objective and its epoch in the first columns.

        ``full`` (``results.csv``): every summary metric, the last epoch's ``final_val_*``,
        run id and error; otherwise (``results.md``) what tells the trials apart: trial, objective,
        best epoch, status, variant, the sampled keys, target metrics, error.
        """
        out = []
        for t in self.ranked():
            row = {"trial": t.label, f"best_{self.metric}": t.objective, "best_epoch": t.metrics.get("best_epoch"),
                   "status": t.status}
            if t.variant is not None:
                row["variant"] = t.variant
            row.update({k: v for k, v in t.params.items() if k != VARIANT_KEY})
            shown = sorted(k for k in t.metrics if k not in (f"best_{self.metric}", "best_epoch"))
            row.update({k: t.metrics[k] for k in shown if full or k.startswith("target_")})
            if full:
                row.update({"trial_id": t.trial_id, "run_id": t.run_id})
            if full or any(x.error for x in self.trials):
                row["error"] = t.error or ""
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        lines = [f"sweep {self.name}: {len(self.trials)} trials "
                 f"({sum(t.status == 'FINISHED' for t in self.trials)} finished, "
                 f"{sum(t.status == 'EARLY_STOPPED' for t in self.trials)} stopped early, "
                 f"{len(self.errors)} failed)" + ("  [INTERRUPTED]" if self.interrupted else "")]
        if self.best is not None:
            b = self.best
            epoch = b.metrics.get("best_epoch")
            at = f" @ epoch {int(epoch)}" if epoch is not None else ""
            lines.append(f"best trial {b.label} ({b.trial_id}): {self.metric} = {b.objective:.4f}{at}  params {b.params}")
            if b.checkpoint:
                lines.append(f"best heads (held-out source classes picked the epoch): {b.checkpoint}")
        if self.refit_checkpoint:
            lines.append(f"refit on all source classes, paper protocol (run {self.refit_run_id}): {self.refit_checkpoint}")
        if self.target_metrics:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(self.target_metrics.items()))
            model = "refit model" if self.refit_checkpoint else "best heads"
            lines.append(f"target evaluation of the {model} (run {self.target_run_id}): {shown}")
        for tid, err in self.errors.items():
            lines.append(f"failed {tid}: {err}")
        lines.append(f"MLflow parent run {self.parent_run_id} in experiment {self.experiment!r}")
        lines.append(f"view: {self.mlflow_ui}")
        if self.optuna_storage and self.optuna_storage.startswith("sqlite:"):
            lines.append(f"study: optuna-dashboard {self.optuna_storage}   (pip install optuna-dashboard)")
        return "\n".join(lines)


def mlflow_ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {tracking_uri}"
    return f"open {tracking_uri} (MLflow tracking server)"
