"""Several objectives: metric names, the Pareto front, its knee and the refit rule (pure Python).

A sweep may name several objectives (``search.objectives: [val/image_auroc, val/pixel_aupro]``,
``search.modes: [max, max]``). A trial's point is the vector of those metrics at the epoch
whose heads it keeps (``best_epoch``: the engine's best source-validation epoch). The front is
the set of finished trials no other trial dominates; :func:`knee` picks the front's point that is
nearest the ideal point once every objective is scaled to [0, 1] over the front (1 = the best
value on the front), ties to the lower trial number. With one objective the front is the best
trial and the knee is that trial.

``refit.pick`` chooses the configuration to refit (:func:`parse_pick`, :func:`choose`):

- ``knee`` (default): the knee of the front;
- ``best:<metric>``: the front's best trial on one objective;
- ``trial:<n>``: trial number n (``t07`` = 7), front or not.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

__all__ = [
    "metric_key", "known_objectives", "dominates", "pareto_front", "knee", "parse_pick", "choose", "PickError",
]


class PickError(ValueError):
    """A ``refit.pick`` rule is malformed or names nothing the sweep has."""


def metric_key(name: str) -> str:
    """The key ``fit`` reports for a metric written either way: ``val/image_auroc`` -> ``val_image_auroc``."""
    name = str(name).strip()
    for prefix in ("train/", "val/", "lr/"):
        if name.startswith(prefix):
            return f"{prefix[:-1]}_{name[len(prefix):]}"
    return name


def known_objectives() -> tuple[str, ...]:
    """The per-epoch source-validation metrics a sweep can select on (``fit`` with ``protocol=select``)."""
    from ssvp.metrics.common import METRIC_KEYS

    return ("val_objective", *(f"val_{k}" for k in METRIC_KEYS), "train_loss")


def _oriented(point: Sequence[float], modes: Sequence[str]) -> list[float]:
    """Every objective turned into 'higher is better'."""
    return [v if m == "max" else -v for v, m in zip(point, modes)]


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """Whether ``a`` is at least as good as ``b`` on every objective and better on one."""
    oa, ob = _oriented(a, modes), _oriented(b, modes)
    return all(x >= y for x, y in zip(oa, ob)) and any(x > y for x, y in zip(oa, ob))


def _finite(point: Sequence[float] | None) -> bool:
    return point is not None and all(isinstance(v, (int, float)) and math.isfinite(v) for v in point)


def pareto_front(points: Mapping[int, Sequence[float]], modes: Sequence[str]) -> list[int]:
    """Keys of the non-dominated points (points with a missing or non-finite value never count), sorted."""
    ok = {k: list(p) for k, p in points.items() if _finite(p)}
    return sorted(k for k, p in ok.items() if not any(dominates(q, p, modes) for j, q in ok.items() if j != k))


def knee(points: Mapping[int, Sequence[float]], modes: Sequence[str]) -> int | None:
    """The front point nearest the ideal point in per-objective [0, 1] scaling; None without a front."""
    front = pareto_front(points, modes)
    if not front:
        return None
    oriented = {k: _oriented(points[k], modes) for k in front}
    n = len(modes)
    lo = [min(p[i] for p in oriented.values()) for i in range(n)]
    hi = [max(p[i] for p in oriented.values()) for i in range(n)]

    def gap(k: int) -> float:
        p = oriented[k]
        return math.sqrt(sum(((hi[i] - p[i]) / (hi[i] - lo[i])) ** 2 for i in range(n) if hi[i] > lo[i]))

    return min(front, key=lambda k: (gap(k), k))


def parse_pick(rule: str, objectives: Sequence[str]) -> tuple[str, str | int | None]:
    """``("knee", None)``, ``("best", metric key)`` or ``("trial", n)``; :class:`PickError` names the key."""
    text = str(rule).strip()
    kind, sep, arg = text.partition(":")
    if kind == "knee" and not sep:
        return "knee", None
    if kind == "best" and sep:
        key = metric_key(arg)
        if key not in objectives:
            raise PickError(f"refit.pick: {text!r} names {arg!r}, which is not one of the sweep's objectives "
                            f"({', '.join(objectives)})")
        return "best", key
    if kind == "trial" and sep:
        try:
            number = int(arg.lstrip("t"))
        except ValueError:
            number = -1
        if number < 0:
            raise PickError(f"refit.pick: {text!r}: trial:<n> needs a trial number, e.g. trial:7")
        return "trial", number
    raise PickError(f"refit.pick must be knee, best:<metric> or trial:<n>; got {text!r}")


def choose(points: Mapping[int, Sequence[float]], rule: str, objectives: Sequence[str],
           modes: Sequence[str]) -> int | None:
    """The trial number ``rule`` picks among ``points`` ({trial number: objective vector}).

    ``trial:<n>`` must name a trial with a finite point (:class:`PickError` otherwise); ``knee`` and
    ``best:`` pick on the front (None when no trial has a finite point).
    """
    kind, arg = parse_pick(rule, objectives)
    if kind == "trial":
        if arg not in points or not _finite(points[arg]):
            have = ", ".join(f"t{k:02d}" for k in sorted(points) if _finite(points[k])) or "none"
            raise PickError(f"refit.pick: trial:{arg} has no finished result in this sweep (finished: {have})")
        return int(arg)
    if kind == "knee":
        return knee(points, modes)
    front = pareto_front(points, modes)
    if not front:
        return None
    i = list(objectives).index(arg)
    sign = 1.0 if modes[i] == "max" else -1.0
    return max(front, key=lambda k: (sign * points[k][i], -k))
