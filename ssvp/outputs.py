"""``SSVPOutput``: what every SSVP head returns (``SSVPHead`` in ``ssvp.model``, ``BayesPFLHead`` in
``ssvp.bayes_pfl``); its own module so the heads import it without importing each other."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["SSVPOutput", "head_inputs"]


@dataclass
class SSVPOutput:
    """What a forward returns (see docs/ARCHITECTURE.md).

    anomaly_map [B, H, W] abnormal probability per pixel (upsampled to ``out_size``);
    score [B] = sigma(S_final) (clamped S_final with ``l_class_sigma=False``); score_logit [B] = S_final (Eq. 19);
    aux: layer_maps [B, L, 2, H, W] (normal / abnormal, upsampled), map_grid [B, 2, g, g],
    patches [B, L, N, D] (fused patch tokens), v_global [B, D], z / mu / logvar [B, latent]
    and recon [B, D] (None with VCPG off), t_init / t_final [B, 2, D] (per-state mean over
    the P prompts), t_init_prompts / t_final_prompts [B, 2, P, D], text [B, 2, D] (unit
    state embeddings the maps are computed with), s_global / s_local [B],
    scale_weights [B, L], spatial_weights [B, L, g, g], alpha (0-dim; None with VCPG off).
    """

    anomaly_map: torch.Tensor
    score: torch.Tensor
    score_logit: torch.Tensor
    aux: dict[str, Any] = field(default_factory=dict)


def head_inputs(feats: Any, class_names: Any, out_size: int | tuple[int, int]) -> tuple[list[str], tuple[int, int]]:
    """A head's checked inputs: one class name (str) per image, and the output size as (H, W)."""
    b = feats.clip_patch.shape[0]
    class_names = [str(c) for c in class_names]
    if len(class_names) != b:
        raise ValueError(f"got {len(class_names)} class names for a batch of {b} images")
    return class_names, ((out_size, out_size) if isinstance(out_size, int) else tuple(out_size))
