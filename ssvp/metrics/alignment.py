"""Semantic-visual alignment metrics of Table 4: TIR-FG (Eq. 23) and SCD (Eq. 24).

    TIR_FG = 1/|Omega_fg| sum_{u in Omega_fg} CosSim(v_u, t_abn)                  (Eq. 23)
    SCD    = ||t_final - t_static||_2, for the normal and the abnormal prompt       (Eq. 24)

As computed here (``ssvp eval`` reports ``tir_fg``, ``scd_normal``, ``scd_abnormal`` per
class and their mean; docs/PAPER_MAP.md):

* v_u are the fused patch features V_syn^local (Eq. 5) of grid cell u and t_abn the
  abnormal state embedding the maps are computed with (T_final, Eq. 11). With several
  tapped layers the cosine is averaged over the layers (interpretation: Eq. 23 names one
  v_u, Eq. 13 has one per layer).
* Omega_fg is the ground-truth mask, a set of pixels; a pixel takes the feature of the
  grid cell it lies in, so each cell counts with the number of anomalous pixels it holds
  (``cell_fraction``: area fraction per cell). The sum runs over every anomalous pixel of
  the evaluated set (one |Omega_fg| for a class, as the equation has one sum).
* t_static, the "static prototypes", are the CLIP text embeddings of fixed template
  prompts (``STATIC_TEMPLATES``: "a photo of a flawless {cls}." / "a photo of a damaged
  {cls}."; interpretation: the paper names no template). Both embeddings are unit vectors
  before the distance (so SCD lies in [0, 2]); SCD is averaged over images.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .common import MetricInputError

__all__ = ["STATIC_TEMPLATES", "cell_fraction", "tir_fg_sums", "tir_fg", "scd_per_image", "scd"]

STATIC_TEMPLATES = ("a photo of a flawless {}.", "a photo of a damaged {}.")  # t_static (normal, abnormal)


def _t(x: Any, name: str) -> torch.Tensor:
    try:
        return torch.as_tensor(x, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise MetricInputError(f"{name}: not a numeric array ({exc})") from None


def cell_fraction(masks: Any, grid: int) -> torch.Tensor:
    """Anomalous-area fraction of each of the grid x grid cells: masks [B, H, W] -> [B, grid * grid]."""
    m = _t(masks, "masks")
    if m.dim() != 3:
        raise MetricInputError(f"masks: expected [B, H, W], got shape {tuple(m.shape)}")
    return F.adaptive_avg_pool2d((m > 0.5).float()[:, None], grid).flatten(1)


def tir_fg_sums(patches: Any, t_abn: Any, fg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: (sum_u fg_u cos(v_u, t_abn), sum_u fg_u) of Eq. 23.

    patches [B, N, D] or [B, L, N, D] (cosines averaged over L), t_abn [B, D], fg [B, N]
    (weights of the cells: 0/1 or the area fraction of ``cell_fraction``).
    """
    v, t, w = _t(patches, "patches"), _t(t_abn, "t_abn"), _t(fg, "fg")
    if v.dim() == 3:
        v = v[:, None]
    if v.dim() != 4 or t.dim() != 2 or w.dim() != 2:
        raise MetricInputError(
            f"tir_fg: expected patches [B, (L,) N, D], t_abn [B, D], fg [B, N]; got "
            f"{tuple(v.shape)}, {tuple(t.shape)}, {tuple(w.shape)}"
        )
    if not (v.shape[0] == t.shape[0] == w.shape[0]) or v.shape[2] != w.shape[1] or v.shape[3] != t.shape[1]:
        raise MetricInputError(
            f"tir_fg: shapes do not pair up: patches {tuple(v.shape)}, t_abn {tuple(t.shape)}, fg {tuple(w.shape)}"
        )
    cos = torch.einsum("blnd,bd->bln", F.normalize(v, dim=-1), F.normalize(t, dim=-1)).mean(dim=1)  # [B, N]
    return (w * cos).sum(dim=1), w.sum(dim=1)


def tir_fg(patches: Any, t_abn: Any, fg: Any) -> float:
    """TIR-FG (Eq. 23) over every anomalous cell of the batch; NaN when there is none."""
    num, den = tir_fg_sums(patches, t_abn, fg)
    total = float(den.sum())
    return float(num.sum()) / total if total > 0 else math.nan


def scd_per_image(t_final: Any, t_static: Any) -> torch.Tensor:
    """||unit(t_final) - unit(t_static)||_2 per image and state: [B, 2, D], [B, 2, D] or [2, D] -> [B, 2]."""
    f, s = _t(t_final, "t_final"), _t(t_static, "t_static")
    if s.dim() == 2:
        s = s[None].expand(f.shape[0], -1, -1)
    if f.dim() != 3 or f.shape[1] != 2 or f.shape != s.shape:
        raise MetricInputError(
            f"scd: expected t_final [B, 2, D] and t_static [B, 2, D] or [2, D] (normal, abnormal); got "
            f"{tuple(f.shape)}, {tuple(s.shape)}"
        )
    return (F.normalize(f, dim=-1) - F.normalize(s, dim=-1)).norm(dim=-1)  # Eq. 24


def scd(t_final: Any, t_static: Any) -> dict[str, float]:
    """SCD (Eq. 24) averaged over images: ``{"scd_normal": ..., "scd_abnormal": ...}``."""
    d = scd_per_image(t_final, t_static)
    return {"scd_normal": float(d[:, 0].mean()), "scd_abnormal": float(d[:, 1].mean())}


def static_text(text_encoder: Any, class_names: Sequence[str]) -> torch.Tensor:
    """t_static [C, 2, D]: CLIP text embeddings of ``STATIC_TEMPLATES`` for each class name."""
    names = [str(c).replace("_", " ") for c in class_names]
    texts = [tpl.format(n) for n in names for tpl in STATIC_TEMPLATES]
    with torch.no_grad():
        emb = text_encoder.encode_text(texts).float()
    return emb.view(len(names), 2, -1)
