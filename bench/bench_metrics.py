"""Benchmark: exact AUPRO (ssvp.metrics) vs the peers' 200-threshold region loop.

Prints figures; asserts nothing about time. Default: 200 maps at 256 x 256 (finishes in
well under 2 minutes on 2 cores); ``--full``: 1,725 maps at 518 x 518 (the size of the
MVTec-AD test set at the paper's resolution, ~460 M pixels; needs ~6 GB of memory).

    .venv/bin/python bench/bench_metrics.py             # default size
    .venv/bin/python bench/bench_metrics.py --full      # MVTec-AD size
    .venv/bin/python bench/bench_metrics.py --sklearn   # also time sklearn's pixel AUROC/AP

The loop is written the way AnomalyCLIP / AdaCLIP compute PRO (``cal_pro_score``): per
threshold, binarise all maps, per labelled region count the covered pixels, FPR over all
normal pixels; keep FPR < 0.3, min-max rescale FPR, ``sklearn.metrics.auc``. Regions are
labelled once before the loop (the peers relabel at every threshold, so their loop is
slower than this one and the reported speedup is conservative).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def aupro_peer_loop(masks, maps, max_step: int = 200, expect_fpr: float = 0.3, relabel: bool = False) -> float:
    """The peers' per-threshold, per-region PRO loop (see module docstring).

    relabel=False labels the regions once (a faster loop than the peers');
    relabel=True labels every mask again at every threshold, as the peers' code does
    (``measure.label`` + ``regionprops`` inside the threshold loop).
    """
    from sklearn.metrics import auc

    masks = np.asarray(masks).astype(bool)
    amaps = np.asarray(maps, dtype=np.float32)
    structure = np.ones((3, 3))

    def regions_of():  # (image, bounding box, region pixels inside the box, area)
        out = []
        for i, m in enumerate(masks):
            lab, _ = ndimage.label(m, structure=structure)
            for r, sl in enumerate(ndimage.find_objects(lab), start=1):
                reg = lab[sl] == r
                out.append((i, sl, reg, int(reg.sum())))
        return out

    regions = None if relabel else regions_of()
    inverse = ~masks
    n_normal = inverse.sum()
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs = [], []
    binary = np.empty(amaps.shape, bool)
    for th in np.arange(min_th, max_th, delta):
        np.greater(amaps, th, out=binary)
        pro = [binary[i][sl][reg].sum() / area for i, sl, reg, area in (regions_of() if relabel else regions)]
        fp = np.logical_and(inverse, binary).sum()
        pros.append(np.mean(pro))
        fprs.append(fp / n_normal)
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < expect_fpr
    f = fprs[keep]
    f = (f - f.min()) / (f.max() - f.min())
    return float(auc(f, pros[keep]))


def make_data(n_maps: int, size: int, seed: int = 0):
    """Random masks (blobs in ~70 % of the images) and smooth maps that partly find them."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_maps, size, size), bool)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n_maps):
        if rng.random() < 0.3:
            continue
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, size, 2)
            ry, rx = rng.integers(max(2, size // 60), max(3, size // 8), 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    maps = np.empty(masks.shape, np.float32)
    sigma = max(1.0, size / 128)
    for i in range(n_maps):
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), sigma)
        noise /= noise.std()
        found = masks[i] * np.float32(rng.uniform(0.0, 8.0))  # some defects barely visible
        maps[i] = noise + ndimage.gaussian_filter(found, sigma)
    return masks, maps


def timed(fn, *args, repeats: int = 1, **kw):
    """(result, best wall seconds, CPU seconds of that run) over ``repeats`` runs."""
    best = None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn(*args, **kw)
        w, c = time.perf_counter() - w, time.process_time() - c
        if best is None or w < best[0]:
            best = (w, c)
    return out, best[0], best[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-maps", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--full", action="store_true", help="1,725 maps at 518 x 518 (MVTec-AD test set size)")
    ap.add_argument("--n-thresholds", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="threads for ssvp.metrics (default: cores, max 8)")
    ap.add_argument("--skip-loop", action="store_true", help="do not run the peers' loop (slow at --full)")
    ap.add_argument("--sklearn", action="store_true", help="also time sklearn's pixel AUROC and AP")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each fast path; the best wall time counts")
    ap.add_argument("--relabel-loop", action="store_true",
                    help="also time the loop that relabels every mask at every threshold, as the peers' code")
    args = ap.parse_args(argv)
    if args.full:
        args.n_maps, args.size = 1725, 518

    from ssvp import metrics as M

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}, python {platform.python_version()}, numpy {np.__version__}")
    (masks, maps), t_gen, _ = timed(make_data, args.n_maps, args.size, args.seed)
    print(f"data: {args.n_maps} maps x {args.size}x{args.size} = {maps.size / 1e6:.1f} M pixels, "
          f"{masks.mean() * 100:.2f} % anomalous, generated in {t_gen:.1f} s")
    print("timings: wall seconds (best of repeats) and CPU seconds of all threads")
    rep = args.repeats
    nt = args.threads
    exact, w_ex, c_ex = timed(M.aupro, masks, maps, n_threads=nt, repeats=rep)
    print(f"  exact AUPRO, ssvp.metrics.aupro            {exact:.6f}  wall {w_ex:7.2f}  cpu {c_ex:7.2f}")
    ex1, w_ex1, c_ex1 = timed(M.aupro, masks, maps, n_threads=1, repeats=rep)
    print(f"  exact AUPRO, one thread                    {ex1:.6f}  wall {w_ex1:7.2f}  cpu {c_ex1:7.2f}")
    allm, w_all, c_all = timed(M.pixel_metrics, masks, maps, n_threads=nt, repeats=rep)
    print(f"  pixel AUROC / AUPRO / AP (pixel_metrics)   {allm['pixel_auroc']:.6f} / {allm['pixel_aupro']:.6f} / "
          f"{allm['pixel_ap']:.6f}  wall {w_all:7.2f}  cpu {c_all:7.2f}")
    thr, w_thr, c_thr = timed(M.aupro_thresholds, masks, maps, n_thresholds=args.n_thresholds, n_threads=nt,
                              repeats=rep)
    print(f"  {args.n_thresholds}-threshold AUPRO, aupro_thresholds     {thr:.6f}  wall {w_thr:7.2f}  cpu {c_thr:7.2f}")
    loops = [] if args.skip_loop else [False] + ([True] if args.relabel_loop else [])
    for relabel in loops:
        name = "peers' loop, relabel per threshold" if relabel else "peers' loop, regions labelled once"
        loop, w_lp, c_lp = timed(aupro_peer_loop, masks, maps, max_step=args.n_thresholds, relabel=relabel)
        print(f"  {args.n_thresholds}-threshold AUPRO, {name:35s} {loop:.6f}  wall {w_lp:7.2f}  cpu {c_lp:7.2f}")
        print(f"    speedup of exact aupro: {w_lp / w_ex:.1f}x wall, {c_lp / c_ex1:.1f}x cpu (one thread); "
              f"|exact - loop| = {abs(exact - loop):.2e}, |aupro_thresholds - loop| = {abs(thr - loop):.2e}")
    print(f"  |exact - {args.n_thresholds}-threshold variant| = {abs(exact - thr):.2e}")
    if args.sklearn:
        from sklearn.metrics import average_precision_score, roc_auc_score

        y, s = masks.ravel(), maps.ravel()
        a, w_a, _ = timed(roc_auc_score, y, s)
        p, w_p, _ = timed(average_precision_score, y, s)
        print(f"  sklearn roc_auc_score {a:.6f} (wall {w_a:.2f}), average_precision_score {p:.6f} (wall {w_p:.2f}); "
              f"|diff| to pixel_metrics {abs(a - allm['pixel_auroc']):.1e} / {abs(p - allm['pixel_ap']):.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
