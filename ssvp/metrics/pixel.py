"""Pixel-level metrics: AUROC, AP, AUPRO (exact and the peers' 200-threshold variant).

Exactness
---------
* ``auroc``/``average_precision``/``f1_max`` and the pixel AUROC/AP are exact and treat
  tied scores as scikit-learn does (``roc_auc_score``, ``average_precision_score``,
  ``precision_recall_curve``): one operating point per distinct score.
* ``aupro`` is the exact area under the PRO-vs-FPR curve up to ``fpr_limit``, divided by
  ``fpr_limit``: the curve has one point per distinct score (PRO = mean over all
  ground-truth connected components of the fraction of the component at or above the
  threshold; FPR over all normal pixels), points are joined by straight lines, the curve
  is cut at ``fpr_limit`` by linear interpolation, and the trapezoid area is divided by
  the limit. This is the MVTec-AD definition (Bergmann et al.); no threshold grid.
* ``aupro_thresholds`` is the variant the peers' code uses (AnomalyCLIP, AdaCLIP and
  their April-GAN lineage): 200 thresholds ``np.arange(min, max, (max - min) / 200)``,
  a pixel counts as positive when ``score > threshold``, the points with FPR < 0.3 are
  kept, their FPRs are min-max rescaled to [0, 1] and the trapezoid area is taken.
  Differences to the exact value: (1) only 200 operating points (a coarse grid under
  the steep start of the curve where most of the area is decided), (2) the curve starts
  at the smallest FPR reached on the grid, not at FPR = 0, and ends at the last grid
  point below 0.3, not at 0.3, (3) the rescaling divides by (max kept FPR - min kept
  FPR) instead of 0.3, so the value is a normalised area over a slightly different
  interval. On smooth maps the two agree to about 1e-2; on noisy maps, or when the
  first grid points already exceed FPR 0.3 (all but few thresholds), they can differ
  by much more. bench/README.md records measured differences.

All of them read the counts that ``pixel_counts._prepare_pixels`` computes once.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from .common import PIXEL_KEYS, MetricDict, MetricInputError, UndefinedMetricError, _to_numpy
from .pixel_counts import _Pixels, _prepare_pixels


def _value_at_rank(px: _Pixels, r: int):
    """(value, True) of the normal score at ascending rank r when its bucket is flagged,
    else (bucket index, False): that bucket holds no anomalous score."""
    b = int(np.searchsorted(px.cum_incl, r, "right"))
    if not px.flagged[b]:
        return b, False
    return px.kth_in_bucket(b, r - int(px.cum_excl[b])), True


def _undefined_reason(px: _Pixels, metric: str) -> str | None:
    if px.n_pos == 0:
        return "no anomalous pixel in the masks"
    if px.n_neg == 0 and metric in ("pixel_auroc", "pixel_aupro"):
        return "no normal pixel in the masks"
    return None


def _pixel_auroc(px: _Pixels) -> float:
    twice_u = 2 * int(px.lt.sum()) + int((px.le - px.lt).sum())
    return twice_u / (2 * px.n_pos * px.n_neg)


def _pixel_ap(px: _Pixels) -> float:
    p, n = px.n_pos, px.n_neg
    first = np.r_[0, np.flatnonzero(np.diff(px.pos)) + 1]  # first index of each distinct score
    count = np.diff(np.r_[first, p])
    tp = p - first
    fp = (n - px.lt[first]) if n else np.zeros_like(tp)
    return float(np.sum(count / p * tp / (tp + fp)))


def _pixel_aupro(px: _Pixels, limit: float) -> float:
    n = px.n_neg
    x_lim = limit * n  # the cut, counted in normal pixels from the top
    k = int(math.floor(x_lim))
    frac = x_lim - k
    base = n - k  # normal pixels outside the top k (ascending order)
    lt_top = np.maximum(px.lt - base, 0).astype(np.float64)
    le_top = np.maximum(px.le - base, 0).astype(np.float64)
    # (1/N) sum over top-k normal pixels of (W(>v) + W(>=v)) / 2, as sum over anomalous pixels
    area = 0.5 * (float(np.dot(px.w, lt_top)) + float(np.dot(px.w, le_top)))
    # the tie group of normal pixels that the cut runs through: value u, g members, a above
    d = math.ceil(x_lim) - 1
    if d >= 0:
        u, exact = _value_at_rank(px, n - 1 - d)
        if exact:
            lt_u, le_u = px.count_lt_le(np.array([u], np.float32))
            g = int(le_u[0] - lt_u[0])
            a = n - int(le_u[0])
            delta = x_lim - a  # in (0, g]
            wg, we = px.w_gt(u), px.w_ge(u)
            area += frac * 0.5 * (wg + we)  # the partial normal pixel, at its group's mean height
            area += delta * (we - wg) * (delta / g - 1.0) * 0.5  # linear interpolation inside the group
        else:  # no anomalous score in u's bucket: PRO is flat there, W(>u) = W(>=u)
            i = int(np.searchsorted(px.bpos, u, "right"))
            area += frac * float(px.cw[-1] - (px.cw[i - 1] if i > 0 else 0.0))
    return area / n / limit


# ---------------------------------------------------------------- pixel metrics API
def _check_limit(limit: float) -> float:
    limit = float(limit)
    if not 0.0 < limit <= 1.0:
        raise MetricInputError(f"aupro_limit / fpr_limit: expected a value in (0, 1], got {limit}")
    return limit


def pixel_auroc(masks: Any, maps: Any, n_threads: int | None = None) -> float:
    """Exact pixel AUROC over all pixels of all maps (ties count 1/2)."""
    px = _prepare_pixels(masks, maps, n_threads=n_threads)
    reason = _undefined_reason(px, "pixel_auroc")
    if reason:
        raise UndefinedMetricError("pixel_auroc", reason)
    return _pixel_auroc(px)


def pixel_ap(masks: Any, maps: Any, n_threads: int | None = None) -> float:
    """Exact pixel AP (as ``sklearn.metrics.average_precision_score`` on all pixels)."""
    px = _prepare_pixels(masks, maps, n_threads=n_threads)
    reason = _undefined_reason(px, "pixel_ap")
    if reason:
        raise UndefinedMetricError("pixel_ap", reason)
    return _pixel_ap(px)


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3, connectivity: int = 2,
          n_threads: int | None = None) -> float:
    """Exact normalised AUPRO: area under PRO(FPR) on [0, fpr_limit] divided by fpr_limit.

    masks: [B,H,W] binary ground truth (bool or 0/1; also [H,W], [B,1,H,W], tensors, or a
    list of [H,W] arrays of differing sizes). maps: anomaly scores of the same shape.
    Regions are the connected components of each mask (``connectivity`` 2 = 8-neighbour,
    1 = 4-neighbour); PRO averages over all regions of all images.
    Raises ``UndefinedMetricError`` without anomalous or without normal pixels.
    """
    limit = _check_limit(fpr_limit)
    px = _prepare_pixels(masks, maps, connectivity=connectivity, n_threads=n_threads, top_fraction=limit)
    reason = _undefined_reason(px, "pixel_aupro")
    if reason:
        raise UndefinedMetricError("pixel_aupro", reason)
    return _pixel_aupro(px, limit)


def aupro_thresholds(masks: Any, maps: Any, n_thresholds: int = 200, fpr_limit: float = 0.3,
                     connectivity: int = 2, n_threads: int | None = None) -> float:
    """AUPRO as the peers' code computes it (AnomalyCLIP / AdaCLIP ``cal_pro_score``).

    Thresholds ``np.arange(min, max, (max - min) / n_thresholds)`` in the maps' float32;
    a pixel is predicted anomalous when ``score > threshold``; PRO = mean over all regions
    of the covered fraction, FPR over all normal pixels; keep points with FPR < fpr_limit,
    min-max rescale their FPR to [0, 1] and integrate PRO with the trapezoid rule.
    Vectorised (same numbers as the per-threshold region loop, far faster). See the module
    docstring for how it differs from the exact ``aupro``.
    """
    limit = _check_limit(fpr_limit)
    if int(n_thresholds) < 2:
        raise MetricInputError(f"n_thresholds: expected >= 2, got {n_thresholds}")
    grid = {}

    def thresholds(lo, hi):  # as the peers: float32 np.arange(min, max, (max - min) / n)
        delta = (hi - lo) / np.float32(n_thresholds)
        grid["ths"] = np.arange(lo, hi, delta) if delta > 0 else np.zeros(0, np.float32)
        return grid["ths"]

    px = _prepare_pixels(masks, maps, connectivity=connectivity, n_threads=n_threads, with_counts=False,
                         probes=thresholds)
    reason = _undefined_reason(px, "pixel_aupro")
    if reason:
        raise UndefinedMetricError("pixel_aupro", reason)
    ths = grid["ths"]
    if ths.size == 0:
        raise UndefinedMetricError("pixel_aupro", "all scores are equal: the threshold grid is empty")
    _, le = px.count_lt_le(ths.astype(np.float32))
    fpr = (px.n_neg - le) / px.n_neg  # score > th
    i = np.searchsorted(px.pos, ths, "right")
    pro = px.cw[-1] - np.where(i > 0, px.cw[np.maximum(i - 1, 0)], 0.0)
    keep = fpr < limit
    if keep.sum() < 2:
        raise UndefinedMetricError("pixel_aupro", f"fewer than 2 of the {ths.size} thresholds reach FPR < {limit}")
    f, p = fpr[keep], pro[keep]
    span = f.max() - f.min()
    if span == 0:
        raise UndefinedMetricError("pixel_aupro", f"all kept thresholds have the same FPR {f[0]}")
    f = (f - f.min()) / span
    return float(abs(np.trapezoid(p, f)))  # f decreases along the grid: take |area| (sklearn.auc)


def pixel_metrics(masks: Any, maps: Any, aupro_limit: float = 0.3, smoothing_sigma: float = 0.0,
                  connectivity: int = 2, n_threads: int | None = None,
                  metrics: Iterable[str] = PIXEL_KEYS) -> MetricDict:
    """``{"pixel_auroc", "pixel_aupro", "pixel_ap"}`` from one shared preparation.

    ``smoothing_sigma > 0`` first smooths the maps (``smooth_maps``). Undefined metrics
    are NaN with their reason in ``.undefined``.
    """
    metrics = tuple(metrics)
    for k in metrics:
        if k not in PIXEL_KEYS:
            raise MetricInputError(f"metrics: unknown pixel metric {k!r}; expected some of {PIXEL_KEYS}")
    limit = _check_limit(aupro_limit)
    if smoothing_sigma and smoothing_sigma > 0:
        maps = smooth_maps(maps, smoothing_sigma)
    only_aupro = set(metrics) == {"pixel_aupro"}
    px = _prepare_pixels(masks, maps, connectivity=connectivity, n_threads=n_threads,
                         top_fraction=limit if only_aupro else None)
    out = MetricDict()
    fns = {"pixel_auroc": _pixel_auroc, "pixel_ap": _pixel_ap,
           "pixel_aupro": lambda p: _pixel_aupro(p, limit)}
    for key in metrics:
        reason = _undefined_reason(px, key)
        if reason:
            out[key] = float("nan")
            out.undefined[key] = reason
        else:
            out[key] = float(fns[key](px))
    return out


# ---------------------------------------------------------------------- smoothing
def smooth_maps(maps: Any, sigma: float = 4.0, truncate: float = 4.0):
    """Gaussian smoothing of each map over its last two axes, as the peers do.

    numpy input: ``scipy.ndimage.gaussian_filter`` with sigma (0, ..., sigma, sigma),
    mode 'reflect', returns float32. torch input: the same separable kernel as a
    convolution on the tensor's device (returns a tensor), with scipy's 'reflect'
    (half-sample symmetric) border; maps smaller than the kernel radius fall back to scipy.
    ``sigma <= 0`` returns the input unchanged.
    """
    if sigma is None or sigma <= 0:
        return maps
    if isinstance(maps, (list, tuple)):  # maps of differing sizes
        return [smooth_maps(m, sigma, truncate) for m in maps]
    radius = int(truncate * float(sigma) + 0.5)
    if hasattr(maps, "detach") and hasattr(maps, "cpu"):
        import torch

        t = maps
        if t.ndim < 2:
            raise MetricInputError(f"maps: expected [..., H, W], got shape {tuple(t.shape)}")
        h, w = t.shape[-2:]
        if radius >= h or radius >= w:
            out = smooth_maps(t.detach().cpu().float().numpy(), sigma, truncate)
            return torch.from_numpy(out).to(t.device)
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (x / float(sigma)) ** 2)
        k = (k / k.sum()).to(device=t.device, dtype=torch.float32)
        lead = t.shape[:-2]
        y = t.detach().float().reshape(-1, 1, h, w)
        y = torch.cat([y[..., :radius].flip(-1), y, y[..., -radius:].flip(-1)], dim=-1)
        y = torch.nn.functional.conv2d(y, k.view(1, 1, 1, -1))
        y = torch.cat([y[..., :radius, :].flip(-2), y, y[..., -radius:, :].flip(-2)], dim=-2)
        y = torch.nn.functional.conv2d(y, k.view(1, 1, -1, 1))
        return y.reshape(*lead, h, w)
    from scipy import ndimage

    a = _to_numpy(maps, "maps").astype(np.float32, copy=False)
    if a.ndim < 2:
        raise MetricInputError(f"maps: expected [..., H, W], got shape {a.shape}")
    sig = (0.0,) * (a.ndim - 2) + (float(sigma), float(sigma))
    return ndimage.gaussian_filter(a, sigma=sig, mode="reflect", truncate=truncate).astype(np.float32, copy=False)
