"""Learning: training on one synthetic domain improves detection on the other domain.

The tiny random-weight backbones carry no semantics, so what can transfer from
``domain_a`` (fabric, wood, tile, pill, bottle_cap) to ``domain_b`` (metal_plate,
leather, mesh, screw, washer) is generic local evidence: a patch that deviates from
its image context. The test trains the SSVP heads with ``fit`` on ``domain_a`` only
(model selection on its held-out categories), then measures ``evaluate`` on
``domain_b``, whose categories the heads never saw, against the untrained heads of
the same seed.
"""
from __future__ import annotations

import time

import pytest

from ssvp.config import Config
from ssvp.engine import evaluate, fit

# Settings chosen on the source validation categories only (see the report in the docstring of
# the test); the target domain plays no part in choosing them.
TRAIN = {
    "train.epochs": 12,
    "train.lr_prompt": 2e-3,
    "train.lr_head": 1e-3,
    "train.batch_size": 8,
    "train.seed": 0,
    "train.device": "cpu",
    "data.val_fraction": 0.2,
}
MIN_IMAGE_AUROC = 0.7
MIN_PIXEL_AUROC = 0.7


def test_training_on_one_domain_transfers_to_unseen_categories_of_the_other(synthetic_root, tmp_path):
    source = f"synthetic:{synthetic_root}/domain_a"
    target = f"synthetic:{synthetic_root}/domain_b"
    cfg = Config.tiny(
        **{
            "data.source": source,
            "data.targets": [target],
            "train.feature_cache": str(tmp_path / "features"),
            **TRAIN,
        }
    )
    t0 = time.perf_counter()
    before = evaluate(cfg, None)[target]["mean"]
    result = fit(cfg, checkpoint_dir=tmp_path / "ckpt")
    after = evaluate(cfg, tmp_path / "ckpt" / "best")[target]["mean"]
    elapsed = time.perf_counter() - t0
    print(
        f"\ntarget {target}: image AUROC {before['image_auroc']:.3f} -> {after['image_auroc']:.3f}, "
        f"pixel AUROC {before['pixel_auroc']:.3f} -> {after['pixel_auroc']:.3f} "
        f"(best epoch {result.best_epoch} on source val, {elapsed:.0f}s)"
    )
    # training worked on the source: the loss went down
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    # and it transfers to the other domain's categories, well above chance and the untrained heads
    assert after["image_auroc"] >= MIN_IMAGE_AUROC, after
    assert after["pixel_auroc"] >= MIN_PIXEL_AUROC, after
    assert after["image_auroc"] > before["image_auroc"] + 0.1
    assert after["pixel_auroc"] > before["pixel_auroc"] + 0.1
