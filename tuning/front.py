"""The sweep's objectives after the search: each trial's point, the Pareto front, the refit pick.

- :func:`trial_values`: a trial's objectives at the epoch whose heads it keeps (``best_epoch``),
  read from its MLflow run (so a resumed sweep rebuilds the front from the record);
- :func:`pick_trial`: ``refit.pick`` (``knee`` | ``best:<metric>`` | ``trial:<n>``) applied to the
  finished trials; sets ``summary.front`` / ``summary.pick`` / ``summary.best``;
- :func:`front_files`: ``pareto_front.md`` / ``.csv`` / ``.json`` and ``pareto_front.png`` (Optuna's
  ``plot_pareto_front`` when the study is at hand, else a plain scatter of the first two objectives);
- :func:`tag_front`: ``pareto_front=true`` on the front's trial runs; the rule and the picked point
  on the parent run (``refit_pick``, ``refit_point``).
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from .pareto import choose, pareto_front

__all__ = ["trial_values", "pick_trial", "front_files", "tag_front"]


def trial_values(client, run, objectives: list[str], best_epoch: float | None) -> dict[str, float]:
    """``{objective: value}`` at ``best_epoch`` (the last logged epoch when unknown) from the run's history."""
    from .tracking import mlflow_metric_name

    out = {}
    for key in objectives:
        hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, mlflow_metric_name(key))}
        if not hist:
            continue
        step = int(best_epoch) if best_epoch is not None and int(best_epoch) in hist else max(hist)
        out[key] = float(hist[step])
    return out


def _number(t, i: int) -> int:
    return t.number if t.number is not None else i


def _points(summary) -> dict[int, list[float]]:
    return {_number(t, i): [t.values.get(k, math.nan) for k in summary.objectives] for i, t in enumerate(summary.trials)}


def pick_trial(summary, rule: str):
    """The trial ``rule`` picks (None: no finished trial with every objective finite)."""
    points = _points(summary)
    by_number = {_number(t, i): t for i, t in enumerate(summary.trials)}
    summary.front = [by_number[n].label for n in pareto_front(points, summary.modes)]
    number = choose(points, rule, summary.objectives, summary.modes)
    if number is None:
        return None
    picked = by_number[number]
    summary.pick = {"rule": rule, "trial": picked.label, "trial_id": picked.trial_id,
                    **{k: picked.values.get(k) for k in summary.objectives}}
    return picked


def front_rows(summary) -> list[dict[str, Any]]:
    """One row per front trial (best on the first objective first)."""
    front = [t for t in summary.trials if t.label in set(summary.front)]
    sign = 1.0 if summary.modes[0] == "max" else -1.0
    front.sort(key=lambda t: -sign * t.values.get(summary.objectives[0], math.nan))
    rows = []
    for t in front:
        row = {"trial": t.label, **{k: t.values.get(k) for k in summary.objectives}}
        row["picked"] = "yes" if summary.pick and summary.pick.get("trial") == t.label else ""
        row.update({k: v for k, v in t.params.items()})
        rows.append(row)
    return rows


def front_files(summary, tmp: Path, study=None) -> list[Path]:
    """The front as a table (md, csv), JSON and a plot in ``tmp``."""
    from .report import write_table

    rows = front_rows(summary)
    if not rows:
        return []
    write_table(rows, tmp / "pareto_front.csv", tmp / "pareto_front.md")
    (tmp / "pareto_front.json").write_text(json.dumps({
        "objectives": summary.objectives, "modes": summary.modes, "front": rows, "pick": summary.pick,
    }, indent=2, default=str))
    files = [tmp / "pareto_front.csv", tmp / "pareto_front.md", tmp / "pareto_front.json"]
    if len(summary.objectives) >= 2:
        files.append(_plot(summary, tmp / "pareto_front.png", study))
    return files


def _plot(summary, path: Path, study) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [o.replace("_", "/", 1) for o in summary.objectives]
    ax = None
    if study is not None and len(summary.objectives) in (2, 3):
        try:
            from optuna.visualization.matplotlib import plot_pareto_front

            with warnings.catch_warnings():  # experimental in Optuna
                warnings.simplefilter("ignore")
                ax = plot_pareto_front(study, target_names=names)
        except Exception:  # noqa: BLE001 - an experimental Optuna plot: fall back to our own
            ax = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 4))
        pts = [(t.label, t.values.get(summary.objectives[0]), t.values.get(summary.objectives[1]))
               for t in summary.trials if len(t.values) >= 2]
        front = set(summary.front)
        for label, x, y in pts:
            on = label in front
            ax.scatter([x], [y], c="tab:red" if on else "tab:gray", s=30 if on else 15)
            ax.annotate(label, (x, y), fontsize=7)
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        ax.set_title("Pareto front (red)")
    if summary.pick:
        ax.scatter([summary.pick.get(summary.objectives[0])], [summary.pick.get(summary.objectives[1])],
                   marker="*", s=200, c="gold", edgecolors="k", zorder=5, label=f"refit: {summary.pick['trial']}")
        ax.legend(fontsize=7)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=100)
    plt.close(ax.figure)
    return path


def tag_front(summary, tracker) -> None:
    """``pareto_front`` on every trial run; the refit rule and its point on the parent."""
    front = set(summary.front)
    for t in summary.trials:
        if t.run_id:
            tracker.client.set_tag(t.run_id, "pareto_front", "true" if t.label in front else "false")
    parent = tracker.parent_run_id
    tracker.client.set_tag(parent, "objectives", ",".join(summary.objectives))
    tracker.client.set_tag(parent, "pareto_front", ",".join(summary.front))
    if summary.pick:
        tracker.client.set_tag(parent, "refit_pick", summary.pick["rule"])
        point = ", ".join(f"{k}={v:.4f}" for k, v in summary.pick.items() if k in summary.objectives and v is not None)
        tracker.client.set_tag(parent, "refit_point", f"{summary.pick['trial']}: {point}")
