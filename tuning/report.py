"""Sweep reports for the parent run: results table (CSV / Markdown), objective plot, importance.

Parameter importance: Optuna's own evaluator (``optuna.importance``; PED-ANOVA, as
optuna-dashboard, else fANOVA seeded) on the sweep's study, or on an in-memory study of the
finished trials; with the number of completed trials it rests on, "indicative" below 20.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["write_table", "markdown_table", "plot_objective", "param_importance", "plot_importance"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def write_table(rows: Sequence[Mapping[str, Any]], csv_path: str | Path | None, md_path: str | Path | None = None) -> list[str]:
    """Write rows (dicts) as CSV and/or a Markdown table; returns the column order."""
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    if csv_path is not None:
        csv_path = Path(csv_path)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with csv_path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k, "") for k in columns})
    if md_path is not None:
        Path(md_path).write_text(markdown_table(rows, columns) + "\n")
    return columns


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """``rows`` (dicts) as a Markdown table, floats to 4 significant digits."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k)).replace("|", "/") for k in columns) + " |")
    return "\n".join(lines)


def plot_objective(values: Sequence[float | None], labels: Sequence[str], metric: str, mode: str, path: str | Path) -> Path:
    """Objective per trial (in start order) with the running best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(1, len(values) + 1))
    ys = [v if v is not None and math.isfinite(v) else float("nan") for v in values]
    best, running = [], None
    for y in ys:
        if not math.isnan(y):
            running = y if running is None else (max(running, y) if mode == "max" else min(running, y))
        best.append(running if running is not None else float("nan"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, ys, "o", label=metric)
    ax.plot(xs, best, "-", label=f"best so far ({mode})")
    failed = [x for x, y in zip(xs, ys) if math.isnan(y)]
    if failed:
        ax.plot(failed, [min([y for y in ys if not math.isnan(y)], default=0.0)] * len(failed), "rx", label="failed / no value")
    ax.set_xlabel("trial (start order)")
    ax.set_ylabel(metric)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(l)[-5:] for l in labels], rotation=45, fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


INDICATIVE_BELOW = 20  # completed trials: fewer, and the importances are only indicative


def param_importance(
    params: Sequence[Mapping[str, Any]],
    values: Sequence[float | None],
    specs: Mapping[str, Any],
    mode: str = "max",
    study=None,
) -> dict[str, Any]:
    """Parameter importance by Optuna's own evaluator, as optuna-dashboard computes it.

    ``study``: the sweep's Optuna study (its COMPLETE trials, what the dashboard reads); without
    one an in-memory study is built from the finished trials (``params``, ``values``; ``specs``
    maps searched keys to :class:`tuning.space.ParamSpec`). The evaluator is Optuna's
    ``PedAnovaImportanceEvaluator`` (deterministic; optuna-dashboard's choice), else
    ``FanovaImportanceEvaluator(seed=0)``. Returns ``{"method", "importance", "n_trials",
    "indicative", "note"}``; ``indicative`` below :data:`INDICATIVE_BELOW` completed trials.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if study is None:
        study = _study_of(params, values, specs, mode)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    out = {"method": "none", "importance": {}, "n_trials": len(done), "indicative": len(done) < INDICATIVE_BELOW}
    if len(done) < 2 or not any(t.params for t in done):
        return {**out, "note": f"{len(done)} completed trial(s): no importance"}
    evaluator, method = _evaluator()
    try:
        imp = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except Exception as exc:  # noqa: BLE001 - e.g. every value equal: nothing to attribute
        return {**out, "note": f"{method}: {exc}"}
    note = f"{method} over {len(done)} completed trials" + (
        f" (indicative: fewer than {INDICATIVE_BELOW})" if out["indicative"] else "")
    return {**out, "method": method, "importance": {k: float(v) for k, v in imp.items()}, "note": note}


def _evaluator():
    import optuna.importance as imp

    if hasattr(imp, "PedAnovaImportanceEvaluator"):
        return imp.PedAnovaImportanceEvaluator(), "optuna-ped-anova"
    return imp.FanovaImportanceEvaluator(seed=0), "optuna-fanova(seed=0)"


def _study_of(params: Sequence[Mapping[str, Any]], values: Sequence[float | None], specs: Mapping[str, Any],
              mode: str):
    """An in-memory Optuna study of the trials with a finite value (COMPLETE), over the searched keys."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    keys = [k for k, s in specs.items() if getattr(s, "searched", False) and s.kind != "grid"]
    dists = {}
    for k in keys:
        s = specs[k]
        if s.kind in ("uniform", "loguniform"):
            dists[k] = FloatDistribution(s.low, s.high, log=s.kind == "loguniform")
        elif s.kind in ("int", "logint"):
            dists[k] = IntDistribution(int(s.low), int(s.high), log=s.kind == "logint")
        else:
            dists[k] = CategoricalDistribution(list(s.values))
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for p, v in zip(params, values):
        if v is not None and math.isfinite(v) and all(k in p for k in keys):
            study.add_trial(optuna.trial.create_trial(params={k: p[k] for k in keys}, distributions=dists,
                                                      value=float(v)))
    return study


def plot_importance(importance: Mapping[str, float], method: str, path: str | Path, note: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(importance.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6, 0.4 * max(3, len(items)) + 1))
    if items:
        ax.barh([k for k, _ in items], [v for _, v in items])
    else:
        ax.text(0.5, 0.5, note or "not enough completed trials", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"importance ({note or method})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
