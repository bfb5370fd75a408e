"""Frozen-feature cache: equal to fresh features, keyed by everything they depend on, no recompute."""
from __future__ import annotations

import json
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from ssvp.backbones import BackboneFeatures, Backbones
from ssvp.config import Config
from ssvp.features import FeatureCache, FeatureCacheError


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def bb():
    return Backbones(Config.tiny().model)


class CountCalls:
    """Counts real forward passes of a module through a forward hook."""

    def __init__(self, module):
        self.calls = 0
        self.images = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1
        self.images += args[0].shape[0]


def _images(n, seed=0, size=112):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_cached_equals_fresh_and_second_read_skips_backbone(bb, tmp_path):
    cache = FeatureCache(tmp_path, bb, Config.tiny().model)
    counter = CountCalls(bb)
    images = _images(4)
    fresh = bb(images)
    assert counter.calls == 1
    first = cache.get_batch(images)  # all misses: one backbone call for the batch
    assert counter.calls == 2 and counter.images == 8
    second = cache.get_batch(images)  # all hits: no backbone call
    assert counter.calls == 2
    assert (cache.hits, cache.misses) == (4, 4)
    for name in fresh.names():
        a, b, c = getattr(fresh, name), getattr(first, name), getattr(second, name)
        assert a.shape == b.shape == c.shape
        torch.testing.assert_close(b, a, atol=2e-3, rtol=1e-3)  # fp16 storage
        assert torch.equal(b, c)  # computed-and-stored and read-back are identical
    assert len(cache) == 4
    # a fresh cache object (another trial / process) reads the same files, still no backbone call
    other = FeatureCache(tmp_path, bb)
    third = other.get_batch(images[1:3])
    assert counter.calls == 2 and other.hits == 2
    assert torch.equal(third.dino_patch, second.dino_patch[1:3])
    counter.handle.remove()


def test_mixed_hits_and_misses_run_only_the_misses(bb, tmp_path):
    cache = FeatureCache(tmp_path, bb, dtype="float32")
    images = _images(5, seed=1)
    cache.get_batch(images[[0, 2]])
    counter = CountCalls(bb)
    feats = cache.get_batch(images)
    assert counter.calls == 1 and counter.images == 3  # only images 1, 3, 4 ran
    fresh = bb(images)
    for name in fresh.names():  # float32 storage: exact up to batch-composition noise
        torch.testing.assert_close(getattr(feats, name), getattr(fresh, name), atol=1e-5, rtol=1e-5)
    counter.handle.remove()


def test_files_are_memory_mappable_fp16(bb, tmp_path):
    cache = FeatureCache(tmp_path, bb)
    img = _images(1, seed=2)
    cache.get_batch(img)
    path = cache.path_for(cache.key_for(img[0]))
    arr = np.load(path, mmap_mode="r")
    assert isinstance(arr, np.memmap) and arr.dtype == np.float16
    assert arr.shape == (4 * 64 * 64 + 64 + 4 * 64 * 64 + 64,)
    spec = json.loads((cache.dir / "spec.json").read_text())
    assert spec["spec_hash"] == cache.spec_hash
    assert spec["backbones"]["clip_layers"] == [1, 2, 3, 4]
    assert not list(cache.dir.glob("**/*.tmp"))  # no temporaries left behind


def test_key_depends_on_image_taps_grid_weights(bb, tmp_path):
    img = _images(1, seed=3)[0]
    base = FeatureCache(tmp_path, bb)
    k = base.key_for(img)
    assert k == base.key_for(img.clone())  # content, not identity
    changed = img.clone()
    changed[0, 0, 0] += 1e-3
    assert base.key_for(changed) != k

    def key_with(**over):
        return FeatureCache(tmp_path, Backbones(Config.tiny(**over).model)).key_for(img)

    other_taps = key_with(clip_layers=[1, 2, 3], dino_layers=[1, 2, 4])
    other_grid = key_with(grid=7)
    no_dino = key_with(fusion="none")
    assert len({k, other_taps, other_grid, no_dino}) == 4
    # other weights: same names and taps, different weights -> different spec and key
    bb2 = Backbones(Config.tiny().model)
    with torch.no_grad():
        bb2.dino.model.embeddings.cls_token.add_(0.1)
    changed_weights = FeatureCache(tmp_path, bb2)
    assert changed_weights.spec_hash != base.spec_hash and changed_weights.key_for(img) != k
    # storage dtype is part of the spec too
    assert FeatureCache(tmp_path, bb, dtype="float32").key_for(img) != k
    # and the same configuration rebuilt elsewhere maps to the same key (shared across trials)
    assert key_with() == k


def test_corrupt_file_is_recomputed(bb, tmp_path):
    cache = FeatureCache(tmp_path, bb)
    img = _images(1, seed=4)
    good = cache.get_batch(img)
    path = cache.path_for(cache.key_for(img[0]))
    path.write_bytes(path.read_bytes()[:200])  # truncated
    counter = CountCalls(bb)
    again = cache.get_batch(img)
    assert counter.calls == 1
    assert torch.equal(again.clip_patch, good.clip_patch)
    assert np.load(path).shape[0] > 1000  # replaced by a complete file
    counter.handle.remove()


def test_bad_arguments(bb, tmp_path):
    with pytest.raises(FeatureCacheError, match="dtype"):
        FeatureCache(tmp_path, bb, dtype="int4")
    with pytest.raises(FeatureCacheError, match="model.grid=7"):
        FeatureCache(tmp_path, bb, Config.tiny(grid=7).model)
    cache = FeatureCache(tmp_path, bb)
    with pytest.raises(ValueError, match=r"\[B, 3, S, S\]"):
        cache.get_batch(torch.rand(3, 112, 112))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FeatureCacheError, match="cannot be created"):
        FeatureCache(blocker / "sub", bb)


def _writer(root, seed, queue):
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    bb = Backbones(Config.tiny().model)
    cache = FeatureCache(root, bb)
    feats = cache.get_batch(_images(3, seed=seed))
    queue.put(feats.clip_patch.numpy())


def test_concurrent_writers_same_images(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), 7, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    np.testing.assert_array_equal(results[0], results[1])
    files = list(tmp_path.glob("*/*/*.npy"))
    assert len(files) == 3 and not list(tmp_path.glob("**/*.tmp"))
    bb = Backbones(Config.tiny().model)
    counter = CountCalls(bb)
    read = FeatureCache(tmp_path, bb).get_batch(_images(3, seed=7))
    assert counter.calls == 0
    np.testing.assert_array_equal(read.clip_patch.numpy(), results[0])


# ----- int8 storage (values + a float32 absmax scale per token) -----
def test_int8_round_trip_error_bound():
    from ssvp.features import dequantize_rows, quantize_rows

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 96)).astype(np.float32) * rng.uniform(0.01, 50, (64, 1)).astype(np.float32)
    x[3, 7] = 400.0  # an outlier channel only widens its own token's step
    x[5] = 0.0  # an all-zero token stays exactly zero
    q, scale = quantize_rows(x)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and q.min() >= -127
    amax = np.abs(x).max(axis=1)
    np.testing.assert_allclose(scale, amax / 127, rtol=1e-6)
    err = np.abs(dequantize_rows(q, scale) - x)
    assert (err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-30).all()  # round to nearest: half a step
    assert err.max() > scale.max() / 4  # ... and the bound is nearly reached (not vacuous)
    assert not dequantize_rows(q, scale)[5].any()
    # the extreme of each token is exact (it defines the scale)
    rows = np.arange(64)
    idx = np.abs(x).argmax(axis=1)
    np.testing.assert_allclose(dequantize_rows(q, scale)[rows, idx], x[rows, idx], rtol=1e-6)


def test_int8_cache_within_half_a_step_and_hits_equal_misses(bb, tmp_path):
    cache = FeatureCache(tmp_path, bb, dtype="int8")
    images = _images(3, seed=11)
    fresh = bb(images)
    first = cache.get_batch(images)  # misses: quantised, stored, and served as a reader gets them
    second = cache.get_batch(images)  # hits
    assert (cache.hits, cache.misses) == (3, 3)
    path = cache.path_for(cache.key_for(images[0]))
    assert path.suffix == ".q8"
    n_values = sum(int(np.prod(s)) for s in cache.shapes.values())
    assert path.stat().st_size < n_values * 1.2  # ~1 byte per value (+ the scales), fp16 is 2
    for name in fresh.names():
        a, b, c = getattr(fresh, name), getattr(first, name), getattr(second, name)
        assert torch.equal(b, c)
        if a.numel():
            step = a.abs().amax(dim=-1, keepdim=True) / 127  # one scale per token
            assert ((b - a).abs() <= step / 2 + 1e-6).all(), name
            assert (b - a).abs().max() > 0  # really quantised


def test_formats_never_mix(bb, tmp_path):
    img = _images(2, seed=12)
    i8 = FeatureCache(tmp_path, bb, dtype="int8")
    f16 = FeatureCache(tmp_path, bb, dtype="float16")
    assert i8.spec_hash != f16.spec_hash and i8.dir != f16.dir
    assert i8.key_for(img[0]) != f16.key_for(img[0])
    assert json.loads((i8.dir / "spec.json").read_text())["int8_scale"].startswith("absmax per token")
    i8.get_batch(img)
    f16.get_batch(img)  # the fp16 cache does not see the int8 files: two misses
    assert (f16.hits, f16.misses) == (0, 2) and len(i8) == len(f16) == 2
    assert {p.suffix for p in i8.dir.glob("*/*.*")} == {".q8"}
    assert {p.suffix for p in f16.dir.glob("*/*.*")} == {".npy"}


def _q8_file(bb, root, seed):
    cache = FeatureCache(root, bb, dtype="int8")
    img = _images(1, seed=seed)
    good = cache.get_batch(img)
    key = cache.key_for(img[0])
    return cache, img, key, cache.path_for(key), good


def _assert_refused_then_recomputed(cache, img, key, path, good, caplog, match):
    with pytest.raises(FeatureCacheError, match=match) as err:  # no image: one clear error naming the file
        cache.get_keyed([key], None)
    assert str(path) in str(err.value)
    counter = CountCalls(cache.backbones)
    with caplog.at_level("WARNING", logger="ssvp.features"):
        again = cache.get_batch(img)  # with the image: recomputed, replaced, warned about
    counter.handle.remove()
    assert counter.calls == 1 and str(path) in caplog.text
    assert torch.equal(again.clip_patch, good.clip_patch)
    assert torch.equal(cache.get_keyed([key], None).dino_patch, good.dino_patch)  # the file is whole again


def test_truncated_int8_file(bb, tmp_path, caplog):
    cache, img, key, path, good = _q8_file(bb, tmp_path, 13)
    path.write_bytes(path.read_bytes()[:-100])
    _assert_refused_then_recomputed(cache, img, key, path, good, caplog, "truncated")


def test_corrupt_int8_scales(bb, tmp_path, caplog):
    cache, img, key, path, good = _q8_file(bb, tmp_path, 14)
    raw = bytearray(path.read_bytes())
    raw[64 + 2] ^= 0x40  # a bit of the first token's scale: every value of that token would be wrong
    path.write_bytes(bytes(raw))
    _assert_refused_then_recomputed(cache, img, key, path, good, caplog, "checksum")


def test_int8_values_without_their_scales(bb, tmp_path, caplog):
    cache, img, key, path, good = _q8_file(bb, tmp_path, 15)
    raw = path.read_bytes()
    n_scales = cache.layout.n_scales
    path.write_bytes(raw[:64] + raw[64 + 4 * n_scales:])  # the header and the values, no scales
    _assert_refused_then_recomputed(cache, img, key, path, good, caplog, "expected")


def test_another_formats_file_and_folder(bb, tmp_path, caplog):
    cache, img, key, path, good = _q8_file(bb, tmp_path, 16)
    f16 = FeatureCache(tmp_path, bb, dtype="float16")
    f16.get_batch(img)
    path.write_bytes(f16.path_for(f16.key_for(img[0])).read_bytes())  # an fp16 .npy under the int8 name
    _assert_refused_then_recomputed(cache, img, key, path, good, caplog, "not an int8 feature file")
    # an fp16 cache given an int8 array of the right length under its name
    f16_path = f16.path_for(f16.key_for(img[0]))
    np.save(f16_path, np.zeros(f16.layout.n_values, np.int8))
    with pytest.raises(FeatureCacheError, match=f"{f16_path}.*holds int8"):
        f16.get_keyed([f16.key_for(img[0])], None)
    # a folder holding another format's cache (copied over this one's name)
    (cache.dir / "spec.json").write_text((f16.dir / "spec.json").read_text())
    with pytest.raises(FeatureCacheError, match=r"spec.json describes another cache .*'float16'"):
        FeatureCache(tmp_path, bb, dtype="int8")


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_read_ahead_batches_equal_direct_reads(bb, tmp_path, dtype):
    from ssvp.engine import FeatureSource

    cache = FeatureCache(tmp_path, bb, dtype=dtype)
    keys = [f"{i:064x}" for i in range(7)]
    with torch.no_grad():
        cache.put(keys, bb(_images(7, seed=17)))
    batches = [{"feature_key": keys[i:i + 3], "image": None, "image_pos": [], "mask": torch.zeros(3, 8, 8)}
               for i in range(0, 7, 3)]  # sizes 3, 3, 1: what a DataLoader of cached items yields
    source = FeatureSource.of_cache(cache, torch.device("cpu"))
    expected = [cache.get_keyed(b["feature_key"], None) for b in batches]
    got, seen = [], []
    for batch, feats in source.batches(batches, limit=3, reuse=True):
        seen.append(feats.clip_patch.data_ptr())
        got.append(BackboneFeatures(*(getattr(feats, n).clone() for n in feats.names())))
    assert [g.batch_size for g in got] == [3, 3, 1]
    for e, g in zip(expected, got):
        for name in e.names():
            assert torch.equal(getattr(e, name), getattr(g, name)), name
    assert seen[0] == seen[1]  # reuse: the second batch overwrote the first one's tensors
    assert len(list(source.batches(batches, limit=2))) == 2
