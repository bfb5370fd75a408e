"""Evaluation metrics of SSVP (paper §4.1, Tables 1-2; TIR-FG and SCD, Eq. 23-24).

Image level: AUROC, F1-max, AP.  Pixel level: AUROC, AUPRO (FPR limit 0.3), AP.
Every value is a fraction in [0, 1]; table printers (``format_table``) multiply by 100.
Keys: ``image_auroc, image_f1max, image_ap, pixel_auroc, pixel_aupro, pixel_ap``.

Files
-----
``common``        keys, errors (``MetricError`` ...), ``MetricDict``, input checks
``image``         image-level AUROC, F1-max, AP (``image_metrics``)
``pixel``         pixel AUROC, AP, exact ``aupro``, ``aupro_thresholds``, ``pixel_metrics``,
                  ``smooth_maps``
``pixel_counts``  the machinery behind every pixel metric (``_prepare_pixels``): exact
                  counts of normal pixels below each anomalous score, without a global sort
``evaluate``      ``evaluate_class``, ``evaluate_predictions`` (macro means), ``format_table``
``alignment``     TIR-FG and SCD (Eq. 23-24)

Everything is importable from ``ssvp.metrics`` as before.

Undefined metrics (the policy)
------------------------------
A metric is undefined when the data cannot define it: AUROC needs both classes; AP and
F1-max need at least one positive; AUPRO needs at least one anomalous and one normal
pixel. Single-metric functions (``auroc``, ``aupro``, ...) raise ``UndefinedMetricError``
(a ``MetricError``, itself a ``ValueError``) whose ``reason`` says why. Functions that
return several metrics (``image_metrics``, ``pixel_metrics``, ``evaluate_class``) return a
``MetricDict``: a plain ``dict`` of metric -> float where an undefined metric is
``float('nan')`` and ``MetricDict.undefined[key]`` holds the reason; NaN never appears
without a reason. ``evaluate_predictions`` averages each metric over the classes where
it is defined and reports the skipped classes. Bad input (shape mismatch, NaN scores,
non-binary labels or masks) raises ``MetricInputError`` naming the field.
"""
from __future__ import annotations

from .alignment import scd, tir_fg
from .common import (IMAGE_KEYS, METRIC_KEYS, PIXEL_KEYS, MetricDict, MetricError, MetricInputError,
                     UndefinedMetricError)
from .evaluate import evaluate_class, evaluate_predictions, format_table
from .image import auroc, average_precision, f1_max, image_metrics
from .pixel import aupro, aupro_thresholds, pixel_ap, pixel_auroc, pixel_metrics, smooth_maps

__all__ = [
    "METRIC_KEYS",
    "IMAGE_KEYS",
    "PIXEL_KEYS",
    "MetricError",
    "MetricInputError",
    "UndefinedMetricError",
    "MetricDict",
    "auroc",
    "average_precision",
    "f1_max",
    "image_metrics",
    "pixel_auroc",
    "pixel_ap",
    "aupro",
    "aupro_thresholds",
    "pixel_metrics",
    "smooth_maps",
    "evaluate_class",
    "evaluate_predictions",
    "format_table",
    "tir_fg",
    "scd",
]
