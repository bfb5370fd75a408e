"""Metric keys, errors, ``MetricDict`` and the input checks every metric shares."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

IMAGE_KEYS = ("image_auroc", "image_f1max", "image_ap")
PIXEL_KEYS = ("pixel_auroc", "pixel_aupro", "pixel_ap")
METRIC_KEYS = IMAGE_KEYS + PIXEL_KEYS


class MetricError(ValueError):
    """Base class of the errors raised by ``ssvp.metrics``."""


class MetricInputError(MetricError):
    """The input is malformed (shape, dtype, NaN, labels not binary); names the field."""


class UndefinedMetricError(MetricError):
    """The metric is not defined for this data (e.g. AUROC with one class only)."""

    def __init__(self, metric: str, reason: str):
        super().__init__(f"{metric} is undefined: {reason}")
        self.metric = metric
        self.reason = reason


class MetricDict(dict):
    """``dict`` of metric -> float; ``.undefined`` maps each NaN entry to its reason."""

    def __init__(self, *args, undefined: Mapping[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.undefined: dict[str, str] = dict(undefined or {})


# --------------------------------------------------------------------------- inputs
def _to_numpy(x: Any, name: str) -> np.ndarray:
    if x is None:
        raise MetricInputError(f"{name}: missing (got None)")
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if x.is_floating_point() and str(x.dtype) not in ("torch.float32", "torch.float64"):
            x = x.float()  # bf16/fp16 have no numpy twin
        x = x.numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # ragged lists etc.
        raise MetricInputError(f"{name}: cannot be read as an array ({exc})") from exc


def _labels_scores(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _to_numpy(labels, "labels").reshape(-1)
    s = _to_numpy(scores, "scores").reshape(-1)
    if y.shape != s.shape:
        raise MetricInputError(f"labels ({y.size} values) and scores ({s.size} values) differ in length")
    if y.size == 0:
        raise MetricInputError("labels: empty")
    if y.dtype != bool:
        if not np.issubdtype(y.dtype, np.number):
            raise MetricInputError(f"labels: expected 0/1 or bool, got dtype {y.dtype}")
        bad = (y != 0) & (y != 1)
        if bad.any():
            raise MetricInputError(f"labels: expected 0/1, found {y[bad][0]!r} at index {int(np.flatnonzero(bad)[0])}")
        y = y == 1
    if not np.issubdtype(s.dtype, np.number) or s.dtype == bool:
        raise MetricInputError(f"scores: expected real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    bad = ~np.isfinite(s)
    if bad.any():
        raise MetricInputError(f"scores: non-finite value {s[bad][0]} at index {int(np.flatnonzero(bad)[0])}")
    return y, s
