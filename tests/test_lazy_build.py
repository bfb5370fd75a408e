"""Lazy build (``ssvp.lazy_backbones``): with a warm feature cache a trial builds the text tower
and the heads only, and trains exactly as an eagerly built model does.

Weights come from real-format files: a tiny open_clip CLIP state dict saved with
``torch.save`` and a tiny DINOv3 ``save_pretrained`` folder (random values, shifted away from
the seeded random init so that loading them is visible).
"""
from __future__ import annotations

import pytest
import torch

from conftest import synthetic_config
from ssvp import backbones as bb_mod
from ssvp.backbones import Backbones, ClipVisionEncoder, DinoEncoder, build_clip, build_dino_model
from ssvp.data import make_synthetic
from ssvp.engine import FEATURE_CACHE_DTYPE_ENV, LAZY_BACKBONES_ENV, build_model, fit
from ssvp.features import FeatureCache, FeatureCacheError
from ssvp.lazy_backbones import LazyBackbones


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(FEATURE_CACHE_DTYPE_ENV, raising=False)
    monkeypatch.delenv(LAZY_BACKBONES_ENV, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(CLIP state dict file, DINOv3 folder) of the tiny architectures, values not the seeded init."""
    out = tmp_path_factory.mktemp("weights")
    gen = torch.Generator().manual_seed(11)
    clip, _tok, _patch, _id = build_clip("tiny", "", 8)
    sd = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
          for k, v in clip.state_dict().items()}
    torch.save(sd, out / "clip_tiny.pt")
    dino, _spec, _id = build_dino_model("dinov3_tiny", "", 8)
    with torch.no_grad():
        for p in dino.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    dino.save_pretrained(out / "dino_tiny")
    return out / "clip_tiny.pt", out / "dino_tiny"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synthetic(root, seed=0, size=112, n_train=1, n_test=4)
    return root


def _cfg(root, weights, **over):
    clip_file, dino_dir = weights
    base = dict(epochs=2, max_per_class=4, batch_size=4, eval_batch_size=8, device="cpu", seed=3,
                clip_pretrained=str(clip_file), dino_weights=str(dino_dir))
    return synthetic_config(root, **{**base, **over})


class VisionBuilds:
    """Counts constructions of the vision towers (the real classes, called through)."""

    def __init__(self, monkeypatch):
        self.calls = {"ClipVisionEncoder": 0, "DinoEncoder": 0, "build_dino_model": 0, "Backbones": 0}
        for cls in (ClipVisionEncoder, DinoEncoder, Backbones):
            real = cls.__init__

            def init(obj, *a, _real=real, _name=cls.__name__, **k):
                if type(obj).__name__ == _name:
                    self.calls[_name] += 1
                return _real(obj, *a, **k)

            monkeypatch.setattr(cls, "__init__", init)
        real_dino = bb_mod.build_dino_model

        def dino(*a, **k):
            self.calls["build_dino_model"] += 1
            return real_dino(*a, **k)

        monkeypatch.setattr(bb_mod, "build_dino_model", dino)

    def total(self) -> int:
        return sum(self.calls.values())


def test_text_tower_only_and_same_text_weights(data_root, weights, monkeypatch):
    cfg = _cfg(data_root, weights)
    eager = Backbones(cfg.model)
    builds = VisionBuilds(monkeypatch)
    lazy = LazyBackbones(cfg.model)
    assert builds.total() == 0 and not lazy.built
    assert lazy.text_source.startswith("checkpoint")
    # the file's values, not the seeded init: loading really happened
    ref = eager.clip_model.state_dict()
    got = lazy.text_model.state_dict()
    assert got.keys() and all(torch.equal(got[k], ref[k]) for k in got)
    assert not torch.equal(got["token_embedding.weight"], build_clip("tiny", "", 8)[0].token_embedding.weight)
    assert torch.equal(lazy.text_model.attn_mask, eager.clip_model.attn_mask)
    for name in ("clip_dim", "dino_dim", "clip_image_size", "dino_image_size", "grid", "text_width"):
        assert getattr(lazy, name) == getattr(eager, name), name
    assert lazy.tap_counts() == (len(eager.clip.taps), len(eager.dino.taps))
    prompts = ["a photo of a flawless bottle", "a photo of a damaged bottle"]
    assert torch.equal(lazy.text.encode_text(prompts), eager.text.encode_text(prompts))
    # first need: a forward builds the real backbones once, with the eager features
    images = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    a, b = lazy(images), eager(images)
    assert lazy.built and builds.calls["Backbones"] == 1
    assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in a.names())
    lazy(images)
    assert builds.calls["Backbones"] == 1 and lazy.forward_calls == 2


def test_random_clip_weights_build_the_same_text_tower(data_root, monkeypatch):
    cfg = synthetic_config(data_root)  # clip_pretrained="" and dino_weights="": seeded random init
    eager = Backbones(cfg.model)
    builds = VisionBuilds(monkeypatch)
    lazy = LazyBackbones(cfg.model)
    assert builds.calls["DinoEncoder"] == builds.calls["build_dino_model"] == 0  # DINO deferred
    assert builds.calls["ClipVisionEncoder"] == 0
    ref = eager.clip_model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in lazy.text_model.state_dict().items())


@pytest.mark.slow  # several training runs
def test_warm_cache_trial_builds_no_vision_tower_and_matches_eager_bit_for_bit(data_root, weights, tmp_path, monkeypatch):
    cfg = _cfg(data_root, weights, feature_cache=str(tmp_path / "cache"))
    monkeypatch.setenv(LAZY_BACKBONES_ENV, "0")
    fit(cfg)  # eager: fills the cache and records the alias of the weights' identity
    eager = fit(cfg).history  # eager, warm
    monkeypatch.delenv(LAZY_BACKBONES_ENV)
    builds = VisionBuilds(monkeypatch)
    lazy = fit(cfg).history  # lazy is the default with a cache
    assert builds.total() == 0, builds.calls
    assert len(lazy) == 2
    for a, b in zip(eager, lazy, strict=True):
        assert a == b  # every metric of every epoch, exactly
    model = build_model(cfg, torch.device("cpu"))
    assert isinstance(model.backbones, LazyBackbones)
    assert not isinstance(build_model(cfg.override({"feature_cache": ""}), torch.device("cpu")).backbones, LazyBackbones)


def test_cold_cache_lazy_trial_builds_once_and_records_the_alias(data_root, weights, tmp_path, monkeypatch):
    cfg = _cfg(data_root, weights, feature_cache=str(tmp_path / "cache"), epochs=1)
    builds = VisionBuilds(monkeypatch)
    first = fit(cfg).history  # misses: the vision towers are built on first need, once
    assert builds.calls["Backbones"] == 1 and builds.calls["DinoEncoder"] == 1
    aliases = list((tmp_path / "cache" / "aliases").iterdir())
    assert len(aliases) == 1
    second = fit(cfg).history
    assert builds.calls["Backbones"] == 1  # warm now: nothing more built
    assert first == second


def test_changed_weights_file_misses_the_alias(data_root, weights, tmp_path, monkeypatch):
    import shutil

    clip_file, dino_dir = weights
    own = tmp_path / "clip.pt"
    shutil.copy(clip_file, own)
    cfg = _cfg(data_root, (own, dino_dir))
    root = tmp_path / "cache"
    lazy = LazyBackbones(cfg.model)
    cache = FeatureCache(root, lazy, cfg.model)  # no alias yet: builds, records it
    assert lazy.built
    again = LazyBackbones(cfg.model)
    assert FeatureCache(root, again, cfg.model).dir == cache.dir and not again.built
    sd = torch.load(own, weights_only=True)
    sd["visual.proj"] = sd["visual.proj"] * 2  # other visual weights, new mtime
    torch.save(sd, own)
    changed = LazyBackbones(cfg.model)
    other = FeatureCache(root, changed, cfg.model)
    assert changed.built and other.dir != cache.dir  # a new spec, never the old features


def test_alias_that_no_longer_matches_fails_at_the_first_miss(data_root, weights, tmp_path):
    cfg = _cfg(data_root, weights)
    root = tmp_path / "cache"
    FeatureCache(root, LazyBackbones(cfg.model), cfg.model)
    alias = next((root / "aliases").iterdir())
    # point the alias at another spec folder (as if the weights had changed in place)
    fake = "f" * 64
    (root / fake[:24]).mkdir()
    spec = (root / alias.read_text()[:24] / "spec.json").read_text().replace(alias.read_text(), fake)
    (root / fake[:24] / "spec.json").write_text(spec)
    alias.write_text(fake)
    lazy = LazyBackbones(cfg.model)
    cache = FeatureCache(root, lazy, cfg.model)
    assert cache.spec_hash == fake and not lazy.built
    with pytest.raises(FeatureCacheError, match="no longer match"):
        cache.get_batch(torch.rand(1, 3, 112, 112))
    assert not alias.exists()


def test_kept_text_tower_is_a_copy_with_the_same_tensors(data_root, weights, monkeypatch):
    """``SSVP_KEEP_TEXT_TOWER=1`` (reused trial processes): the second model reads no weights, gets its
    own copy of the same tensors, and a trial that moves or changes its copy leaves the next one alone."""
    from ssvp.lazy_backbones import KEEP_TEXT_ENV, _KEPT_TEXT

    monkeypatch.setenv(KEEP_TEXT_ENV, "1")
    _KEPT_TEXT.clear()
    cfg = _cfg(data_root, weights)
    first = LazyBackbones(cfg.model)
    assert first.timings["weights_read_s"] > 0 and "kept" not in first.text_source
    second = LazyBackbones(cfg.model)
    assert second.timings["weights_read_s"] == 0.0 and second.text_source.endswith("kept in this process")
    a, b = first.text_model.state_dict(), second.text_model.state_dict()
    assert all(torch.equal(a[k], b[k]) and a[k].data_ptr() != b[k].data_ptr() for k in a)
    with torch.no_grad():
        first.text_model.token_embedding.weight.add_(1.0)  # a trial's copy changed in place
    third = LazyBackbones(cfg.model)
    assert torch.equal(third.text_model.token_embedding.weight, b["token_embedding.weight"])
    prompts = ["a photo of a flawless bottle"]
    assert torch.equal(third.text.encode_text(prompts), second.text.encode_text(prompts))
    # another weights file is another key: built anew, and the master copy is replaced (one kept)
    other = LazyBackbones(_cfg(data_root, weights, clip_pretrained="").model)
    assert "kept" not in other.text_source and len(_KEPT_TEXT) == 1
    monkeypatch.delenv(KEEP_TEXT_ENV)
    assert "kept" not in LazyBackbones(cfg.model).text_source
    _KEPT_TEXT.clear()


@pytest.mark.slow  # several training runs
def test_trials_in_one_process_train_as_in_fresh_processes(data_root, weights, tmp_path, monkeypatch):
    """Three warm-cache trials in one process (kept text tower, other gamma in the middle) give the
    histories that trials in their own processes give: nothing of one trial leaks into the next."""
    from ssvp.lazy_backbones import KEEP_TEXT_ENV, _KEPT_TEXT

    cfg = _cfg(data_root, weights, feature_cache=str(tmp_path / "cache"))
    fresh = fit(cfg).history  # also warms the cache
    other = fit(cfg.override({"gamma": 0.2})).history
    monkeypatch.setenv(KEEP_TEXT_ENV, "1")
    _KEPT_TEXT.clear()
    kept = [fit(cfg).history, fit(cfg.override({"gamma": 0.2})).history, fit(cfg).history]
    assert kept == [fresh, other, fresh]
    assert fresh != other
    _KEPT_TEXT.clear()
