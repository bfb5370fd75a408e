"""Class folds and seeds per trial: an objective that does not hinge on one split (no Ray, no MLflow).

``search.class_folds: k`` (k >= 2) splits the source classes into k disjoint held-out sets
(:func:`assign_folds`: the sorted classes shuffled with ``search.seed``, then cut into k nearly
equal parts), the same for every trial. ``search.seeds_per_trial: n`` trains each fold with n
seeds (the trial's ``train.seed`` + 0 .. n-1). Every (fold, seed) pair is a *replica*
(:func:`replicas`): one ``fit`` with ``train.protocol=select``, that fold's classes held out
(``data.val_classes``), that seed.

A trial runs its replicas in lockstep (:func:`run_lockstep`): replica 0 trains one epoch, then
replica 1, ..., then the trial reports that epoch's aggregate (:func:`aggregate`), and so on. One
process holds them all (the feature cache, the kept text tower and the data are shared), one
replica runs at a time (the global RNG is reseeded by each ``fit``; taking turns keeps a trial
deterministic), and ASHA sees one number per epoch: the mean over replicas. Folds of one trial
run one after the other; parallelism comes from running trials side by side.

Aggregates reported each epoch for each selection metric ``m`` (``search.metric``, the
``objectives`` and ``val_objective``): ``m`` = the mean over replicas (finite values), ``m_std``
the spread (sample standard deviation), ``m_<label>`` each replica's value (labels ``fold0``,
``seed1``, ``fold0_seed1``). With ``search.risk: kappa``, ``m`` is ``mean - kappa * std`` (``mean +
kappa * std`` for a minimised metric) and ``m_mean`` the plain mean. Every other numeric metric is
the plain mean over replicas.
"""
from __future__ import annotations

import math
import threading
from typing import Any, Callable, Mapping, Sequence

__all__ = ["FoldError", "assign_folds", "replicas", "aggregate", "risk_adjusted", "best_epoch", "run_lockstep"]


class FoldError(ValueError):
    """Folds or seeds that cannot be built; the message names the key."""


def assign_folds(classes: Sequence[str], k: int, seed: int) -> list[list[str]]:
    """k disjoint, non-empty held-out class sets covering the source classes (each sorted).

    Seeded (the same classes in the same folds for the same ``seed``, whatever the listing order).
    Refused: k > number of classes (a fold would be empty) and k folds that would leave a fold's
    training split empty (a single class).
    """
    import numpy as np

    names = sorted(set(classes))
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise FoldError(f"search.class_folds must be an integer >= 1, got {k!r}")
    if k > len(names):
        raise FoldError(f"search.class_folds: {k} folds need at least {k} source classes; the source has "
                        f"{len(names)} ({', '.join(names) or 'none'}), so a fold would be empty")
    if k > 1 and len(names) < 2:
        raise FoldError("search.class_folds: held-out folds need at least 2 source classes (one to train on)")
    order = np.random.default_rng(seed).permutation(len(names))
    return [sorted(names[i] for i in part) for part in np.array_split(order, k)]


def replicas(folds: Sequence[Sequence[str]], seeds_per_trial: int) -> list[dict[str, Any]]:
    """``[{"label", "val_classes" (None: the base split), "seed_offset"}]``; [] for one fold, one seed."""
    if not isinstance(seeds_per_trial, int) or isinstance(seeds_per_trial, bool) or seeds_per_trial < 1:
        raise FoldError(f"search.seeds_per_trial must be an integer >= 1, got {seeds_per_trial!r}")
    folds = [list(f) for f in folds] or [None]
    if len(folds) == 1 and seeds_per_trial == 1:
        return []
    out = []
    for i, fold in enumerate(folds):
        for j in range(seeds_per_trial):
            parts = ([f"fold{i}"] if len(folds) > 1 else []) + ([f"seed{j}"] if seeds_per_trial > 1 else [])
            out.append({"label": "_".join(parts), "val_classes": fold if len(folds) > 1 else None, "seed_offset": j})
    return out


def risk_adjusted(mean: float, std: float, kappa: float, mode: str) -> float:
    """``mean - kappa * std`` for a maximised metric, ``mean + kappa * std`` for a minimised one."""
    return mean - kappa * std if mode == "max" else mean + kappa * std


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def aggregate(rows: Sequence[Mapping[str, float]], labels: Sequence[str], selected: Mapping[str, str],
              kappa: float | None = None) -> dict[str, float]:
    """One epoch's report from each replica's report (see the module docstring).

    ``selected`` maps each selection metric to its mode (max | min).
    """
    keys = [k for k in rows[0] if all(k in r for r in rows)]
    out: dict[str, float] = {}
    for key in keys:
        mean, std = _mean_std([r[key] for r in rows])
        out[key] = float(rows[0][key]) if key == "epoch" else mean
        if key in selected:
            out[f"{key}_std"] = std
            out.update({f"{key}_{label}": float(r[key]) for label, r in zip(labels, rows)})
            if kappa:
                out[f"{key}_mean"] = mean
                out[key] = risk_adjusted(mean, std, float(kappa), selected[key])
    return out


def best_epoch(history: Sequence[Mapping[str, float]], key: str = "val_objective", mode: str = "max") -> int | None:
    """The first epoch with the best finite ``key`` (the engine's rule: later ties do not win)."""
    best, at = None, None
    for row in history:
        v = row.get(key)
        if v is None or not math.isfinite(v):
            continue
        if best is None or (v > best if mode == "max" else v < best):
            best, at = v, int(row["epoch"])
    return at


class _Stopped(Exception):
    """Raised in a replica's thread when the trial ended (stopped by Tune, or another replica failed)."""


class _Turns:
    """Whose turn it is: replicas 0..n-1, then the reporter (n), round and round; finished replicas skipped."""

    def __init__(self, n: int):
        self.n, self.turn, self.cond = n, 0, threading.Condition()
        self.finished: set[int] = set()
        self.stopped = False

    def wait(self, who: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.stopped or self.turn == who)
            if self.stopped and who != self.n:
                raise _Stopped()

    def pass_on(self, who: int, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.finished.add(who)
            nxt = (who + 1) % (self.n + 1)
            while nxt in self.finished:
                nxt = (nxt + 1) % (self.n + 1)
            self.turn = nxt
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


def run_lockstep(fits: Sequence[Callable[[Callable], Any]],
                 on_round: Callable[[int, list[dict], list[str | None]], None], start: int = 0) -> list[Any]:
    """Run ``fits[i](on_epoch)`` (each an ``engine.fit`` taking its ``on_epoch``) one epoch at a time each.

    After every replica has trained epoch e, ``on_round(e, [metrics per replica], [checkpoint per
    replica])`` runs in the calling thread (the one that may report to Ray). A replica's error, or
    an error raised by ``on_round`` (Tune stopping the trial), ends every replica at its next epoch
    and is raised here. ``start``: epochs every replica already trained (all resumed from there).
    Returns each fit's result.
    """
    n = len(fits)
    turns = _Turns(n)
    rows: list[dict[int, tuple[dict, str | None]]] = [{} for _ in range(n)]
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def body(i: int) -> None:
        def on_epoch(epoch: int, metrics: dict, ckpt: str | None) -> None:
            rows[i][int(epoch)] = (dict(metrics), ckpt)
            turns.pass_on(i)
            turns.wait(i)

        try:
            turns.wait(i)
            results[i] = fits[i](on_epoch)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            errors.append(exc)
            turns.stop()
        finally:
            turns.pass_on(i, finished=True)

    threads = [threading.Thread(target=body, args=(i,), name=f"replica-{i}", daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    reported = start
    try:
        while True:
            turns.wait(n)
            if errors:
                raise errors[0]
            while all(reported + 1 in r for r in rows):
                reported += 1
                on_round(reported, [r[reported][0] for r in rows], [r[reported][1] for r in rows])
            if len(turns.finished) == n:
                break
            turns.pass_on(n)
    except BaseException:
        turns.stop()
        raise
    finally:
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return results
