"""Visual-Text Anomaly Mapper (VTAM): per-layer maps, dual-gated fusion, calibrated image score.

Per tapped layer l, each fused patch token f (and the global token) is compared with the
normal / abnormal text embeddings t_n, t_a of its image:

    s_k = cos(f, t_k) / tau,  k in {n, a}                                    (Eq. 13)
    M_l = Softmax_k(s_k)  -> [normal, abnormal] probability per patch         (Eq. 14)

Dual gate (AnomalyMoE-style):

    w = Softmax_l(W_s V_global)                  global scale gate, sum_l w_l = 1   (Eq. 15)
    G = Softmax_l(Conv1x1([M_1^a, ..., M_L^a]))  local spatial gate per pixel       (Eq. 16)
    pi_l(p) = w_l G_l(p) / sum_k w_k G_k(p),  M = sum_l pi_l M_l                     (Eq. 17)

The two gates are combined multiplicatively and renormalised, so ``M`` stays a convex
combination of per-layer probability maps (normal + abnormal = 1 at every pixel).

Image score, in logit space so that BCE can be taken on sigma(S_final) (Eq. 21):

    S_global = (cos(V_global, t_a) - cos(V_global, t_n)) / tau
             = logit of the Eq. 14 softmax applied to the global token
    S_local  = logit(max_p M^a(p))                                           (Eq. 18, ``max``)
    S_final  = (1 - gamma) S_global + gamma S_local                           (Eq. 19)

The paper contradicts itself on S_local: Eq. 18 takes the maximum of the fused map
(``s_local="max"``, default, the main text), while Algorithm 1 averages spatial
max-pooled maps; ``s_local="mean_maxpool"`` implements the latter as the mean over
layers of each layer map's spatial max, ``logit(mean_l max_p M_l^a(p))``.

With ``enabled=False`` (Table 3 ablation "VTAM off") there are no gates: the map is
the plain mean of the layer maps and S_final = S_global.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["state_probs", "prob_logit", "VTAM"]

_EPS = 1e-6


def state_probs(feats: torch.Tensor, text: torch.Tensor, tau: float) -> torch.Tensor:
    """Softmax over [normal, abnormal] of cosine similarities / tau (Eq. 13-14).

    feats [B, ..., D], text [B, 2, D] -> [B, ..., 2].
    """
    b, d = feats.shape[0], feats.shape[-1]
    f = F.normalize(feats, dim=-1).reshape(b, -1, d)
    t = F.normalize(text, dim=-1)
    logits = torch.einsum("bnd,bkd->bnk", f, t) / tau  # Eq. 13
    return logits.softmax(dim=-1).reshape(*feats.shape[:-1], text.shape[1])  # Eq. 14


def prob_logit(p: torch.Tensor) -> torch.Tensor:
    """logit(p) = log p - log(1 - p), with p clamped to [1e-6, 1 - 1e-6]."""
    p = p.clamp(_EPS, 1.0 - _EPS)
    return torch.log(p) - torch.log1p(-p)


class VTAM(nn.Module):
    def __init__(
        self,
        n_layers: int,
        clip_dim: int,
        tau: float,
        gamma: float,
        s_local: str = "max",
        enabled: bool = True,
    ) -> None:
        super().__init__()
        if s_local not in ("max", "mean_maxpool"):
            raise ValueError(f"model.s_local must be max or mean_maxpool; got {s_local!r}")
        self.n_layers = n_layers
        self.tau = float(tau)
        self.gamma = float(gamma)
        self.s_local_mode = s_local
        self.enabled = enabled
        if enabled:
            self.scale_gate = nn.Linear(clip_dim, n_layers)  # W_s of Eq. 15
            self.spatial_gate = nn.Conv2d(n_layers, n_layers, kernel_size=1)  # Eq. 16

    def forward(self, patches: torch.Tensor, v_global: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """patches [B, L, N, D] (N = g*g), v_global [B, D], text [B, 2, D] (normal, abnormal).

        Returns layer_maps [B, L, 2, g, g], map [B, 2, g, g], scale_weights [B, L],
        spatial_weights [B, L, g, g], s_global / s_local / s_final [B].
        """
        b, n_layers, n, _ = patches.shape
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"patch count N={n} is not a square grid")
        if n_layers != self.n_layers:
            raise ValueError(f"VTAM built for {self.n_layers} layers, got {n_layers}")
        layer_maps = state_probs(patches, text, self.tau)  # [B, L, N, 2], Eq. 13-14
        layer_maps = layer_maps.permute(0, 1, 3, 2).reshape(b, n_layers, 2, g, g)

        t = F.normalize(text, dim=-1)
        v = F.normalize(v_global, dim=-1)
        cos = torch.einsum("bd,bkd->bk", v, t)
        s_global = (cos[:, 1] - cos[:, 0]) / self.tau  # logit of Eq. 14 on the global token

        if self.enabled:
            scale_w = self.scale_gate(v_global).softmax(dim=-1)  # Eq. 15
            spatial_w = self.spatial_gate(layer_maps[:, :, 1]).softmax(dim=1)  # Eq. 16
            pi = scale_w[:, :, None, None] * spatial_w
            pi = pi / pi.sum(dim=1, keepdim=True)  # Eq. 17
            fused = (pi[:, :, None] * layer_maps).sum(dim=1)
        else:
            scale_w = layer_maps.new_full((b, n_layers), 1.0 / n_layers)
            spatial_w = layer_maps.new_full((b, n_layers, g, g), 1.0 / n_layers)
            fused = layer_maps.mean(dim=1)

        s_local = self.local_score(fused, layer_maps)
        if self.enabled:
            s_final = (1.0 - self.gamma) * s_global + self.gamma * s_local  # Eq. 19
        else:
            s_final = s_global
        return {
            "layer_maps": layer_maps,
            "map": fused,
            "scale_weights": scale_w,
            "spatial_weights": spatial_w,
            "s_global": s_global,
            "s_local": s_local,
            "s_final": s_final,
        }

    def local_score(self, fused: torch.Tensor, layer_maps: torch.Tensor) -> torch.Tensor:
        if self.s_local_mode == "max":
            peak = fused[:, 1].flatten(1).amax(dim=1)  # Eq. 18
        else:
            peak = layer_maps[:, :, 1].flatten(2).amax(dim=2).mean(dim=1)  # Algorithm 1 variant
        return prob_logit(peak)
