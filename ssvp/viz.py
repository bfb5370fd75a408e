"""Anomaly-map overlays as PNG (PIL only, so the model library needs no plotting stack)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 along blue -> cyan -> yellow -> red."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    stops = np.array([0.0, 0.33, 0.66, 1.0])
    colors = np.array([[0, 0, 160], [0, 200, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float32)
    out = np.empty(values.shape + (3,), dtype=np.float32)
    for c in range(3):
        out[..., c] = np.interp(v[..., 0], stops, colors[:, c])
    return out.astype(np.uint8)


def overlay(image: torch.Tensor | np.ndarray, amap: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Blend an anomaly map (probabilities, H x W) over an image ([3, H, W] in [0, 1])."""
    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = np.transpose(img, (1, 2, 0))
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    base = (np.clip(img, 0, 1) * 255).astype(np.float32)
    if amap.shape != base.shape[:2]:
        amap = np.asarray(Image.fromarray(amap.astype(np.float32)).resize(base.shape[1::-1], Image.BILINEAR))
    heat = heat_colors(amap).astype(np.float32)
    return Image.fromarray(((1 - alpha) * base + alpha * heat).astype(np.uint8))


def save_overlay(image, amap: np.ndarray, path: str | Path, title: str | None = None) -> Path:
    """Write image | overlay side by side, with an optional caption."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    over = overlay(image, amap)
    left = overlay(image, np.zeros_like(amap), alpha=0.0)
    canvas = Image.new("RGB", (over.width * 2, over.height + (14 if title else 0)), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(over, (over.width, 0))
    if title:
        ImageDraw.Draw(canvas).text((2, over.height + 1), title, fill="black")
    canvas.save(path)
    return path
