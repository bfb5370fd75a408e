"""Visual-Text Anomaly Mapper (VTAM, §3.3): layer maps, AnomalyMoE dual gate, calibrated score.

Per tapped layer l, each fused patch token V^(l)(h, w) is compared with the normal and
abnormal text embeddings t_n, t_a of its image (unit vectors, see ``ssvp.model``):

    M^(l)_k(h, w) = cos(V^(l)(h, w), t_k),  k in {norm, anom}                        (Eq. 13)
    P_anom^(l) = exp(M_anom / tau) / (exp(M_norm / tau) + exp(M_anom / tau))          (Eq. 14)

AnomalyMoE (Algorithm 2), as written:

    w_scale = Softmax(F_gate^global(V_global))       F_gate^global: Linear-GELU-Linear (Eq. 15)
    M_spatial^(l) = sigmoid(F_gate^local(V^(l)))     F_gate^local: one 1x1 conv D -> 1,
                                                     shared by the layers (Alg. 2 line 12) (Eq. 16)
    P_map = sum_l w_scale[l] * (M_spatial^(l) (.) P_anom^(l))                        (Eq. 17)

Because M_spatial is in (0, 1) and not renormalised, P_map can fall below every layer map
at a pixel: the gate suppresses background, as §3.3.2 says it should.

Image score (§3.3.3):

    S_local  = max_{h,w} P_map(h, w)                     (Eq. 18, ``s_local="max"``)
             | Mean_{h,w}(MaxPool_k(P_map))              (Alg. 1 line 10, ``"mean_maxpool"``)
    S_global = <V_global, t_a> - <V_global, t_n>         (Eq. 19 inner product, ``s_global="inner"``)
             | cos(V_global, t_a) - cos(V_global, t_n)   (Alg. 1 line 11, ``"cosine"``)
    S_final  = (1 - gamma) S_global + gamma S_local                                   (Eq. 19)

Eq. 19 writes <V_global, T_final> for a T_final that holds both prompt banks; reading it
as the abnormal-minus-normal similarity (the log-odds form of Eq. 14's two-state
comparison) is this implementation's interpretation (docs/PAPER_MAP.md). For the inner
product, t_n / t_a are the raw state embeddings (mean of the P prompts' T_final), for the
cosine the unit ones. S_final is a logit: Eq. 21 takes sigma(S_final).

With ``enabled=False`` (Table 3 rows A-D, "VTAM off") there are no gates: P_map is the
plain mean of the layer maps and S_final = S_global.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["S_GLOBAL_MODES", "state_probs", "prob_logit", "local_score", "global_score", "local_term", "VTAM"]

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


def local_score(p_map: torch.Tensor, mode: str = "max", kernel: int = 3) -> torch.Tensor:
    """S_local of P_map [B, g, g]: ``max`` (Eq. 18) or ``mean_maxpool`` (Alg. 1 line 10)."""
    if mode == "max":
        return p_map.flatten(1).amax(dim=1)  # Eq. 18
    if mode == "mean_maxpool":
        pooled = F.max_pool2d(p_map[:, None], kernel_size=kernel, stride=1, padding=kernel // 2)
        return pooled[:, 0, : p_map.shape[-2], : p_map.shape[-1]].flatten(1).mean(dim=1)  # Alg. 1 line 10
    raise ValueError(f"model.s_local must be max or mean_maxpool; got {mode!r}")


S_GLOBAL_MODES = ("prob", "logit", "inner", "cosine")


def global_score(v_global: torch.Tensor, t_state: torch.Tensor, mode: str = "prob", tau: float = 0.07) -> torch.Tensor:
    """S_global [B] from V_global [B, D] and state embeddings t_state [B, 2, D] (normal, abnormal).

    ``prob``: sigma((cos_a - cos_n) / tau) in [0, 1], Eq. 14's two-state softmax on the global token;
    ``logit``: (cos_a - cos_n) / tau in [-2 / tau, 2 / tau], its log-odds; ``inner``: <V, t_a> - <V, t_n>
    on the raw vectors (unbounded); ``cosine``: cos_a - cos_n in [-2, 2].
    """
    if mode not in S_GLOBAL_MODES:
        raise ValueError(f"model.s_global must be one of {', '.join(S_GLOBAL_MODES)}; got {mode!r}")
    if mode != "inner":
        v_global, t_state = F.normalize(v_global, dim=-1), F.normalize(t_state, dim=-1)
    sim = torch.einsum("bd,bkd->bk", v_global, t_state)  # Eq. 19 <V_global, T_final> per state
    diff = sim[:, 1] - sim[:, 0]
    if mode == "prob":
        return torch.sigmoid(diff / tau)  # = softmax([cos_n, cos_a] / tau)[abnormal], as Eq. 14
    return diff / tau if mode == "logit" else diff


def local_term(s_local: torch.Tensor, mode: str, tau: float) -> torch.Tensor:
    """S_local as Eq. 19 mixes it: the probability itself, or its log-odds (``s_global=logit``)
    clipped to S_global's range [-2 / tau, 2 / tau]."""
    if mode != "logit":
        return s_local
    bound = 2.0 / tau
    return prob_logit(s_local).clamp(-bound, bound)


class VTAM(nn.Module):
    def __init__(
        self,
        n_layers: int,
        clip_dim: int,
        tau: float,
        gamma: float,
        s_local: str = "max",
        enabled: bool = True,
        s_global: str = "prob",
        s_local_kernel: int = 3,
    ) -> None:
        """Wide on purpose: each argument is a named hyperparameter of Eq. 13-19
        (``n_layers`` the layer maps l of Eq. 13 and 17, ``clip_dim`` D of Eq. 15-16's gates, ``tau``
        Eq. 14's temperature, ``gamma`` Eq. 19's mix, ``s_local``/``s_local_kernel`` Eq. 18 or
        Algorithm 1 line 10, ``enabled`` Table 3's VTAM switch, ``s_global`` Eq. 19's S_global),
        passed one by one so the module can be built without a ``Config`` (``ssvp.model`` and the
        tests call it so)."""
        super().__init__()
        if s_local not in ("max", "mean_maxpool"):
            raise ValueError(f"model.s_local must be max or mean_maxpool; got {s_local!r}")
        if s_global not in S_GLOBAL_MODES:
            raise ValueError(f"model.s_global must be one of {', '.join(S_GLOBAL_MODES)}; got {s_global!r}")
        self.n_layers = n_layers
        self.tau = float(tau)
        self.gamma = float(gamma)
        self.s_local_mode = s_local
        self.s_local_kernel = int(s_local_kernel)
        self.s_global_mode = s_global
        self.enabled = enabled
        if enabled:
            # F_gate^global of Eq. 15 (an MLP; hidden width D_c: the paper gives none)
            self.scale_gate = nn.Sequential(nn.Linear(clip_dim, clip_dim), nn.GELU(), nn.Linear(clip_dim, n_layers))
            self.spatial_gate = nn.Conv2d(clip_dim, 1, kernel_size=1)  # F_gate^local of Eq. 16

    def forward(
        self, patches: torch.Tensor, v_global: torch.Tensor, text: torch.Tensor, t_state: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """patches [B, L, N, D] (N = g*g), v_global [B, D], text [B, 2, D] (normal, abnormal; the
        maps use their directions), t_state [B, 2, D] raw state embeddings for the inner product of
        Eq. 19 (default: ``text``).

        Returns layer_maps [B, L, 2, g, g], map [B, 2, g, g] (channel 1 = P_map, channel 0 = 1 - P_map),
        scale_weights [B, L], spatial_weights [B, L, g, g] (M_spatial), s_global / s_local / s_final [B].
        """
        b, n_layers, n, d = patches.shape
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"patch count N={n} is not a square grid")
        if n_layers != self.n_layers:
            raise ValueError(f"VTAM built for {self.n_layers} layers, got {n_layers}")
        layer_maps = state_probs(patches, text, self.tau)  # [B, L, N, 2], Eq. 13-14
        layer_maps = layer_maps.permute(0, 1, 3, 2).reshape(b, n_layers, 2, g, g)
        p_anom = layer_maps[:, :, 1]  # P_anom^(l), [B, L, g, g]
        # the inner product takes the raw state embeddings; the other readings the maps' unit ones
        raw = t_state is not None and self.s_global_mode == "inner"
        s_global = global_score(v_global, t_state if raw else text, self.s_global_mode, self.tau)

        if self.enabled:
            scale_w = self.scale_gate(v_global).softmax(dim=-1)  # w_scale, Eq. 15
            grid = patches.reshape(b * n_layers, g, g, d).permute(0, 3, 1, 2)  # V^(l) as [B*L, D, g, g]
            spatial_w = torch.sigmoid(self.spatial_gate(grid)).view(b, n_layers, g, g)  # M_spatial, Eq. 16
            p_map = (scale_w[:, :, None, None] * (spatial_w * p_anom)).sum(dim=1)  # Eq. 17
            s_local = local_score(p_map, self.s_local_mode, self.s_local_kernel)  # Eq. 18
            s_final = (1.0 - self.gamma) * s_global + self.gamma * local_term(s_local, self.s_global_mode, self.tau)  # Eq. 19
        else:
            scale_w = p_anom.new_full((b, n_layers), 1.0 / n_layers)
            spatial_w = p_anom.new_ones((b, n_layers, g, g))
            p_map = p_anom.mean(dim=1)
            s_local = local_score(p_map, self.s_local_mode, self.s_local_kernel)
            s_final = s_global
        return {
            "layer_maps": layer_maps,
            "map": torch.stack([1.0 - p_map, p_map], dim=1),
            "scale_weights": scale_w,
            "spatial_weights": spatial_w,
            "s_global": s_global,
            "s_local": s_local,
            "s_final": s_final,
        }
