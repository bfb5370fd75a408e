"""Search algorithms: Optuna TPE whose study lives in an RDB store and survives ``Tuner.restore``."""
from __future__ import annotations

import logging
import math

import optuna
from ray.tune.search.optuna import OptunaSearch

__all__ = ["ResumableOptunaSearch", "make_optuna_search"]


class ResumableOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that can be restored onto an existing RDB study.

    Ray's ``OptunaSearch`` enqueues ``points_to_evaluate`` whenever it sets up its
    study; on ``Tuner.restore`` that would put the paper-default point into the stored
    study a second time (and Optuna would run it again). Here the points are enqueued
    only into an empty study. Trials asked from Optuna after Tune's last experiment
    checkpoint (a driver killed mid-step) are marked FAIL on restore, so the study has
    no trial left RUNNING forever.

    What Optuna stores is what MLflow reports: every epoch's value is an intermediate value
    at step = epoch, a trial's value is its *best* epoch (the heads it keeps), and a trial
    that stopped before ``epochs`` (ASHA) is PRUNED (its intermediate values kept).
    """

    def __init__(self, *args, epochs: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._epochs = epochs
        self._progress: dict[str, dict[int, float]] = {}  # trial_id -> {epoch: value}

    def observe(self, trial_id: str, result: dict | None) -> None:
        """Record one epoch's value as an intermediate value (once per epoch).

        Tune calls :meth:`on_trial_result` only for results its scheduler lets continue; the
        result ASHA stops a trial on reaches this through :meth:`on_trial_complete`, and the
        sweep's MLflow callback passes on every result it logs, so Optuna holds what MLflow holds.
        """
        if (not result or trial_id in self._completed_trials or trial_id not in self._ot_trials
                or result.get("target_eval_done") or self.metric not in result):
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        values = self._progress.setdefault(trial_id, {})
        if step in values:  # an epoch reported again after a restart
            return
        values[step] = float(result[self.metric])
        self._ot_trials[trial_id].report(values[step], step)

    def on_trial_result(self, trial_id: str, result: dict):
        self.observe(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        self.observe(trial_id, result)
        values = self._progress.get(trial_id, {})
        finite = [v for v in values.values() if math.isfinite(v)]
        state = optuna.trial.TrialState
        try:
            if error or not finite:
                self._ot_study.tell(self._ot_trials[trial_id], state=state.FAIL)
            elif self._epochs and max(values) < self._epochs:  # stopped early: its last value is kept
                self._ot_study.tell(self._ot_trials[trial_id], state=state.PRUNED)
            else:
                self._ot_study.tell(self._ot_trials[trial_id], max(finite) if self._mode == "max" else min(finite))
        except Exception as exc:  # noqa: BLE001 - as Ray's OptunaSearch: never fail the sweep here
            logging.getLogger(__name__).warning(exc)
        self._completed_trials.add(trial_id)

    def _setup_study(self, mode):
        if self._storage is not None:
            try:
                existing = optuna.load_study(study_name=self._study_name, storage=self._storage)
                if existing.trials:
                    self._points_to_evaluate = []  # enqueued by the first run already
            except KeyError:
                pass
        super()._setup_study(mode)

    def restore(self, checkpoint_path):
        super().restore(checkpoint_path)
        if self._ot_study is None:
            return
        known = {t.number for t in self._ot_trials.values()}
        for t in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.number not in known:
                self._ot_study.tell(t.number, state=optuna.trial.TrialState.FAIL)


def make_optuna_search(study_name: str, storage_url: str | None, seed: int, points: list[dict] | None,
                       epochs: int | None = None) -> ResumableOptunaSearch:
    """TPE (seeded) with ``points`` evaluated first; the study ``study_name`` is kept at ``storage_url``;
    a trial that ends before ``epochs`` is PRUNED."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return ResumableOptunaSearch(
        points_to_evaluate=list(points or []) or None,
        sampler=optuna.samplers.TPESampler(seed=seed),
        study_name=study_name,
        storage=optuna.storages.RDBStorage(storage_url) if storage_url else None,  # None: kept in Tune's state
        epochs=epochs,
    )
