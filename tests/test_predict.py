"""`ssvp predict` pictures and thresholds: full-size overlays and panels, ground-truth lookup,
validation F1-max thresholds, the per-epoch console line of `ssvp train`, CLI help."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from ssvp.cli import EpochPrinter, build_parser
from ssvp.thresholds import validation_thresholds
from ssvp.viz import find_mask, render_panel, resize_map, save_overlay, save_panel


def _photo(w: int, h: int) -> np.ndarray:
    """An H x W x 3 photo in [0, 1] with a bright square (the 'defect') at a known place."""
    img = np.full((h, w, 3), 0.3, dtype=np.float32)
    img[h // 4 : h // 4 + h // 8, w // 2 : w // 2 + w // 8] = 0.9
    return img


def test_overlay_and_panel_keep_the_photo_size_and_aspect(tmp_path):
    w, h = 400, 800  # a portrait photo; the model's map is square and small
    amap = np.zeros((16, 16), dtype=np.float32)
    amap[4:6, 8:10] = 1.0
    over = save_overlay(_photo(w, h), amap, tmp_path / "a.overlay.png")
    assert Image.open(over).size == (w, h)
    # the hot spot lands where it is in the photo (the square map is stretched back, not cropped)
    heat = np.asarray(Image.open(over), dtype=np.float32)
    red = heat[..., 0] - heat[..., 2]
    y, x = np.unravel_index(np.argmax(red), red.shape)
    assert 4 / 16 * h <= y <= 6 / 16 * h and 8 / 16 * w <= x <= 10 / 16 * w

    mask = np.zeros((h, w), dtype=np.uint8)
    mask[h // 4 : h // 4 + h // 8, w // 2 : w // 2 + w // 8] = 255
    panel = Image.open(save_panel(_photo(w, h), amap, tmp_path / "a.panel.png", score=0.8, threshold=0.5,
                                  pixel_threshold=0.5, mask=mask))
    no_gt = Image.open(save_panel(_photo(w, h), amap, tmp_path / "b.panel.png", score=0.2, threshold=0.5))
    # four tiles with a mask, three without, each at the photo's size (plus gaps, colour bar, text)
    assert h < panel.height < h + 200 and 4 * w < panel.width < 4 * w + 250
    assert h < no_gt.height < h + 200 and 3 * w < no_gt.width < 3 * w + 250
    assert panel.width - no_gt.width == pytest.approx(w, abs=w // 10)


def test_panel_tiles_show_ground_truth_map_and_predicted_mask():
    w, h = 300, 200
    amap = np.zeros((h, w), dtype=np.float32)
    amap[50:100, 100:200] = 0.9  # above the pixel threshold: predicted mask
    mask = np.zeros((h, w), dtype=bool)
    mask[120:160, 20:60] = True
    canvas, boxes = render_panel(_photo(w, h), amap, score=0.9, threshold=0.5, pixel_threshold=0.5, mask=mask)
    assert list(boxes) == ["image", "truth", "map", "pred"]
    img = np.asarray(canvas.convert("RGB"), dtype=np.int32)

    def tile(kind):
        x0, y0, x1, y1 = boxes[kind]
        assert (x1 - x0, y1 - y0) == (w, h)
        return img[y0:y1, x0:x1]

    assert np.abs(tile("image") - np.round(_photo(w, h) * 255)).max() <= 1  # the photo itself
    gt = tile("truth")
    ys, xs = np.nonzero(gt[..., 1] - gt[..., 0] > 60)  # green: the ground truth, in place
    assert ys.min() >= 118 and ys.max() <= 161 and xs.min() >= 18 and xs.max() <= 61
    heat = tile("map")
    assert (heat[75, 150, 0] - heat[75, 150, 2]) > 100 > (heat[10, 10, 2] - heat[10, 10, 0]) > 0  # red hot, blue cold
    red = tile("pred")[..., 0] - tile("pred")[..., 1]
    assert red[55:95, 105:195].mean() > 40 and red[120:160, 20:60].mean() < 10  # predicted = map >= 0.5 only
    # without a pixel threshold of its own, the image threshold cuts the map
    _, boxes = render_panel(_photo(w, h), amap, score=0.1, threshold=0.95)
    assert "truth" not in boxes and "pred" in boxes


def test_find_mask_mvtec_layout_and_mirror(tmp_path):
    img = tmp_path / "tire" / "test" / "cut" / "003.png"
    gt = tmp_path / "tire" / "ground_truth" / "cut" / "003_mask.png"
    good = tmp_path / "tire" / "test" / "good" / "000.png"
    for p in (img, gt, good):
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (4, 4)).save(p)
    assert find_mask(img) == gt
    assert find_mask(good) is None  # good images have no mask file
    masks = tmp_path / "masks"
    (masks / "cut").mkdir(parents=True)
    Image.new("L", (4, 4)).save(masks / "cut" / "003.png")
    assert find_mask(img, masks, tmp_path / "tire" / "test") == masks / "cut" / "003.png"
    assert find_mask(tmp_path / "x.png") is None


def test_resize_map_is_bilinear_to_width_height():
    m = resize_map(np.array([[0.0, 1.0]], dtype=np.float32), (4, 3))
    assert m.shape == (3, 4) and m[0, 0] == pytest.approx(0.0) and m[0, -1] == pytest.approx(1.0)


def test_validation_thresholds_hand_computed():
    # images: labels 0 0 1 1, scores .1 .4 .35 .8 ->
    #   t=.8: P=1, R=.5, F1=.667; t=.4: TP=1 FP=1 -> .5; t=.35: TP=2 FP=1 -> .8; t=.1: .667 -> t* = .35
    maps = np.zeros((4, 2, 2), dtype=np.float32)
    masks = np.zeros((4, 2, 2), dtype=np.uint8)
    maps[2, 0, 0], masks[2, 0, 0] = 0.7, 1  # one anomalous pixel at 0.7, one normal pixel at 0.6
    maps[3, 1, 1] = 0.6
    preds = {"a": {"labels": np.array([0, 0]), "scores": np.array([0.1, 0.4]), "masks": masks[:2], "maps": maps[:2]},
             "b": {"labels": np.array([1, 1]), "scores": np.array([0.35, 0.8]), "masks": masks[2:], "maps": maps[2:]}}
    t = validation_thresholds(preds)
    assert t["image"] == pytest.approx(0.35) and t["image_f1"] == pytest.approx(0.8)
    assert t["pixel"] == pytest.approx(0.7) and t["pixel_f1"] == pytest.approx(1.0)
    assert t["n_images"] == 4 and t["classes"] == ["a", "b"]
    # a single label: no threshold rather than a meaningless one
    only_good = {"a": {**preds["a"], "masks": np.zeros_like(masks[:2])}}
    t = validation_thresholds(only_good)
    assert t["image"] is None and t["pixel"] is None


def test_epoch_line_shows_losses_validation_and_best():
    out = io.StringIO()
    printer = EpochPrinter(epochs=3, stream=out)
    printer(1, {"train_loss": 1.5, "train_focal": 0.5, "val_image_auroc": 0.6, "val_pixel_auroc": 0.7,
                "val_objective": 0.65, "epoch": 1}, None)
    printer(2, {"train_loss": 1.2, "train_focal": 0.4, "val_image_auroc": 0.5, "val_pixel_auroc": 0.6,
                "val_objective": 0.55, "epoch": 2}, None)
    printer(3, {"train_loss": 1.0, "val_objective": float("nan")}, None)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("epoch 1/3 | loss 1.5000 (focal 0.5000) | val I-AUROC 0.6000, P-AUROC 0.7000, "
                               "objective 0.6500 | best 0.6500 @ epoch 1 *")
    assert "best 0.6500 @ epoch 1 |" in lines[1] and "objective 0.5500" in lines[1]
    assert "best 0.6500 @ epoch 1 |" in lines[2] and "objective" not in lines[2]


def test_every_cli_option_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = [f"{name} {a.option_strings}" for name, p in [("ssvp", parser), *sub.choices.items()]
               for a in p._actions if a.option_strings and not a.help]
    assert not missing
    for name, p in sub.choices.items():
        assert "examples:" in (p.epilog or ""), name
        assert name == "make-synthetic" or "--print-config" in p.format_help()
    assert "examples:" in parser.epilog and math.isfinite(len(parser.format_help()))


def test_threshold_resolution_flag_stored_or_none(tmp_path):
    import argparse

    import torch

    from ssvp.cli import _thresholds

    def ckpt(name, state):
        d = tmp_path / name
        d.mkdir()
        torch.save({"head": {}, **state}, d / "head.pt")
        return str(d)

    sel = ckpt("select", {"protocol": "select", "thresholds": {"image": 0.61, "pixel": 0.42, "classes": ["wood"],
                                                               "epoch": 3}})
    paper = ckpt("paper", {"protocol": "paper", "thresholds": {"epoch": 5}})

    def resolve(path, threshold=None, pixel=None):
        return _thresholds(argparse.Namespace(checkpoint=path, threshold=threshold, pixel_threshold=pixel))

    image, pixel, source = resolve(sel)
    assert (image, pixel) == (0.61, 0.42) and "validation F1-max" in source and "wood" in source and "epoch 3" in source
    assert resolve(sel, threshold=0.7)[:2] == (0.7, 0.42) and resolve(sel, 0.7)[2] == "--threshold"
    assert resolve(paper, threshold=0.7)[:2] == (0.7, 0.7)  # the pixel threshold falls back to the image one
    image, pixel, source = resolve(paper)
    assert image is None and pixel is None and "train.protocol=paper" in source and "--threshold" in source


@pytest.mark.slow
def test_an_image_scores_the_same_alone_in_any_batch_order_and_worker_count(synthetic_root):
    """Issue 20 point 3: with the sampled z of Eq. 8 (z_infer=sample, the default), `ssvp eval`'s
    per-image scores and maps do not depend on the batch size, the order, the number of DataLoader
    workers, and `ssvp predict` on one image alone gives its `ssvp eval` score."""
    import dataclasses
    from pathlib import Path

    import torch
    from torch.utils.data import Subset

    from conftest import synthetic_config
    from ssvp.data import open_dataset
    from ssvp.engine import FeatureSource, build_model, predict_dataset, predict_paths, with_backbone_sizes

    cfg = synthetic_config(synthetic_root, device="cpu", max_per_class=2, eval_batch_size=4)
    assert cfg.model.z_infer == "sample"
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    ds = with_backbone_sizes(open_dataset(cfg.data.targets[0], split="test", image_size=112, max_per_class=2), model)
    features = FeatureSource(cfg, model, torch.device("cpu"))

    def by_path(run_cfg, data) -> dict[str, tuple[float, np.ndarray, str]]:
        preds = predict_dataset(run_cfg, model, data, torch.device("cpu"), features)
        return {p: (s, m, c) for c, r in preds.items() for p, s, m in zip(r["paths"], r["scores"], r["maps"])}

    base = by_path(cfg, ds)
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_batch_size=3, num_workers=2))
    runs = {
        "batch 3, 2 workers": by_path(other, ds),
        "reversed order": by_path(cfg, Subset(ds, list(range(len(ds)))[::-1])),
        "alone": by_path(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_batch_size=1)), ds),
    }
    for name, got in runs.items():
        assert got.keys() == base.keys(), name
        for path, (score, amap, _) in base.items():
            assert got[path][0] == pytest.approx(score, rel=1e-5, abs=1e-6), (name, path)
            np.testing.assert_allclose(got[path][1], amap, rtol=1e-4, atol=1e-5, err_msg=f"{name} {path}")
    path = sorted(base)[len(base) // 2]  # `ssvp predict` on one image of the set
    alone = predict_paths(cfg, None, [Path(path)], base[path][2], model=model)[0]
    assert alone["score"] == pytest.approx(base[path][0], rel=1e-5, abs=1e-6)
