"""Learning: training on one synthetic domain, measured on the other domain's unseen categories.

The tiny random-weight backbones carry no semantics, so what can transfer from
``domain_a`` (fabric, wood, tile, pill, bottle_cap) to ``domain_b`` (metal_plate,
leather, mesh, screw, washer) is generic local evidence. The heads are trained with
``fit`` on ``domain_a`` only (a fixed schedule; nothing is chosen on ``domain_b``),
and ``evaluate`` on ``domain_b`` is compared with the untrained heads of the same seed.

Measured (2 shared CPU cores, seed 0, default synthetic benchmark): target image
AUROC 0.39 -> 0.76 after 8 epochs; target pixel AUROC 0.49 -> 0.44. The pixel maps do
not transfer across domains with random backbones (in-domain they do: training-set
pixel AUROC reaches 0.77-0.83), although a training-free "cosine distance of a patch
to its image's mean token" already scores 0.73-0.78 pixel AUROC on ``domain_b``: the
cue is in the features, the heads do not learn it from three source categories.
That gap is recorded as a strict xfail so that it shows up once it is closed.

Levers tried without closing it (seed 0; /tmp/lrn2/*.log): Eq. 20 also on every per-layer
map, lambda1 = 0.1, focal_lambda = 0, grad_clip = 0, lr_head 1e-3 / lr_prompt 5e-3, 20-30
epochs, fusion none / concat, vtam or vcpg off, tau 0.2, the source-val "best" checkpoint:
target pixel AUROC stays 0.41-0.46 (image 0.47-0.76). Per-image hue/saturation
diversity (+-60 or +-180 deg, domain_a only or both, plus random defect colours) lifts
target pixel AUROC to 0.55-0.66 but drops target image AUROC to 0.43-0.55, and source-val
(one held-out category) tracks neither. No setting reaches pixel >= 0.65 with image >= 0.7.
"""
from __future__ import annotations

import time

import pytest

from ssvp.config import Config
from ssvp.engine import evaluate, fit

TRAIN = {"train.epochs": 8, "train.batch_size": 8, "train.seed": 0, "train.device": "cpu"}
MIN_AUROC = 0.7


@pytest.fixture(scope="module")
def transfer(synthetic_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("learning")
    target = f"synthetic:{synthetic_root}/domain_b"
    cfg = Config.tiny(
        **{
            "data.source": f"synthetic:{synthetic_root}/domain_a",
            "data.targets": [target],
            "train.feature_cache": str(tmp / "features"),  # frozen backbones: features computed once
            **TRAIN,
        }
    )
    t0 = time.perf_counter()
    before = evaluate(cfg, None)[target]["mean"]
    result = fit(cfg, checkpoint_dir=tmp / "ckpt")
    after = evaluate(cfg, tmp / "ckpt" / "last")[target]["mean"]
    elapsed = time.perf_counter() - t0
    print(
        f"\ntarget {target}: image AUROC {before['image_auroc']:.3f} -> {after['image_auroc']:.3f}, "
        f"pixel AUROC {before['pixel_auroc']:.3f} -> {after['pixel_auroc']:.3f} ({elapsed:.0f}s)"
    )
    return before, after, result


def test_training_lowers_the_source_loss(transfer):
    _, _, result = transfer
    assert len(result.history) == TRAIN["train.epochs"]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_image_auroc_transfers_to_unseen_categories_of_the_other_domain(transfer):
    before, after, _ = transfer
    assert after["image_auroc"] >= MIN_AUROC, (before, after)
    assert after["image_auroc"] > before["image_auroc"] + 0.15, (before, after)


@pytest.mark.xfail(strict=True, reason="pixel maps do not transfer across synthetic domains with random backbones "
                   "(measured 0.49 -> 0.44); see the module docstring")
def test_pixel_auroc_transfers_to_unseen_categories_of_the_other_domain(transfer):
    before, after, _ = transfer
    assert after["pixel_auroc"] >= MIN_AUROC, (before, after)
    assert after["pixel_auroc"] > before["pixel_auroc"] + 0.1, (before, after)
