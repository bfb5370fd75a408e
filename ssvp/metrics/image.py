"""Image-level metrics: AUROC, F1-max, AP (exact, ties as scikit-learn treats them)."""
from __future__ import annotations

from typing import Any

import numpy as np

from .common import MetricDict, UndefinedMetricError, _labels_scores


def _binary_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (false, true) positives at every distinct score, highest first."""
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), y.size - 1]  # last index of each tie group
    tps = np.cumsum(y_sorted, dtype=np.int64)[last]
    fps = (last + 1) - tps
    return fps, tps


# --------------------------------------------------------------------- image metrics
def auroc(labels: Any, scores: Any) -> float:
    """Exact ROC AUC (ties count 1/2), equal to ``sklearn.metrics.roc_auc_score``."""
    y, s = _labels_scores(labels, scores)
    fps, tps = _binary_curve(y, s)
    p, n = int(tps[-1]), int(fps[-1])
    if p == 0 or n == 0:
        raise UndefinedMetricError("auroc", f"needs both classes, got {p} positive and {n} negative")
    fpr = np.r_[0.0, fps / n]
    tpr = np.r_[0.0, tps / p]
    return float(np.trapezoid(tpr, fpr))


def _precision_recall(labels: Any, scores: Any, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at every distinct threshold ``score >= t``, highest t first."""
    y, s = _labels_scores(labels, scores)
    fps, tps = _binary_curve(y, s)
    p = int(tps[-1])
    if p == 0:
        raise UndefinedMetricError(metric, "no positive sample")
    return tps / (tps + fps), tps / p


def average_precision(labels: Any, scores: Any) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n over distinct thresholds (``average_precision_score``)."""
    precision, recall = _precision_recall(labels, scores, "average_precision")
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(labels: Any, scores: Any, return_threshold: bool = False):
    """Largest F1 over all thresholds ``score >= t`` (t = each distinct score).

    Equals ``max(2PR / (P + R))`` over ``sklearn.metrics.precision_recall_curve`` as the
    peers compute it. With ``return_threshold`` returns ``(f1, t)``.
    """
    precision, recall = _precision_recall(labels, scores, "f1_max")
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    i = int(np.argmax(f1))
    if return_threshold:
        thresholds = np.sort(np.unique(_labels_scores(labels, scores)[1]))[::-1]
        return float(f1[i]), float(thresholds[i])
    return float(f1[i])


def image_metrics(labels: Any, scores: Any) -> MetricDict:
    """``{"image_auroc", "image_f1max", "image_ap"}``; undefined ones are NaN with a reason."""
    out = MetricDict()
    for key, fn in (("image_auroc", auroc), ("image_f1max", f1_max), ("image_ap", average_precision)):
        try:
            out[key] = fn(labels, scores)
        except UndefinedMetricError as exc:
            out[key] = float("nan")
            out.undefined[key] = exc.reason
    return out
