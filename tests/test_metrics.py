"""ssvp.metrics against hand-computed values, scikit-learn and brute-force references."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from ssvp import metrics as M
from ssvp.metrics import pixel_counts as PC

ROOT = Path(__file__).resolve().parents[1]


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_metrics", ROOT / "bench" / "bench_metrics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------ references
def brute_force_aupro(masks, maps, limit=0.3):
    """Every distinct threshold, per-region overlap and FPR computed explicitly."""
    masks = np.asarray(masks, bool)
    maps = np.asarray(maps, np.float64)
    regions = []
    for m in masks:
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions.append([(lab == r) for r in range(1, n + 1)])
    normal = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        overlaps = [pred[i][r].mean() for i, rs in enumerate(regions) for r in rs]
        ys.append(float(np.mean(overlaps)))
        xs.append(float(pred[normal].mean()))
    xs, ys = np.array(xs), np.array(ys)
    # integrate to `limit`, with linear interpolation at the limit (MVTec's trapezoid)
    inside = xs <= limit
    x_in, y_in = xs[inside], ys[inside]
    j = int(np.searchsorted(xs, limit, "right"))  # first point beyond the limit
    if j < xs.size and x_in[-1] < limit:
        y_lim = ys[j - 1] + (ys[j] - ys[j - 1]) * (limit - xs[j - 1]) / (xs[j] - xs[j - 1])
        x_in, y_in = np.r_[x_in, limit], np.r_[y_in, y_lim]
    return float(np.trapezoid(y_in, x_in)) / limit


def random_masks_maps(rng, n=5, h=24, w=20, quantize=None, smooth=0.0):
    masks = np.zeros((n, h, w), bool)
    for i in range(n - 1):  # the last image stays normal
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
            masks[i, y : y + rng.integers(1, 7), x : x + rng.integers(1, 7)] = True
    maps = rng.random((n, h, w)) + 0.6 * masks
    if smooth:
        maps = ndimage.gaussian_filter(maps, (0, smooth, smooth))
    if quantize:
        maps = np.round(maps * quantize) / quantize
    return masks, maps.astype(np.float32)


# ------------------------------------------------------------- image metrics
def test_image_metrics_hand_computed():
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert M.auroc(y, s) == pytest.approx(0.75)
    # desc: .8(+) .4(-) .35(+) .1(-): AP = .5*1 + .5*2/3
    assert M.average_precision(y, s) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # F1 per threshold: .667, .5, .8, .667
    assert M.f1_max(y, s) == pytest.approx(0.8)
    assert M.f1_max(y, s, return_threshold=True) == pytest.approx((0.8, 0.35))


def test_image_metrics_hand_computed_with_ties():
    y, s = [0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]
    assert M.auroc(y, s) == pytest.approx(3.5 / 4)  # the tied pair counts 1/2
    assert M.average_precision(y, s) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # thresholds .9: P1 R.5 -> .667; .5: P2/3 R1 -> .8; .2: P.5 R1 -> .667
    assert M.f1_max(y, s) == pytest.approx(0.8)


@pytest.mark.parametrize("seed", range(6))
def test_image_metrics_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.25
    s = np.round(rng.random(300) + 0.3 * y, 1)  # ~14 distinct values: heavy ties
    assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    p, r, _ = precision_recall_curve(y, s)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)
    assert M.f1_max(y, s) == pytest.approx(f1.max(), abs=1e-12)


def test_all_equal_scores():
    y = np.array([1, 0, 0, 1, 0, 0, 0, 0])
    s = np.full(8, 0.3)
    p = y.mean()
    assert M.auroc(y, s) == 0.5
    assert M.average_precision(y, s) == pytest.approx(p)
    assert M.f1_max(y, s) == pytest.approx(2 * p / (1 + p))  # threshold that includes all


def test_class_without_anomalies_is_undefined_not_silent():
    with pytest.raises(M.UndefinedMetricError, match="both classes"):
        M.auroc([0, 0, 0], [0.1, 0.2, 0.3])
    r = M.image_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert set(r) == set(M.IMAGE_KEYS)
    assert all(math.isnan(v) for v in r.values())
    assert set(r.undefined) == set(M.IMAGE_KEYS)
    # only normal images missing: AUROC undefined, AP and F1 defined (= 1)
    r = M.image_metrics([1, 1], [0.1, 0.9])
    assert math.isnan(r["image_auroc"]) and r["image_ap"] == 1.0 and r["image_f1max"] == 1.0
    assert list(r.undefined) == ["image_auroc"]


def test_bad_image_inputs_name_the_field():
    with pytest.raises(M.MetricInputError, match="labels"):
        M.auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(M.MetricInputError, match="scores"):
        M.auroc([0, 1, 1], [0.1, float("nan"), 0.3])
    with pytest.raises(M.MetricInputError, match="differ in length"):
        M.auroc([0, 1], [0.1, 0.2, 0.3])


# -------------------------------------------------------------- pixel metrics
@pytest.mark.parametrize("seed,quantize", [(0, None), (1, 10), (2, 4), (3, None)])
def test_pixel_auroc_ap_match_sklearn(seed, quantize):
    rng = np.random.default_rng(seed)
    masks, maps = random_masks_maps(rng, n=7, h=30, w=26, quantize=quantize)
    r = M.pixel_metrics(masks, maps, n_threads=3)  # 3 sorted chunks of normal pixels
    assert r["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert r["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert not r.undefined


def test_aupro_hand_computed():
    # one region {0.9, 0.2}; normal pixels {0.5, 0.1}
    # curve (0,0) (0,.5) (.5,.5) (.5,1) (1,1)
    masks = np.array([[[1, 1, 0, 0]]])
    maps = np.array([[[0.9, 0.2, 0.5, 0.1]]], np.float32)
    assert M.aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.75)
    assert M.aupro(masks, maps, fpr_limit=0.5) == pytest.approx(0.5)
    assert M.aupro(masks, maps, fpr_limit=0.25) == pytest.approx(0.5)


def test_aupro_hand_computed_cut_inside_a_tie_group():
    # region {0.5}, normal {0.5, 0.5, 0.1}: curve (0,0) -> (2/3, 1) -> (1, 1)
    # at FPR .3 the line gives PRO .45: area .3 * .45 / 2, normalised by .3 -> .225
    masks = np.array([[[1, 0, 0, 0]]])
    maps = np.array([[[0.5, 0.5, 0.5, 0.1]]], np.float32)
    assert M.aupro(masks, maps) == pytest.approx(0.225)


def test_aupro_regions_are_averaged_not_pixels():
    # a 1-pixel region found and a 3-pixel region missed -> PRO 1/2 below FPR 0
    masks = np.array([[[1, 0, 1, 1, 1, 0, 0, 0, 0, 0]]])
    maps = np.array([[[9, 0, 0, 0, 0, 1, 2, 3, 4, 5]]], np.float32)
    # threshold 9: FPR 0, PRO .5; then normals rise FPR by 1/5 each, PRO stays .5 until 0
    assert M.aupro(masks, maps, fpr_limit=0.4) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(8))
def test_exact_aupro_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    quantize = [None, 20, 5, None, 50, None, 8, None][seed]  # some heavy ties
    masks, maps = random_masks_maps(rng, n=5, h=18, w=16, quantize=quantize)
    limit = [0.3, 0.3, 0.3, 0.05, 0.3, 1.0, 0.5, 0.3][seed]
    got = M.aupro(masks, maps, fpr_limit=limit, n_threads=2)
    assert got == pytest.approx(brute_force_aupro(masks, maps, limit), abs=1e-6)


@pytest.mark.parametrize("limit", [0.3, 0.07])
def test_exact_aupro_cut_in_a_bucket_without_anomalous_scores(limit):
    # anomalous pixels all score above every normal pixel: the FPR cut lands among normal
    # scores whose histogram bucket holds no anomalous score (PRO is flat there)
    rng = np.random.default_rng(11)
    masks, maps = random_masks_maps(rng, n=5, h=20, w=20)
    maps = (maps + 3 * masks).astype(np.float32)
    maps[masks] -= rng.random(masks.sum()).astype(np.float32) * 3.5  # some anomalous pixels dip low
    got = M.aupro(masks, maps, fpr_limit=limit, n_threads=1)
    assert got == pytest.approx(brute_force_aupro(masks, maps, limit), abs=1e-6)


def test_aupro_thresholds_equals_peers_region_loop():
    rng = np.random.default_rng(5)
    masks, maps = random_masks_maps(rng, n=6, h=32, w=32, smooth=1.5)
    bench = _bench_module()
    loop = bench.aupro_peer_loop(masks, maps, max_step=200, expect_fpr=0.3)
    assert M.aupro_thresholds(masks, maps, n_thresholds=200) == pytest.approx(loop, abs=1e-9)
    relabel = bench.aupro_peer_loop(masks[:3], maps[:3], max_step=50, expect_fpr=0.3, relabel=True)
    assert M.aupro_thresholds(masks[:3], maps[:3], n_thresholds=50) == pytest.approx(relabel, abs=1e-9)


def test_threshold_variant_close_to_exact_on_smooth_maps():
    rng = np.random.default_rng(7)
    masks, maps = random_masks_maps(rng, n=8, h=64, w=64)
    maps = ndimage.gaussian_filter(rng.random(maps.shape) * 0.5 + masks, (0, 4, 4)).astype(np.float32)
    exact = M.aupro(masks, maps)
    approx = M.aupro_thresholds(masks, maps, n_thresholds=200)
    assert 0.2 < exact < 0.99
    assert approx == pytest.approx(exact, abs=0.03)


def test_pixel_all_equal_scores():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:4, 2:5] = True
    maps = np.full((2, 8, 8), 0.7, np.float32)
    r = M.pixel_metrics(masks, maps)
    assert r["pixel_auroc"] == 0.5
    assert r["pixel_ap"] == pytest.approx(masks.mean())
    # one operating point (FPR 1, PRO 1): the curve is the diagonal, area to .3 is .045
    assert r["pixel_aupro"] == pytest.approx(0.045 / 0.3)


def test_empty_masks_are_undefined_with_reason():
    masks = np.zeros((3, 8, 8))
    maps = np.random.default_rng(0).random((3, 8, 8))
    r = M.pixel_metrics(masks, maps)
    assert all(math.isnan(r[k]) for k in M.PIXEL_KEYS)
    assert all("no anomalous pixel" in r.undefined[k] for k in M.PIXEL_KEYS)
    with pytest.raises(M.UndefinedMetricError):
        M.aupro(masks, maps)
    # all pixels anomalous: AP defined (= 1), AUROC and AUPRO not
    r = M.pixel_metrics(np.ones((1, 4, 4)), maps[:1, :4, :4])
    assert r["pixel_ap"] == 1.0 and set(r.undefined) == {"pixel_auroc", "pixel_aupro"}


def test_pixel_inputs_accept_tensors_lists_and_reject_bad_input():
    import torch

    rng = np.random.default_rng(3)
    masks, maps = random_masks_maps(rng, n=3, h=12, w=12)
    maps_bf16 = torch.from_numpy(maps).to(torch.bfloat16)  # no numpy twin: converted to float32
    ref = M.pixel_metrics(masks, maps_bf16.float().numpy())
    r_t = M.pixel_metrics(torch.from_numpy(masks).float()[:, None], maps_bf16)
    assert r_t == ref
    # images of different sizes as lists
    ml = [masks[0], masks[1, :8, :10]]
    sl = [maps[0], maps[1, :8, :10]]
    cat_m = np.r_[ml[0].ravel(), ml[1].ravel()]
    cat_s = np.r_[sl[0].ravel(), sl[1].ravel()]
    assert M.pixel_auroc(ml, sl) == pytest.approx(roc_auc_score(cat_m, cat_s))
    with pytest.raises(M.MetricInputError, match="differ in shape"):
        M.pixel_metrics(masks, maps[:, :10])
    with pytest.raises(M.MetricInputError, match="mask values"):
        M.pixel_metrics(masks * 255, maps)
    bad = maps.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(M.MetricInputError, match=r"image 1, pixel \(2, 3\)"):
        M.pixel_metrics(masks, bad, n_threads=1)


def test_pixel_metrics_large_input_threads_agree():
    # 24 maps of 256 x 256 (1.6 M pixels), float32; speed is measured in bench/bench_metrics.py
    rng = np.random.default_rng(0)
    masks = np.zeros((24, 256, 256), bool)
    masks[::2, 100:140, 60:90] = True
    maps = (rng.random(masks.shape, dtype=np.float32) + masks * np.float32(0.5)).astype(np.float32)
    r = M.pixel_metrics(masks, maps)
    assert 0.5 < r["pixel_auroc"] < 1 and 0 < r["pixel_aupro"] < 1
    assert M.pixel_metrics(masks, maps, n_threads=1) == r  # thread count does not change a bit


def test_dense_mode_one_bucket_equals_bucketed_mode(monkeypatch):
    # Dense anomalous scores (most histogram buckets hold one) make the preparation sort
    # all normal scores in one bucket; both paths must give the same numbers.
    rng = np.random.default_rng(4)
    masks = np.zeros((5, 256, 256), bool)  # > 2^18 pixels: the dense check runs
    masks[:, 20:236, 20:236] = True
    maps = rng.random(masks.shape, dtype=np.float32) + np.float32(0.2) * masks
    monkeypatch.setattr(PC, "_DENSE_FRACTION", 0.0)  # always switch
    assert PC._prepare_pixels(masks, maps, with_counts=False).n_buckets == 1
    dense = M.pixel_metrics(masks, maps)
    monkeypatch.setattr(PC, "_DENSE_FRACTION", 2.0)  # never switch
    assert PC._prepare_pixels(masks, maps, with_counts=False).n_buckets > 1
    bucketed = M.pixel_metrics(masks, maps)
    for k in M.PIXEL_KEYS:
        assert dense[k] == pytest.approx(bucketed[k], abs=1e-12)
    assert dense["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)


def sorted_reference_aupro(masks, maps, limit=0.3):
    """The brute-force definition computed from one full sort (for inputs too large for
    a pass per threshold): cumulative FPR and PRO at the end of every tie group."""
    masks = np.asarray(masks, bool)
    weight = np.zeros(masks.shape, np.float64)
    n_regions = 0
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        sizes = np.bincount(lab.ravel())
        weight[i][m] = 1.0 / sizes[lab[m]]
        n_regions += n
    weight /= n_regions
    normal = ~masks
    weight[normal] = -1.0 / normal.sum()  # the sign tells the two apart
    v, w = maps.ravel().astype(np.float64), weight.ravel()
    order = np.argsort(-v, kind="stable")
    v, w = v[order], w[order]
    ends = np.r_[np.flatnonzero(np.diff(v)), v.size - 1]  # last index of each tie group
    xs = np.r_[0.0, np.cumsum(np.where(w < 0, -w, 0.0))[ends]]
    ys = np.r_[0.0, np.cumsum(np.where(w > 0, w, 0.0))[ends]]
    j = int(np.searchsorted(xs, limit, "right"))
    x_in, y_in = xs[:j], ys[:j]
    if j < xs.size and x_in[-1] < limit:
        y_lim = ys[j - 1] + (ys[j] - ys[j - 1]) * (limit - xs[j - 1]) / (xs[j] - xs[j - 1])
        x_in, y_in = np.r_[x_in, limit], np.r_[y_in, y_lim]
    return float(np.trapezoid(y_in, x_in)) / limit


def test_sorted_reference_equals_brute_force():
    rng = np.random.default_rng(3)
    for quantize in (None, 6):
        masks, maps = random_masks_maps(rng, n=5, h=18, w=16, quantize=quantize)
        for limit in (0.3, 0.05, 1.0):
            assert sorted_reference_aupro(masks, maps, limit) == pytest.approx(
                brute_force_aupro(masks, maps, limit), abs=1e-9)


@pytest.mark.parametrize("quantize", [None, 40])
def test_aupro_top_only_sort_equals_full_reference(quantize):
    # > 2^18 pixels: ``aupro`` sorts only the normal scores near the top (sample quantile);
    # it must equal the full reference and ``pixel_metrics``, which sorts them all
    rng = np.random.default_rng(7)
    masks, maps = random_masks_maps(rng, n=12, h=160, w=160, quantize=quantize, smooth=1.0)
    for limit in (0.3, 0.02):
        px = PC._prepare_pixels(masks, maps, top_fraction=limit, with_counts=False)
        assert px.exact_from == 1
        ref = sorted_reference_aupro(masks, maps, limit)
        assert M.aupro(masks, maps, fpr_limit=limit) == pytest.approx(ref, abs=1e-9)
        assert M.pixel_metrics(masks, maps, aupro_limit=limit)["pixel_aupro"] == pytest.approx(ref, abs=1e-9)


def test_kth_normal_score_of_a_bucket_across_thread_pieces():
    rng = np.random.default_rng(9)
    masks, maps = random_masks_maps(rng, n=12, h=64, w=64, quantize=30)
    px = PC._prepare_pixels(masks, maps, n_threads=3, with_counts=False)
    assert len(px.subs) == 3
    normal = np.sort(maps[~masks])
    for b in np.flatnonzero(px.flagged)[:: max(1, px.flagged.sum() // 25)]:
        lo, hi = int(px.cum_excl[b]), int(px.cum_incl[b])
        for r in {lo, (lo + hi) // 2, hi - 1} if hi > lo else ():
            assert px.kth_in_bucket(int(b), r - lo) == normal[r]


def test_aupro_top_only_falls_back_when_the_sample_misleads():
    # the strided sample sees only even rows and columns, which score high here: its
    # quantile lies above the true cut, the histogram shows it, the pass is redone in full
    # (4 x 512 x 512 = 2^20 pixels: the smallest input sampled with a stride of 2)
    rng = np.random.default_rng(8)
    masks, maps = random_masks_maps(rng, n=4, h=512, w=512)
    maps[:, ::2, ::2] += 5
    px = PC._prepare_pixels(masks, maps, top_fraction=0.3, with_counts=False)
    assert px.exact_from == 0  # the full preparation
    assert M.aupro(masks, maps) == pytest.approx(sorted_reference_aupro(masks, maps), abs=1e-9)


# ------------------------------------------------------------------ smoothing
def test_smooth_maps_numpy_and_torch_agree_with_scipy():
    import torch

    rng = np.random.default_rng(0)
    maps = rng.random((3, 40, 36)).astype(np.float32)
    ref = np.stack([ndimage.gaussian_filter(m, sigma=4) for m in maps])  # the peers' per-map call
    out = M.smooth_maps(maps, 4)
    assert out.dtype == np.float32 and np.allclose(out, ref, atol=1e-6)
    out_t = M.smooth_maps(torch.from_numpy(maps), 4)
    assert isinstance(out_t, torch.Tensor) and np.allclose(out_t.numpy(), ref, atol=1e-5)
    small = M.smooth_maps(torch.from_numpy(maps[:, :10, :10]), 4)  # smaller than the radius
    assert np.allclose(small.numpy(), np.stack([ndimage.gaussian_filter(m, 4) for m in maps[:, :10, :10]]), atol=1e-6)
    assert M.smooth_maps(maps, 0) is maps


# ----------------------------------------------------------------- evaluation
def _class_data(rng, n=6, anomalies=True):
    masks, maps = random_masks_maps(rng, n=n, h=16, w=16)
    if not anomalies:
        masks[:] = False
    labels = masks.reshape(n, -1).any(1).astype(int)
    scores = maps.reshape(n, -1).max(1)
    return dict(labels=labels, scores=scores, masks=masks, maps=maps)


def test_evaluate_predictions_per_class_and_mean_skip_undefined():
    rng = np.random.default_rng(1)
    data = {"bottle": _class_data(rng), "cable": _class_data(rng), "good_only": _class_data(rng, anomalies=False)}
    res = M.evaluate_predictions(data)
    assert set(res["per_class"]) == {"bottle", "cable", "good_only"}
    for cls in ("bottle", "cable"):
        d = data[cls]
        assert res["per_class"][cls]["image_auroc"] == pytest.approx(roc_auc_score(d["labels"], d["scores"]))
        assert res["per_class"][cls]["pixel_auroc"] == pytest.approx(roc_auc_score(d["masks"].ravel(), d["maps"].ravel()))
    for k in M.METRIC_KEYS:
        assert math.isnan(res["per_class"]["good_only"][k])
        assert k in res["undefined"]["good_only"]
        assert res["skipped"][k] == ["good_only"] and res["n_classes"][k] == 2
        assert res["mean"][k] == pytest.approx((res["per_class"]["bottle"][k] + res["per_class"]["cable"][k]) / 2)
    assert "good_only" not in str(res["mean"])


def test_evaluate_predictions_smoothing_changes_only_pixel_metrics():
    rng = np.random.default_rng(2)
    data = {"a": _class_data(rng, n=4)}
    plain = M.evaluate_predictions(data)
    smooth = M.evaluate_predictions(data, smoothing_sigma=4)
    for k in M.IMAGE_KEYS:
        assert plain["mean"][k] == smooth["mean"][k]
    sm = M.smooth_maps(data["a"]["maps"], 4)
    assert smooth["mean"]["pixel_auroc"] == pytest.approx(roc_auc_score(data["a"]["masks"].ravel(), sm.ravel()))


def test_evaluate_predictions_bad_input_names_class_and_field():
    rng = np.random.default_rng(0)
    d = _class_data(rng)
    with pytest.raises(M.MetricInputError, match=r"per_class\['x'\].*mask"):
        M.evaluate_predictions({"x": dict(d, mask=d["masks"])})
    with pytest.raises(M.MetricInputError, match=r"per_class\['x'\].*differ in count"):
        M.evaluate_predictions({"x": dict(d, scores=d["scores"][:-1], labels=d["labels"][:-1])})
    with pytest.raises(M.MetricInputError, match=r"per_class\['x'\].*labels.*scores.*differ in length"):
        M.evaluate_predictions({"x": dict(d, scores=d["scores"][:-1])})


def test_format_table_markdown_and_csv():
    res = {
        "per_class": {"bottle": {"image_auroc": 0.9123, "pixel_aupro": 0.5},
                      "empty": {"image_auroc": float("nan"), "pixel_aupro": 0.7}},
        "mean": {"image_auroc": 0.9123, "pixel_aupro": 0.6},
        "skipped": {"image_auroc": ["empty"]},
        "n_classes": {"image_auroc": 1, "pixel_aupro": 2},
    }
    md = M.format_table(res)
    lines = md.splitlines()
    assert lines[0] == "| class | image_auroc | pixel_aupro |"
    assert "| bottle | 91.2 | 50.0 |" in lines
    assert "| empty | n/a | 70.0 |" in lines
    assert "| **mean** | 91.2 | 60.0 |" in lines
    assert "image_auroc: mean over 1 classes, skipped empty" in md
    csv = M.format_table(res, fmt="csv", percent=False, decimals=3)
    assert csv.splitlines() == ["class,image_auroc,pixel_aupro", "bottle,0.912,0.500", "empty,,0.700", "mean,0.912,0.600"]


# ------------------------------------------------------------- TIR-FG and SCD (Eq. 23-24)
def test_tir_fg_eq23_hand_computed():
    """Two images, 2x2 grid, D = 2, t_abn = (1, 0). Image 0: cells (1,0), (0,1), (1,1)/sqrt2, (-1,0);
    its mask covers cells 0 and 2 -> cosines 1 and 1/sqrt2. Image 1: cell 3 (0,1) anomalous -> cos 0.
    Eq. 23 is one mean over all anomalous pixels: (1 + 1/sqrt2 + 0) / 3."""
    from ssvp.metrics.alignment import cell_fraction, tir_fg

    r = 1 / np.sqrt(2)
    v = np.array([[[1, 0], [0, 1], [r, r], [-1, 0]], [[1, 0], [1, 0], [1, 0], [0, 1]]], dtype=np.float32)
    t_abn = np.array([[1, 0], [2, 0]], dtype=np.float32)  # norms do not matter
    masks = np.zeros((2, 4, 4), dtype=np.float32)
    masks[0, :2, :2] = 1  # cell 0
    masks[0, 2:, :2] = 1  # cell 2
    masks[1, 2:, 2:] = 1  # cell 3
    fg = cell_fraction(masks, 2)
    np.testing.assert_allclose(fg.numpy(), [[1, 0, 1, 0], [0, 0, 0, 1]])
    assert tir_fg(v, t_abn, fg) == pytest.approx((1 + r + 0) / 3, rel=1e-6)
    # a cell half covered counts with half the pixels; several layers: cosines averaged over layers
    masks[1, 2:, 2:] = 0
    masks[1, 2:, 2] = 1  # half of cell 3
    fg = cell_fraction(masks, 2)
    assert tir_fg(v, t_abn, fg) == pytest.approx((1 + r + 0.5 * 0) / 2.5, rel=1e-6)
    two_layers = np.stack([v, -v], axis=1)  # [B, L=2, N, D]: cosines cancel
    assert tir_fg(two_layers, t_abn, fg) == pytest.approx(0.0, abs=1e-7)
    assert np.isnan(tir_fg(v, t_abn, np.zeros((2, 4))))  # no anomalous pixel: undefined


def test_scd_eq24_per_state_hand_computed():
    """||unit(t_final) - unit(t_static)||_2 per state: orthogonal -> sqrt 2, equal -> 0, opposite -> 2."""
    from ssvp.metrics.alignment import scd, scd_per_image

    e = np.eye(2, dtype=np.float32)
    t_static = np.stack([e[0], e[1]])  # [2, D]: normal, abnormal
    t_final = np.stack([np.stack([3 * e[0], e[0]]), np.stack([e[1], -e[1]])])  # [B=2, 2, D]
    d = scd_per_image(t_final, t_static).numpy()
    np.testing.assert_allclose(d, [[0.0, np.sqrt(2)], [np.sqrt(2), 2.0]], rtol=1e-6)
    out = scd(t_final, t_static)
    assert out["scd_normal"] == pytest.approx(np.sqrt(2) / 2, rel=1e-6)
    assert out["scd_abnormal"] == pytest.approx((np.sqrt(2) + 2) / 2, rel=1e-6)


def test_tir_fg_rejects_bad_shapes():
    from ssvp.metrics.alignment import scd, tir_fg

    with pytest.raises(M.MetricInputError, match="tir_fg"):
        tir_fg(np.ones((2, 4, 3)), np.ones((2, 2)), np.ones((2, 4)))
    with pytest.raises(M.MetricInputError, match="scd"):
        scd(np.ones((2, 3, 4)), np.ones((2, 4)))
