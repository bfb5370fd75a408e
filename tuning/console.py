"""What a sweep prints: one line per finished trial, instead of Tune's progress table.

::

    [sweep] quick-20261201-160102: optuna, 8 trials, objective val_objective (max), ASHA on epoch
    [1/8] t00 γ=0.5 ξ=0.85 β=0.1 ...  best_val_objective 0.7241 @ epoch 3/3          best t00 0.7241 | 2 running
    [2/8] t01 γ=0.549 ξ=0.822 ...      best_val_objective 0.6120 @ epoch 1/3  ASHA   best t00 0.7241 | 2 running
    [3/8] t02 ...                      FAILED  DatasetError: cannot read image ...
    [4/8] t03 ...  best_val_objective 0.6810 @ epoch 3/3 [fold0 0.7100 fold1 0.6520 ±0.0410]   (class_folds: 2)

The objective of a trial is its *best* epoch (the heads it keeps, what MLflow's
``best_val_objective``, Optuna's value and the final summary report), so "best" here names
the same trial the summary does. ``SweepConfig.verbose``: 0 prints nothing, 1 these lines
(default), 2 also Tune's own table and Ray's worker logs (``sweep.py --verbose``).
"""
from __future__ import annotations

import math
import sys
from typing import Mapping, TextIO

from .tracking import _TuneCallback, param_text, trial_number

__all__ = ["SweepConsole"]

class SweepConsole(_TuneCallback):
    """Tune callback (driver side) printing a line when a trial ends, with the best so far."""

    def __init__(self, metric: str, mode: str, total: int, epochs: int, number_offset: int = 0,
                 stream: TextIO | None = None, variant_labels: Mapping[str, str] | None = None):
        """Eight parameters on purpose: each is one thing the line shows or where it goes (``metric``
        and ``mode`` of "best", ``total`` of ``[n/total]``, ``epochs`` of ``epoch e/E``,
        ``number_offset`` of ``tNN``, ``variant_labels`` of a grid cell, ``stream``), given by name by
        ``runner.console_callbacks`` and the tests; a holder object would only be unpacked here."""
        self.metric, self.mode, self.total, self.epochs = metric, mode, total, epochs
        self.number_offset = number_offset
        self.variant_labels = dict(variant_labels or {})  # variant -> label in the line (grid cells: "E/full")
        self.stream = stream
        self._values: dict[str, dict[int, float]] = {}  # trial_id -> {epoch: objective}
        self._ended: list[str] = []
        self._best: tuple[str, float, int] | None = None  # (label, value, epoch)
        self._replicas: dict[str, dict[int, dict[str, float]]] = {}  # trial_id -> {epoch: {fold0: v, std: s}}

    def get_state(self):  # nothing worth restoring: the lines are a live view
        return None

    def _label(self, trial) -> str:
        number = trial_number(trial, self.number_offset)
        return f"t{number:02d}" if number is not None else trial.trial_id

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("target_eval_done") or self.metric not in result:
            return
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        self._values.setdefault(trial.trial_id, {})[epoch] = float(result[self.metric])
        prefix = f"{self.metric}_"  # class folds / seeds per trial (tuning.folds): each replica's value, the spread
        parts = {k[len(prefix):]: float(v) for k, v in result.items()
                 if k.startswith(prefix) and k[len(prefix):].startswith(("fold", "seed", "std"))}
        if parts:
            self._replicas.setdefault(trial.trial_id, {})[epoch] = parts

    def _best_epoch(self, trial_id: str) -> tuple[float, int] | None:
        values = {e: v for e, v in self._values.get(trial_id, {}).items() if math.isfinite(v)}
        if not values:
            return None
        pick = max if self.mode == "max" else min
        epoch = pick(values, key=values.get)
        return values[epoch], epoch

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trials, trial, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        from .tracking import error_summary, trial_error_text

        self._line(trials, trial, error_summary(trial_error_text(trial)))

    def _line(self, trials, trial, error: str | None) -> None:
        if trial.trial_id in self._ended:
            return
        self._ended.append(trial.trial_id)
        label = self._label(trial)
        params = {k: v for k, v in trial.config.items()}
        variant = params.get("variant")
        what = " ".join(x for x in (self.variant_labels.get(variant, variant) if variant else "", param_text(params)) if x)
        head = f"[{len(self._ended)}/{self.total}] {label} {what}"
        best = self._best_epoch(trial.trial_id)
        if error:
            body = f"FAILED  {error[:160]}"
        elif best is None:
            body = f"{self.metric} n/a"
        else:
            value, epoch = best
            last = max(self._values[trial.trial_id])
            stopped = "  stopped early (ASHA)" if last < self.epochs else ""
            body = f"best_{self.metric} {value:.4f} @ epoch {epoch}/{self.epochs}{stopped}"
            parts = self._replicas.get(trial.trial_id, {}).get(epoch)
            if parts:
                body += " [" + " ".join(f"{k} {v:.4f}" for k, v in parts.items() if k != "std")
                body += f" ±{parts['std']:.4f}]" if "std" in parts else "]"
            better = self._best is None or (value > self._best[1] if self.mode == "max" else value < self._best[1])
            if better:
                self._best = (label, value, epoch)
        running = sum(1 for t in trials if t.status == "RUNNING" and t.trial_id != trial.trial_id)
        tail = f"best {self._best[0]} {self._best[1]:.4f} @ {self._best[2]}" if self._best else "best -"
        print(f"{head}  {body}   | {tail} | {running} running", file=self.stream or sys.stdout, flush=True)
