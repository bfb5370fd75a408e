"""Sweep reports for the parent run: results table (CSV / Markdown), objective plot, importance.

Parameter importance: Optuna's fANOVA evaluator (``optuna.importance``) on an
in-memory study rebuilt from the completed trials when at least three trials with a
finite objective exist; otherwise (or if it fails) the absolute Spearman rank
correlation between each numeric parameter and the objective.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["write_table", "plot_objective", "param_importance", "plot_importance"]


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
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in rows:
            lines.append("| " + " | ".join(_fmt(row.get(k)).replace("|", "/") for k in columns) + " |")
        Path(md_path).write_text("\n".join(lines) + "\n")
    return columns


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


def _spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    import numpy as np
    from scipy.stats import rankdata

    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return 0.0
    rx, ry = rankdata(xs), rankdata(ys)
    c = np.corrcoef(rx, ry)[0, 1]
    return float(abs(c)) if math.isfinite(c) else 0.0


def param_importance(
    params: Sequence[Mapping[str, Any]],
    values: Sequence[float | None],
    specs: Mapping[str, Any],
    mode: str = "max",
) -> tuple[dict[str, float], str]:
    """``({param: importance}, method)`` over trials with a finite objective.

    ``specs`` maps searched keys to :class:`tuning.space.ParamSpec`.
    """
    rows = [(p, v) for p, v in zip(params, values) if v is not None and math.isfinite(v)]
    keys = [k for k, s in specs.items() if getattr(s, "searched", False) and s.kind != "grid"]
    keys = [k for k in keys if len({repr(p.get(k)) for p, _ in rows}) > 1]
    if len(rows) < 2 or not keys:
        return {}, "none"
    if len(rows) >= 3:
        try:
            import optuna
            from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

            dists = {}
            for k in keys:
                s = specs[k]
                if s.kind in ("uniform", "loguniform"):
                    dists[k] = FloatDistribution(s.low, s.high, log=s.kind == "loguniform")
                elif s.kind in ("int", "logint"):
                    dists[k] = IntDistribution(int(s.low), int(s.high), log=s.kind == "logint")
                else:
                    dists[k] = CategoricalDistribution(list(s.values))
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
            for p, v in rows:
                study.add_trial(
                    optuna.trial.create_trial(params={k: p[k] for k in keys}, distributions=dists, value=float(v))
                )
            imp = optuna.importance.get_param_importances(study)
            return {k: float(v) for k, v in imp.items()}, "optuna-fanova"
        except Exception:  # noqa: BLE001 - fall back to correlation
            pass
    out = {}
    ys = [float(v) for _, v in rows]
    for k in keys:
        raw = [p.get(k) for p, _ in rows]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw):
            xs = [float(x) for x in raw]
        else:
            cats = {repr(x): i for i, x in enumerate(dict.fromkeys(map(repr, raw)))}
            xs = [float(cats[repr(x)]) for x in raw]
        out[k] = _spearman(xs, ys)
    return dict(sorted(out.items(), key=lambda kv: -kv[1])), "spearman-abs"


def plot_importance(importance: Mapping[str, float], method: str, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(importance.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6, 0.4 * max(3, len(items)) + 1))
    if items:
        ax.barh([k for k, _ in items], [v for _, v in items])
    else:
        ax.text(0.5, 0.5, "not enough completed trials", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"importance ({method})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
