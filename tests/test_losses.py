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


def test_vae_against_hand_values_and_target_is_data():
    recon = torch.tensor([[1.0, 2.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0]], requires_grad=True)
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    loss, rec, kl = vae_loss(recon, target, mu, logvar, beta=0.1)
    assert rec.item() == pytest.approx(2.5)  # (1 + 4) / 2
    # per dim: 0.5 (mu^2 + sigma^2 - 1 - log sigma^2) = 0.5 and 0.5 (2 - 1 - ln 2)
    kl_expected = (0.5 + 0.5 * (1 - math.log(2.0))) / 2
    assert kl.item() == pytest.approx(kl_expected, rel=1e-6)
    assert loss.item() == pytest.approx(2.5 + 0.1 * kl_expected, rel=1e-6)  # Eq. 9
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
    cfg = Config.tiny(lambda1=0.7, lambda2=0.3, beta=0.05, xi=0.5, focal_lambda=2.0).model
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


def test_total_loss_without_vcpg_has_no_vae_or_margin():
    cfg = Config.tiny().model
    out = _fake_output(with_vae=False)
    masks, labels = torch.zeros(2, 4, 4), torch.tensor([0, 1])
    loss, parts = total_loss(out, masks, labels, cfg)
    assert float(parts["vae"]) == 0.0 and float(parts["margin"]) == 0.0
    assert loss.item() == pytest.approx(float(parts["focal"]) + float(parts["bce"]), rel=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        total_loss(out, torch.zeros(2, 8, 8), labels, cfg)
