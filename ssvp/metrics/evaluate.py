"""All metrics of a class, macro means over classes (Tables 1-2), and table printing."""
from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence

import numpy as np

from .common import METRIC_KEYS, MetricDict, MetricInputError, _to_numpy
from .image import image_metrics
from .pixel import pixel_metrics
from .pixel_counts import _as_stack


# --------------------------------------------------------------------- evaluation
def evaluate_class(labels: Any = None, scores: Any = None, masks: Any = None, maps: Any = None, *,
                   smoothing_sigma: float = 0.0, aupro_limit: float = 0.3, connectivity: int = 2,
                   n_threads: int | None = None) -> MetricDict:
    """All metrics of one class. Image metrics need ``scores`` (labels default to
    ``mask.any()`` per image when masks are given); pixel metrics need ``masks`` and
    ``maps``. Metrics whose inputs are missing are left out; undefined ones are NaN with
    the reason in ``.undefined``.

    Eight parameters on purpose: four optional arrays (any subset) and ``pixel_metrics``' own four
    keywords, passed through unchanged and repeated by ``evaluate_predictions``; this is the public
    per-class entry point (``ssvp.metrics``, docs/ARCHITECTURE.md), so an options object would make
    every caller build one to change one pixel-metric setting.
    """
    out = MetricDict()
    if labels is None and masks is not None and scores is not None:
        m = _as_stack(masks, "masks", True)
        labels = np.array([bool(x.any()) for x in m])
    if scores is not None:
        if labels is None:
            raise MetricInputError("labels: missing (needed with scores when no masks are given)")
        r = image_metrics(labels, scores)
        out.update(r)
        out.undefined.update(r.undefined)
    if (masks is None) != (maps is None):
        raise MetricInputError("masks and maps: give both or neither (pixel metrics need both)")
    if masks is not None:
        if scores is not None and len(_to_numpy(scores, "scores").reshape(-1)) != _n_images(masks):
            raise MetricInputError(f"scores ({len(_to_numpy(scores, 'scores').reshape(-1))}) and masks "
                                   f"({_n_images(masks)} images) differ in count")
        r = pixel_metrics(masks, maps, aupro_limit=aupro_limit, smoothing_sigma=smoothing_sigma,
                          connectivity=connectivity, n_threads=n_threads)
        out.update(r)
        out.undefined.update(r.undefined)
    return out


def _n_images(x: Any) -> int:
    if isinstance(x, (list, tuple)):
        return len(x)
    shape = tuple(getattr(x, "shape", np.shape(x)))
    return 1 if len(shape) == 2 else int(shape[0])


def evaluate_predictions(per_class: Mapping[str, Mapping[str, Any]], smoothing_sigma: float = 0.0,
                         aupro_limit: float = 0.3, connectivity: int = 2,
                         n_threads: int | None = None) -> dict:
    """Per-class metrics and their macro mean, as in the paper's Tables 1-2.

    per_class: ``{cls: {"labels": [B], "scores": [B], "masks": [B,H,W], "maps": [B,H,W]}}``
    (any subset that ``evaluate_class`` accepts). Returns::

        {"per_class": {cls: {metric: float}},      # NaN only where "undefined" says why
         "mean":      {metric: float},             # over the classes where it is defined
         "undefined": {cls: {metric: reason}},     # only classes with undefined metrics
         "skipped":   {metric: [cls, ...]},        # classes left out of each mean
         "n_classes": {metric: int}}               # classes each mean averages
    """
    if not isinstance(per_class, Mapping) or not per_class:
        raise MetricInputError("per_class: expected a non-empty mapping class -> arrays")
    allowed = {"labels", "scores", "masks", "maps"}
    result: dict = {"per_class": {}, "mean": {}, "undefined": {}, "skipped": {}, "n_classes": {}}
    for cls, arrays in per_class.items():
        if not isinstance(arrays, Mapping):
            raise MetricInputError(f"per_class[{cls!r}]: expected a mapping with {sorted(allowed)}")
        extra = set(arrays) - allowed
        if extra:
            raise MetricInputError(f"per_class[{cls!r}]: unknown field(s) {sorted(extra)}; expected {sorted(allowed)}")
        try:
            r = evaluate_class(arrays.get("labels"), arrays.get("scores"), arrays.get("masks"), arrays.get("maps"),
                               smoothing_sigma=smoothing_sigma, aupro_limit=aupro_limit,
                               connectivity=connectivity, n_threads=n_threads)
        except MetricInputError as exc:
            raise MetricInputError(f"per_class[{cls!r}]: {exc}") from exc
        result["per_class"][cls] = dict(r)
        if r.undefined:
            result["undefined"][cls] = dict(r.undefined)
    keys = [k for k in METRIC_KEYS if any(k in r for r in result["per_class"].values())]
    for k in keys:
        vals, skipped = [], []
        for cls, r in result["per_class"].items():
            if k not in r:
                continue
            if math.isnan(r[k]):
                skipped.append(cls)
            else:
                vals.append(r[k])
        result["mean"][k] = float(np.mean(vals)) if vals else float("nan")
        result["n_classes"][k] = len(vals)
        if skipped:
            result["skipped"][k] = skipped
        if not vals:
            result["undefined"].setdefault("mean", {})[k] = "undefined in every class"
    return result


def format_table(result: Mapping[str, Any], fmt: str = "markdown", percent: bool = True, decimals: int = 1,
                 metrics: Sequence[str] | None = None, class_header: str = "class") -> str:
    """Per-class rows plus a ``mean`` row from ``evaluate_predictions``' result.

    fmt: "markdown" or "csv". ``percent`` multiplies by 100 (the paper's tables).
    Undefined cells read ``n/a`` (markdown) or are empty (csv); markdown adds a note
    naming the classes each mean skipped.
    """
    if fmt not in ("markdown", "csv"):
        raise MetricInputError(f"fmt: expected 'markdown' or 'csv', got {fmt!r}")
    per_class = result.get("per_class")
    if not isinstance(per_class, Mapping):
        raise MetricInputError("result: expected the dict returned by evaluate_predictions (no 'per_class')")
    if metrics is None:
        metrics = [k for k in METRIC_KEYS if k in result.get("mean", {})]
    scale = 100.0 if percent else 1.0
    rows = [(str(c), r) for c, r in per_class.items()] + [("mean", result.get("mean", {}))]

    def cell(v, empty):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return empty
        return f"{v * scale:.{decimals}f}"

    if fmt == "csv":
        import csv

        buf = io.StringIO()
        wr = csv.writer(buf, lineterminator="\n")
        wr.writerow([class_header, *metrics])
        for name, r in rows:
            wr.writerow([name, *(cell(r.get(k), "") for k in metrics)])
        return buf.getvalue()
    lines = ["| " + " | ".join([class_header, *metrics]) + " |",
             "|" + "|".join(["---"] + ["---:"] * len(metrics)) + "|"]
    for name, r in rows:
        name_cell = f"**{name}**" if name == "mean" else name
        lines.append("| " + " | ".join([name_cell, *(cell(r.get(k), "n/a") for k in metrics)]) + " |")
    notes = [f"{k}: mean over {result.get('n_classes', {}).get(k, '?')} classes, skipped {', '.join(map(str, v))}"
             for k, v in result.get("skipped", {}).items() if k in metrics]
    if notes:
        lines.append("")
        lines.extend(f"- {n}" for n in notes)
    return "\n".join(lines) + "\n"
