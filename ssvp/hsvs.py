"""Hierarchical Semantic-Visual Synergy (HSVS): fuse DINO structure into CLIP's joint space.

The Adaptive Token Features Fusion (ATF) block of the paper runs two cross-attention
paths between the CLIP tokens ``F_c`` [B, N, D_c] and the DINO tokens ``F_d`` [B, N, D_d]:

    Q_c = F_c W_c^Q,  K_d = F_d W_d^K,  V_d = F_d W_d^V                      (Eq. 2)
    Q_d = F_d W_d^Q,  K_c = F_c W_c^K,  V_c = F_c W_c^V                      (Eq. 2)
    Attn_{c->d} = Softmax(Q_c K_d^T / sqrt(d_head)) V_d                      (Eq. 3)
    Attn_{d->c} = Softmax(Q_d K_c^T / sqrt(d_head)) V_c                      (Eq. 4)
    Z_joint = [LN(Attn_{c->d}) ; LN(Attn_{d->c})],  F = F_c + Z_joint W_o    (Eq. 5)

``Attn_{c->d}`` injects DINO's geometric priors into the CLIP semantic manifold,
``Attn_{d->c}`` is the reciprocal structural path. The projection ``W_o`` maps the
concatenation back to ``D_c`` so the fused tokens can be compared with CLIP text
embeddings. The residual to ``F_c`` (``residual=True``, default) is this
implementation's reading of "fuse into the CLIP semantic space": it keeps the output
anchored in CLIP's joint space; pass ``residual=False`` for ``F = Z_joint W_o``.

Every tapped layer pair (CLIP layer i with DINO layer i) gets its own block, and so
does the global token (a sequence of length 1; there the softmax over a single key is
identically 1, so each path reduces to its value projection).

``ConcatFusion`` is the Table 3 (B) ablation: ``F = F_c + [LN(F_c) ; LN(F_d)] W_o``,
the same output head without the attention paths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CrossAttention", "ATFBlock", "ConcatFusion", "HSVSFusion"]


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
        # Eq. 3-4 (and Eq. 10): Softmax(Q K^T / sqrt(d_head)) V, per head
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, nq, self.heads * self.head_dim)


class ATFBlock(nn.Module):
    """Dual-path cross-attention fusion of one CLIP/DINO token pair (Eq. 2-5)."""

    def __init__(self, clip_dim: int, dino_dim: int, heads: int, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.c2d = CrossAttention(clip_dim, dino_dim, clip_dim, heads)  # Q_c, K_d, V_d (Eq. 2)
        self.d2c = CrossAttention(dino_dim, clip_dim, clip_dim, heads)  # Q_d, K_c, V_c (Eq. 2)
        self.norm_c2d = nn.LayerNorm(clip_dim)
        self.norm_d2c = nn.LayerNorm(clip_dim)
        self.out = nn.Linear(2 * clip_dim, clip_dim)  # W_o of Eq. 5

    def forward(self, f_c: torch.Tensor, f_d: torch.Tensor) -> torch.Tensor:
        a_cd = self.c2d(f_c, f_d)  # Eq. 3
        a_dc = self.d2c(f_d, f_c)  # Eq. 4
        z_joint = torch.cat([self.norm_c2d(a_cd), self.norm_d2c(a_dc)], dim=-1)  # Eq. 5
        fused = self.out(z_joint)
        return f_c + fused if self.residual else fused


class ConcatFusion(nn.Module):
    """Table 3 (B): concatenate the normalised CLIP and DINO tokens and project to D_c."""

    def __init__(self, clip_dim: int, dino_dim: int, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.norm_c = nn.LayerNorm(clip_dim)
        self.norm_d = nn.LayerNorm(dino_dim)
        self.out = nn.Linear(clip_dim + dino_dim, clip_dim)

    def forward(self, f_c: torch.Tensor, f_d: torch.Tensor) -> torch.Tensor:
        fused = self.out(torch.cat([self.norm_c(f_c), self.norm_d(f_d)], dim=-1))
        return f_c + fused if self.residual else fused


class HSVSFusion(nn.Module):
    """All fusion blocks of the head: one per tapped layer pair plus one for the global token.

    ``mode``: ``atf`` (ATF blocks, the paper), ``concat`` (Table 3 B) or ``none``
    (CLIP only: no parameters, DINO features are ignored).
    """

    def __init__(
        self, mode: str, n_layers: int, clip_dim: int, dino_dim: int, heads: int, residual: bool = True
    ) -> None:
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
                return ATFBlock(clip_dim, dino_dim, heads, residual)
            return ConcatFusion(clip_dim, dino_dim, residual)

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

