"""Frozen backbones (Eq. 1): shapes, grid alignment, tapped tokens against the libraries' own passes."""
from __future__ import annotations

import copy
import time

import pytest
import torch

from ssvp.backbones import (
    DINO_REGISTRY,
    BackboneFeatures,
    BackboneWeightsError,
    Backbones,
    DinoEncoder,
    GridMismatchError,
    build_clip,
    build_dino_model,
    dino_tap_indices,
)
from ssvp.config import Config

OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    return Backbones(Config.tiny().model)


# ----- shapes, sizes, grid -----
def test_tiny_shapes_and_grid(tiny):
    assert (tiny.grid, tiny.clip_image_size, tiny.dino_image_size) == (8, 112, 128)
    assert (tiny.clip_dim, tiny.dino_dim, tiny.text_width) == (64, 64, 64)
    images = torch.rand(8, 3, 96, 96)  # any input size: each backbone resizes to its own
    feats = tiny(images)
    assert isinstance(feats, BackboneFeatures)
    assert feats.clip_patch.shape == (8, 4, 64, 64)
    assert feats.clip_global.shape == (8, 64)
    assert feats.dino_patch.shape == (8, 4, 64, 64)
    assert feats.dino_global.shape == (8, 64)
    assert feats.grid == 8
    assert all(getattr(feats, n).dtype == torch.float32 for n in feats.names())
    assert torch.isfinite(feats.clip_patch).all() and torch.isfinite(feats.dino_patch).all()
    # samples are independent: a sub-batch gives the same rows
    sub = tiny(images[2:4])
    torch.testing.assert_close(sub.clip_patch, feats.clip_patch[2:4], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sub.dino_global, feats.dino_global[2:4], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "dino_model, dino_size, dino_dim",
    [("dinov3_vitl16", 592, 1024), ("dinov2_vitl14", 518, 1024), ("mae_vitl16", 592, 1024),
     ("dinov3_vitb16", 592, 768), ("dinov3_vits16", 592, 384), ("dinov3_vits16plus", 592, 384)],
)
def test_full_size_construction_on_meta(dino_model, dino_size, dino_dim):
    """Paper sizes: g = 37, CLIP ViT-L/14 at 518 px (768-d joint space), DINO at patch * 37 px."""
    cfg = Config().override({"clip_pretrained": "", "dino_weights": "", "dino_model": dino_model})
    with torch.device("meta"):  # real classes and shapes, no memory, no init time
        bb = Backbones(cfg.model)
        feats = bb(torch.rand(1, 3, 518, 518))
    assert (bb.grid, bb.clip_image_size, bb.dino_image_size) == (37, 518, dino_size)
    assert (bb.clip_dim, bb.dino_dim, bb.text_width) == (768, dino_dim, 768)
    # CLIP positional embeddings built for the 37 x 37 grid (+ class token)
    assert tuple(bb.clip.visual.positional_embedding.shape) == (37 * 37 + 1, 1024)
    # DINO stops after its last tapped block (11 of 24 / 12): later blocks are not even kept
    assert len(bb.dino._layers()) == 11
    assert feats.clip_patch.shape == (1, 4, 1369, 768)
    assert feats.dino_patch.shape == (1, 4, 1369, dino_dim)
    assert feats.dino_global.shape == (1, dino_dim)


def test_grid_mismatch_is_a_clear_error():
    cfg = Config.tiny().model
    with pytest.raises(GridMismatchError, match=r"DINO image size 130 px.*8x8 grid.*16 x grid 8 = 128"):
        Backbones(cfg, dino_image_size=130)
    with pytest.raises(GridMismatchError, match=r"CLIP image size 120 px"):
        Backbones(cfg, clip_image_size=120)
    Backbones(cfg, clip_image_size=112, dino_image_size=128)  # the matching sizes are accepted


def test_fusion_none_builds_no_dino():
    bb = Backbones(Config.tiny(fusion="none").model)
    assert bb.dino is None and bb.dino_dim == 0
    assert not any("dino" in name for name, _ in bb.named_parameters())
    feats = bb(torch.rand(2, 3, 112, 112))
    assert feats.dino_patch.shape == (2, 0, 64, 0) and feats.dino_global.shape == (2, 0)


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = Backbones(Config.tiny().model)
    assert torch.equal(torch.rand(3), expected)  # building did not consume the caller's RNG
    b = Backbones(Config.tiny().model)
    images = torch.rand(2, 3, 112, 112)
    fa, fb = a(images), b(images)
    assert torch.equal(fa.clip_patch, fb.clip_patch) and torch.equal(fa.dino_patch, fb.dino_patch)


# ----- tapped tokens equal the libraries' own passes -----
@pytest.mark.parametrize("name", ["dinov3_tiny", "dinov2_tiny", "mae_tiny"])
@pytest.mark.parametrize("norm", [False, True])
def test_truncated_dino_equals_full_forward(name, norm):
    full, spec, _ = build_dino_model(name, "", 8)
    full.eval()
    taps = [1, 3]
    enc = DinoEncoder(copy.deepcopy(full), spec.family, taps, grid=8, patch=spec.patch, norm=norm)
    assert len(enc._layers()) == 3 < full.config.num_hidden_layers  # block 4 is never run
    x = torch.randn(2, 3, 8 * spec.patch, 8 * spec.patch)
    kwargs = {}
    if spec.family == "mae":  # full pass without masking and in identity order
        kwargs = dict(noise=torch.arange(64.0).expand(2, 64), interpolate_pos_encoding=True)
    with torch.no_grad():
        hidden = full(pixel_values=x, output_hidden_states=True, **kwargs).hidden_states  # [emb, block1, ...]
        patch, cls = enc(x)
    final_norm = full.norm if spec.family == "dinov3" else full.layernorm
    prefix = 1 + (4 if spec.family == "dinov3" else 0)  # CLS (+ 4 registers for DINOv3)
    for j, t in enumerate(taps):
        ref = final_norm(hidden[t]) if norm else hidden[t]
        torch.testing.assert_close(patch[:, j], ref[:, prefix:], atol=1e-5, rtol=1e-5)
    ref_last = final_norm(hidden[taps[-1]]) if norm else hidden[taps[-1]]
    torch.testing.assert_close(cls, ref_last[:, 0], atol=1e-5, rtol=1e-5)
    assert patch.shape == (2, 2, 64, 64)


def test_backbones_dino_resizes_and_normalises_like_the_reference(tiny):
    """Backbones = ImageNet normalisation at 16 g px + the truncated pass of the same weights."""
    images = torch.rand(2, 3, 128, 128)  # already DINO's size: no resize
    with torch.no_grad():
        hidden = tiny.dino.model(pixel_values=(images - IMAGENET_MEAN) / IMAGENET_STD, output_hidden_states=True)
        feats = tiny(images)
    ref = tiny.dino.model.norm(hidden.hidden_states[4])
    torch.testing.assert_close(feats.dino_patch[:, 3], ref[:, 5:], atol=1e-5, rtol=1e-5)


def test_clip_taps_equal_open_clip_forward_intermediates():
    taps = [1, 3]
    bb = Backbones(Config.tiny(clip_layers=taps, dino_layers=taps).model)
    assert len(bb.clip.visual.transformer.resblocks) == 3  # truncated after the last tap
    reference, _, _, _ = build_clip("tiny", "", 8)  # same seeded random weights, all 4 blocks
    reference.eval()
    images = torch.rand(2, 3, 112, 112)
    x = (images - OPENAI_MEAN) / OPENAI_STD
    with torch.no_grad():
        out = reference.visual.forward_intermediates(
            x, indices=[t - 1 for t in taps], normalize_intermediates=True, output_fmt="NLC",
            output_extra_tokens=True,
        )
        feats = bb(images)
    proj = reference.visual.proj
    for j in range(len(taps)):
        torch.testing.assert_close(feats.clip_patch[:, j], out["image_intermediates"][j] @ proj, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        feats.clip_global, out["image_intermediates_prefix"][-1][:, 0] @ proj, atol=1e-5, rtol=1e-5
    )


def test_clip_last_layer_global_equals_encode_image(tiny):
    """With the last block tapped, the global token is exactly CLIP's image embedding."""
    images = torch.rand(3, 3, 112, 112)
    with torch.no_grad():
        ref = tiny.clip_model.encode_image((images - OPENAI_MEAN) / OPENAI_STD)
        feats = tiny(images)
    torch.testing.assert_close(feats.clip_global, ref, atol=1e-5, rtol=1e-5)


# ----- frozen, text encoder -----
def test_frozen_and_always_eval(tiny):
    assert all(not p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not any(m.training for m in tiny.modules())
    assert list(tiny.text.parameters()) == []  # a head holding the text encoder owns no backbone weights
    assert tiny.text.state_dict() == {}


def test_encode_embeddings_matches_encode_text_and_passes_gradients(tiny):
    text = tiny.text
    prompts = ["a photo of a flawless bottle", "a photo of a damaged bottle", "scratch"]
    ids = text.tokenize(prompts)
    assert ids.shape == (3, text.context_length) and ids.dtype == torch.long
    emb = text.token_embedding(ids).detach().clone().requires_grad_(True)
    assert emb.shape == (3, text.context_length, text.width)
    out = text.encode_embeddings(emb, text.eot_index(ids))
    with torch.no_grad():
        ref = tiny.clip_model.encode_text(ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.shape == (3, tiny.clip_dim)
    (out**2).sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())  # nothing reaches the frozen weights


def test_encode_embeddings_is_causal(tiny):
    text = tiny.text
    ids = text.tokenize(["a photo of a damaged bottle"])
    eot = text.eot_index(ids)
    emb = text.token_embedding(ids)
    base = text.encode_embeddings(emb, eot)
    after, before = emb.clone(), emb.clone()
    bump = torch.randn(text.width, generator=torch.Generator().manual_seed(0))  # not a constant: LN removes those
    after[:, int(eot) + 1] += bump  # a token after EOT: invisible under the causal mask
    before[:, 1] += bump  # a token before EOT changes the feature
    torch.testing.assert_close(text.encode_embeddings(after, eot), base, atol=1e-6, rtol=1e-6)
    assert (text.encode_embeddings(before, eot) - base).abs().max() > 1e-4
    # gradients only reach positions up to EOT
    x = emb.detach().clone().requires_grad_(True)
    text.encode_embeddings(x, eot).sum().backward()
    assert x.grad[:, int(eot) + 1 :].abs().max() == 0 and x.grad[:, : int(eot) + 1].abs().sum() > 0


# ----- weights errors -----
def test_missing_clip_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "clip.pt"
    cfg = Config.tiny(clip_model="ViT-B-32", clip_pretrained=str(missing)).model
    with pytest.raises(BackboneWeightsError, match="nope/clip.pt.*does not exist") as info:
        Backbones(cfg)
    assert "local checkpoint" in str(info.value) and isinstance(info.value, ValueError)


def test_unreadable_clip_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(BackboneWeightsError, match="broken.pt"):
        Backbones(Config.tiny(clip_pretrained=str(bad)).model)


def test_clip_tag_offline_and_unknown_tag():
    t0 = time.perf_counter()
    with pytest.raises(BackboneWeightsError, match="'openai'.*ViT-L-14.*HF_HUB_OFFLINE"):
        build_clip("ViT-L-14", "openai", 37)
    assert time.perf_counter() - t0 < 20  # offline: fails fast instead of waiting on hub retries (27-46 s)
    with pytest.raises(BackboneWeightsError, match="known tags: .*openai"):
        build_clip("ViT-L-14", "no_such_tag", 37)


def test_dino_weights_errors(tmp_path):
    with pytest.raises(BackboneWeightsError, match="missing_dir.*does not exist"):
        build_dino_model("dinov3_tiny", str(tmp_path / "missing_dir"), 8)
    t0 = time.perf_counter()
    with pytest.raises(BackboneWeightsError, match="facebook/dinov3-vitl16-pretrain-lvd1689m.*huggingface-cli"):
        build_dino_model("dinov3_vitl16", "facebook/dinov3-vitl16-pretrain-lvd1689m", 37)
    assert time.perf_counter() - t0 < 20
    with pytest.raises(ValueError, match="dino_model='dinov9'.*dinov3_vitl16"):
        build_dino_model("dinov9", "", 8)


def test_local_dino_folder_round_trip(tmp_path):
    """A saved transformers folder is accepted as dino_weights and gives the same features."""
    model, _, _ = build_dino_model("dinov3_tiny", "", 8)
    model.save_pretrained(tmp_path / "dino")
    a = Backbones(Config.tiny().model)
    b = Backbones(Config.tiny(dino_weights=str(tmp_path / "dino")).model)
    images = torch.rand(1, 3, 128, 128)
    torch.testing.assert_close(a(images).dino_patch, b(images).dino_patch)
    assert a.spec()["dino_weights"] == b.spec()["dino_weights"]
    assert a.spec()["dino"] != b.spec()["dino"]


def test_taps_out_of_range():
    with pytest.raises(ValueError, match=r"dino_layers=\[1, 9\].*outside 1..4"):
        Backbones(Config.tiny(dino_layers=[1, 9], clip_layers=[1, 2]).model)


def test_registry_names_match_config_doc():
    for name in ("dinov3_vitl16", "dinov3_vitb16", "dinov3_vits16", "dinov3_vits16plus", "dinov2_vitl14",
                 "mae_vitl16", "dinov3_tiny"):
        assert name in DINO_REGISTRY


@pytest.mark.parametrize("name, low, high", [("dinov3_vits16plus", 28.0e6, 30.0e6), ("dinov3_vits16", 21.0e6, 22.5e6)])
def test_table5_small_dinov3_is_vit_s_plus_at_29m(name, low, high):
    """Table 5 lists the DINOv3 ViT-Small at 29M parameters: that is ViT-S+/16 (gated MLP), not ViT-S/16 (21.6M)."""
    with torch.device("meta"):
        model, spec, _ = build_dino_model(name, "", 37)
    n = sum(p.numel() for p in model.parameters())
    assert low <= n <= high, n
    assert DINO_REGISTRY["dinov3_vits16plus"].default_weights == "facebook/dinov3-vits16plus-pretrain-lvd1689m"


def test_dino_taps_as_written_or_spread():
    """model.dino_taps: {3, 6, 9, 11} as written; spread over the depth: {6, 12, 18, 24} on 24 blocks."""
    paper = Config().model
    assert dino_tap_indices(paper, 24) == [3, 6, 9, 11]
    spread = Config().override({"dino_taps": "spread"}).model
    assert dino_tap_indices(spread, 24) == [6, 12, 18, 24] and dino_tap_indices(spread, 12) == [3, 6, 9, 12]
    a = Backbones(Config.tiny(dino_layers=[1, 2], clip_layers=[1, 2]).model)
    b = Backbones(Config.tiny(dino_layers=[1, 2], clip_layers=[1, 2], dino_taps="spread").model)
    assert a.dino.taps == [1, 2] and b.dino.taps == [2, 4]
    images = torch.rand(1, 3, 112, 112)
    assert (a(images).dino_patch - b(images).dino_patch).abs().max() > 1e-4


def test_dino_branch_takes_its_own_input(tiny):
    """§4.2: forward(images, images_dino) runs DINO on images_dino (its own resolution of the original)."""
    clip_in, dino_in = torch.rand(2, 3, 112, 112), torch.rand(2, 3, 128, 128)
    both = tiny(clip_in, dino_in)
    dino_only = tiny(dino_in)  # DINO gets dino_in unchanged (already 128 px)
    torch.testing.assert_close(both.dino_patch, dino_only.dino_patch)
    torch.testing.assert_close(both.clip_patch, tiny(clip_in).clip_patch)
    assert (both.dino_patch - tiny(clip_in).dino_patch).abs().max() > 1e-4  # not the upsampled CLIP input
    with pytest.raises(ValueError, match="images_dino"):
        tiny(clip_in, torch.rand(3, 3, 128, 128))


def test_clip_checkpoint_positional_embeddings_resampled_to_grid(tmp_path):
    """A checkpoint made for another grid loads with its position grid resized (bicubic) to g x g."""
    source, _, _, _ = build_clip("tiny", "", 8)
    path = tmp_path / "tiny_clip_g8.pt"
    torch.save(source.state_dict(), path)
    bb = Backbones(Config.tiny(grid=6, clip_pretrained=str(path)).model)
    assert bb.clip_image_size == 84
    pos = source.visual.positional_embedding.detach()
    grid = pos[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True, align_corners=False)
    expected = torch.cat([pos[:1], expected.permute(0, 2, 3, 1).reshape(36, -1)])
    torch.testing.assert_close(bb.clip.visual.positional_embedding, expected)
    # everything else is the checkpoint's
    torch.testing.assert_close(bb.clip.visual.proj, source.visual.proj)
    assert torch.equal(bb.clip_model.token_embedding.weight, source.token_embedding.weight)


# ----- CLIP ViT-L/14-336 (OpenAI), the 518-px recipe's checkpoint (docs/PAPER_MAP.md) -----
def _released_vit_l14_336(path, full_random: tuple[str, ...] = ("visual.positional_embedding",)):
    """A file in the layout of OpenAI's released ViT-L-14-336px state dict: open_clip's
    ViT-L-14-336 keys and shapes, fp16, and the three scalars OpenAI's state dict carries. Random
    values; to keep the file small, tensors not in ``full_random`` repeat one random row
    (a stride-0 view stores one row)."""
    import open_clip

    with torch.device("meta"):
        ref = open_clip.create_model("ViT-L-14-336", device="meta")
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, t in ref.state_dict().items():
        if key in full_random or t.dim() == 0:
            state[key] = (torch.randn(t.shape, generator=gen) * 0.02).half()
        else:
            state[key] = (torch.randn(t.shape[-1], generator=gen) * 0.02).half().expand(t.shape)
    state.update(input_resolution=torch.tensor(336), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(state, path)
    return state


def _vit_l14_336(path, taps=(6, 12, 18, 24)):
    return Config().override({"clip_model": "ViT-L-14-336", "clip_pretrained": str(path), "fusion": "none",
                              "clip_layers": list(taps)}).model


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")
def test_released_clip_336_layout_loads_strictly_at_518px(tmp_path):
    """Keys, shapes and the 577 -> 1370 positional embedding of OpenAI's ViT-L/14-336 load through
    clip_pretrained=<file> (strict) and give [B, 4, 1369, 768] patch features (meta: shapes only)."""
    path = tmp_path / "ViT-L-14-336px.pt"
    _released_vit_l14_336(path)
    assert path.stat().st_size < 20e6
    with torch.device("meta"):
        bb = Backbones(_vit_l14_336(path))
        feats = bb(torch.rand(2, 3, 518, 518))
    assert (bb.grid, bb.clip_image_size, bb.clip_dim) == (37, 518, 768)
    assert tuple(bb.clip.visual.positional_embedding.shape) == (37 * 37 + 1, 1024)
    assert feats.clip_patch.shape == (2, 4, 1369, 768) and feats.clip_global.shape == (2, 768)
    # OpenAI's weights use QuickGELU: its release is recognised without "openai" in the file name
    assert type(bb.clip.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    # a key missing from the release is refused (strict), naming the file
    state = torch.load(path, weights_only=True)
    del state["visual.proj"]
    torch.save(state, tmp_path / "broken.pt")
    with torch.device("meta"), pytest.raises(BackboneWeightsError, match="(?s)broken.pt.*visual.proj"):
        Backbones(_vit_l14_336(tmp_path / "broken.pt"))


@pytest.mark.slow
def test_released_clip_336_values_load_and_positions_are_resampled(tmp_path):
    """The same file on real memory: the 24 x 24 position grid resampled bicubically to 37 x 37, the
    other weights the file's, finite [1, 4, 1369, 768] features (4 early taps keep the forward short)."""
    path = tmp_path / "ViT-L-14-336px.pt"
    state = _released_vit_l14_336(path)
    bb = Backbones(_vit_l14_336(path, taps=(1, 2, 3, 4)))
    pos = state["visual.positional_embedding"].float()
    grid = pos[1:].reshape(1, 24, 24, -1).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(37, 37), mode="bicubic", antialias=True, align_corners=False)
    expected = torch.cat([pos[:1], expected.permute(0, 2, 3, 1).reshape(1369, -1)])
    torch.testing.assert_close(bb.clip.visual.positional_embedding, expected)
    torch.testing.assert_close(bb.clip.visual.proj, state["visual.proj"].float())
    feats = bb(torch.rand(1, 3, 518, 518))
    assert feats.clip_patch.shape == (1, 4, 1369, 768) and torch.isfinite(feats.clip_patch).all()


def test_torchscript_clip_release_loads_like_a_state_dict(tmp_path):
    """OpenAI's releases are TorchScript archives (torch.load(weights_only=True) refuses them): the
    archive's weights load, positions resampled, and it counts as OpenAI's (QuickGELU)."""
    from ssvp.backbones import _read_clip_file

    source, _, _, _ = build_clip("tiny", "", 8)
    traced = torch.jit.trace(source.eval(), (torch.rand(1, 3, 112, 112), torch.randint(0, 100, (1, 32))),
                             check_trace=False)
    path = tmp_path / "ViT-tiny.pt"
    traced.save(str(path))
    state, released = _read_clip_file(str(path))
    assert released and set(state) == set(source.state_dict())
    bb = Backbones(Config.tiny(grid=6, clip_pretrained=str(path)).model)
    assert bb.clip_image_size == 84
    torch.testing.assert_close(bb.clip.visual.proj, source.visual.proj)
    assert torch.equal(bb.clip_model.token_embedding.weight, source.token_embedding.weight)
