"""The machinery behind every pixel metric: ``_prepare_pixels`` and ``_Pixels``.

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
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import MetricInputError, _to_numpy


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


def _chunk_ranges(m, threads: int) -> tuple[list[tuple[int, int]], int]:
    """Image ranges ``[(a, b)]`` of about equal pixel counts (at least one per thread, at most
    ``_CHUNK_PIXELS`` each), and the total pixel count."""
    n_img = len(m)
    sizes = np.array([x.size for x in m], np.int64)
    n_px = int(sizes.sum())
    n_chunks = int(min(n_img, max(threads, -(-n_px // _CHUNK_PIXELS))))
    bounds = np.searchsorted(np.cumsum(sizes), np.linspace(0, n_px, n_chunks + 1)[1:-1])
    return [(int(a), int(b)) for a, b in zip(np.r_[0, bounds], np.r_[bounds, n_img]) if b > a], n_px


def _scan_chunk(m, s, r: tuple[int, int], structure: np.ndarray):
    """Pass 1 on images ``r = (a, b)``: validate the maps, their range, and the anomalous pixels
    with their region weights ``1 / |region|`` (``ndimage.label`` on each mask's bounding box)."""
    from scipy import ndimage

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


def _anomalous_pixels(m, s, ranges: list, structure: np.ndarray, threads: int) -> tuple[_Pixels, np.float32, np.float32]:
    """Pass 1 over every chunk: a ``_Pixels`` holding the sorted anomalous scores and their PRO
    weights ``1 / (|region| * n_regions)``, and the range ``(lo, hi)`` of all scores."""
    r1 = _run(lambda r: _scan_chunk(m, s, r, structure), ranges, threads)
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
    return _Pixels(pos=pos, w=w, cw=np.cumsum(w), n_neg=0, n_regions=n_regions), lo, hi


def _normal_sample(m, s, n_px: int, n_buckets: int) -> np.ndarray | None:
    """Normal scores of every k-th row and column (~2^18 pixels); None for small inputs."""
    if not (n_buckets > 1 and n_px > (1 << 18)):
        return None
    k = max(1, int(math.sqrt(n_px / (1 << 18))))
    if isinstance(m, np.ndarray):
        return s[:, ::k, ::k][~m[:, ::k, ::k]]
    return np.concatenate([si[::k, ::k][~mi[::k, ::k]] for mi, si in zip(m, s)])


def _bucket_layout(px: _Pixels, sample: np.ndarray | None, lo, hi, probes, top_fraction: float | None) -> None:
    """Set ``px``'s buckets: ``lo``, ``scale``, ``n_buckets`` (already the planned count),
    ``exact_from``, ``flagged`` (buckets holding an anomalous score or a probe) and ``bpos``."""
    n_buckets = px.n_buckets
    base, exact_from = lo, 0
    if top_fraction is not None and sample is not None and sample.size:
        # Only the top `top_fraction` of the normal scores need exact counts (AUPRO): the
        # buckets start at the sample's quantile a margin below, and bucket 0 takes every
        # lower score; checked after the histogram.
        q = np.float32(np.quantile(sample, max(0.0, 1.0 - top_fraction - _TOP_MARGIN)))
        if lo < q < hi:
            base, exact_from = q, 1
    px.lo, px.exact_from = base, exact_from
    # (n_buckets - 2) keeps float32 rounding of (hi - base) * scale below n_buckets
    px.scale = np.float32((n_buckets - 2) / float(hi - base)) if hi > base else np.float32(0)
    flagged = np.zeros(n_buckets, bool)
    flagged[px.bucket(px.pos)] = True
    if probes is not None:
        flagged[px.bucket(np.asarray(probes(lo, hi), np.float32))] = True
    flagged[:exact_from] = False
    # Dense anomalous scores flag most buckets: then the histogram saves nothing and one
    # bucket (a plain sort of the normal scores) is cheaper. Decide on the sample.
    if exact_from == 0 and sample is not None and sample.size and flagged[px.bucket(sample)].mean() > _DENSE_FRACTION:
        px.n_buckets = 1
        px.scale = np.float32(0)
        flagged = np.ones(1, bool)
    px.flagged = flagged
    px.bpos = px.bucket(px.pos)


def _histogram_normals(px: _Pixels, m, s, ranges: list) -> tuple[list, list, list]:
    """Pass 2 over every chunk: per sorted piece (one per thread), the histogram of the normal
    scores over ``px``'s buckets; per chunk, its normal scores in flagged buckets (unsorted).
    Returns ``(hists, keeps, groups)``, ``groups[g]`` the chunks of piece ``g``."""
    n_buckets, flagged = px.n_buckets, px.flagged
    n_pieces = max(1, min(px.threads, len(ranges)))  # one sorted piece per thread
    groups = [g.tolist() for g in np.array_split(np.arange(len(ranges)), n_pieces)]
    piece_of = {c: gi for gi, g in enumerate(groups) for c in g}
    hists = [np.zeros(n_buckets, np.int64) for _ in groups]  # normal pixels per bucket and piece
    locks = [threading.Lock() for _ in groups]

    def pass2(c):  # histogram of normal scores; keep those in flagged buckets
        a, b = ranges[c]
        neg = s[a:b][~m[a:b]] if isinstance(m, np.ndarray) else np.concatenate([s[i][~m[i]] for i in range(a, b)])
        if n_buckets == 1:
            with locks[piece_of[c]]:
                hists[piece_of[c]][0] += neg.size
            return neg
        f = neg - px.lo
        f *= px.scale
        if px.exact_from:
            np.maximum(f, 0, out=f)  # scores below the base go to bucket 0
        bk = f.astype(np.intp)  # == px.bucket(neg): the scores lie in [lo, hi]
        del f
        h = np.bincount(bk, minlength=n_buckets)
        keep = neg[flagged[bk]]
        with locks[piece_of[c]]:
            hists[piece_of[c]] += h
        return keep

    return hists, _run(pass2, list(range(len(ranges))), px.threads), groups


def _sort_pieces(keeps: list, groups: list, threads: int) -> list[np.ndarray]:
    """Each group's kept normal scores merged and sorted, one piece per thread; ``keeps`` is
    emptied on the way (each chunk's copy freed as soon as it is merged)."""
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

    return _run(sort_piece, list(range(len(groups))), threads)


def _prepare_pixels(masks: Any, maps: Any, connectivity: int = 2, n_threads: int | None = None,
                    with_counts: bool = True, probes=None, top_fraction: float | None = None) -> _Pixels:
    """Two threaded passes over image chunks. ``probes(lo, hi) -> float32 array`` names
    extra values whose counts must be exact (their buckets get refined too).
    ``top_fraction``: only values at or above the normal score of descending rank
    ``floor(top_fraction * n_neg)`` need exact counts (AUPRO alone); lower buckets are
    not sorted, and counts there are those of the lower buckets (see ``count_lt_le``)."""
    m, s = _pair(masks, maps)
    structure = _region_structure(connectivity)
    threads = _n_threads(n_threads)
    ranges, n_px = _chunk_ranges(m, threads)
    px, lo, hi = _anomalous_pixels(m, s, ranges, structure, threads)  # pass 1
    px.threads = threads
    # bucket layout: about one bucket per 2 pixels, at most 2^22 (a 32 MB histogram)
    px.n_buckets = int(min(1 << 22, max(1 << 8, 1 << int(np.ceil(np.log2(max(n_px, 2) / 2))))))
    _bucket_layout(px, _normal_sample(m, s, n_px, px.n_buckets), lo, hi, probes, top_fraction)
    hists, keeps, groups = _histogram_normals(px, m, s, ranges)  # pass 2
    hist = np.sum(hists, axis=0)
    px.cum_incl = np.cumsum(hist)
    px.cum_excl = px.cum_incl - hist
    px.n_neg = int(px.cum_incl[-1])
    if px.exact_from and px.cum_excl[px.exact_from] > px.n_neg - math.floor(top_fraction * px.n_neg) - 1:
        # the sample missed: the top scores reach below the skipped buckets; redo in full
        return _prepare_pixels(masks, maps, connectivity, n_threads, with_counts, probes, None)
    px.subs = _sort_pieces(keeps, groups, threads)
    del keeps
    px.starts = [np.r_[0, np.cumsum(np.where(px.flagged, h, 0))] for h in hists]
    if with_counts and px.n_pos and px.n_neg:
        px.lt, px.le = px.count_lt_le(px.pos)
    return px
