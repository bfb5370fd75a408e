"""Anomaly-map pictures for ``ssvp predict`` (PIL only, so the model library needs no plotting stack).

Everything is drawn at the input photo's own size and aspect: the model sees a square resize
of the photo, so its map is resized back to the photo's (width, height), which undoes the
squash. Two files per image:

* ``save_overlay``: the photo with the heatmap blended over it, same size as the photo;
* ``save_panel``: the anomalib-style panel ``image | ground truth (when a mask exists) |
  heatmap with colour bar | predicted mask (map >= pixel threshold)``, with the score, the
  threshold and the predicted label underneath.

Colours: a fixed scale from 0 to 1 (the map is a probability), the same for every image, so
two panels can be compared by eye.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PANEL_MAX_SIDE = 1024  # panel tiles larger than this are scaled down (aspect kept); overlays never
PANEL_MIN_SIDE = 256  # smaller photos are scaled up in the panel so that its text stays legible


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 along blue -> cyan -> yellow -> red."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    stops = np.array([0.0, 0.33, 0.66, 1.0])
    colors = np.array([[0, 0, 160], [0, 200, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float32)
    out = np.empty(values.shape + (3,), dtype=np.float32)
    for c in range(3):
        out[..., c] = np.interp(v[..., 0], stops, colors[:, c])
    return out.astype(np.uint8)


def _rgb_array(image: Any) -> np.ndarray:
    """H x W x 3 float in [0, 1] from a [3, H, W] / [H, W, 3] tensor or array, a PIL image or a path."""
    if isinstance(image, (str, Path)):
        from .data import load_image

        image = load_image(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, dtype=np.float32)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.transpose(img, (1, 2, 0))
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return np.clip(img.astype(np.float32), 0.0, 1.0)


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to ``size`` = (width, height)."""
    amap = np.asarray(amap, dtype=np.float32)
    if amap.shape == (size[1], size[0]):
        return amap
    return np.asarray(Image.fromarray(amap).resize(size, Image.BILINEAR), dtype=np.float32)


def overlay(image: Any, amap: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Blend an anomaly map (probabilities, any size) over an image, at the image's size."""
    base = _rgb_array(image) * 255.0
    amap = resize_map(amap, (base.shape[1], base.shape[0]))
    heat = heat_colors(amap).astype(np.float32)
    return Image.fromarray(((1 - alpha) * base + alpha * heat).astype(np.uint8))


def save_overlay(image: Any, amap: np.ndarray, path: str | Path, alpha: float = 0.45) -> Path:
    """The heatmap blended over the image, written at the image's own size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, amap, alpha).save(path)
    return path


def known_good(image_path: str | Path) -> bool:
    """An image of the MVTec-AD layout's ``test/good`` folder: its ground truth is empty."""
    p = Path(image_path)
    return p.parent.name == "good" and p.parent.parent.name == "test"


def find_mask(image_path: str | Path, masks_dir: str | Path | None = None,
              input_root: str | Path | None = None) -> Path | None:
    """The ground-truth mask of an image, or None.

    With ``masks_dir``: ``masks_dir/<path relative to input_root>`` with the name ``<stem>_mask.*``
    or ``<stem>.*``. Without: the MVTec-AD layout ``<class>/test/<defect>/<name>`` ->
    ``<class>/ground_truth/<defect>/<stem>_mask.png``.
    """
    p = Path(image_path)
    if masks_dir is not None:
        rel = p.relative_to(input_root) if input_root is not None and p.is_relative_to(input_root) else Path(p.name)
        folder = Path(masks_dir) / rel.parent
        candidates = [folder / f"{p.stem}_mask{ext}" for ext in (".png", p.suffix)]
        candidates += [folder / f"{p.stem}{ext}" for ext in (".png", p.suffix)]
    elif p.parent.parent.name == "test":
        folder = p.parent.parent.parent / "ground_truth" / p.parent.name
        candidates = [folder / f"{p.stem}_mask.png", folder / f"{p.stem}.png"]
    else:
        return None
    return next((c for c in candidates if c.is_file()), None)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def colour_bar(height: int, width: int, font, marks: dict[str, float] | None = None) -> Image.Image:
    """A vertical 0..1 colour bar (1 at the top) with ticks, and ``marks`` (label -> value) as lines."""
    label_w = _text_size(ImageDraw.Draw(Image.new("RGB", (1, 1))), "t=0.00", font)[0] + 8
    bar_w = int(np.clip(width // 12, 12, 40))
    img = Image.new("RGB", (bar_w + label_w + 6, height), "white")
    pad = max(6, height // 40)
    inner = height - 2 * pad
    values = np.linspace(1.0, 0.0, inner, dtype=np.float32)[:, None].repeat(bar_w, axis=1)
    img.paste(Image.fromarray(heat_colors(values)), (2, pad))
    draw = ImageDraw.Draw(img)
    draw.rectangle([2, pad, 2 + bar_w - 1, pad + inner - 1], outline="black")
    text_h = _text_size(draw, "0.00", font)[1]
    mark_ys = [pad + round((1 - float(np.clip(v, 0, 1))) * (inner - 1))
               for v in (marks or {}).values() if v is not None and np.isfinite(v)]
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = pad + round((1 - v) * (inner - 1))
        draw.line([2 + bar_w, y, 2 + bar_w + 4, y], fill="black")
        if all(abs(y - my) > text_h + 3 for my in mark_ys):  # a mark's label wins over a tick's
            draw.text((bar_w + 8, y - text_h // 2 - 1), f"{v:.2f}", fill="black", font=font)
    for label, v in (marks or {}).items():
        if v is None or not np.isfinite(v):
            continue
        y = pad + round((1 - float(np.clip(v, 0, 1))) * (inner - 1))
        draw.line([0, y, 2 + bar_w + 4, y], fill="white", width=3)
        draw.line([0, y, 2 + bar_w + 4, y], fill="black", width=1)
        th = _text_size(draw, label, font)[1]
        y_text = min(max(y - th // 2 - 1, 0), height - th - 2)
        draw.text((bar_w + 8, y_text), label, fill="black", font=font, stroke_width=2, stroke_fill="white")
    return img


def _mask_tile(base: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> Image.Image:
    """The image dimmed, the mask filled in ``colour`` (half transparent) with a solid outline."""
    from scipy import ndimage

    out = base * 0.55
    m = mask.astype(bool)
    out[m] = 0.5 * out[m] + 0.5 * np.asarray(colour, dtype=np.float32)
    edge = m & ~ndimage.binary_erosion(m, iterations=max(1, min(mask.shape) // 150))
    out[edge] = colour
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def save_panel(image: Any, amap: np.ndarray, path: str | Path, **kwargs: Any) -> Path:
    """``render_panel`` written to ``path`` (PNG); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_panel(image, amap, **kwargs)[0].save(path)
    return path


def _panel_scale(h: int, w: int) -> float:
    """Tiles at most ``PANEL_MAX_SIDE`` on their long side; photos under ``PANEL_MIN_SIDE`` scaled up."""
    return min(1.0, PANEL_MAX_SIDE / max(h, w)) if max(h, w) >= PANEL_MIN_SIDE else PANEL_MIN_SIDE / max(h, w)


def _panel_tiles(rgb: np.ndarray, amap: np.ndarray, mask, px_t: float | None) -> tuple[list, np.ndarray]:
    """``[(kind, title, tile)]``: the photo at tile size, the ground truth (when ``mask`` is given),
    the heatmap and the predicted mask (when there is a pixel threshold); and the map at tile size."""
    h, w = rgb.shape[:2]
    scale = _panel_scale(h, w)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    base_img = Image.fromarray((rgb * 255).astype(np.uint8))
    if scale != 1.0:
        base_img = base_img.resize((tw, th), Image.BILINEAR)
    base = np.asarray(base_img, dtype=np.float32)
    amap_t = resize_map(amap, (tw, th))
    tiles: list[tuple[str, str, Image.Image]] = [("image", "Image", base_img)]
    if mask is not None:
        if isinstance(mask, (str, Path)):
            from .data.base import mask_to_bool

            m = mask_to_bool(Image.open(mask), str(mask))
        else:
            m = np.asarray(mask) > 0
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((tw, th), Image.NEAREST)) > 127
        tiles.append(("truth", "Ground truth" if m.any() else "Ground truth (no defect)",
                      _mask_tile(base, m, (0, 200, 0))))
    heat = Image.fromarray((0.5 * base + 0.5 * heat_colors(amap_t)).astype(np.uint8))
    tiles.append(("map", "Anomaly map", heat))
    if px_t is not None:
        pred = amap_t >= px_t
        tiles.append(("pred", f"Predicted mask (>= {px_t:.2f})", _mask_tile(base, pred, (255, 40, 40))))
    return tiles, amap_t


def _panel_lines(score: float, threshold: float | None, map_max: float, title: str) -> tuple[list[str], str | None]:
    """The text under the tiles (score, label and threshold, map maximum; then ``title``) and the label."""
    label = None if threshold is None else ("anomalous" if score >= threshold else "normal")
    lines = [f"score {score:.4f}" + (f"  ->  {label.upper()}  (threshold {threshold:.4f})" if label else
                                      "  (no threshold: no label)") + f"  |  map max {map_max:.2f}"]
    if title:
        lines.append(title)
    return lines, label


def _compose_panel(tiles: list, lines: list[str], label: str | None, px_t: float | None):
    """Tiles side by side with their titles (the colour bar right of the map) and the text below."""
    tw, th = tiles[0][2].size
    font_px = max(12, min(28, round(th / 22)))
    font = _font(font_px)
    small = _font(max(11, font_px - 2))
    gap = max(6, tw // 40)
    bar = colour_bar(th, tw, small, {f"t={px_t:.2f}": px_t} if px_t is not None else None)
    head_h = font_px + 2 * gap
    foot_h = (font_px + 6) * len(lines) + gap
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_font = {name: next((f for f in (font, small, _font(10)) if _text_size(probe, name, f)[0] <= tw),
                             _font(10)) for _, name, _ in tiles}
    text_w = max(_text_size(probe, line, font if i == 0 else small)[0] for i, line in enumerate(lines)) + 2 * gap
    width = max(len(tiles) * tw + (len(tiles) - 1) * gap + gap + bar.width + 2 * gap, text_w)
    canvas = Image.new("RGB", (width, head_h + th + foot_h), "white")
    draw = ImageDraw.Draw(canvas)
    x = gap
    boxes: dict[str, tuple[int, int, int, int]] = {}
    for kind, name, tile in tiles:
        canvas.paste(tile, (x, head_h))
        boxes[kind] = (x, head_h, x + tw, head_h + th)
        tw_text = _text_size(draw, name, title_font[name])[0]
        draw.text((x + max(0, (tw - tw_text) // 2), gap), name, fill="black", font=title_font[name])
        if kind == "map":
            canvas.paste(bar, (x + tw + gap // 2, head_h))
            x += bar.width + gap // 2
        x += tw + gap
    y = head_h + th + gap // 2
    for i, line in enumerate(lines):
        colour = ("firebrick" if label == "anomalous" else "darkgreen" if label else "black") if i == 0 else "dimgray"
        draw.text((gap, y), line, fill=colour, font=font if i == 0 else small)
        y += font_px + 6
    return canvas.crop((0, 0, max(x, text_w), canvas.height)), boxes


def render_panel(
    image: Any,
    amap: np.ndarray,
    *,
    score: float,
    threshold: float | None,
    pixel_threshold: float | None = None,
    mask: np.ndarray | str | Path | None = None,
    title: str = "",
) -> tuple[Image.Image, dict[str, tuple[int, int, int, int]]]:
    """``image | ground truth | heatmap + colour bar | predicted mask`` as one picture, and the
    box (x0, y0, x1, y1) of each tile by kind: ``image``, ``truth``, ``map``, ``pred``.

    ``image``: a path, PIL image, tensor or array at the photo's own size; ``amap``: the
    anomaly map in [0, 1] at any size (resized to the photo); ``mask``: the ground truth
    (path or array; the tile is left out when None); ``threshold``: the image-score threshold
    (label); ``pixel_threshold``: the map threshold of the predicted mask (default: ``threshold``).
    Tiles are scaled to ``PANEL_MIN_SIDE``..``PANEL_MAX_SIDE`` on their long side.
    """
    px_t = threshold if pixel_threshold is None else pixel_threshold
    tiles, amap_t = _panel_tiles(_rgb_array(image), amap, mask, px_t)
    lines, label = _panel_lines(score, threshold, float(np.max(amap_t)), title)
    return _compose_panel(tiles, lines, label, px_t)
