"""What a sweep returns: :class:`ResultSummary` (the sweep) and :class:`TrialSummary` (one trial)."""
from __future__ import annotations

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
    errors: dict[str, str] = field(default_factory=dict)  # trial_id -> reason
    interrupted: bool = False
    optuna_storage: str | None = None
    table_path: str | None = None

    @property
    def mlflow_ui(self) -> str:
        return mlflow_ui_command(self.tracking_uri)

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per trial (what ``results.csv`` holds)."""
        out = []
        for t in self.trials:
            row = {"trial_id": t.trial_id, "status": t.status}
            if t.variant is not None:
                row["variant"] = t.variant
            row.update({k: v for k, v in t.params.items() if k != VARIANT_KEY})
            row[f"best_{self.metric}"] = t.objective
            row.update({k: v for k, v in sorted(t.metrics.items()) if k != f"best_{self.metric}"})
            row["run_id"] = t.run_id
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
            lines.append(f"best trial {self.best.trial_id}: {self.metric} = {self.best.objective:.4f}  params {self.best.params}")
            if self.best.checkpoint:
                lines.append(f"best heads: {self.best.checkpoint}")
        if self.target_metrics:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(self.target_metrics.items()))
            lines.append(f"target evaluation (run {self.target_run_id}): {shown}")
        for tid, err in self.errors.items():
            lines.append(f"failed {tid}: {err}")
        lines.append(f"MLflow parent run {self.parent_run_id} in experiment {self.experiment!r}")
        lines.append(f"view: {self.mlflow_ui}")
        return "\n".join(lines)


def mlflow_ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {tracking_uri}"
    return f"open {tracking_uri} (MLflow tracking server)"
