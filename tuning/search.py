"""Search algorithms: Optuna TPE whose study lives in an RDB store and survives ``Tuner.restore``."""
from __future__ import annotations

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
    """

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


def make_optuna_search(study_name: str, storage_url: str | None, seed: int, points: list[dict] | None) -> ResumableOptunaSearch:
    """TPE (seeded) with ``points`` evaluated first; the study ``study_name`` is kept at ``storage_url``."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return ResumableOptunaSearch(
        points_to_evaluate=list(points or []) or None,
        sampler=optuna.samplers.TPESampler(seed=seed),
        study_name=study_name,
        storage=optuna.storages.RDBStorage(storage_url) if storage_url else None,  # None: kept in Tune's state
    )
