"""Training from cached frozen features gives the results of training from images.

The cache (``ssvp.features.FeatureCache``) stores fp16 by default and float32 on request
(``SSVP_FEATURE_CACHE_DTYPE=float32``, read by ``ssvp.engine.feature_cache_dtype``):

* float32 storage holds the backbone outputs bit for bit, so with the same seed every
  per-epoch metric equals the image-trained one exactly. (Batch size 1: the CPU backbone
  is not bit-invariant to batch composition, ~1e-8, and the image path recomputes each
  image in a new shuffled batch every epoch, so exact equality is only defined per image.)
* fp16 storage rounds each feature to 11 significant bits (relative error <= 2**-11 ~ 4.9e-4);
  the losses are smooth means over thousands of such values, so they move by a first-order
  amount well under that bound (measured ~1e-5 relative): we allow 2e-3 relative. Pixel
  metrics rank ~10^5 pixels, so a few swapped near-ties move them by ~1e-5: we allow 2e-3.
  Image metrics rank 8 validation images: a score perturbation can at most swap a near-tied
  (normal, anomalous) pair, so we allow one pair, 1 / (n_normal * n_anomalous).
* int8 storage (``train.feature_cache_dtype: int8``) rounds each value to half a step of its
  token's absmax / 127 (<= 0.39 % of the token's largest value): the losses moved by <= 3.3e-3
  relative and the pixel metrics by <= 1e-3 (measured), so we allow 1e-2 and 5e-3; image metrics
  one (normal, anomalous) pair as above.
* A second trial with another gamma reuses the cache: no vision backbone forward at all
  (counted with a global forward hook), no new cache file, and no image file decoded
  (the path index maps an unchanged file to its content key).
* A file rewritten in place is decoded and hashed again: its new content is a miss
  (one backbone call), never the stale features of the old content.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ssvp.backbones import Backbones, ClipVisionEncoder, DinoEncoder
from conftest import synthetic_config
from ssvp.config import Config
from ssvp.data import base as data_base
from ssvp.data import load_image, make_synthetic, zero_shot_splits
from ssvp.engine import FEATURE_CACHE_DTYPE_ENV, fit

LOSS_RTOL = 2e-3
PIXEL_ATOL = 2e-3
INT8_LOSS_RTOL = 1e-2
INT8_PIXEL_ATOL = 5e-3


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(FEATURE_CACHE_DTYPE_ENV, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is faster and steadier on a shared CPU
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synthetic(root, seed=0, size=112, n_train=1, n_test=4)
    return root


def _cfg(root, **over) -> Config:
    base = dict(epochs=2, max_per_class=4, batch_size=4, eval_batch_size=8, device="cpu", seed=3,
                protocol="select")  # these tests read the per-epoch validation metrics
    return synthetic_config(root, **{**base, **over})


class VisionForwards:
    """Counts forward calls of the frozen vision backbones (any instance) with a global hook."""

    kinds = (Backbones, ClipVisionEncoder, DinoEncoder)

    def __init__(self):
        self.calls = {k.__name__: 0 for k in self.kinds}
        self.handle = torch.nn.modules.module.register_module_forward_hook(self._hook)

    def _hook(self, module, args, output):
        for k in self.kinds:
            if isinstance(module, k):
                self.calls[k.__name__] += 1

    def total(self) -> int:
        return sum(self.calls.values())

    def close(self):
        self.handle.remove()


class ImageDecodes:
    """Counts image files opened for decoding (``ssvp.data.base._open(path, "image")``), calling the real one."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        real = data_base._open

        def counting_open(path, what):
            if what == "image":
                self.paths.append(str(path))
            return real(path, what)

        monkeypatch.setattr(data_base, "_open", counting_open)


def _npy_files(cache_dir, suffix=".npy"):
    return sorted(p for p in cache_dir.glob(f"*/*/*{suffix}"))


def _assert_history_close(ref: list[dict], got: list[dict], loss_rtol: float, pixel_atol: float, one_pair: float):
    for a, b in zip(ref, got, strict=True):
        assert a.keys() == b.keys()
        for key, va in a.items():
            vb = b[key]
            if key.startswith("train_") or key == "lr_prompt":
                assert vb == pytest.approx(va, rel=loss_rtol, abs=1e-6), (key, va, vb)
            elif key.startswith("val_pixel"):
                assert abs(vb - va) <= pixel_atol, (key, va, vb)
            elif key.startswith("val_"):
                assert abs(vb - va) <= one_pair + 1e-12, (key, va, vb)
            else:
                assert va == vb, key


def _train_val_images(cfg) -> tuple[int, float]:
    """(number of distinct train+val images, one (normal, anomalous) val pair as an AUROC step)."""
    train_ds, val_ds, _ = zero_shot_splits(cfg.data, 14 * cfg.model.grid)
    labels = val_ds.labels
    n_pos, n_neg = int(labels.sum()), int(len(labels) - labels.sum())
    assert n_pos and n_neg, "validation split needs both normal and anomalous images"
    return len(train_ds) + len(val_ds), 1.0 / (n_pos * n_neg)


@pytest.mark.slow  # two or three training runs
def test_float32_cache_training_is_bit_identical(data_root, tmp_path, monkeypatch):
    cfg = _cfg(data_root, batch_size=1, max_steps_per_epoch=6)  # epoch 2 also meets unseen images
    from_images = fit(cfg).history

    monkeypatch.setenv(FEATURE_CACHE_DTYPE_ENV, "float32")
    cache_dir = tmp_path / "cache32"
    counter = VisionForwards()
    try:
        from_cache = fit(cfg.override({"feature_cache": str(cache_dir)})).history
    finally:
        counter.close()

    assert len(from_images) == len(from_cache) == 2
    for a, b in zip(from_images, from_cache):
        assert a.keys() == b.keys()
        assert {"train_loss", "val_image_auroc", "val_pixel_auroc", "val_pixel_aupro"} <= a.keys()
        assert a == b  # every metric of every epoch, exactly
    files = _npy_files(cache_dir)
    assert files and all(np.load(f, mmap_mode="r").dtype == np.float32 for f in files)
    # each image ran through the backbones once (misses only), never again
    assert counter.calls["Backbones"] > 0
    assert counter.calls["ClipVisionEncoder"] == counter.calls["DinoEncoder"] == counter.calls["Backbones"]


@pytest.mark.slow  # two or three training runs
def test_fp16_cache_matches_within_tolerance_and_second_trial_reuses_it(data_root, tmp_path, monkeypatch):
    decodes = ImageDecodes(monkeypatch)
    cfg = _cfg(data_root)
    n_images, one_pair = _train_val_images(cfg)
    from_images = fit(cfg).history

    cache_dir = tmp_path / "cache16"
    cached_cfg = cfg.override({"feature_cache": str(cache_dir), "feature_cache_dtype": "float16"})
    first = fit(cached_cfg).history
    files = _npy_files(cache_dir)
    # every train and validation image is cached (validation reads the cache too), in fp16
    assert len(files) == n_images
    assert all(np.load(f, mmap_mode="r").dtype == np.float16 for f in files)

    _assert_history_close(from_images, first, LOSS_RTOL, PIXEL_ATOL, one_pair)

    # int8 storage (train.feature_cache_dtype): ~1 byte per value, error <= half a step of each
    # token's absmax / 127 (~0.2 % of the token's largest value): looser, still close
    int8_dir = tmp_path / "cache8"
    int8 = fit(cfg.override({"feature_cache": str(int8_dir), "feature_cache_dtype": "int8"})).history
    assert len(_npy_files(int8_dir, ".q8")) == n_images and not _npy_files(int8_dir)
    _assert_history_close(from_images, int8, INT8_LOSS_RTOL, INT8_PIXEL_ATOL, one_pair)

    # second trial, another head hyperparameter: all features from the cache
    assert len(decodes.paths) >= n_images  # trials from images decode every image
    counter = VisionForwards()
    decodes.paths.clear()
    try:
        second = fit(cached_cfg.override({"gamma": 0.1})).history
    finally:
        counter.close()
    assert counter.total() == 0, counter.calls
    assert decodes.paths == []  # not one image decoded: masks and labels only
    assert _npy_files(cache_dir) == files  # nothing recomputed or added
    assert len(second) == 2
    # gamma weighs S_local vs S_global (Eq. 19): the BCE of the image score must change
    assert second[0]["train_bce"] != pytest.approx(first[0]["train_bce"], rel=1e-6)


def test_cache_dtype_from_config_or_env_and_bad_one_named(data_root, tmp_path, monkeypatch):
    from ssvp.config import ConfigError
    from ssvp.engine import feature_cache_dtype
    from ssvp.features import DEFAULT_DTYPE

    cfg = _cfg(data_root, feature_cache=str(tmp_path / "c"), epochs=1)
    assert feature_cache_dtype(cfg) == DEFAULT_DTYPE
    monkeypatch.setenv(FEATURE_CACHE_DTYPE_ENV, "float32")
    assert feature_cache_dtype(cfg) == "float32"
    assert feature_cache_dtype(cfg.override({"feature_cache_dtype": "int8"})) == "int8"  # the config key wins
    with pytest.raises(ConfigError, match="train.feature_cache_dtype must be one of"):
        cfg.override({"feature_cache_dtype": "int4"})
    monkeypatch.setenv(FEATURE_CACHE_DTYPE_ENV, "int4")
    with pytest.raises(ValueError, match="SSVP_FEATURE_CACHE_DTYPE.*int4"):
        fit(cfg)


def test_rewritten_image_is_recomputed_not_served_stale(data_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    cfg = _cfg(root, epochs=1, val_fraction=0.0, feature_cache=str(tmp_path / "cache"))
    train_ds, _, _ = zero_shot_splits(cfg.data, 112)
    fit(cfg)
    files = _npy_files(tmp_path / "cache")
    assert len(files) == len(train_ds)

    victim = train_ds.records[0].image_path  # same name and image size, new pixels
    from PIL import Image

    img = Image.open(victim)
    img.load()
    img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(victim)
    counter = VisionForwards()
    try:
        fit(cfg)
    finally:
        counter.close()
    assert counter.calls["Backbones"] == 1  # the rewritten image only
    new_files = _npy_files(tmp_path / "cache")
    assert len(new_files) == len(files) + 1
    (added,) = set(new_files) - set(files)
    # the new file holds the features of the new content, keyed by that content
    from ssvp.backbones import Backbones as BB
    from ssvp.features import FeatureCache

    bb = BB(cfg.model)
    cache = FeatureCache(tmp_path / "cache", bb, cfg.model)
    # keyed by both inputs: the CLIP-size image and the DINO-size one resized from the file (§4.2)
    dino = load_image(victim, bb.dino_image_size) if bb.dino_image_size not in (0, 112) else None
    assert cache.path_for(cache.key_for(load_image(victim, 112), dino)) == added
