"""Decision thresholds for ``ssvp predict``: the F1-max operating points on the validation split.

``fit`` validates on held-out *source* categories every epoch; ``validation_thresholds``
turns that epoch's predictions into two thresholds, stored with the checkpoint
(``head.pt["thresholds"]``):

* ``image``: the image-score threshold t that maximises F1 over the pooled validation images
  (an image is anomalous when ``score >= t``, as in ``ssvp.metrics.f1_max``);
* ``pixel``: the same over the pooled validation pixels (maps smoothed as for the pixel
  metrics), at most ``MAX_PIXELS`` of them taken on a fixed stride (no random numbers).

In the zero-shot protocol these come from the source categories and are applied to unseen
target categories: a calibrated starting point, not a guarantee; ``ssvp predict
--threshold`` overrides them. A threshold is None when validation has a single label.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

MAX_PIXELS = 4_000_000


def validation_thresholds(preds: Mapping[str, Mapping[str, Any]], smoothing_sigma: float = 0.0) -> dict:
    """``{"image": t or None, "pixel": t or None, "image_f1": f, "pixel_f1": f, "n_images": n}``
    from ``ssvp.engine.predict_dataset``'s output (``{cls: {labels, scores, masks, maps}}``)."""
    from .metrics import f1_max, smooth_maps

    out: dict[str, Any] = {"image": None, "pixel": None, "image_f1": None, "pixel_f1": None,
                           "n_images": 0, "classes": sorted(preds)}
    if not preds:
        return out
    labels = np.concatenate([np.asarray(p["labels"]).ravel() for p in preds.values()])
    scores = np.concatenate([np.asarray(p["scores"], dtype=np.float64).ravel() for p in preds.values()])
    out["n_images"] = int(labels.size)
    if 0 < labels.sum() < labels.size:
        f1, t = f1_max(labels, scores, return_threshold=True)
        out["image"], out["image_f1"] = float(t), float(f1)
    masks = [np.asarray(p["masks"]) for p in preds.values()]
    maps = [np.asarray(smooth_maps(np.asarray(p["maps"], dtype=np.float32), smoothing_sigma))
            if smoothing_sigma > 0 else np.asarray(p["maps"]) for p in preds.values()]
    total = sum(m.size for m in masks)
    stride = max(1, math.ceil(total / MAX_PIXELS))
    px_labels = np.concatenate([m.ravel() for m in masks])[::stride] > 0
    px_scores = np.concatenate([m.ravel() for m in maps])[::stride].astype(np.float64)
    if 0 < px_labels.sum() < px_labels.size:
        f1, t = f1_max(px_labels, px_scores, return_threshold=True)
        out["pixel"], out["pixel_f1"] = float(t), float(f1)
    return out
