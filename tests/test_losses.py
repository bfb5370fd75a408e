"""Losses of Eq. 9, 12, 20-22 against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from ssvp.config import Config
from ssvp.losses import bce_loss, focal_loss, margin_loss, total_loss, vae_loss
from ssvp.model import SSVPOutput


def test_focal_against_hand_values():
    p = torch.tensor([[[0.9, 0.2]]])
    y = torch.tensor([[[1.0, 0.0]]])
    # p_t = (0.9, 0.8): mean(-(0.1)^2 ln 0.9, -(0.2)^2 ln 0.8)
    expected = (-(0.1**2) * math.log(0.9) - (0.2**2) * math.log(0.8)) / 2
    assert focal_loss(p, y, 2.0).item() == pytest.approx(expected, rel=1e-5)
    # lambda = 0 is plain binary cross-entropy
    assert focal_loss(p, y, 0.0).item() == pytest.approx(-(math.log(0.9) + math.log(0.8)) / 2, rel=1e-5)
    # a confident wrong pixel dominates
    assert focal_loss(torch.tensor([[[0.1]]]), torch.tensor([[[1.0]]]), 2.0).item() == pytest.approx(
        -(0.9**2) * math.log(0.1), rel=1e-5
    )
    with pytest.raises(ValueError, match="differ in shape"):
        focal_loss(torch.rand(1, 4, 4), torch.zeros(1, 8, 8), 2.0)


def test_focal_is_finite_at_saturated_probabilities():
    loss = focal_loss(torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[1.0, 0.0]]]), 2.0)
    assert torch.isfinite(loss) and loss.item() > 5


def test_bce_on_sigmoid_of_s_final():
    logits = torch.tensor([0.0, 2.0])
    labels = torch.tensor([1, 0])
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert bce_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_bce_without_sigma_is_algorithm3():
    """l_class_sigma=false: BCE(S_final, y) on the score itself: S = 0.7, y = 1 -> -ln 0.7 (vs -ln sigma(0.7))."""
    s, y = torch.tensor([0.7]), torch.tensor([1])
    assert bce_loss(s, y, sigma=False).item() == pytest.approx(-math.log(0.7), rel=1e-6)
    assert bce_loss(s, y, sigma=True).item() == pytest.approx(math.log(1 + math.exp(-0.7)), rel=1e-6)


def test_vae_sum_as_written_and_mean_option():
    recon = torch.tensor([[1.0, 2.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0]], requires_grad=True)
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    # per dim KL: 0.5 (mu^2 + sigma^2 - 1 - log sigma^2) = 0.5 and 0.5 (2 - 1 - ln 2)
    kl_sum = 0.5 + 0.5 * (1 - math.log(2.0))
    loss, rec, kl = vae_loss(recon, target, mu, logvar, beta=0.1)  # Eq. 9 as written: sums
    assert rec.item() == pytest.approx(5.0)  # ||(1, 2)||^2
    assert kl.item() == pytest.approx(kl_sum, rel=1e-6)
    assert loss.item() == pytest.approx(5.0 + 0.1 * kl_sum, rel=1e-6)
    # batch of two identical rows: the sums are per image, averaged over the batch
    two = vae_loss(recon.repeat(2, 1), target.repeat(2, 1), mu.repeat(2, 1), logvar.repeat(2, 1), 0.1)
    assert two[0].item() == pytest.approx(loss.item(), rel=1e-6)
    loss_m, rec_m, kl_m = vae_loss(recon, target, mu, logvar, beta=0.1, reduction="mean")  # the option
    assert rec_m.item() == pytest.approx(2.5) and kl_m.item() == pytest.approx(kl_sum / 2, rel=1e-6)
    assert loss_m.item() == pytest.approx(2.5 + 0.1 * kl_sum / 2, rel=1e-6)
    loss.backward()
    assert target.grad is None and recon.grad is not None
    # standard normal posterior: KL = 0
    assert vae_loss(recon, recon, torch.zeros(1, 3), torch.zeros(1, 3), 1.0)[2].item() == 0.0


def test_margin_zero_above_xi_linear_below_and_stop_gradient():
    xi = 0.85
    t_init = torch.tensor([[1.0, 0.0]], requires_grad=True)

    def at(theta):
        return torch.tensor([[math.cos(theta), math.sin(theta)]], requires_grad=True) * 3.0

    assert margin_loss(at(0.1), t_init, xi).item() == 0.0  # cos 0.1 = 0.995 > xi
    for theta in (0.8, 1.2, 2.0):
        assert margin_loss(at(theta), t_init, xi).item() == pytest.approx(xi - math.cos(theta), abs=1e-6)
    # linear below xi: d loss / d cos = -1
    cos = torch.tensor(0.3, requires_grad=True)
    t_final = torch.stack([cos, torch.sqrt(1 - cos**2)])[None]
    margin_loss(t_final, t_init, xi).backward()
    assert cos.grad.item() == pytest.approx(-1.0, abs=1e-5)
    assert t_init.grad is None  # sg(T_init)


def _fake_output(b=2, h=4, with_vae=True):
    torch.manual_seed(0)
    amap = torch.rand(b, h, h, requires_grad=True)
    logit = torch.randn(b, requires_grad=True)
    aux = {"mu": None}
    if with_vae:
        aux = {
            "mu": torch.randn(b, 3),
            "logvar": torch.randn(b, 3) * 0.1,
            "recon": torch.randn(b, 5),
            "v_global": torch.randn(b, 5),
            "t_final_prompts": torch.randn(b, 2, 3, 5),
            "t_init_prompts": torch.randn(b, 2, 3, 5),
        }
    return SSVPOutput(anomaly_map=amap, score=torch.sigmoid(logit), score_logit=logit, aux=aux)


def test_total_loss_is_eq22():
    cfg = Config.tiny(lambda1=0.7, lambda2=0.3, beta=0.05, xi=0.5, focal_lambda=2.0, l_seg_on="p_map").model
    out = _fake_output()
    masks = (torch.rand(2, 4, 4) > 0.7).float()
    labels = torch.tensor([1, 0])
    loss, parts = total_loss(out, masks, labels, cfg)
    a = out.aux
    focal = focal_loss(out.anomaly_map, masks, 2.0)
    bce = bce_loss(out.score_logit, labels)
    vae = vae_loss(a["recon"], a["v_global"], a["mu"], a["logvar"], 0.05)[0]
    margin = margin_loss(a["t_final_prompts"], a["t_init_prompts"], 0.5)
    assert margin.item() > 0
    assert loss.item() == pytest.approx((focal + bce + 0.7 * vae + 0.3 * margin).item(), rel=1e-6)
    assert set(parts) >= {"focal", "bce", "vae", "margin"}
    assert float(parts["total"]) == pytest.approx(loss.item())
    loss.backward()
    assert out.anomaly_map.grad is not None and out.score_logit.grad is not None


def test_l_seg_on_every_layer_as_written_or_on_p_map():
    """Eq. 20 on each P_anom^(l) (mean over layers) by default; l_seg_on=p_map: on P_map (Alg. 3)."""
    out = _fake_output()
    layers = torch.rand(2, 3, 4, 4)
    out.aux["layer_maps"] = torch.stack([1 - layers, layers], dim=2)
    masks, labels = (torch.rand(2, 4, 4) > 0.7).float(), torch.tensor([1, 0])
    per_layer = sum(focal_loss(layers[:, i], masks, 2.0) for i in range(3)) / 3
    _, parts = total_loss(out, masks, labels, Config.tiny().model)
    assert float(parts["focal"]) == pytest.approx(per_layer.item(), rel=1e-6)
    _, parts = total_loss(out, masks, labels, Config.tiny(l_seg_on="p_map").model)
    assert float(parts["focal"]) == pytest.approx(focal_loss(out.anomaly_map, masks, 2.0).item(), rel=1e-6)
    assert abs(per_layer.item() - focal_loss(out.anomaly_map, masks, 2.0).item()) > 1e-3


def test_total_loss_without_vcpg_has_no_vae_or_margin():
    cfg = Config.tiny().model
    out = _fake_output(with_vae=False)
    masks, labels = torch.zeros(2, 4, 4), torch.tensor([0, 1])
    loss, parts = total_loss(out, masks, labels, cfg)
    assert float(parts["vae"]) == 0.0 and float(parts["margin"]) == 0.0
    assert loss.item() == pytest.approx(float(parts["focal"]) + float(parts["bce"]), rel=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        total_loss(out, torch.zeros(2, 8, 8), labels, cfg)


def _tiny_step_table(**overrides):
    """gradient_table of a tiny SSVP head on 4 random images (2 with a defect), at initialisation and
    after one AdamW step (defaults otherwise, as `bench/grad_flow.py` prints it for real data)."""
    from ssvp.engine import make_optimizer
    from ssvp.losses import gradient_table
    from ssvp.model import SSVP

    cfg = Config.tiny(**overrides)
    torch.manual_seed(0)
    model = SSVP(cfg.model)
    feats = model.backbones(torch.rand(4, 3, 112, 112, generator=torch.Generator().manual_seed(2)))
    masks = torch.zeros(4, 112, 112)
    masks[:2, 20:50, 30:70] = 1
    labels, names = torch.tensor([1, 1, 0, 0]), ["bottle", "screw", "bottle", "screw"]
    head = model.head.train()

    def table():
        torch.manual_seed(1)
        return gradient_table(head, head(feats, names, 112), masks, labels, cfg.model)

    first = table()
    opt = make_optimizer(cfg, model)
    torch.manual_seed(1)
    total_loss(head(feats, names, 112), masks, labels, cfg.model)[0].backward()
    opt.step()
    return first, table()


def test_which_loss_term_reaches_which_parameters():
    """Issue 20 point 4, the facts of PAPER_MAP's gradient-flow table (defaults: l_seg_on=p_anom, alpha_init=0)."""
    init, step = _tiny_step_table()
    gates = ("F_gate^global (Eq. 15)", "F_gate^local (Eq. 16)")
    for table in (init, step):
        for g in gates:  # Eq. 20 on P_anom^(l): the VTAM gates learn from L_Class only
            assert table[g]["L_Seg"] == 0 and table[g]["L_Class"] > 0, g
        # one latent token: the softmax over it is 1, so W_Q, W_K get nothing (SDPA's backward: rounding only)
        assert all(v < 1e-6 for v in table["W_Q, W_K (Eq. 10)"].values()), table["W_Q, W_K (Eq. 10)"]
        for g in ("prompts [V]bg, [V]state (Eq. 6)", *gates, "ATF local blocks (Eq. 2-5)"):
            assert table[g]["lambda1 L_VAE"] == 0, g  # V_global is the VAE's data, its target detached
        vae = table["VAE decoder D_theta (Eq. 9)"]
        assert vae["lambda1 L_VAE"] > 0 and vae["L_Seg"] == vae["L_Class"] == 0
        assert table["VAE encoder F_mu, F_sigma (Eq. 7)"]["lambda1 L_VAE"] > 0
        assert table["prompts [V]bg, [V]state (Eq. 6)"]["L_Seg"] > 0 and table["alpha (Eq. 11)"]["L_Class"] > 0
    # alpha = 0 at initialisation: the latent path (W_V, z -> tokens, the encoder through z) is cut
    for g in ("W_V (Eq. 10)", "z -> latent tokens (Eq. 10)"):
        assert all(v == 0 for v in init[g].values()), g
        assert step[g]["L_Seg"] > 0 and step[g]["L_Class"] > 0, g
    assert init["VAE encoder F_mu, F_sigma (Eq. 7)"]["L_Class"] == 0 < step["VAE encoder F_mu, F_sigma (Eq. 7)"]["L_Class"]
    # Alg. 3's focal on P_map (l_seg_on=p_map) does reach the gates
    init_map, _ = _tiny_step_table(l_seg_on="p_map")
    assert all(init_map[g]["L_Seg"] > 0 for g in gates)
