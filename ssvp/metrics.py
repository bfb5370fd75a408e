"""Evaluation metrics of SSVP (paper §4.1, Tables 1-2; TIR-FG and SCD, Eq. 23-24).

Image level: AUROC, F1-max, AP.  Pixel level: AUROC, AUPRO (FPR limit 0.3), AP.
Every value is a fraction in [0, 1]; table printers (``format_table``) multiply by 100.
Keys: ``image_auroc, image_f1max, image_ap, pixel_auroc, pixel_aupro, pixel_ap``.

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

Algorithm (why it is fast)
--------------------------
All pixel metrics come from one preparation (``_prepare_pixels``), two threaded passes
over chunks of images. Pass 1 validates the maps, finds their range and collects the
anomalous pixels (a few percent) with their PRO weights ``1 / (|region| * n_regions)``
from ``scipy.ndimage.label`` on each mask's bounding box (8-connectivity by default, as
``skimage.measure.label`` and the MVTec code); they are sorted once. Pass 2 never sorts
the normal pixels: it histograms them into up to 2^22 equal-width score buckets
(``np.bincount``) and keeps, for an exact sort, only the normal pixels whose bucket also
holds an anomalous score (typically a few percent). The bucket index
``floor((x - lo) * scale)`` is computed in float32 alike for every array, so it is
monotone in x, and the histogram's prefix sums plus ``searchsorted`` inside the kept
buckets give, exactly, how many normal pixels score below / at most as high as each
anomalous pixel (the kept scores are sorted in one piece per thread; each piece records
where each bucket starts, so no per-pixel bucket index is stored). ``aupro`` alone needs
exact counts only above the FPR limit: it also skips the buckets below the sample
quantile of the top ``limit + 5 %`` normal scores (checked against the histogram; on a
miss it redoes the pass in full), which leaves about a third of the sort. From those
counts:

* AUROC = (sum_p #neg<s_p + 0.5 #neg==s_p) / (P N)            (Mann-Whitney form)
* AP    = sum over distinct anomalous scores t of (n_t / P) * TP(>=t) / (TP(>=t)+FP(>=t))
* AUPRO = (1/N) sum over the top ``limit*N`` normal pixels of (W(>v) + W(>=v)) / 2,
  where W(>v) is the PRO reached above score v (the trapezoid of the segment a normal
  pixel adds to the curve); the sum is re-ordered into
  sum_p w_p * #(top normal pixels below s_p), so only counts are needed. The tie group
  that the FPR limit cuts through gets the exact linear-interpolation correction; when
  its bucket holds no anomalous score, PRO is flat there and no exact value is needed.

No per-threshold loop and no global sort: ~20 array passes over the pixels in total,
against ~3 per threshold (600 for 200 thresholds) plus a region loop per threshold in
the peers' code. Figures: bench/bench_metrics.py, bench/README.md.

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

import io
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

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


# --------------------------------------------------------------------- pixel inputs
def _as_stack(x: Any, name: str, is_mask: bool) -> np.ndarray | list[np.ndarray]:
    """[B,H,W] array (also [H,W], [B,1,H,W], tensors) or a list of [H,W] arrays."""
    if isinstance(x, (list, tuple)):
        items = [_to_numpy(a, f"{name}[{i}]") for i, a in enumerate(x)]
        items = [a[0] if a.ndim == 3 and a.shape[0] == 1 else a for a in items]
        for i, a in enumerate(items):
            if a.ndim != 2:
                raise MetricInputError(f"{name}[{i}]: expected a 2-D map, got shape {a.shape}")
        if not items:
            raise MetricInputError(f"{name}: empty")
        if len({a.shape for a in items}) == 1:
            x = np.stack(items)
        else:
            return [_check_values(a, f"{name}[{i}]", is_mask) for i, a in enumerate(items)]
    a = _to_numpy(x, name)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise MetricInputError(f"{name}: expected [B,H,W] (or [H,W], [B,1,H,W]), got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0 or a.shape[2] == 0:
        raise MetricInputError(f"{name}: empty, shape {a.shape}")
    return _check_values(a, name, is_mask)


def _check_values(a: np.ndarray, name: str, is_mask: bool) -> np.ndarray:
    if is_mask:
        if a.dtype == bool:
            return a
        if not np.issubdtype(a.dtype, np.number):
            raise MetricInputError(f"{name}: expected a binary mask, got dtype {a.dtype}")
        lo, hi = a.min(), a.max()
        if lo < 0 or hi > 1:
            raise MetricInputError(f"{name}: mask values must be in [0, 1] (0/1 or bool), found range [{lo}, {hi}]")
        return a > 0.5
    if not np.issubdtype(a.dtype, np.number) or a.dtype == bool:
        raise MetricInputError(f"{name}: expected real-valued anomaly maps, got dtype {a.dtype}")
    return np.asarray(a, dtype=np.float32)  # no copy when already float32


def _pair(masks: Any, maps: Any):
    m = _as_stack(masks, "masks", True)
    s = _as_stack(maps, "maps", False)
    if isinstance(m, np.ndarray) and isinstance(s, np.ndarray):
        if m.shape != s.shape:
            raise MetricInputError(f"masks {m.shape} and maps {s.shape} differ in shape")
        return m, s
    m_list = list(m) if isinstance(m, np.ndarray) else m
    s_list = list(s) if isinstance(s, np.ndarray) else s
    if len(m_list) != len(s_list):
        raise MetricInputError(f"masks ({len(m_list)} images) and maps ({len(s_list)} images) differ in count")
    for i, (a, b) in enumerate(zip(m_list, s_list)):
        if a.shape != b.shape:
            raise MetricInputError(f"masks[{i}] {a.shape} and maps[{i}] {b.shape} differ in shape")
    return m_list, s_list


def _n_threads(n_threads: int | None) -> int:
    if n_threads is None:
        n_threads = min(os.cpu_count() or 1, 8)
    return max(1, int(n_threads))


@dataclass
class _Pixels:
    """Everything the pixel metrics need, from two passes over the maps.

    Normal-pixel scores are never sorted as a whole: a histogram over ``n_buckets``
    equal-width score buckets counts them, and only the normal pixels that fall into a
    bucket holding an anomalous score (or a probe value such as a grid threshold) are kept
    and sorted (``sub``). The bucket index ``floor((x - lo) * scale)`` is computed in
    float32 for every array alike, so it is monotone in x and counts stay exact.
    """

    pos: np.ndarray  # float32 scores of anomalous pixels, ascending
    w: np.ndarray  # float64 PRO weight of each anomalous pixel: 1 / (|region| * n_regions)
    cw: np.ndarray  # cumulative sum of w
    n_neg: int
    n_regions: int
    lo: np.float32 = np.float32(0)
    scale: np.float32 = np.float32(0)
    n_buckets: int = 1
    cum_excl: np.ndarray | None = None  # int64 [n_buckets]: # normal pixels in lower buckets
    cum_incl: np.ndarray | None = None
    flagged: np.ndarray | None = None  # bool [n_buckets]: bucket's normal pixels are in `subs`
    subs: list | None = None  # sorted float32 pieces (one per thread) of the flagged buckets' normal scores
    starts: list | None = None  # per piece, int64 [n_buckets + 1]: index in the piece where bucket b starts
    threads: int = 1
    exact_from: int = 0  # counts are exact for values in buckets >= exact_from (see _prepare_pixels)
    bpos: np.ndarray | None = None  # bucket index of each anomalous pixel (non-decreasing)
    lt: np.ndarray | None = None  # int64: # normal pixels with score <  pos[i]
    le: np.ndarray | None = None  # int64: # normal pixels with score <= pos[i]

    @property
    def n_pos(self) -> int:
        return int(self.pos.size)

    def bucket(self, x: np.ndarray) -> np.ndarray:
        if self.n_buckets == 1:
            return np.zeros(np.shape(x), np.intp)
        f = (np.asarray(x, np.float32) - self.lo) * self.scale
        return np.clip(f, 0, self.n_buckets - 1).astype(np.intp)  # monotone in x

    def count_lt_le(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """# normal pixels < and <= each value; exact for values in flagged buckets, for
        values in buckets holding no normal pixel and for values outside [lo, hi] (the
        top bucket is always empty, see ``scale``). In the other buckets (below
        ``exact_from``) both counts are those of the lower buckets."""
        values = np.asarray(values, np.float32)
        b = self.bucket(values)

        def piece(k):
            # bucket() is monotone, so the kept scores of lower (higher) buckets are all
            # below (above) a value: its position in the piece minus its bucket's start
            # counts the kept scores of its own bucket below it
            sub, first = self.subs[k], self.starts[k][b]
            left = np.searchsorted(sub, values, "left")
            right = left.copy()  # '<=' differs from '<' only where a normal score equals the value
            tie = left < sub.size
            tie[tie] = sub[left[tie]] == values[tie]
            if tie.any():
                right[tie] = np.searchsorted(sub, values[tie], "right")
            return left - first, right - first

        parts = _run(piece, list(range(len(self.subs))), self.threads)
        lt = self.cum_excl[b].astype(np.int64)
        le = lt.copy()
        for a, c in parts:
            lt += a
            le += c
        return lt, le

    def kth_in_bucket(self, b: int, r: int) -> float:
        """The r-th smallest (0-based) normal score of flagged bucket b, found by bisection
        on each piece's sorted run of that bucket: no copy, no sort."""
        segs = [sub[st[b]:st[b + 1]] for sub, st in zip(self.subs, self.starts)]

        def rank_gt(x) -> int:  # scores of the bucket that are <= x
            return sum(int(np.searchsorted(q, x, "right")) for q in segs)

        for seg in segs:
            lo_i, hi_i = 0, seg.size
            while lo_i < hi_i:  # first index whose value has more than r scores <= it
                mid = (lo_i + hi_i) // 2
                if rank_gt(seg[mid]) > r:
                    hi_i = mid
                else:
                    lo_i = mid + 1
            if lo_i < seg.size:
                x = seg[lo_i]
                if sum(int(np.searchsorted(q, x, "left")) for q in segs) <= r:
                    return float(x)
        raise AssertionError(f"rank {r} outside bucket {b}")  # unreachable: r < the bucket's count

    def w_ge(self, v: float) -> float:  # PRO reached at threshold score >= v
        i = int(np.searchsorted(self.pos, np.float32(v), "left"))
        return float(self.cw[-1] - (self.cw[i - 1] if i > 0 else 0.0))

    def w_gt(self, v: float) -> float:  # PRO reached at threshold score > v
        i = int(np.searchsorted(self.pos, np.float32(v), "right"))
        return float(self.cw[-1] - (self.cw[i - 1] if i > 0 else 0.0))


def _run(fn, items: list, threads: int) -> list:
    """``[fn(x) for x in items]`` on up to ``threads`` threads (numpy releases the GIL)."""
    if len(items) <= 1 or threads <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(threads, len(items))) as ex:
        return list(ex.map(fn, items))


def _region_structure(connectivity: int) -> np.ndarray:
    from scipy import ndimage

    if connectivity not in (1, 2):
        raise MetricInputError(f"connectivity: expected 1 (4-neighbour) or 2 (8-neighbour), got {connectivity}")
    return ndimage.generate_binary_structure(2, connectivity)


_CHUNK_PIXELS = 1 << 24  # pixels per work item: bounds the temporaries (~0.3 GB per thread)
_DENSE_FRACTION = 0.8  # above this share of normal pixels in flagged buckets: sort them all
_TOP_MARGIN = 0.05  # top_fraction: also sort this share of normal pixels below the sample's quantile


def _prepare_pixels(masks: Any, maps: Any, connectivity: int = 2, n_threads: int | None = None,
                    with_counts: bool = True, probes=None, top_fraction: float | None = None) -> _Pixels:
    """Two threaded passes over image chunks. ``probes(lo, hi) -> float32 array`` names
    extra values whose counts must be exact (their buckets get refined too).
    ``top_fraction``: only values at or above the normal score of descending rank
    ``floor(top_fraction * n_neg)`` need exact counts (AUPRO alone); lower buckets are
    not sorted, and counts there are those of the lower buckets (see ``count_lt_le``)."""
    from scipy import ndimage

    m, s = _pair(masks, maps)
    structure = _region_structure(connectivity)
    n_img = len(m)
    sizes = np.array([x.size for x in m], np.int64)
    n_px = int(sizes.sum())
    threads = _n_threads(n_threads)
    n_chunks = int(min(n_img, max(threads, -(-n_px // _CHUNK_PIXELS))))
    bounds = np.searchsorted(np.cumsum(sizes), np.linspace(0, n_px, n_chunks + 1)[1:-1])
    ranges = [(int(a), int(b)) for a, b in zip(np.r_[0, bounds], np.r_[bounds, n_img]) if b > a]

    def normal_scores(a, b):
        if isinstance(m, np.ndarray):
            return s[a:b][~m[a:b]]
        return np.concatenate([s[i][~m[i]] for i in range(a, b)])

    def pass1(r):  # validate, range, anomalous pixels with their region weights
        a, b = r
        mk, sk = m[a:b], s[a:b]  # array slices or list slices
        lo, hi = np.float32(np.inf), np.float32(-np.inf)
        pos_s, pos_w, n_reg = [], [], 0
        for i in range(b - a):
            mi, si = mk[i], sk[i]
            lo_i, hi_i = si.min(), si.max()  # NaN and +-inf show up here
            if not (np.isfinite(lo_i) and np.isfinite(hi_i)):
                y, x = np.argwhere(~np.isfinite(si))[0]
                raise MetricInputError(f"maps: non-finite value at image {a + i}, pixel ({y}, {x})")
            lo, hi = min(lo, lo_i), max(hi, hi_i)
            rows = np.flatnonzero(mi.any(axis=1))
            if rows.size == 0:
                continue
            cols = np.flatnonzero(mi.any(axis=0))
            box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            mb = mi[box]
            lab, n = ndimage.label(mb, structure=structure)  # labelling the box is enough
            lab_p = lab[mb]
            size = np.bincount(lab_p)
            pos_s.append(si[box][mb])
            pos_w.append(1.0 / size[lab_p])
            n_reg += n
        return lo, hi, pos_s, pos_w, n_reg

    r1 = _run(pass1, ranges, threads)
    lo = np.float32(min(r[0] for r in r1))
    hi = np.float32(max(r[1] for r in r1))
    pos_s = [x for r in r1 for x in r[2]]
    pos_w = [x for r in r1 for x in r[3]]
    n_regions = sum(r[4] for r in r1)
    pos = np.concatenate(pos_s).astype(np.float32, copy=False) if pos_s else np.zeros(0, np.float32)
    w = np.concatenate(pos_w) if pos_w else np.zeros(0, np.float64)
    if n_regions:
        w = w / n_regions
    order = np.argsort(pos)  # the order inside tie groups does not matter
    pos, w = pos[order], w[order]
    px = _Pixels(pos=pos, w=w, cw=np.cumsum(w), n_neg=0, n_regions=n_regions)

    # bucket layout: about one bucket per 2 pixels, at most 2^22 (a 32 MB histogram)
    n_buckets = int(min(1 << 22, max(1 << 8, 1 << int(np.ceil(np.log2(max(n_px, 2) / 2))))))
    sample = None
    if n_buckets > 1 and n_px > (1 << 18):  # every k-th row and column: ~2^18 pixels
        k = max(1, int(math.sqrt(n_px / (1 << 18))))
        if isinstance(m, np.ndarray):
            sample = s[:, ::k, ::k][~m[:, ::k, ::k]]
        else:
            sample = np.concatenate([si[::k, ::k][~mi[::k, ::k]] for mi, si in zip(m, s)])
    base, exact_from = lo, 0
    if top_fraction is not None and sample is not None and sample.size:
        # Only the top `top_fraction` of the normal scores need exact counts (AUPRO): the
        # buckets start at the sample's quantile a margin below, and bucket 0 takes every
        # lower score; checked after the histogram.
        q = np.float32(np.quantile(sample, max(0.0, 1.0 - top_fraction - _TOP_MARGIN)))
        if lo < q < hi:
            base, exact_from = q, 1
    px.lo, px.n_buckets = base, n_buckets
    # (n_buckets - 2) keeps float32 rounding of (hi - base) * scale below n_buckets
    px.scale = np.float32((n_buckets - 2) / float(hi - base)) if hi > base else np.float32(0)
    flagged = np.zeros(n_buckets, bool)
    flagged[px.bucket(pos)] = True
    probe_values = np.asarray(probes(lo, hi), np.float32) if probes is not None else None
    if probe_values is not None:
        flagged[px.bucket(probe_values)] = True
    flagged[:exact_from] = False
    # Dense anomalous scores flag most buckets: then the histogram saves nothing and one
    # bucket (a plain sort of the normal scores) is cheaper. Decide on the sample.
    if exact_from == 0 and sample is not None and sample.size and flagged[px.bucket(sample)].mean() > _DENSE_FRACTION:
        n_buckets = px.n_buckets = 1
        px.scale = np.float32(0)
        flagged = np.ones(1, bool)
    px.bpos = px.bucket(pos)

    n_pieces = max(1, min(threads, len(ranges)))  # one sorted piece per thread
    groups = [g.tolist() for g in np.array_split(np.arange(len(ranges)), n_pieces)]
    piece_of = {c: gi for gi, g in enumerate(groups) for c in g}
    hists = [np.zeros(n_buckets, np.int64) for _ in groups]  # normal pixels per bucket and piece
    locks = [threading.Lock() for _ in groups]

    def pass2(c):  # histogram of normal scores; keep those in flagged buckets
        neg = normal_scores(*ranges[c])
        if n_buckets == 1:
            with locks[piece_of[c]]:
                hists[piece_of[c]][0] += neg.size
            return neg
        f = neg - px.lo
        f *= px.scale
        if exact_from:
            np.maximum(f, 0, out=f)  # scores below the base go to bucket 0
        b = f.astype(np.intp)  # == px.bucket(neg): the scores lie in [lo, hi]
        del f
        h = np.bincount(b, minlength=n_buckets)
        keep = neg[flagged[b]]
        with locks[piece_of[c]]:
            hists[piece_of[c]] += h
        return keep

    keeps = _run(pass2, list(range(len(ranges))), threads)
    hist = np.sum(hists, axis=0)
    px.cum_incl = np.cumsum(hist)
    px.cum_excl = px.cum_incl - hist
    px.n_neg = int(px.cum_incl[-1])
    if exact_from and px.cum_excl[exact_from] > px.n_neg - math.floor(top_fraction * px.n_neg) - 1:
        # the sample missed: the top scores reach below the skipped buckets; redo in full
        return _prepare_pixels(masks, maps, connectivity, n_threads, with_counts, probes, None)

    def sort_piece(gi):
        idx = groups[gi]
        if len(idx) == 1:
            a = keeps[idx[0]]  # the chunk's own copy of its scores
        else:
            a = np.concatenate([keeps[i] for i in idx]) if len(idx) else np.zeros(0, np.float32)
        for i in idx:
            keeps[i] = None  # free the chunk copies as soon as they are merged
        a.sort()
        return a

    px.subs = _run(sort_piece, list(range(len(groups))), threads)
    del keeps
    px.starts = [np.r_[0, np.cumsum(np.where(flagged, h, 0))] for h in hists]
    px.flagged, px.threads, px.exact_from = flagged, threads, exact_from
    if with_counts and px.n_pos and px.n_neg:
        px.lt, px.le = px.count_lt_le(px.pos)
    return px


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


# --------------------------------------------------------------------- evaluation
def evaluate_class(labels: Any = None, scores: Any = None, masks: Any = None, maps: Any = None, *,
                   smoothing_sigma: float = 0.0, aupro_limit: float = 0.3, connectivity: int = 2,
                   n_threads: int | None = None) -> MetricDict:
    """All metrics of one class. Image metrics need ``scores`` (labels default to
    ``mask.any()`` per image when masks are given); pixel metrics need ``masks`` and
    ``maps``. Metrics whose inputs are missing are left out; undefined ones are NaN with
    the reason in ``.undefined``.
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


# ---------------------------------------------------------- TIR-FG and SCD (Eq. 23-24)
def _unit(x: np.ndarray, name: str) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    if (n == 0).any():
        raise MetricInputError(f"{name}: contains a zero vector (cosine similarity undefined)")
    return x / n


def _text_pairs(t: Any, name: str, b: int | None, d: int | None) -> np.ndarray:
    a = _to_numpy(t, name).astype(np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[1] != 2:
        raise MetricInputError(f"{name}: expected [2, D] or [B, 2, D] (normal, abnormal), got shape {a.shape}")
    if d is not None and a.shape[2] != d:
        raise MetricInputError(f"{name}: feature size {a.shape[2]} differs from the visual features' {d}")
    if b is not None and a.shape[0] not in (1, b):
        raise MetricInputError(f"{name}: batch {a.shape[0]} differs from {b}")
    return _unit(a, name)


def tir_fg(t_init: Any, t_final: Any, v_global: Any, labels: Any) -> float:
    """TIR-FG (Eq. 23): text-image relevance gain of the vision-conditioned prompts.

    Inputs (what ``SSVPOutput.aux`` holds): ``t_init`` [2, D] or [B, 2, D], the static
    prompts' text features (normal, abnormal) before VCPG; ``t_final`` [B, 2, D], after
    VCPG (Eq. 12); ``v_global`` [B, D], the image's global visual feature in the joint
    space; ``labels`` [B] (1 = anomalous).

    Definition used here: relevance R(T) = mean_i sign_i * (cos(v_i, t_i^abn) -
    cos(v_i, t_i^norm)) with sign_i = +1 for anomalous and -1 for normal images (how much
    closer an image is to the text of its true state), and TIR-FG = R(T_final) - R(T_init).
    Positive = VCPG made text and image more relevant to each other.

    Caveat: the paper's Eq. 23 text could not be read from this project's stored copy of
    arXiv 2601.09147 (only its opening is indexed); this is a reconstruction from the
    metric's name and the quantities VCPG produces. Check it against the paper before
    quoting numbers next to the paper's.
    """
    v = _to_numpy(v_global, "v_global").astype(np.float64)
    if v.ndim != 2:
        raise MetricInputError(f"v_global: expected [B, D], got shape {v.shape}")
    b, d = v.shape
    y, _ = _labels_scores(labels, np.zeros(len(_to_numpy(labels, "labels").reshape(-1))))
    if y.size != b:
        raise MetricInputError(f"labels ({y.size}) and v_global ({b}) differ in batch size")
    v = _unit(v, "v_global")
    sign = np.where(y, 1.0, -1.0)

    def relevance(t):
        cos = np.einsum("bd,bcd->bc", v, np.broadcast_to(t, (b, 2, d)))
        return float(np.mean(sign * (cos[:, 1] - cos[:, 0])))

    return relevance(_text_pairs(t_final, "t_final", b, d)) - relevance(_text_pairs(t_init, "t_init", b, d))


def scd(t_init: Any, t_final: Any) -> float:
    """SCD (Eq. 24): semantic consistency of the vision-conditioned prompts.

    Inputs: ``t_init`` [2, D] or [B, 2, D] and ``t_final`` [B, 2, D] text features
    (normal, abnormal). SCD = mean over images and both states of cos(t_final, t_init):
    1 means VCPG kept the prompts' initial semantics (gate alpha = 0 at initialisation,
    Eq. 12), lower values mean the image-conditioned prompts drifted from them. Read with
    TIR-FG: a useful VCPG raises relevance (TIR-FG > 0) while staying consistent.

    Caveat: as for ``tir_fg``, a reconstruction; the paper's Eq. 24 text was not readable
    from this project's stored copy of the paper.
    """
    tf = _to_numpy(t_final, "t_final")
    b = tf.shape[0] if tf.ndim == 3 else 1
    d = tf.shape[-1]
    f = _text_pairs(t_final, "t_final", None, d)
    i = _text_pairs(t_init, "t_init", b, d)
    return float(np.mean(np.sum(np.broadcast_to(i, f.shape) * f, axis=-1)))
