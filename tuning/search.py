"""Search algorithms: Optuna TPE whose study lives in an RDB store and survives ``Tuner.restore``."""
from __future__ import annotations

import logging
import math
import warnings

import optuna
from ray.tune.search.optuna import OptunaSearch

__all__ = ["ResumableOptunaSearch", "make_optuna_search", "make_sampler", "SecretFreeRDBStorage", "remember_storage_url"]

SELECT_KEY = "val_objective"  # the engine keeps the heads of the best epoch by this

_REAL_URLS: dict[str, str] = {}  # redacted URL -> URL, in this (driver) process only


def remember_storage_url(url: str | None) -> None:
    """Make the study's real URL known to this process before a pickled searcher is loaded (resume)."""
    from .redact import redact_text

    if url:
        _REAL_URLS[redact_text(url)] = url


EPOCH_OBJECTIVES = "epoch_objectives"  # several objectives: a trial's user attribute {epoch: [selection, *objectives]}


class SecretFreeRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB store whose pickles (Tune's ``tuner.pkl`` and searcher state) hold its URL with the
    password redacted; unpickled in a driver that knows the real URL (the sweep's ``optuna_storage``,
    see :func:`remember_storage_url`), the password is put back from there, never from the storage path."""

    def __init__(self, url: str, **kwargs):
        super().__init__(url, **kwargs)
        remember_storage_url(url)

    def __getstate__(self) -> dict:
        from .redact import redact_text

        state = super().__getstate__()
        state["url"] = redact_text(state["url"])
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__({**state, "url": _REAL_URLS.get(state["url"], state["url"])})


class ResumableOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that can be restored onto an existing RDB study.

    Ray's ``OptunaSearch`` enqueues ``points_to_evaluate`` whenever it sets up its
    study; on ``Tuner.restore`` that would put the paper-default point into the stored
    study a second time (and Optuna would run it again). Here the points are enqueued
    only into an empty study. A trial asked from Optuna after Tune's last experiment
    checkpoint (a driver killed mid-step) is handed out again as Tune's replacement for
    it, or marked FAIL if none comes, so the study has no trial left RUNNING forever and
    none that MLflow lacks.

    What Optuna stores is what MLflow reports: every epoch's value is an intermediate value
    at step = epoch (MLflow's ``val/objective``), a trial's value is its *best* epoch (the
    heads it keeps; MLflow's ``best_val_objective``, the study's metric name), and a trial
    that stopped before ``epochs`` (ASHA) is PRUNED with that same best value (Optuna's own
    ``tell`` would give it its *last* intermediate value), its intermediate values kept.
    Each trial carries the user attributes ``ray_trial_id`` and ``mlflow_run_id``; the study
    carries ``study_user_attrs`` (set by the MLflow callback: sweep name, parent run id).
    """

    def __init__(self, *args, epochs: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._epochs = epochs
        self._progress: dict[str, dict[int, float]] = {}  # trial_id -> {epoch: value (several: val_objective)}
        self._vectors: dict[str, dict[int, list[float]]] = {}  # several objectives: trial_id -> {epoch: values}
        self.study_user_attrs: dict[str, str] = {}

    @property
    def multi(self) -> bool:
        return isinstance(self.metric, list)

    def observe(self, trial_id: str, result: dict | None, run_id: str | None = None) -> None:
        """Record one epoch's value as an intermediate value (once per epoch).

        Tune calls :meth:`on_trial_result` only for results its scheduler lets continue; the
        result ASHA stops a trial on reaches this through :meth:`on_trial_complete`, and the
        sweep's MLflow callback passes on every result it logs (with the trial's MLflow
        ``run_id``), so Optuna holds what MLflow holds.
        """
        if run_id and trial_id in self._ot_trials and self._ot_trials[trial_id].user_attrs.get("mlflow_run_id") != run_id:
            self._ot_trials[trial_id].set_user_attr("mlflow_run_id", run_id)
        metrics = self.metric if self.multi else [self.metric]
        if (not result or trial_id in self._completed_trials or trial_id not in self._ot_trials
                or result.get("target_eval_done") or any(m not in result for m in metrics)):
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        values = self._progress.setdefault(trial_id, {})
        if step in values:  # an epoch reported again after a restart
            return
        if self.multi:  # Optuna keeps no intermediate values of several objectives: the epoch's vector here
            values[step] = float(result.get(SELECT_KEY, math.nan))
            vectors = self._vectors.setdefault(trial_id, {})
            vectors[step] = [float(result[m]) for m in metrics]
            # ... and on the trial, so that a searcher restored from an older state still has every epoch
            self._ot_trials[trial_id].set_user_attr(EPOCH_OBJECTIVES, {
                str(e): [values.get(e, math.nan), *v] for e, v in sorted(vectors.items())})
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
        if self.multi:  # every objective finite at the kept epoch, else the trial failed
            finite = [1.0] if all(math.isfinite(v) for v in self.kept_vector(trial_id) or [math.nan]) else []
        state = optuna.trial.TrialState
        try:
            if error or not finite:
                self._ot_study.tell(self._ot_trials[trial_id], state=state.FAIL)
            elif self._epochs and max(values) < self._epochs and self.multi:  # stopped early (ASHA on one metric)
                self._ot_study.tell(self._ot_trials[trial_id], state=state.PRUNED)
            elif self._epochs and max(values) < self._epochs:  # stopped early: PRUNED, valued as MLflow values it
                self._tell_pruned(self._ot_trials[trial_id], max(finite) if self._mode == "max" else min(finite))
            elif self.multi:
                self._ot_study.tell(self._ot_trials[trial_id], self.kept_vector(trial_id))
            else:
                self._ot_study.tell(self._ot_trials[trial_id], max(finite) if self._mode == "max" else min(finite))
        except Exception as exc:  # noqa: BLE001 - as Ray's OptunaSearch: never fail the sweep here
            logging.getLogger(__name__).warning(exc)
        self._completed_trials.add(trial_id)

    def _tell_pruned(self, trial, value: float) -> None:
        """End ``trial`` PRUNED with ``value`` (its best epoch) as its value.

        ``study.tell(state=PRUNED)`` takes no value (it stores the last intermediate value), so the
        state and value are written through the study's storage, as ``tell`` itself does."""
        try:
            self._ot_study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.PRUNED, [value])
        except Exception:  # noqa: BLE001 - a storage without that call: Optuna's own (last value)
            self._ot_study.tell(trial, state=optuna.trial.TrialState.PRUNED)

    def kept_vector(self, trial_id: str) -> list[float] | None:
        """The objectives at the epoch whose heads the trial keeps: the engine's best source-validation
        epoch (``val_objective``, first of ties), else the last epoch."""
        vectors = self._vectors.get(trial_id) or {}
        if not vectors:
            return None
        select = self._progress.get(trial_id, {})
        finite = {e: v for e, v in select.items() if math.isfinite(v)}
        epoch = min((e for e in finite if finite[e] == max(finite.values())), default=max(vectors))
        return vectors.get(epoch, vectors[max(vectors)])

    def _setup_study(self, mode):
        if self._storage is not None:
            try:
                existing = optuna.load_study(study_name=self._study_name, storage=self._storage)
                if existing.trials:
                    self._points_to_evaluate = []  # enqueued by the first run already
            except KeyError:
                pass
        super()._setup_study(mode)
        # optuna-dashboard: named objectives, not "Objective 0" (several: each objective's own name)
        names = list(self.metric) if self.multi else [f"best_{self.metric}"]
        with warnings.catch_warnings():  # experimental since Optuna 3.2, stable in use
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if self._ot_study.metric_names != names:
                self._ot_study.set_metric_names(names)
        for key, value in self.study_user_attrs.items():
            self._ot_study.set_user_attr(key, value)

    def suggest(self, trial_id: str):
        """Ray's suggestion, with the Ray trial id on the Optuna trial (``ray_trial_id``). After a
        restore, a trial Optuna handed out but Tune lost (the driver was killed before Tune's next
        experiment checkpoint) is handed out again, as the same Optuna trial with its parameters:
        Tune asks for a replacement, which becomes that trial, so the study holds no lost trial and
        numbers its trials as MLflow does."""
        orphans = getattr(self, "_orphans", None)
        if orphans and trial_id not in self._ot_trials and not callable(self._space):
            self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, orphans.pop(0)._trial_id)
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return config

    def restore(self, checkpoint_path):
        """Tune's saved searcher state; Optuna trials still RUNNING that it does not know are kept to be
        handed out again (:meth:`suggest`) and failed by :meth:`fail_orphans` if none asks for them."""
        super().restore(checkpoint_path)
        self._orphans = []
        if self._ot_study is None:
            return
        self._refill_progress()
        known = {t.number for t in self._ot_trials.values()}
        running = self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        self._orphans = sorted((t for t in running if t.number not in known), key=lambda t: t.number)
        if callable(self._space):  # a define-by-run space suggests afresh: nothing to hand out again
            self.fail_orphans()

    def _refill_progress(self) -> None:
        """The epochs each known trial reported to the study after the saved state was written (a
        driver killed between two searcher checkpoints): MLflow has them, so they are not reported
        again, yet a trial's value is its best epoch over all of them."""
        for trial_id, trial in self._ot_trials.items():
            try:
                frozen = self._ot_study._storage.get_trial(trial._trial_id)
            except Exception:  # noqa: BLE001 - a trial the storage no longer has
                continue
            values = self._progress.setdefault(trial_id, {})
            if not self.multi:
                for step, value in frozen.intermediate_values.items():
                    values.setdefault(int(step), float(value))
                continue
            vectors = self._vectors.setdefault(trial_id, {})
            for step, (select, *vector) in (frozen.user_attrs.get(EPOCH_OBJECTIVES) or {}).items():
                values.setdefault(int(step), float(select))
                vectors.setdefault(int(step), [float(v) for v in vector])

    def fail_trial(self, trial_id: str) -> None:
        """End ``trial_id``'s Optuna trial as FAIL when it is still RUNNING (Tune stopped it before its
        first result, e.g. at the sweep's time budget, and told the searcher nothing)."""
        trial = self._ot_trials.get(trial_id)
        if trial is None or self._ot_study is None or trial_id in self._completed_trials:
            return
        frozen = self._ot_study._storage.get_trial(trial._trial_id)
        if frozen.state == optuna.trial.TrialState.RUNNING:
            self._ot_study.tell(frozen.number, state=optuna.trial.TrialState.FAIL)
        self._completed_trials.add(trial_id)

    def fail_orphans(self) -> None:
        """End the restored RUNNING trials nobody asked for again as FAIL (none stays RUNNING forever)."""
        for t in getattr(self, "_orphans", None) or []:
            self._ot_study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        self._orphans = []


def make_sampler(name: str, seed: int):
    """Optuna's seeded TPE or NSGA-II sampler (both handle one or several objectives)."""
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_optuna_search(study_name: str, storage_url: str | None, seed: int, points: list[dict] | None,
                       epochs: int | None = None, objectives: list[str] | None = None,
                       modes: list[str] | None = None, sampler: str = "tpe") -> ResumableOptunaSearch:
    """TPE or NSGA-II (seeded) with ``points`` evaluated first; the study ``study_name`` is kept at
    ``storage_url``; a trial that ends before ``epochs`` is PRUNED. With several ``objectives`` the
    searcher holds the metrics and modes itself (Tune's own metric/mode stay unset).

    Eight parameters on purpose: the study's identity (``study_name``, ``storage_url``), how trials
    are picked (``sampler``, ``seed``, ``points`` tried first), the pruning horizon (``epochs``), and
    ``objectives``/``modes``, the parallel lists Optuna's and Tune's own ``metric``/``mode`` take;
    ``plan.make_search`` and the fault tests pass them as they are, so grouping them would only add
    a wrapper to unpack."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    several = dict(metric=list(objectives), mode=list(modes)) if objectives and len(objectives) > 1 else {}
    return ResumableOptunaSearch(
        points_to_evaluate=list(points or []) or None,
        sampler=make_sampler(sampler, seed),
        **several,
        study_name=study_name,
        storage=SecretFreeRDBStorage(storage_url) if storage_url else None,  # None: kept in Tune's state
        epochs=epochs,
    )
