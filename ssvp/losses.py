"""SSVP training objective (Eq. 9, 12, 20-22).

    L_focal  = mean_p -(1 - p_t)^lambda log p_t,  p_t = M^a if y = 1 else 1 - M^a   (Eq. 20)
    L_bce    = BCE(sigma(S_final), y_image)                                       (Eq. 21)
    L_VAE    = ||V_global - V_hat||^2 + beta KL(N(mu, sigma^2) || N(0, I))        (Eq. 9)
    L_margin = mean max(0, xi - cos(T_final, sg(T_init)))                          (Eq. 12)
    L        = L_focal + L_bce + lambda1 L_VAE + lambda2 L_margin                  (Eq. 22)

Reductions (the paper does not spell them out): the focal loss is the mean over pixels
and images; the VAE reconstruction is the mean squared error over batch and feature
dimensions, and the KL term the mean over batch and latent dimensions of
0.5 (mu^2 + sigma^2 - 1 - log sigma^2), so beta weighs two per-element averages. The
reconstruction target V_global is treated as data (stop-gradient): the VAE models the
visual feature, it does not reshape it. The margin anchors each generated prompt
embedding to its static counterpart: zero while their cosine is at least xi, linear
below; T_init is detached (stop-gradient), so only T_final moves. Unlike peers
(AnomalyCLIP, AdaCLIP) no Dice term is added: the paper's Eq. 22 has none.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["focal_loss", "bce_loss", "vae_loss", "margin_loss", "total_loss"]

_EPS = 1e-6


def focal_loss(prob: torch.Tensor, target: torch.Tensor, focal_lambda: float) -> torch.Tensor:
    """Binary focal loss on abnormal probabilities ``prob`` [B, H, W] vs masks {0, 1} (Eq. 20)."""
    if prob.shape != target.shape:
        raise ValueError(f"anomaly map {tuple(prob.shape)} and mask {tuple(target.shape)} differ in shape")
    prob = prob.float()
    target = target.to(prob.dtype)
    p = prob.clamp(_EPS, 1.0 - _EPS)
    p_t = torch.where(target > 0.5, p, 1.0 - p)
    return (-((1.0 - p_t) ** focal_lambda) * torch.log(p_t)).mean()  # Eq. 20


def bce_loss(score_logit: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on sigma(S_final) against image labels (Eq. 21)."""
    if score_logit.shape != labels.shape:
        raise ValueError(f"score_logit {tuple(score_logit.shape)} and labels {tuple(labels.shape)} differ in shape")
    score_logit = score_logit.float()
    return F.binary_cross_entropy_with_logits(score_logit, labels.to(score_logit.dtype))  # Eq. 21


def vae_loss(
    recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_VAE, reconstruction, KL) of Eq. 9; ``target`` is detached (treated as data)."""
    mu, logvar = mu.float(), logvar.float()
    rec = F.mse_loss(recon.float(), target.detach().float())
    kl = (0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)).mean()
    return rec + beta * kl, rec, kl  # Eq. 9


def margin_loss(t_final: torch.Tensor, t_init: torch.Tensor, xi: float) -> torch.Tensor:
    """mean relu(xi - cos(T_final, sg(T_init))) over all prompt embeddings (Eq. 12)."""
    cos = F.cosine_similarity(t_final.float(), t_init.detach().float(), dim=-1)  # sg(T_init)
    return F.relu(xi - cos).mean()  # Eq. 12


def total_loss(out: Any, masks: torch.Tensor, labels: torch.Tensor, model_cfg: Any) -> tuple[torch.Tensor, dict]:
    """Eq. 22 on an ``SSVPOutput``; returns (loss, parts) with detached scalar tensors in ``parts``.

    ``masks`` [B, H, W] must match ``out.anomaly_map``; ``labels`` [B] in {0, 1}. The VAE
    and margin terms are zero when VCPG is off (no latent, T_final = T_init).
    """
    masks = masks.to(out.anomaly_map.device)
    labels = labels.to(out.score_logit.device)
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    focal = focal_loss(out.anomaly_map, masks, model_cfg.focal_lambda)
    bce = bce_loss(out.score_logit, labels.float())
    aux = out.aux
    zero = out.score_logit.new_zeros(())
    if aux.get("mu") is not None:
        vae, rec, kl = vae_loss(aux["recon"], aux["v_global"], aux["mu"], aux["logvar"], model_cfg.beta)
        margin = margin_loss(aux["t_final_prompts"], aux["t_init_prompts"], model_cfg.xi)
    else:
        vae = rec = kl = margin = zero
    loss = focal + bce + model_cfg.lambda1 * vae + model_cfg.lambda2 * margin  # Eq. 22
    parts = {
        "focal": focal.detach(),
        "bce": bce.detach(),
        "vae": vae.detach(),
        "vae_recon": rec.detach(),
        "vae_kl": kl.detach(),
        "margin": margin.detach(),
        "total": loss.detach(),
    }
    return loss, parts
