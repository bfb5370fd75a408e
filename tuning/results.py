"""What a sweep returns: :class:`ResultSummary` (the sweep) and :class:`TrialSummary` (one trial)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .trial import VARIANT_KEY

__all__ = ["ResultSummary", "TrialSummary", "mlflow_ui_command", "run_url", "text_table"]


@dataclass
class TrialSummary:
    trial_id: str
    status: str  # FINISHED | FAILED | KILLED (interrupted) | EARLY_STOPPED | STOPPED (time budget, no epoch)
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
    values: dict[str, float] = field(default_factory=dict)  # each objective at the kept epoch (tuning.front)

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
    model_uri: str | None = None  # the refit model (an MLflow LoggedModel): models:/<model id>
    registered_model: str | None = None  # models:/<name>/<version> with register_model
    objectives: list[str] = field(default_factory=list)  # several: the Pareto front is over these
    modes: list[str] = field(default_factory=list)
    front: list[str] = field(default_factory=list)  # labels of the non-dominated trials
    pick: dict[str, Any] = field(default_factory=dict)  # refit.pick: rule, trial, its point

    @property
    def mlflow_ui(self) -> str:
        return mlflow_ui_command(self.tracking_uri)

    @property
    def parent_url(self) -> str:
        """The parent run in the MLflow UI's model-training view (:func:`run_url`)."""
        return run_url(self.tracking_uri, self.experiment_id, self.parent_run_id)

    def how_to_view(self) -> str:
        """The parent run's page; on a SQLite store after the ``mlflow ui`` command that serves it."""
        if self.tracking_uri.startswith("sqlite:"):
            return f"{self.mlflow_ui}   then open {self.parent_url}"
        return self.parent_url

    def target_rows(self) -> list[dict[str, Any]]:
        """``target/<dataset>/<metric>`` metrics as rows: one per dataset, a column per metric."""
        rows: dict[str, dict[str, Any]] = {}
        for key, value in sorted(self.target_metrics.items()):
            _, dataset, metric = (key.split("/", 2) + ["", ""])[:3]
            rows.setdefault(dataset, {"dataset": dataset})[metric] = value
        return list(rows.values())

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
            if len(self.objectives) > 1:  # each objective at the kept epoch, and whether the trial is on the front
                row.update({k: t.values.get(k) for k in self.objectives})
                row["front"] = "yes" if t.label in self.front else ""
            if t.variant is not None:
                row["variant"] = t.variant
            row.update({k: v for k, v in t.params.items() if k != VARIANT_KEY})
            shown = sorted(k for k in t.metrics if k not in (f"best_{self.metric}", "best_epoch"))
            row.update({k: t.metrics[k] for k in shown if full or k.startswith("target/")})
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
        if len(self.objectives) > 1:
            lines.append(f"Pareto front over {', '.join(self.objectives)}: {', '.join(self.front) or 'empty'}")
        if self.pick:
            lines.append(f"refit pick {self.pick['rule']}: {self.pick['trial']}")
        if self.refit_checkpoint:
            lines.append(f"refit on all source classes, paper protocol (run {self.refit_run_id}): {self.refit_checkpoint}")
        if self.model_uri:
            lines.append(f"refit model: {self.registered_model or self.model_uri}   "
                         "(mlflow.pyfunc.load_model(...).predict(DataFrame(path=[...], class_name=[...])))")
        if self.target_metrics:
            model = "refit model" if self.refit_checkpoint else "best heads"
            lines.append(f"target evaluation of the {model} (run {self.target_run_id}):")
            lines.extend("  " + ln for ln in text_table(self.target_rows()))
        for tid, err in self.errors.items():
            lines.append(f"failed {tid}: {err}")
        lines.append(f"MLflow parent run {self.parent_run_id} in experiment {self.experiment!r}")
        lines.append(f"view: {self.how_to_view()}")
        if self.optuna_storage and self.optuna_storage.startswith("sqlite:"):
            lines.append(f"study: optuna-dashboard {self.optuna_storage}   (pip install optuna-dashboard)")
        return "\n".join(lines)


def text_table(rows: list[dict[str, Any]]) -> list[str]:
    """Rows (dicts) as aligned text lines, floats to 4 decimals."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[f"{r.get(c):.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    return ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [columns, *cells]]


LOCAL_UI = "http://127.0.0.1:5000"  # where ``mlflow ui`` serves by default


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI, in the model-training view (``workflowType=machine_learning``:
    a fresh browser would otherwise open MLflow 3's GenAI view). On a tracking server its address
    (without any user:password), else that of a local ``mlflow ui``."""
    from urllib.parse import urlsplit

    base = LOCAL_UI
    if tracking_uri.startswith(("http://", "https://")):
        parts = urlsplit(tracking_uri)
        base = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "") + parts.path.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def mlflow_ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {tracking_uri}"
    return f"open {tracking_uri} (MLflow tracking server)"
