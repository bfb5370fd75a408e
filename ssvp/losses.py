"""SSVP training objective (§3.4, Eq. 9, 12, 20-22; Algorithm 3).

    L_Seg   = -1/HW sum_{h,w} [Y (1-p)^lambda log p + (1-Y) p^lambda log(1-p)]     (Eq. 20)
    L_Class = BCE(sigma(S_final), y_img)                                            (Eq. 21)
    L_VAE   = ||V_global - D_theta(z)||_2^2 + beta KL(q(z|V_global) || N(0, I))     (Eq. 9)
    L_reg   = max(0, xi - cos(T_final, sg(T_init)))                                 (Eq. 12)
    L_total = L_Seg + L_Class + lambda1 L_VAE + lambda2 L_reg                       (Eq. 22)

Named options where the paper contradicts itself (main-text default first):

* ``l_seg_on``: ``p_anom`` applies Eq. 20 to every layer's P_anom^(l) (§3.4), averaged over
  the layers; ``p_map`` to the fused P_map (Algorithm 3 line 8).
* ``l_class_sigma``: ``True`` is Eq. 21's BCE(sigma(S_final), y); ``False`` is Algorithm 3's
  BCE(S_final, y) on the score clamped to [1e-6, 1 - 1e-6].
* ``vae_reduction``: ``sum`` (as written: ||.||_2^2 and the KL summed over the feature and
  latent dimensions, then averaged over the batch) or ``mean`` (per-element averages, which
  shrink the VAE term by ~D relative to the focal and BCE terms).

Reductions the paper leaves open (interpretations): Eq. 20 is the mean over pixels (its
1/HW) and images; Eq. 12 the mean over prompts and images; the reconstruction target
V_global is treated as data (stop-gradient), so the VAE models the visual feature and does
not reshape it. sg(T_init) is detached. No Dice term: Eq. 22 has none.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["focal_loss", "bce_loss", "vae_loss", "margin_loss", "loss_terms", "total_loss", "gradient_table"]

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


def bce_loss(score_logit: torch.Tensor, labels: torch.Tensor, sigma: bool = True) -> torch.Tensor:
    """BCE(sigma(S_final), y) (Eq. 21); ``sigma=False``: BCE(S_final, y) on the clamped score (Alg. 3)."""
    if score_logit.shape != labels.shape:
        raise ValueError(f"score_logit {tuple(score_logit.shape)} and labels {tuple(labels.shape)} differ in shape")
    score_logit = score_logit.float()
    labels = labels.to(score_logit.dtype)
    if sigma:
        return F.binary_cross_entropy_with_logits(score_logit, labels)  # Eq. 21
    return F.binary_cross_entropy(score_logit.clamp(_EPS, 1.0 - _EPS), labels)  # Alg. 3 line 8


def vae_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float,
    reduction: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_VAE, reconstruction, KL) of Eq. 9; ``target`` is detached (treated as data).

    ``reduction="sum"``: squared norm / KL summed over dimensions, mean over the batch (as
    written); ``"mean"``: averaged over every element.
    """
    mu, logvar = mu.float(), logvar.float()
    sq = (recon.float() - target.detach().float()).pow(2)
    kl_el = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    if reduction == "sum":
        rec, kl = sq.flatten(1).sum(1).mean(), kl_el.flatten(1).sum(1).mean()
    elif reduction == "mean":
        rec, kl = sq.mean(), kl_el.mean()
    else:
        raise ValueError(f"model.vae_reduction must be sum or mean; got {reduction!r}")
    return rec + beta * kl, rec, kl  # Eq. 9


def margin_loss(t_final: torch.Tensor, t_init: torch.Tensor, xi: float) -> torch.Tensor:
    """mean relu(xi - cos(T_final, sg(T_init))) over all prompt embeddings (Eq. 12)."""
    cos = F.cosine_similarity(t_final.float(), t_init.detach().float(), dim=-1)  # sg(T_init)
    return F.relu(xi - cos).mean()  # Eq. 12


def loss_terms(out: Any, masks: torch.Tensor, labels: torch.Tensor, model_cfg: Any) -> dict[str, torch.Tensor]:
    """The terms of Eq. 22, unweighted and with their graphs: focal (L_Seg), bce (L_Class), vae,
    vae_recon, vae_kl (L_VAE and its parts, Eq. 9), margin (L_reg). See ``total_loss``."""
    masks = masks.to(out.anomaly_map.device)
    labels = labels.to(out.score_logit.device)
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    aux = out.aux
    if getattr(model_cfg, "l_seg_on", "p_anom") == "p_anom" and aux.get("layer_maps") is not None:
        layers = aux["layer_maps"][:, :, 1]  # P_anom^(l) [B, L, H, W], Eq. 20 on every layer
        # one call over B*L maps of equal size = the mean over layers of each layer's L_Seg
        focal = focal_loss(layers.flatten(0, 1), masks[:, None].expand_as(layers).flatten(0, 1), model_cfg.focal_lambda)
    else:
        focal = focal_loss(out.anomaly_map, masks, model_cfg.focal_lambda)  # Alg. 3: on P_map
    bce = bce_loss(out.score_logit, labels.float(), getattr(model_cfg, "l_class_sigma", True))
    zero = out.score_logit.new_zeros(())
    if aux.get("mu") is not None:
        vae, rec, kl = vae_loss(
            aux["recon"], aux["v_global"], aux["mu"], aux["logvar"], model_cfg.beta,
            getattr(model_cfg, "vae_reduction", "sum"),
        )
        margin = margin_loss(aux["t_final_prompts"], aux["t_init_prompts"], model_cfg.xi)
    else:
        vae = rec = kl = margin = zero
    return {"focal": focal, "bce": bce, "vae": vae, "vae_recon": rec, "vae_kl": kl, "margin": margin}


def total_loss(out: Any, masks: torch.Tensor, labels: torch.Tensor, model_cfg: Any) -> tuple[torch.Tensor, dict]:
    """Eq. 22 on an ``SSVPOutput``; returns (loss, parts) with detached scalar tensors in ``parts``.

    L_Seg is taken on ``aux["layer_maps"]`` (``l_seg_on=p_anom``) or ``out.anomaly_map`` (``p_map``).
    ``masks`` [B, H, W] must match ``out.anomaly_map``; ``labels`` [B] in {0, 1}. The VAE
    and margin terms are zero when VCPG is off (no latent, T_final = T_init).
    With ``prompting=bayes_pfl`` the Bayes-PFL objective (``ssvp.bayes_pfl.bayes_pfl_loss``), with
    ``bayes_pfl_vcpg`` that objective plus VCPG's VAE and margin terms.
    """
    if getattr(model_cfg, "prompting", "vcpg") in ("bayes_pfl", "bayes_pfl_vcpg"):
        from .bayes_pfl import bayes_pfl_loss

        loss, parts = bayes_pfl_loss(out, masks, labels, model_cfg)
        if out.aux.get("mu") is not None:  # VCPG as the prompt generator (ssvp.pfl_vcpg, Table 3 row D): Eq. 9, 12, 22
            loss, vcpg_parts = _with_vcpg_terms(loss, out.aux, model_cfg)
            parts.update(vcpg_parts)
            parts["total"] = loss.detach()
        return loss, parts
    t = loss_terms(out, masks, labels, model_cfg)
    loss = t["focal"] + t["bce"] + model_cfg.lambda1 * t["vae"] + model_cfg.lambda2 * t["margin"]  # Eq. 22
    parts = {k: v.detach() for k, v in t.items()}
    parts["total"] = loss.detach()
    return loss, parts


def _with_vcpg_terms(loss: torch.Tensor, aux: dict, model_cfg: Any) -> tuple[torch.Tensor, dict]:
    """loss + lambda1 L_VAE (Eq. 9) + lambda2 L_reg (Eq. 12, each bank prompt's T_final against its T_init)."""
    vae, rec, kl = vae_loss(aux["recon"], aux["v_global"], aux["mu"], aux["logvar"], model_cfg.beta,
                            getattr(model_cfg, "vae_reduction", "sum"))
    margin = margin_loss(aux["text_samples"][:, 0], aux["t_init_prompts"], model_cfg.xi)
    total = loss + model_cfg.lambda1 * vae + model_cfg.lambda2 * margin
    return total, {"vae": vae.detach(), "vae_recon": rec.detach(), "vae_kl": kl.detach(), "margin": margin.detach()}


# which trainable parameters each group of the gradient table holds (name prefixes of SSVPHead)
GRADIENT_GROUPS = {
    "prompts [V]bg, [V]state (Eq. 6)": ("prompts.",),
    "ATF local blocks (Eq. 2-5)": ("fusion.layers.",),
    "ATF global block (Eq. 5, V_global)": ("fusion.global_block.",),
    "VAE encoder F_mu, F_sigma (Eq. 7)": ("vcpg.f_mu.", "vcpg.f_sigma."),
    "VAE decoder D_theta (Eq. 9)": ("vcpg.decoder.",),
    "z -> latent tokens (Eq. 10)": ("vcpg.latent_tokens.",),
    "W_V (Eq. 10)": ("vcpg.cross.v.",),
    "W_Q, W_K (Eq. 10)": ("vcpg.cross.q.", "vcpg.cross.k."),
    "alpha (Eq. 11)": ("vcpg.alpha",),
    "LayerNorm (Eq. 11)": ("vcpg.norm.",),
    "F_gate^global (Eq. 15)": ("vtam.scale_gate.",),
    "F_gate^local (Eq. 16)": ("vtam.spatial_gate.",),
}
# Eq. 22's terms as weighted in the total
GRADIENT_TERMS = {"L_Seg": ("focal", None), "L_Class": ("bce", None), "lambda1 L_VAE": ("vae", "lambda1"),
                  "lambda2 L_reg": ("margin", "lambda2")}


def gradient_table(head: Any, out: Any, masks: torch.Tensor, labels: torch.Tensor, model_cfg: Any) -> dict[str, dict[str, float]]:
    """{parameter group: {term of Eq. 22: gradient L2 norm}} for one forward ``out`` of ``head``
    (``GRADIENT_GROUPS`` x ``GRADIENT_TERMS``; a group the head does not have is left out).
    0.0 means no gradient reaches the group from that term."""
    terms = loss_terms(out, masks, labels, model_cfg)
    named = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    table: dict[str, dict[str, float]] = {}
    grads = {}
    for label, (key, weight) in GRADIENT_TERMS.items():
        term = terms[key] * (getattr(model_cfg, weight) if weight else 1.0)
        grads[label] = (torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                        if term.requires_grad else [None] * len(params))
    for group, prefixes in GRADIENT_GROUPS.items():
        idx = [i for i, (n, _) in enumerate(named) if n.startswith(prefixes)]
        if not idx:
            continue
        table[group] = {
            label: float(sum(float(g[i].float().pow(2).sum()) for i in idx if g[i] is not None) ** 0.5)
            for label, g in grads.items()
        }
    return table
