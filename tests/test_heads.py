"""HSVS (Eq. 2-5), VCPG (Eq. 7-11) and VTAM (Eq. 13-19) on small tensors, against hand computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssvp.hsvs import ATFBlock, ConcatFusion, HSVSFusion
from ssvp.vcpg import VCPG
from ssvp.vtam import VTAM, prob_logit, state_probs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- HSVS / ATF
def _manual_attn(x_q, x_kv, mod):
    """Single-head Softmax(Q K^T / sqrt(d)) V with the module's own projections (Eq. 3-4)."""
    q, k, v = mod.q(x_q), mod.k(x_kv), mod.v(x_kv)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v


def test_atf_matches_hand_computation():
    blk = ATFBlock(clip_dim=8, dino_dim=12, heads=1)
    f_c, f_d = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    a_cd = _manual_attn(f_c, f_d, blk.c2d)  # Eq. 3
    a_dc = _manual_attn(f_d, f_c, blk.d2c)  # Eq. 4
    z = torch.cat([F.layer_norm(a_cd, (8,)), F.layer_norm(a_dc, (8,))], -1)  # Eq. 5 (LN affine = identity at init)
    expected = f_c + z @ blk.out.weight.T + blk.out.bias
    torch.testing.assert_close(blk(f_c, f_d), expected, rtol=1e-5, atol=1e-5)
    blk.residual = False
    torch.testing.assert_close(blk(f_c, f_d), expected - f_c, rtol=1e-5, atol=1e-5)


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
    torch.testing.assert_close(blk(f_c, f_d), f_c + cat @ blk.out.weight.T + blk.out.bias, rtol=1e-5, atol=1e-5)


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


def test_alpha_nonzero_adds_gated_cross_attention():
    vc = VCPG(dim=16, latent_dim=4, heads=1, alpha_init=0.7).eval()
    t_init, v = torch.randn(2, 2, 3, 16), torch.randn(2, 16)
    out = vc(v, t_init)
    z = out["z"]
    torch.testing.assert_close(z, out["mu"])  # eval: z = mu
    mem = vc.latent_tokens(z).view(2, vc.n_latent_tokens, 16)
    q = t_init.reshape(2, 6, 16)
    h = vc.cross_out(_manual_attn(q, mem, vc.cross))  # Eq. 10
    expected = F.layer_norm(q + 0.7 * h, (16,)).view_as(t_init)  # Eq. 11
    torch.testing.assert_close(out["t_final"], expected, rtol=1e-5, atol=1e-5)
    assert (out["t_final"] - F.layer_norm(t_init, (16,))).abs().max() > 1e-3


def test_reparameterization_uses_mu_plus_sigma_eps_in_training():
    vc = VCPG(dim=8, latent_dim=5, heads=2).train()
    mu, logvar = torch.randn(4, 5), torch.randn(4, 5)
    torch.manual_seed(123)
    z = vc.reparameterize(mu, logvar)
    torch.manual_seed(123)
    eps = torch.randn(4, 5)
    torch.testing.assert_close(z, mu + torch.exp(0.5 * logvar) * eps)  # Eq. 8
    vc.eval()
    assert torch.equal(vc.reparameterize(mu, logvar), mu)


def test_alpha_zero_blocks_attention_gradients_but_not_alpha():
    vc = VCPG(dim=8, latent_dim=4, heads=2, alpha_init=0.0)
    out = vc(torch.randn(2, 8), torch.randn(2, 2, 3, 8))
    (out["t_final"] * torch.randn_like(out["t_final"])).sum().backward()
    assert vc.alpha.grad is not None and vc.alpha.grad.abs() > 0
    for mod in (vc.cross, vc.cross_out, vc.latent_tokens):
        for p in mod.parameters():
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0


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


def test_gates_are_distributions_and_map_is_a_probability():
    vt = VTAM(n_layers=3, clip_dim=8, tau=0.07, gamma=0.5)
    out = vt(*_vtam_inputs())
    torch.testing.assert_close(out["scale_weights"].sum(-1), torch.ones(2))  # Eq. 15
    torch.testing.assert_close(out["spatial_weights"].sum(1), torch.ones(2, 4, 4))  # Eq. 16
    torch.testing.assert_close(out["map"].sum(1), torch.ones(2, 4, 4))
    torch.testing.assert_close(out["layer_maps"].sum(2), torch.ones(2, 3, 4, 4))
    assert out["map"].min() >= 0 and out["map"].max() <= 1


def test_dual_gate_fusion_matches_hand_weights():
    """Scale gate forced to (0.25, 0.75), spatial gate uniform -> M = 0.25 M_1 + 0.75 M_2 (Eq. 15-17)."""
    vt = VTAM(n_layers=2, clip_dim=8, tau=0.1, gamma=0.5)
    with torch.no_grad():
        vt.scale_gate.weight.zero_()
        vt.scale_gate.bias.copy_(torch.tensor([0.0, math.log(3.0)]))
        vt.spatial_gate.weight.zero_()
        vt.spatial_gate.bias.zero_()
    out = vt(*_vtam_inputs(n_layers=2))
    torch.testing.assert_close(out["scale_weights"], torch.tensor([[0.25, 0.75]] * 2))
    lm = out["layer_maps"]
    torch.testing.assert_close(out["map"], 0.25 * lm[:, 0] + 0.75 * lm[:, 1])
    # spatial gate alone: scale uniform, spatial weights favour layer 1 at every pixel by e^1 : 1
    with torch.no_grad():
        vt.scale_gate.bias.zero_()
        vt.spatial_gate.bias.copy_(torch.tensor([1.0, 0.0]))
    out = vt(*_vtam_inputs(n_layers=2))
    w1 = math.e / (math.e + 1)
    torch.testing.assert_close(out["map"], w1 * out["layer_maps"][:, 0] + (1 - w1) * out["layer_maps"][:, 1])


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_s_final_follows_eq19(gamma):
    vt = VTAM(n_layers=3, clip_dim=8, tau=0.07, gamma=gamma)
    patches, v, text = _vtam_inputs()
    out = vt(patches, v, text)
    torch.testing.assert_close(out["s_final"], (1 - gamma) * out["s_global"] + gamma * out["s_local"])
    if gamma == 0.0:
        torch.testing.assert_close(out["s_final"], out["s_global"])
    if gamma == 1.0:
        torch.testing.assert_close(out["s_final"], out["s_local"])
    # S_global is the logit of the Eq. 14 softmax on the global token
    p_global = state_probs(v[:, None], text, 0.07)[:, 0, 1]
    torch.testing.assert_close(torch.sigmoid(out["s_global"]), p_global, rtol=1e-5, atol=1e-6)


def test_s_local_modes():
    patches, v, text = _vtam_inputs()
    out = VTAM(3, 8, 0.07, 0.5, s_local="max")(patches, v, text)
    torch.testing.assert_close(out["s_local"], prob_logit(out["map"][:, 1].flatten(1).amax(1)))  # Eq. 18
    vt = VTAM(3, 8, 0.07, 0.5, s_local="mean_maxpool")
    out = vt(patches, v, text)
    per_layer_max = out["layer_maps"][:, :, 1].flatten(2).amax(2)  # [B, L]
    torch.testing.assert_close(out["s_local"], prob_logit(per_layer_max.mean(1)))  # Algorithm 1
    torch.testing.assert_close(prob_logit(torch.tensor([0.5, 0.8])), torch.tensor([0.0, math.log(4.0)]))
    with pytest.raises(ValueError, match="s_local"):
        VTAM(3, 8, 0.07, 0.5, s_local="mean")


def test_vtam_off_is_plain_mean_and_global_score():
    vt = VTAM(n_layers=3, clip_dim=8, tau=0.07, gamma=0.5, enabled=False)
    assert sum(p.numel() for p in vt.parameters()) == 0
    out = vt(*_vtam_inputs())
    torch.testing.assert_close(out["map"], out["layer_maps"].mean(1))
    torch.testing.assert_close(out["s_final"], out["s_global"])
    torch.testing.assert_close(out["scale_weights"], torch.full((2, 3), 1 / 3))


def test_vtam_rejects_non_square_grid():
    with pytest.raises(ValueError, match="square"):
        VTAM(2, 8, 0.07, 0.5)(torch.randn(1, 2, 15, 8), torch.randn(1, 8), torch.randn(1, 2, 8))
