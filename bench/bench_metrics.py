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


def aupro_peer_loop(masks, maps, max_step: int = 200, expect_fpr: float = 0.3) -> float:
    """The peers' per-threshold, per-region PRO loop (see module docstring)."""
    from sklearn.metrics import auc

    masks = np.asarray(masks).astype(bool)
    amaps = np.asarray(maps, dtype=np.float32)
    regions = []  # (image, bounding box, region pixels inside the box, area)
    for i, m in enumerate(masks):
        lab, _ = ndimage.label(m, structure=np.ones((3, 3)))
        for r, sl in enumerate(ndimage.find_objects(lab), start=1):
            reg = lab[sl] == r
            regions.append((i, sl, reg, int(reg.sum())))
    inverse = ~masks
    n_normal = inverse.sum()
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs = [], []
    binary = np.empty(amaps.shape, bool)
    for th in np.arange(min_th, max_th, delta):
        np.greater(amaps, th, out=binary)
        pro = [binary[i][sl][reg].sum() / area for i, sl, reg, area in regions]
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
    for i in range(n_maps):
        noise = rng.random((size, size), dtype=np.float32)
        found = masks[i] * np.float32(rng.uniform(0.0, 1.5))  # some defects barely visible
        maps[i] = ndimage.gaussian_filter(noise + found, sigma=max(1.0, size / 128))
    return masks, maps


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


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
    args = ap.parse_args(argv)
    if args.full:
        args.n_maps, args.size = 1725, 518

    from ssvp import metrics as M

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, numpy {np.__version__}")
    (masks, maps), t_gen = timed(make_data, args.n_maps, args.size, args.seed)
    n_px = maps.size
    print(f"data: {args.n_maps} maps x {args.size}x{args.size} = {n_px / 1e6:.1f} M pixels, "
          f"{masks.mean() * 100:.2f} % anomalous, generated in {t_gen:.1f} s")

    exact, t_exact = timed(M.aupro, masks, maps, n_threads=args.threads)
    print(f"exact AUPRO (ssvp.metrics.aupro):             {exact:.6f}   {t_exact:8.2f} s")
    allm, t_all = timed(M.pixel_metrics, masks, maps, n_threads=args.threads)
    print(f"pixel AUROC/AUPRO/AP together (pixel_metrics): "
          f"{allm['pixel_auroc']:.6f} / {allm['pixel_aupro']:.6f} / {allm['pixel_ap']:.6f}   {t_all:8.2f} s")
    thr, t_thr = timed(M.aupro_thresholds, masks, maps, n_thresholds=args.n_thresholds, n_threads=args.threads)
    print(f"{args.n_thresholds}-threshold AUPRO, vectorised (aupro_thresholds): {thr:.6f}   {t_thr:8.2f} s")
    if not args.skip_loop:
        loop, t_loop = timed(aupro_peer_loop, masks, maps, max_step=args.n_thresholds)
        print(f"{args.n_thresholds}-threshold AUPRO, peers' region loop:     {loop:.6f}   {t_loop:8.2f} s")
        print(f"speedup exact vs loop: {t_loop / t_exact:.1f}x (all three pixel metrics: {t_loop / t_all:.1f}x)")
        print(f"|exact - loop| = {abs(exact - loop):.2e}   |aupro_thresholds - loop| = {abs(thr - loop):.2e}")
    print(f"|exact - {args.n_thresholds}-threshold variant| = {abs(exact - thr):.2e}")
    if args.sklearn:
        from sklearn.metrics import average_precision_score, roc_auc_score

        y, s = masks.ravel(), maps.ravel()
        a, t_a = timed(roc_auc_score, y, s)
        p, t_p = timed(average_precision_score, y, s)
        print(f"sklearn roc_auc_score {a:.6f} ({t_a:.2f} s), average_precision_score {p:.6f} ({t_p:.2f} s); "
              f"|diff| {abs(a - allm['pixel_auroc']):.1e} / {abs(p - allm['pixel_ap']):.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
