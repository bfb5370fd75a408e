"""HSVS (Eq. 2-5), VCPG (Eq. 7-11) and VTAM (Eq. 13-19, Alg. 2) on small tensors, against hand computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssvp.hsvs import ATFBlock, ConcatFusion, HSVSFusion
from ssvp.vcpg import VCPG, image_noise
from ssvp.vtam import VTAM, global_score, local_score, local_term, state_probs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- HSVS / ATF
def _manual_attn(x_q, x_kv, mod):
    """Single-head Softmax(Q K^T / sqrt(d)) V with the module's own projections (Eq. 3-4)."""
    q, k, v = mod.q(x_q), mod.k(x_kv), mod.v(x_kv)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v


def _mlp(x, mlp):
    """F_mlp of Eq. 5 by hand: W2 GELU(W1 x + b1) + b2."""
    h = F.gelu(x @ mlp[0].weight.T + mlp[0].bias)
    return h @ mlp[2].weight.T + mlp[2].bias


def test_atf_matches_hand_computation():
    blk = ATFBlock(clip_dim=8, dino_dim=12, heads=1)
    assert isinstance(blk.mlp[1], torch.nn.GELU) and blk.mlp[0].in_features == 16  # two-layer GELU MLP
    f_c, f_d = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    a_cd = _manual_attn(f_c, f_d, blk.c2d)  # Eq. 3
    a_dc = _manual_attn(f_d, f_c, blk.d2c)  # Eq. 3
    z = torch.cat([F.layer_norm(a_cd, (8,)), F.layer_norm(a_dc, (8,))], -1)  # Eq. 4 (LN affine = identity at init)
    expected = f_c + _mlp(z, blk.mlp)  # Eq. 5
    torch.testing.assert_close(blk(f_c, f_d), expected, rtol=1e-5, atol=1e-5)
    blk.residual = False
    torch.testing.assert_close(blk(f_c, f_d), expected - f_c, rtol=1e-5, atol=1e-5)


def test_eq5_mlp_on_a_hand_computed_token():
    """D_c = 1: Z_joint = [a, b]; F_mlp = w2 * GELU(w1 . z + b1) + b2, numbers by hand."""
    blk = ATFBlock(clip_dim=1, dino_dim=1, heads=1, ln=False)
    with torch.no_grad():
        for lin in (blk.c2d.q, blk.c2d.k, blk.c2d.v, blk.d2c.q, blk.d2c.k, blk.d2c.v):
            lin.weight.fill_(1.0)
            lin.bias.zero_()
        blk.mlp[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
        blk.mlp[0].bias.fill_(0.5)
        blk.mlp[2].weight.fill_(3.0)
        blk.mlp[2].bias.fill_(-1.0)
    # one token each: the softmax over one key is 1, so Attn_{c->d} = f_d, Attn_{d->c} = f_c
    out = blk(torch.tensor([[[2.0]]]), torch.tensor([[[0.25]]]))
    h = 1.0 * 0.25 + 2.0 * 2.0 + 0.5  # 4.75
    gelu = 0.5 * h * (1 + math.erf(h / math.sqrt(2)))
    assert out.item() == pytest.approx(2.0 + 3.0 * gelu - 1.0, rel=1e-5)


def test_ln_option_drops_the_eq4_layernorm():
    """model.ln_eq4_eq11=false (Algorithm 1 line 5): Z_joint = [Attn_{c->d} || Attn_{d->c}]."""
    blk = ATFBlock(clip_dim=8, dino_dim=12, heads=1, ln=False)
    f_c, f_d = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    z = torch.cat([_manual_attn(f_c, f_d, blk.c2d), _manual_attn(f_d, f_c, blk.d2c)], -1)
    torch.testing.assert_close(blk(f_c, f_d), f_c + _mlp(z, blk.mlp), rtol=1e-5, atol=1e-5)
    with_ln = ATFBlock(clip_dim=8, dino_dim=12, heads=1, ln=True)
    with_ln.load_state_dict(blk.state_dict(), strict=False)
    assert (with_ln(f_c, f_d) - blk(f_c, f_d)).abs().max() > 1e-3


def test_atf_single_token_reduces_to_value_projection():
    """Global token: softmax over one key is 1, so Attn_{c->d} = V_d (Eq. 3)."""
    blk = ATFBlock(clip_dim=8, dino_dim=6, heads=2)
    f_c, f_d = torch.randn(3, 1, 8), torch.randn(3, 1, 6)
    torch.testing.assert_close(blk.c2d(f_c, f_d), blk.c2d.v(f_d), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blk.d2c(f_d, f_c), blk.d2c.v(f_c), rtol=1e-5, atol=1e-6)


def test_atf_multihead_shape_and_head_check():
    blk = ATFBlock(clip_dim=8, dino_dim=12, heads=4)
    out = blk(torch.randn(2, 9, 8), torch.randn(2, 9, 12))
    assert out.shape == (2, 9, 8)
    with pytest.raises(ValueError, match="attn_heads"):
        ATFBlock(clip_dim=10, dino_dim=12, heads=4)


def test_concat_fusion_matches_hand_computation():
    blk = ConcatFusion(clip_dim=8, dino_dim=12)
    f_c, f_d = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    cat = torch.cat([F.layer_norm(f_c, (8,)), F.layer_norm(f_d, (12,))], -1)
    torch.testing.assert_close(blk(f_c, f_d), f_c + _mlp(cat, blk.mlp), rtol=1e-5, atol=1e-5)
    # rows B and C of Table 3 differ only by the attention: the same MLP shape and residual
    atf = ATFBlock(clip_dim=8, dino_dim=12, heads=1)
    assert [type(m) for m in blk.mlp] == [type(m) for m in atf.mlp]
    assert blk.mlp[2].weight.shape == atf.mlp[2].weight.shape


def test_fusion_pairs_layers_one_to_one():
    fus = HSVSFusion("atf", n_layers=3, clip_dim=8, dino_dim=12, heads=2)
    cp, cg = torch.randn(2, 3, 4, 8), torch.randn(2, 8)
    dp, dg = torch.randn(2, 3, 4, 12), torch.randn(2, 12)
    out, g = fus(cp, cg, dp, dg)
    assert out.shape == (2, 3, 4, 8) and g.shape == (2, 8)
    dp2 = dp.clone()
    dp2[:, 1] += 1.0  # perturb DINO layer 2 only
    out2, g2 = fus(cp, cg, dp2, dg)
    changed = [(out2[:, i] - out[:, i]).abs().max().item() > 1e-6 for i in range(3)]
    assert changed == [False, True, False]
    torch.testing.assert_close(g2, g)  # the global block sees only the global tokens
    torch.testing.assert_close(fus.layers[1](cp[:, 1], dp2[:, 1]), out2[:, 1])
    torch.testing.assert_close(fus.global_block(cg[:, None], dg[:, None])[:, 0], g)


def test_fusion_none_is_identity_and_errors_name_the_problem():
    fus = HSVSFusion("none", n_layers=2, clip_dim=8, dino_dim=0, heads=2)
    assert sum(p.numel() for p in fus.parameters()) == 0
    cp, cg = torch.randn(1, 2, 4, 8), torch.randn(1, 8)
    out, g = fus(cp, cg, None, None)
    assert out is cp and g is cg
    atf = HSVSFusion("atf", n_layers=2, clip_dim=8, dino_dim=6, heads=2)
    with pytest.raises(ValueError, match="dino_patch is empty"):
        atf(cp, cg, torch.zeros(1, 0, 4, 0), torch.zeros(1, 0))
    with pytest.raises(ValueError, match="clip_layers"):
        atf(torch.randn(1, 3, 4, 8), cg, torch.randn(1, 3, 4, 6), torch.randn(1, 6))
    with pytest.raises(ValueError, match="fusion"):
        HSVSFusion("sum", 2, 8, 6, 2)


# ----------------------------------------------------------------------------- VCPG
def test_alpha_zero_gives_layernorm_of_t_init():
    vc = VCPG(dim=16, latent_dim=4, heads=2, alpha_init=0.0)
    t_init = torch.randn(3, 2, 3, 16) * 5 + 2
    out = vc(torch.randn(3, 16), t_init)
    torch.testing.assert_close(out["t_final"], F.layer_norm(t_init, (16,)), rtol=1e-5, atol=1e-5)  # Eq. 11
    no_ln = VCPG(dim=16, latent_dim=4, heads=2, alpha_init=0.0, ln=False)  # Algorithm 1 line 8
    torch.testing.assert_close(no_ln(torch.randn(3, 16), t_init)["t_final"], t_init)


def test_encoder_is_two_parallel_mlps():
    """Eq. 7: mu = F_mu(V), log sigma^2 = F_sigma(V), no shared trunk."""
    vc = VCPG(dim=8, latent_dim=3, heads=2)
    v = torch.randn(4, 8)
    mu, logvar = vc.encode(v)
    torch.testing.assert_close(mu, _mlp(v, vc.f_mu))
    torch.testing.assert_close(logvar, _mlp(v, vc.f_sigma).clamp(-10, 10))
    with torch.no_grad():
        for p in vc.f_sigma.parameters():
            p.add_(1.0)
    torch.testing.assert_close(vc.encode(v)[0], mu)  # F_sigma does not feed mu


def test_eq10_single_latent_token_gives_every_prompt_v_z():
    """As written (n_latent_tokens=1): one key, softmax = 1, delta_inj = Z W_V for every prompt."""
    vc = VCPG(dim=16, latent_dim=4, heads=2, alpha_init=0.7, z_infer="mu").eval()
    t_init, v = torch.randn(2, 2, 3, 16), torch.randn(2, 16)
    out = vc(v, t_init)
    torch.testing.assert_close(out["z"], out["mu"])  # z_infer=mu
    v_z = vc.cross.v(vc.latent_tokens(out["z"]))  # [B, 16]
    expected = F.layer_norm(t_init + 0.7 * v_z[:, None, None, :], (16,))  # Eq. 10-11
    torch.testing.assert_close(out["t_final"], expected, rtol=1e-5, atol=1e-5)


def test_alpha_nonzero_adds_gated_cross_attention_over_latent_tokens():
    vc = VCPG(dim=16, latent_dim=4, heads=1, alpha_init=0.7, n_latent_tokens=4, z_infer="mu").eval()
    t_init, v = torch.randn(2, 2, 3, 16), torch.randn(2, 16)
    out = vc(v, t_init)
    mem = vc.latent_tokens(out["z"]).view(2, 4, 16)
    q = t_init.reshape(2, 6, 16)
    h = _manual_attn(q, mem, vc.cross)  # Eq. 10
    expected = F.layer_norm(q + 0.7 * h, (16,)).view_as(t_init)  # Eq. 11
    torch.testing.assert_close(out["t_final"], expected, rtol=1e-5, atol=1e-5)
    assert (out["t_final"] - F.layer_norm(t_init, (16,))).abs().max() > 1e-3


def test_reparameterization_samples_in_training_and_seeded_at_inference():
    vc = VCPG(dim=8, latent_dim=5, heads=2, z_seed=7).train()
    mu, logvar = torch.randn(4, 5), torch.randn(4, 5)
    torch.manual_seed(123)
    z = vc.reparameterize(mu, logvar)
    torch.manual_seed(123)
    eps = torch.randn(4, 5)
    torch.testing.assert_close(z, mu + torch.exp(0.5 * logvar) * eps)  # Eq. 8
    # inference (§3.2.2 "the sampled z"): eps = R u, u = the image's unit key, R ~ N(0, 1) from z_seed
    vc.eval()
    key = torch.randn(4, 8)
    z1 = vc.reparameterize(mu, logvar, key)
    proj = torch.randn(5, 8, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z1, mu + torch.exp(0.5 * logvar) * (F.normalize(key, dim=-1) @ proj.T))
    torch.testing.assert_close(vc.reparameterize(mu, logvar, key), z1)  # reproducible
    torch.testing.assert_close(vc.reparameterize(mu[2:], logvar[2:], key[2:]), z1[2:])  # alone = in a batch
    vc.z_infer = "mu"  # the option
    assert torch.equal(vc.reparameterize(mu, logvar), mu)


def test_image_noise_is_standard_normal_over_seeds_for_a_fixed_image():
    """For one image, eps = R u over seeds is N(0, I): mean ~ 0, variance ~ 1, uncorrelated dimensions."""
    key = torch.randn(1, 8)
    eps = torch.cat([image_noise(key, 4, seed)[0] for seed in range(2000)])  # [2000, 4]
    assert eps.mean(0).abs().max() < 0.1
    torch.testing.assert_close(torch.cov(eps.T), torch.eye(4), atol=0.12, rtol=0)
    # two different images: different draws; a rescaled feature (same direction): the same draw
    assert (image_noise(torch.randn(1, 8), 4, 3) - image_noise(key, 4, 3)).abs().max() > 1e-3
    torch.testing.assert_close(image_noise(2.5 * key, 4, 3), image_noise(key, 4, 3))


def test_alpha_zero_blocks_attention_gradients_but_not_alpha():
    vc = VCPG(dim=8, latent_dim=4, heads=2, alpha_init=0.0)
    out = vc(torch.randn(2, 8), torch.randn(2, 2, 3, 8))
    (out["t_final"] * torch.randn_like(out["t_final"])).sum().backward()
    assert vc.alpha.grad is not None and vc.alpha.grad.abs() > 0
    for mod in (vc.cross, vc.latent_tokens):
        for p in mod.parameters():
            assert p.grad is None or torch.count_nonzero(p.grad) == 0


# ----------------------------------------------------------------------------- VTAM
def test_state_softmax_with_tau_matches_hand_computation():
    feats = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])  # [B=1, N=2, D=2]
    text = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # normal, abnormal (norms do not matter)
    tau = 0.5
    p = state_probs(feats, text, tau)
    # patch 1: cos = (1, 0) -> logits (2, 0); patch 2: cos = (0.6, 0.8) -> logits (1.2, 1.6)
    p_a1 = math.exp(0) / (math.exp(2) + math.exp(0))
    p_a2 = math.exp(1.6) / (math.exp(1.2) + math.exp(1.6))
    expected = torch.tensor([[[1 - p_a1, p_a1], [1 - p_a2, p_a2]]])
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-6)


def _vtam_inputs(b=2, n_layers=3, g=4, d=8):
    return torch.randn(b, n_layers, g * g, d), torch.randn(b, d), torch.randn(b, 2, d)


def _set_gates(vt, scale_logits, conv_weight=None, conv_bias=0.0):
    """Scale gate -> constant logits (last layer of F_gate^global), spatial gate -> given 1x1 conv."""
    with torch.no_grad():
        vt.scale_gate[2].weight.zero_()
        vt.scale_gate[2].bias.copy_(torch.tensor(scale_logits))
        vt.spatial_gate.weight.zero_()
        if conv_weight is not None:
            vt.spatial_gate.weight.copy_(torch.tensor(conv_weight).view_as(vt.spatial_gate.weight))
        vt.spatial_gate.bias.fill_(conv_bias)


def test_gates_as_written_eq15_17():
    vt = VTAM(n_layers=3, clip_dim=8, tau=0.07, gamma=0.5)
    patches, v, text = _vtam_inputs()
    out = vt(patches, v, text)
    torch.testing.assert_close(out["scale_weights"].sum(-1), torch.ones(2))  # Eq. 15 softmax
    assert isinstance(vt.scale_gate[1], torch.nn.GELU)  # F_gate^global is an MLP
    # Eq. 16: M = sigmoid(conv1x1(V^(l))), one conv shared by the layers, on the fused features
    grid = patches.view(2, 3, 4, 4, 8)
    m = torch.sigmoid(grid @ vt.spatial_gate.weight.view(8) + vt.spatial_gate.bias)
    torch.testing.assert_close(out["spatial_weights"], m, rtol=1e-5, atol=1e-6)
    expected = (out["scale_weights"][:, :, None, None] * m * out["layer_maps"][:, :, 1]).sum(1)  # Eq. 17
    torch.testing.assert_close(out["map"][:, 1], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["map"].sum(1), torch.ones(2, 4, 4))
    torch.testing.assert_close(out["layer_maps"].sum(2), torch.ones(2, 3, 4, 4))


def test_dual_gate_on_hand_computed_numbers():
    """D=2, t_n=(1,0), t_a=(0,1), tau=1. Layer 1 token (1,0): P = 1/(1+e); layer 2 token (0,1): P = e/(1+e).
    w_scale = (0.25, 0.75); conv weight (0, 2): M^(1) = sigmoid(0) = 0.5, M^(2) = sigmoid(2)."""
    vt = VTAM(n_layers=2, clip_dim=2, tau=1.0, gamma=0.5)
    _set_gates(vt, [0.0, math.log(3.0)], conv_weight=[0.0, 2.0])
    patches = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # [B=1, L=2, N=1, D=2]
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    out = vt(patches, torch.zeros(1, 2), text)
    p1, p2 = 1 / (1 + math.e), math.e / (1 + math.e)
    sig2 = 1 / (1 + math.exp(-2.0))
    expected = 0.25 * 0.5 * p1 + 0.75 * sig2 * p2  # Eq. 17
    assert out["map"][0, 1, 0, 0].item() == pytest.approx(expected, rel=1e-5)


def test_local_gate_can_push_the_map_below_every_layer_map():
    """The gate of Eq. 16-17 is not renormalised: it suppresses a background pixel below all layer maps."""
    vt = VTAM(n_layers=3, clip_dim=8, tau=1.0, gamma=0.5)  # tau = 1: every P_anom^(l) in [0.12, 0.88]
    patches, v, text = _vtam_inputs()
    _set_gates(vt, [0.0, 0.0, 0.0], conv_bias=-4.0)  # M = sigmoid(-4) ~ 0.018 everywhere
    out = vt(patches, v, text)
    lowest = out["layer_maps"][:, :, 1].amin(dim=1)
    assert bool((out["map"][:, 1] < lowest).all())
    # a convex mix of the layer maps (the old gate) could never do that
    assert bool((out["layer_maps"][:, :, 1].mean(1) >= lowest).all())


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_s_final_follows_eq19(gamma):
    vt = VTAM(n_layers=3, clip_dim=8, tau=0.07, gamma=gamma)
    patches, v, text = _vtam_inputs()
    out = vt(patches, v, text)
    torch.testing.assert_close(out["s_final"], (1 - gamma) * out["s_global"] + gamma * out["s_local"])
    if gamma == 1.0:
        torch.testing.assert_close(out["s_final"], out["s_local"])


def test_s_global_inner_product_and_cosine_by_hand():
    """V = (3, 4), t_n = (1, 0), t_a = (0, 2): <V,t_a> - <V,t_n> = 8 - 3 = 5 (Eq. 19 on raw vectors);
    cosine: 0.8 - 0.6 = 0.2; logit: 0.2 / tau; prob (default): sigma(0.2 / tau) = Eq. 14 on V_global."""
    v, t = torch.tensor([[3.0, 4.0]]), torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    tau = 0.07
    assert global_score(v, t, "inner").item() == pytest.approx(5.0)
    assert global_score(v, t, "cosine").item() == pytest.approx(0.2)
    assert global_score(v, t, "logit", tau).item() == pytest.approx(0.2 / tau, rel=1e-5)
    assert global_score(v, t, "prob", tau).item() == pytest.approx(1 / (1 + math.exp(-0.2 / tau)), rel=1e-5)
    # the prob reading is the abnormal channel of Eq. 14's softmax, taken on the global token
    torch.testing.assert_close(global_score(v, t, "prob", tau), state_probs(v[:, None], t, tau)[:, 0, 1])
    patches = torch.randn(1, 2, 4, 2)
    for mode, expected in (("inner", 5.0), ("cosine", 0.2), ("logit", 0.2 / tau)):
        out = VTAM(2, 2, tau, 0.0, s_global=mode)(patches, v, t)
        assert out["s_final"].item() == pytest.approx(expected, rel=1e-5), mode
    # raw state embeddings for the inner product, unit ones for the maps
    sep = VTAM(2, 2, tau, 0.0, s_global="inner")(patches, v, F.normalize(t, dim=-1), t_state=t)
    assert sep["s_global"].item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="s_global"):
        VTAM(2, 2, tau, 0.0, s_global="dot")


@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_eq19_terms_share_one_bounded_range_by_construction(mode):
    """Issue 20 point 1: the two terms Eq. 19 mixes lie in one bounded range whatever the features,
    their norms or the gates: [0, 1] (prob, the default) or [-2 / tau, 2 / tau] (logit)."""
    tau = 0.07
    lo, hi = (0.0, 1.0) if mode == "prob" else (-2 / tau, 2 / tau)
    vt = VTAM(3, 8, tau, 0.5, s_global=mode)
    for scale, bias in ((1.0, 0.0), (1e3, 8.0), (1e-3, -8.0)):  # tiny / huge features, gates open / shut
        patches, v, text = _vtam_inputs(b=16)
        _set_gates(vt, [0.0, 1.0, -1.0], conv_weight=[0.5] * 8, conv_bias=bias)
        out = vt(scale * patches, scale * 50 * v, text)
        terms = torch.stack([out["s_global"], local_term(out["s_local"], mode, tau), out["s_final"]])
        assert bool(((terms >= lo) & (terms <= hi)).all()), (scale, bias, terms)
    # the inner product (the former default) is not bounded: its scale is V_global's norm
    big = VTAM(3, 8, tau, 0.5, s_global="inner")(patches, 1e3 * v, text)
    assert big["s_global"].abs().max() > 10


def test_s_local_max_and_mean_maxpool_by_hand():
    """One hot pixel (value 1) at (1, 1) of a 4x4 map: max = 1 (Eq. 18); a 3x3 max-pool lights 9 cells,
    their mean is 9/16 (Algorithm 1 line 10 taken literally)."""
    p = torch.zeros(1, 4, 4)
    p[0, 1, 1] = 1.0
    assert local_score(p, "max").item() == 1.0
    assert local_score(p, "mean_maxpool", 3).item() == pytest.approx(9 / 16)
    p[0, 1, 1], p[0, 3, 3] = 0.0, 0.5  # corner: 2x2 window inside the map -> 4 cells at 0.5
    assert local_score(p, "mean_maxpool", 3).item() == pytest.approx(4 * 0.5 / 16)
    vt = VTAM(3, 8, 0.07, 0.5, s_local="mean_maxpool")
    out = vt(*_vtam_inputs())
    torch.testing.assert_close(out["s_local"], local_score(out["map"][:, 1], "mean_maxpool", 3))
    with pytest.raises(ValueError, match="s_local"):
        VTAM(3, 8, 0.07, 0.5, s_local="mean")


def test_vtam_off_is_plain_mean_and_global_score():
    vt = VTAM(n_layers=3, clip_dim=8, tau=0.07, gamma=0.5, enabled=False)
    assert sum(p.numel() for p in vt.parameters()) == 0
    out = vt(*_vtam_inputs())
    torch.testing.assert_close(out["map"][:, 1], out["layer_maps"][:, :, 1].mean(1))
    torch.testing.assert_close(out["s_final"], out["s_global"])
    torch.testing.assert_close(out["scale_weights"], torch.full((2, 3), 1 / 3))


def test_vtam_rejects_non_square_grid():
    with pytest.raises(ValueError, match="square"):
        VTAM(2, 8, 0.07, 0.5)(torch.randn(1, 2, 15, 8), torch.randn(1, 8), torch.randn(1, 2, 8))
