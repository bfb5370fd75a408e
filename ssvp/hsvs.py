"""Hierarchical Semantic-Visual Synergy (HSVS): fuse DINO structure into CLIP's joint space.

The Adaptive Token Features Fusion (ATF) block of the paper runs two cross-attention
paths between the CLIP tokens ``F_c`` [B, N, D_c] and the DINO tokens ``F_d`` [B, N, D_d]:

    Q_c = F_c W_c^Q,  K_d = F_d W_d^K,  V_d = F_d W_d^V                      (Eq. 2)
    Q_d = F_d W_d^Q,  K_c = F_c W_c^K,  V_c = F_c W_c^V                      (Eq. 2)
    Attn_{c->d} = Softmax(Q_c K_d^T / sqrt(d_head)) V_d                      (Eq. 3)
    Attn_{d->c} = Softmax(Q_d K_c^T / sqrt(d_head)) V_c                      (Eq. 3)
    Z_joint = [LN(Attn_{c->d}) || LN(Attn_{d->c})]                           (Eq. 4)
    V_syn = F_c + F_mlp(Z_joint),  F_mlp = Linear(2D_c, D_c) GELU Linear(D_c, D_c)   (Eq. 5)

``Attn_{c->d}`` injects DINO's geometric priors into the CLIP semantic manifold,
``Attn_{d->c}`` is the reciprocal structural path; d_head = D_c / heads. F_mlp is the
"two-layer MLP activated by GELU" of Eq. 5 (hidden width D_c: the paper gives none) and
the residual to F_c is Eq. 5's. ``ln=False`` drops the LayerNorms (Algorithm 1, line 5
has none; ``model.ln_eq4_eq11``).

Every tapped layer pair (CLIP layer i with DINO layer i) gets its own block, and so
does the global token (a sequence of length 1; there the softmax over a single key is
identically 1, so each path reduces to its value projection).

``ConcatFusion`` is the Table 3 (B) ablation: ``V_syn = F_c + F_mlp([LN(F_c) || LN(F_d)])``,
the same two-layer GELU MLP and residual without the attention paths, so rows B and C
differ only by the attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CrossAttention", "fusion_mlp", "ATFBlock", "ConcatFusion", "HSVSFusion"]


def fusion_mlp(in_dim: int, dim: int) -> nn.Sequential:
    """F_mlp of Eq. 5: Linear(in_dim, dim) -> GELU -> Linear(dim, dim)."""
    return nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))


def _norm(dim: int, ln: bool) -> nn.Module:
    return nn.LayerNorm(dim) if ln else nn.Identity()


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from one token set, keys/values from another."""

    def __init__(self, q_dim: int, kv_dim: int, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by model.attn_heads={heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(q_dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        b, nq, _ = x_q.shape
        nk = x_kv.shape[1]
        q = self.q(x_q).view(b, nq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x_kv).view(b, nk, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x_kv).view(b, nk, self.heads, self.head_dim).transpose(1, 2)
        # Eq. 3 (and Eq. 10): Softmax(Q K^T / sqrt(d_head)) V, per head
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, nq, self.heads * self.head_dim)


class ATFBlock(nn.Module):
    """Dual-path cross-attention fusion of one CLIP/DINO token pair (Eq. 2-5)."""

    def __init__(self, clip_dim: int, dino_dim: int, heads: int, residual: bool = True, ln: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.c2d = CrossAttention(clip_dim, dino_dim, clip_dim, heads)  # Q_c, K_d, V_d (Eq. 2)
        self.d2c = CrossAttention(dino_dim, clip_dim, clip_dim, heads)  # Q_d, K_c, V_c (Eq. 2)
        self.norm_c2d = _norm(clip_dim, ln)  # LN of Eq. 4
        self.norm_d2c = _norm(clip_dim, ln)
        self.mlp = fusion_mlp(2 * clip_dim, clip_dim)  # F_mlp of Eq. 5

    def forward(self, f_c: torch.Tensor, f_d: torch.Tensor) -> torch.Tensor:
        a_cd = self.c2d(f_c, f_d)  # Attn_{c->d}, Eq. 3
        a_dc = self.d2c(f_d, f_c)  # Attn_{d->c}, Eq. 3
        z_joint = torch.cat([self.norm_c2d(a_cd), self.norm_d2c(a_dc)], dim=-1)  # Eq. 4
        fused = self.mlp(z_joint)
        return f_c + fused if self.residual else fused  # Eq. 5


class ConcatFusion(nn.Module):
    """Table 3 (B): the normalised CLIP and DINO tokens concatenated, then Eq. 5's MLP and residual."""

    def __init__(self, clip_dim: int, dino_dim: int, residual: bool = True, ln: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.norm_c = _norm(clip_dim, ln)
        self.norm_d = _norm(dino_dim, ln)
        self.mlp = fusion_mlp(clip_dim + dino_dim, clip_dim)

    def forward(self, f_c: torch.Tensor, f_d: torch.Tensor) -> torch.Tensor:
        fused = self.mlp(torch.cat([self.norm_c(f_c), self.norm_d(f_d)], dim=-1))
        return f_c + fused if self.residual else fused


class HSVSFusion(nn.Module):
    """All fusion blocks of the head: one per tapped layer pair plus one for the global token.

    ``mode``: ``atf`` (ATF blocks, the paper), ``concat`` (Table 3 B) or ``none``
    (CLIP only: no parameters, DINO features are ignored).
    """

    def __init__(
        self,
        mode: str,
        n_layers: int,
        clip_dim: int,
        dino_dim: int,
        heads: int,
        residual: bool = True,
        ln: bool = True,
    ) -> None:
        """Wide on purpose: each argument is a named setting of the fusion of Eq. 2-5
        (``mode`` the Table 3 fusion row, ``n_layers`` the tapped layer pairs, ``clip_dim``/``dino_dim``
        D_c/D_d of Eq. 2, ``heads`` of Eq. 3, ``residual`` Eq. 5's F_c + ..., ``ln`` Eq. 4's LayerNorms),
        passed one by one so the module can be built without a ``Config`` (``ssvp.model``,
        ``ssvp.bayes_pfl`` and the tests call it so)."""
        super().__init__()
        if mode not in ("atf", "concat", "none"):
            raise ValueError(f"model.fusion must be atf, concat or none; got {mode!r}")
        self.mode = mode
        self.n_layers = n_layers
        if mode == "none":
            self.layers = nn.ModuleList()
            self.global_block = None
            return

        def make() -> nn.Module:
            if mode == "atf":
                return ATFBlock(clip_dim, dino_dim, heads, residual, ln)
            return ConcatFusion(clip_dim, dino_dim, residual, ln)

        self.layers = nn.ModuleList(make() for _ in range(n_layers))
        self.global_block = make()

    def forward(
        self,
        clip_patch: torch.Tensor,
        clip_global: torch.Tensor,
        dino_patch: torch.Tensor | None,
        dino_global: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """clip_patch [B, L, N, Dc], dino_patch [B, L, N, Dd] -> fused patches [B, L, N, Dc], global [B, Dc]."""
        if clip_patch.dim() != 4 or clip_patch.shape[1] != self.n_layers:
            raise ValueError(
                f"clip_patch must be [B, {self.n_layers}, N, Dc] (one entry per model.clip_layers tap); "
                f"got {tuple(clip_patch.shape)}"
            )
        if self.mode == "none":
            return clip_patch, clip_global
        if dino_patch is None or dino_global is None or dino_patch.numel() == 0:
            raise ValueError(f"model.fusion={self.mode!r} needs DINO features, but dino_patch is empty")
        if dino_patch.shape[:3] != clip_patch.shape[:3]:
            raise ValueError(
                f"dino_patch {tuple(dino_patch.shape)} does not pair with clip_patch {tuple(clip_patch.shape)}: "
                "both need [B, L, N, ...] with the same taps count L and grid N"
            )
        # layer-major contiguous copies, made once: each block then reads contiguous [B, N, D]
        # tokens (a strided slice would be copied again by every projection that reads it)
        cp = clip_patch.transpose(0, 1).contiguous()
        dp = dino_patch.transpose(0, 1).contiguous()
        fused = torch.stack([block(cp[i], dp[i]) for i, block in enumerate(self.layers)], dim=1)
        g = self.global_block(clip_global[:, None], dino_global[:, None])[:, 0]
        return fused, g

