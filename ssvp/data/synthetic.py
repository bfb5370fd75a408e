"""A procedural two-domain anomaly benchmark in the MVTec-AD folder layout.

``make_synthetic(out_dir, seed)`` writes ``out_dir/domain_a`` and ``out_dir/domain_b``,
each an MVTec-AD tree (``<cls>/train/good``, ``<cls>/test/good``, ``<cls>/test/<defect>``,
``<cls>/ground_truth/<defect>/<NNN>_mask.png``) plus a ``meta.json``. The two domains
share no category and differ in palette, lighting and material, so training on one and
testing on the other is a (small) zero-shot transfer:

- ``domain_a`` (warm light from the top left): woven ``fabric``, ``wood`` grain,
  ceramic ``tile`` grid, two-tone ``pill`` capsules and crown ``bottle_cap``.
- ``domain_b`` (cool light from the right): brushed ``metal_plate``, pebbled ``leather``,
  perforated ``mesh``, Phillips ``screw`` heads and ``washer`` rings.

Defects (3 per category): scratch, crack, stain, color_spot, hole, missing_piece.
Each is painted as an alpha map over a target appearance derived from the local
surface (darker, lighter, tinted, background showing through), so defects are clearly
visible but not a trivial colour cue. Masks are exact: a pixel is in the mask if and
only if the defect changed it (alpha below 0.25 is cut to zero, and normal and
defective renderings share the same sensor noise).

Deterministic by seed: every image draws from its own ``numpy`` generator seeded by
(seed, domain, category, split, index), and PNG encoding is deterministic, so the same
seed gives the same bytes. Only numpy, scipy.ndimage and PIL are used.

Written here rather than taken from PyPI: the ``defect-synthesis`` package (0.1.0)
only paints defects onto seed images the user supplies (no base textures or objects),
needs opencv-python and draws from Python's global ``random`` state, so it neither
provides the two-domain benchmark nor byte-level determinism by seed.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

__all__ = ["make_synthetic", "render_item", "DOMAINS", "CATEGORIES"]

Array = np.ndarray


# --------------------------------------------------------------------------- noise helpers
def _grid(size: int) -> tuple[Array, Array]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _noise(rng: np.random.Generator, size: int, sigma: float | tuple[float, float]) -> Array:
    """Gaussian-filtered white noise with unit standard deviation."""
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma, mode="wrap")
    return (n - n.mean()) / (n.std() + 1e-6)


def _fbm(rng: np.random.Generator, size: int, k: float, sigmas=(16, 8, 4, 2), weights=(0.5, 0.3, 0.15, 0.05)) -> Array:
    out = sum(w * _noise(rng, size, s * k) for s, w in zip(sigmas, weights))
    return out / (out.std() + 1e-6)


def _rgb(c) -> Array:
    return np.asarray(c, dtype=np.float32).reshape(1, 1, 3)


def _jitter(rng: np.random.Generator, color, amount: float = 0.04) -> Array:
    return np.clip(_rgb(color) * (1 + rng.uniform(-amount, amount, 3).astype(np.float32)), 0, 1)


def _smoothstep(x: Array) -> Array:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _cover(signed_dist: Array) -> Array:
    """Anti-aliased coverage of a shape from its signed distance in pixels (negative inside)."""
    return np.clip(0.5 - signed_dist, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- textures (domain_a)
def _fabric(rng, s):
    k = s / 128
    yy, xx = _grid(s)
    ang = math.radians(rng.uniform(-4, 4))
    u = xx * math.cos(ang) + yy * math.sin(ang) + rng.uniform(0, 20)
    v = -xx * math.sin(ang) + yy * math.cos(ang) + rng.uniform(0, 20)
    p = rng.uniform(7.0, 8.5) * k
    parity = (np.floor(u / p) + np.floor(v / p)) % 2
    warp = np.sin(np.pi * ((u / p) % 1.0)) ** 0.6
    weft = np.sin(np.pi * ((v / p) % 1.0)) ** 0.6
    profile = np.where(parity == 0, warp, weft)
    fibres = _noise(rng, s, (0.7 * k, 2.5 * k)) * np.where(parity == 0, 1, 0) + _noise(rng, s, (2.5 * k, 0.7 * k)) * np.where(parity == 0, 0, 1)
    c_warp, c_weft = _jitter(rng, (0.78, 0.56, 0.42)), _jitter(rng, (0.70, 0.47, 0.36))
    color = np.where(parity[..., None] == 0, c_warp, c_weft)
    shade = 0.55 + 0.45 * profile + 0.05 * fibres
    return color * shade[..., None], None


def _wood(rng, s):
    k = s / 128
    yy, xx = _grid(s)
    warp = _noise(rng, s, 18 * k) * 6 * k + _noise(rng, s, (6 * k, 30 * k)) * 2 * k
    freq = rng.uniform(0.07, 0.1) / k
    g = (yy + 0.08 * xx * rng.uniform(-1, 1) + warp) * freq + rng.uniform(0, 1)
    ring = _smoothstep(np.abs((g % 1.0) - 0.5) * 2) ** 0.7
    streak = _noise(rng, s, (0.6 * k, 12 * k))
    light, dark = _jitter(rng, (0.80, 0.60, 0.38)), _jitter(rng, (0.52, 0.33, 0.18))
    img = dark + (light - dark) * ring[..., None]
    return img * (1 + 0.05 * streak[..., None]), None


def _tile(rng, s):
    k = s / 128
    yy, xx = _grid(s)
    t = s / 4
    ox, oy = rng.uniform(0, t, 2)
    cx, cy = np.floor((xx + ox) / t), np.floor((yy + oy) / t)
    fx, fy = ((xx + ox) % t), ((yy + oy) % t)
    grout_w = 1.6 * k
    edge = np.minimum(np.minimum(fx, t - fx), np.minimum(fy, t - fy))
    grout = _cover(edge - grout_w)  # 1 in the grout lines
    tile_id = (cx * 7 + cy * 13).astype(np.int64) % 17
    tints = 1 + rng.uniform(-0.05, 0.05, 17).astype(np.float32)
    base = _jitter(rng, (0.88, 0.80, 0.66)) * tints[tile_id][..., None]
    speck = 0.03 * _noise(rng, s, 0.8 * k) + 0.03 * _noise(rng, s, 6 * k)
    bevel = 1 - 0.12 * _cover(edge - 4 * k) * (1 - grout)
    tile = base * (1 + speck[..., None]) * bevel[..., None]
    g_col = _jitter(rng, (0.45, 0.40, 0.35))
    return tile * (1 - grout[..., None]) + g_col * grout[..., None], None


# --------------------------------------------------------------------------- textures (domain_b)
def _metal_plate(rng, s):
    k = s / 128
    yy, xx = _grid(s)
    streaks = _noise(rng, s, (0.5 * k, 28 * k))
    y0 = rng.uniform(0.2, 0.8) * s
    spec = np.exp(-(((yy - y0) / (0.25 * s)) ** 2)) * 0.18
    base = _jitter(rng, (0.56, 0.60, 0.66), 0.03)
    img = base * (1 + 0.07 * streaks[..., None]) + spec[..., None]
    return img, None


def _leather(rng, s):
    k = s / 128
    n = _noise(rng, s, 2.6 * k)
    creases = np.exp(-((n / 0.22) ** 2))
    pebble = _fbm(rng, s, k, sigmas=(6, 3, 1.5), weights=(0.5, 0.3, 0.2))
    base = _jitter(rng, (0.30, 0.36, 0.40), 0.05)
    return base * (0.9 + 0.07 * pebble[..., None]) * (1 - 0.35 * creases[..., None]), None


def _mesh(rng, s):
    k = s / 128
    yy, xx = _grid(s)
    pitch = 12 * k
    ox, oy = rng.uniform(0, pitch, 2)
    row = np.floor((yy + oy) / pitch)
    fx = ((xx + ox + (row % 2) * pitch / 2) % pitch) - pitch / 2
    fy = ((yy + oy) % pitch) - pitch / 2
    rho = np.sqrt(fx**2 + fy**2)
    hole = _cover(rho - 3.6 * k)
    plate = _jitter(rng, (0.62, 0.66, 0.70), 0.03) * (1 + 0.05 * _noise(rng, s, (0.5 * k, 20 * k)))[..., None]
    inside = _rgb((0.08, 0.09, 0.11)) * (1 + 0.5 * np.clip(fy / (3.6 * k), -1, 1))[..., None]
    return plate * (1 - hole[..., None]) + inside * hole[..., None], None


# --------------------------------------------------------------------------- objects
def _background(rng, s, color, grain=0.025):
    k = s / 128
    yy, xx = _grid(s)
    grad = 1 + 0.06 * ((xx - s / 2) * rng.uniform(-1, 1) + (yy - s / 2) * rng.uniform(-1, 1)) / s
    return _jitter(rng, color, 0.03) * (grad * (1 + grain * _noise(rng, s, 1.5 * k)))[..., None]


def _pill(rng, s):
    yy, xx = _grid(s)
    cx, cy = s / 2 + rng.uniform(-0.05, 0.05, 2) * s
    ang = math.radians(rng.uniform(-25, 25))
    u = (xx - cx) * math.cos(ang) + (yy - cy) * math.sin(ang)
    v = -(xx - cx) * math.sin(ang) + (yy - cy) * math.cos(ang)
    h, r = 0.17 * s * rng.uniform(0.95, 1.05), 0.14 * s * rng.uniform(0.95, 1.05)
    d = np.sqrt(np.maximum(np.abs(u) - h, 0) ** 2 + v**2)
    cov = _cover(d - r)
    height = np.sqrt(np.clip(1 - (d / r) ** 2, 0, 1))
    left, right = _jitter(rng, (0.93, 0.90, 0.84)), _jitter(rng, (0.78, 0.40, 0.30))
    color = np.where((u < 0)[..., None], left, right)
    seam = 1 - 0.25 * _cover(np.abs(u) - 0.6 * s / 128)
    hl = np.exp(-(((u + 0.4 * h) ** 2 + (v + 0.45 * r) ** 2) / (0.2 * r) ** 2)) * 0.25
    obj = color * (0.6 + 0.4 * height)[..., None] * seam[..., None] + hl[..., None]
    bg = _background(rng, s, (0.36, 0.27, 0.20))
    return bg * (1 - cov[..., None]) + obj * cov[..., None], (cov, bg)


def _bottle_cap(rng, s):
    yy, xx = _grid(s)
    cx, cy = s / 2 + rng.uniform(-0.05, 0.05, 2) * s
    rho, th = np.hypot(xx - cx, yy - cy), np.arctan2(yy - cy, xx - cx)
    R = 0.31 * s * rng.uniform(0.96, 1.04)
    edge_r = R * (1 + 0.045 * np.sin(21 * th + rng.uniform(0, 2 * np.pi)))
    cov = _cover(rho - edge_r)
    t = rho / R
    rings = 1 - 0.18 * _cover(np.abs(t - 0.8) * R - 1.2 * s / 128) - 0.1 * np.clip((t - 0.85) / 0.15, 0, 1)
    light = 0.75 + 0.25 * np.cos(th + np.pi * 0.75) * np.clip(t, 0, 1)
    base = _jitter(rng, (0.86, 0.62, 0.22))
    obj = base * (rings * light)[..., None] * (1 + 0.02 * _noise(rng, s, 1.0))[..., None]
    bg = _background(rng, s, (0.90, 0.86, 0.78))
    return bg * (1 - cov[..., None]) + obj * cov[..., None], (cov, bg)


def _screw(rng, s):
    yy, xx = _grid(s)
    k = s / 128
    cx, cy = s / 2 + rng.uniform(-0.05, 0.05, 2) * s
    rho, th = np.hypot(xx - cx, yy - cy), np.arctan2(yy - cy, xx - cx)
    R = 0.3 * s * rng.uniform(0.96, 1.04)
    cov = _cover(rho - R)
    ang = rng.uniform(0, np.pi / 2)
    u = (xx - cx) * math.cos(ang) + (yy - cy) * math.sin(ang)
    v = -(xx - cx) * math.sin(ang) + (yy - cy) * math.cos(ang)
    arm_w, arm_l = 0.055 * s, 0.17 * s
    d1 = np.maximum(np.abs(u) - arm_l, np.abs(v) - arm_w)
    d2 = np.maximum(np.abs(v) - arm_l, np.abs(u) - arm_w)
    slot = _cover(np.minimum(d1, d2))
    bevel = np.clip((rho / R - 0.8) / 0.2, 0, 1)
    light = 0.8 + 0.2 * np.cos(th) * (0.3 + bevel)
    metal = _jitter(rng, (0.70, 0.72, 0.76), 0.03) * (light * (1 - 0.2 * bevel))[..., None]
    metal = metal * (1 + 0.04 * _noise(rng, s, (0.5 * k, 6 * k)))[..., None]
    obj = metal * (1 - 0.75 * slot)[..., None]
    bg = _background(rng, s, (0.22, 0.26, 0.32))
    return bg * (1 - cov[..., None]) + obj * cov[..., None], (cov, bg)


def _washer(rng, s):
    yy, xx = _grid(s)
    k = s / 128
    cx, cy = s / 2 + rng.uniform(-0.05, 0.05, 2) * s
    rho, th = np.hypot(xx - cx, yy - cy), np.arctan2(yy - cy, xx - cx)
    Ro, Ri = 0.33 * s * rng.uniform(0.96, 1.04), 0.13 * s * rng.uniform(0.95, 1.05)
    cov = _cover(np.maximum(rho - Ro, Ri - rho))
    mid = (rho - Ri) / (Ro - Ri)
    profile = 0.75 + 0.25 * np.sin(np.pi * np.clip(mid, 0, 1))
    light = 0.85 - 0.15 * np.cos(th)
    turn = 1 + 0.05 * np.sin(rho * 1.7 / k)  # lathe rings
    obj = _jitter(rng, (0.48, 0.54, 0.60), 0.03) * (profile * light * turn)[..., None]
    bg = _background(rng, s, (0.84, 0.87, 0.90))
    return bg * (1 - cov[..., None]) + obj * cov[..., None], (cov, bg)


# --------------------------------------------------------------------------- domains
@dataclass(frozen=True)
class Category:
    render: Callable
    defects: tuple[str, ...]
    scratch_light: bool = False  # metal scratches catch the light; others are dark grooves
    spot_color: tuple[float, float, float] = (0.45, 0.30, 0.22)


CATEGORIES: dict[str, Category] = {
    # domain_a
    "fabric": Category(_fabric, ("hole", "stain", "scratch")),
    "wood": Category(_wood, ("crack", "hole", "scratch")),
    "tile": Category(_tile, ("crack", "missing_piece", "stain")),
    "pill": Category(_pill, ("color_spot", "crack", "missing_piece"), spot_color=(0.50, 0.36, 0.26)),
    "bottle_cap": Category(_bottle_cap, ("missing_piece", "scratch", "stain"), scratch_light=True),
    # domain_b
    "metal_plate": Category(_metal_plate, ("hole", "scratch", "stain"), scratch_light=True),
    "leather": Category(_leather, ("color_spot", "crack", "hole"), spot_color=(0.52, 0.50, 0.44)),
    "mesh": Category(_mesh, ("crack", "scratch", "stain"), scratch_light=True),
    "screw": Category(_screw, ("color_spot", "missing_piece", "scratch"), scratch_light=True, spot_color=(0.55, 0.36, 0.22)),
    "washer": Category(_washer, ("crack", "missing_piece", "scratch"), scratch_light=True),
}


@dataclass(frozen=True)
class Domain:
    categories: tuple[str, ...]
    light_dir: tuple[float, float]  # (x, y) direction the light comes from
    tint: tuple[float, float, float]  # colour temperature of the light
    stain: tuple[float, float, float]  # multiplicative colour of stains


DOMAINS: dict[str, Domain] = {
    "domain_a": Domain(("fabric", "wood", "tile", "pill", "bottle_cap"), (-1.0, -1.0), (1.05, 1.0, 0.90), (0.66, 0.52, 0.40)),
    "domain_b": Domain(("metal_plate", "leather", "mesh", "screw", "washer"), (1.0, 0.0), (0.94, 1.0, 1.07), (0.55, 0.62, 0.52)),
}


def _lighting(rng, s, dom: Domain) -> Array:
    yy, xx = _grid(s)
    lx, ly = dom.light_dir
    norm = math.hypot(lx, ly)
    ramp = -((xx - s / 2) * lx + (yy - s / 2) * ly) / (norm * s)  # +0.5 near the light
    vign = 1 - 0.12 * ((xx - s / 2) ** 2 + (yy - s / 2) ** 2) / (s / 2) ** 2
    gain = rng.uniform(0.94, 1.06)
    return (gain * (1 + 0.16 * ramp) * vign)[..., None] * _rgb(dom.tint)


# --------------------------------------------------------------------------- defects
def _draw(s: int, draw_fn: Callable[[ImageDraw.ImageDraw, float], None], ss: int = 4) -> Array:
    """Rasterise with PIL at ``ss`` x supersampling; returns an anti-aliased alpha in [0, 1]."""
    canvas = Image.new("L", (s * ss, s * ss), 0)
    draw_fn(ImageDraw.Draw(canvas), ss)
    return np.asarray(canvas.reduce(ss), dtype=np.float32) / 255.0


def _pick_point(rng, region: Array, margin: float) -> tuple[float, float]:
    s = region.shape[0]
    m = int(margin * s)
    inner = np.zeros_like(region, dtype=bool)
    inner[m : s - m, m : s - m] = region[m : s - m, m : s - m] > 0.5
    ys, xs = np.nonzero(inner)
    if len(ys) == 0:
        return s / 2, s / 2
    i = rng.integers(len(ys))
    return float(xs[i]), float(ys[i])


def _walk(rng, x, y, length, step, turn, direction=None) -> list[tuple[float, float]]:
    th = rng.uniform(0, 2 * np.pi) if direction is None else direction
    pts = [(x, y)]
    for _ in range(max(2, int(length / step))):
        th += rng.normal(0, turn)
        x, y = x + step * math.cos(th), y + step * math.sin(th)
        pts.append((x, y))
    return pts


def _scratch_alpha(rng, s, region):
    k = s / 128
    x, y = _pick_point(rng, region, 0.2)
    pts = _walk(rng, x, y, rng.uniform(0.25, 0.45) * s, 2.0 * k, 0.05)
    width = max(1.2, rng.uniform(1.2, 2.0) * k)

    def fn(d, ss):
        d.line([(px * ss, py * ss) for px, py in pts], fill=255, width=max(1, int(round(width * ss))), joint="curve")

    return _draw(s, fn)


def _crack_alpha(rng, s, region):
    k = s / 128
    x, y = _pick_point(rng, region, 0.2)
    main = _walk(rng, x, y, rng.uniform(0.25, 0.4) * s, 2.5 * k, 0.45)
    branches = []
    for _ in range(rng.integers(1, 3)):
        bx, by = main[rng.integers(1, len(main))]
        branches.append(_walk(rng, bx, by, rng.uniform(0.06, 0.15) * s, 2.0 * k, 0.5))
    w_main, w_branch = max(1.4, rng.uniform(1.4, 2.2) * k), max(1.1, 1.0 * k)

    def fn(d, ss):
        d.line([(px * ss, py * ss) for px, py in main], fill=255, width=max(1, int(round(w_main * ss))), joint="curve")
        for b in branches:
            d.line([(px * ss, py * ss) for px, py in b], fill=255, width=max(1, int(round(w_branch * ss))), joint="curve")

    return _draw(s, fn)


def _blob(rng, s, region, r_range) -> Array:
    yy, xx = _grid(s)
    x, y = _pick_point(rng, region, 0.15)
    r0 = rng.uniform(*r_range) * s
    rho, th = np.hypot(xx - x, yy - y), np.arctan2(yy - y, xx - x)
    wobble = sum(rng.uniform(0, 0.12) * np.sin(n * th + rng.uniform(0, 2 * np.pi)) for n in range(2, 6))
    return _cover(rho - r0 * (1 + wobble))


def _stain_alpha(rng, s, region):
    cov = _blob(rng, s, region, (0.08, 0.14))
    inner = 0.8 + 0.2 * _noise(rng, s, 2.5 * s / 128)
    return cov * np.clip(rng.uniform(0.55, 0.75) * inner, 0.3, 0.95)


def _spot_alpha(rng, s, region):
    return _blob(rng, s, region, (0.035, 0.06)) * rng.uniform(0.8, 0.95)


def _hole_alpha(rng, s, region):
    return _blob(rng, s, region, (0.04, 0.075))


def _missing_alpha(rng, s, obj_cov):
    """A bite out of the object's rim (objects) or a chip of the surface (textures)."""
    yy, xx = _grid(s)
    if obj_cov is None:
        x, y = _pick_point(rng, np.ones((s, s), np.float32), 0.2)
        r = rng.uniform(0.06, 0.1) * s
        sd = np.maximum(np.abs(xx - x), np.abs(yy - y)) * 0.6 + np.hypot(xx - x, yy - y) * 0.4
        return _cover(sd - r)
    rim = (obj_cov > 0.3) & (obj_cov < 0.7)
    ys, xs = np.nonzero(rim)
    i = rng.integers(len(ys))
    r = rng.uniform(0.09, 0.14) * s
    return _cover(np.hypot(xx - xs[i], yy - ys[i]) - r) * obj_cov


def _apply_defect(rng, s, defect: str, cat: Category, dom: Domain, img: Array, obj) -> tuple[Array, Array]:
    """The defect's alpha map and target appearance (both before clipping to the mask)."""
    obj_cov, bg = obj if obj is not None else (None, None)
    region = obj_cov if obj_cov is not None else np.ones((s, s), np.float32)
    if obj_cov is not None:  # keep paint-on defects off the object's anti-aliased rim
        region = ndimage.binary_erosion(obj_cov > 0.5, iterations=max(1, s // 40)).astype(np.float32)
    if defect == "scratch":
        alpha = _scratch_alpha(rng, s, region) * region
        target = img + (1 - img) * 0.6 if cat.scratch_light else img * 0.45
    elif defect == "crack":
        alpha = _crack_alpha(rng, s, region) * region
        target = img * 0.28
    elif defect == "stain":
        alpha = _stain_alpha(rng, s, region) * region
        target = img * _rgb(dom.stain)
    elif defect == "color_spot":
        alpha = _spot_alpha(rng, s, region) * region
        target = np.broadcast_to(_jitter(rng, cat.spot_color, 0.05), img.shape) * (0.85 + 0.15 * img.mean(-1, keepdims=True))
    elif defect == "hole":
        alpha = _hole_alpha(rng, s, region) * region
        yy, _ = _grid(s)
        target = np.broadcast_to(_rgb((0.07, 0.065, 0.06)), img.shape) * (1 + 0.4 * (yy / s))[..., None]
    elif defect == "missing_piece":
        alpha = _missing_alpha(rng, s, obj_cov)
        if bg is not None:
            target = bg
        else:  # a chipped tile shows the darker body under the glaze
            target = img * _rgb((0.62, 0.55, 0.50))
    else:  # pragma: no cover - CATEGORIES lists only the defects above
        raise ValueError(f"unknown defect {defect!r}")
    return alpha.astype(np.float32), np.asarray(target, dtype=np.float32)


# --------------------------------------------------------------------------- rendering
def _quantize(x: Array) -> Array:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_item(domain: str, category: str, defect: str | None, rng: np.random.Generator, size: int = 128):
    """``(clean, image, mask)``: uint8 ``[S,S,3]`` renderings without and with ``defect``, bool mask.

    ``defect`` None gives ``image == clean`` and an empty mask. The mask holds exactly
    the pixels the defect changed (up to 8-bit rounding of very faint alpha).
    """
    dom, cat = DOMAINS[domain], CATEGORIES[category]
    s = int(size)
    base, obj = cat.render(rng, s)
    light = _lighting(rng, s, dom)
    noise = rng.normal(0.0, 0.012, (s, s, 3)).astype(np.float32)
    clean = _quantize(base * light + noise)
    if defect is None:
        return clean, clean.copy(), np.zeros((s, s), dtype=bool)
    min_area = max(6, int(25 * (s / 128) ** 2))
    for _ in range(20):
        alpha, target = _apply_defect(rng, s, defect, cat, dom, base, obj)
        alpha = np.where(alpha >= 0.25, np.clip(alpha, 0, 1), 0.0).astype(np.float32)
        painted = alpha > 0
        if painted.sum() < min_area:
            continue
        out = base * (1 - alpha[..., None]) + target * alpha[..., None]
        image = _quantize(out * light + noise)  # same light and noise: unpainted pixels keep their bytes
        return clean, image, painted
    raise RuntimeError(f"could not place a {defect} on {domain}/{category}")  # pragma: no cover


def _split_plan(cat: Category, n_test: int) -> list[str | None]:
    n_good = max(1, int(round(n_test / 3))) if n_test > 1 else n_test
    n_bad = max(0, n_test - n_good)
    return [None] * n_good + [cat.defects[i % len(cat.defects)] for i in range(n_bad)]


def _save_png(arr: Array, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG", optimize=False, compress_level=6)


def make_synthetic(
    out_dir: str | Path,
    seed: int = 0,
    size: int = 128,
    n_train: int = 8,
    n_test: int = 12,
    domains: tuple[str, ...] | None = None,
    verbose: bool = False,
) -> dict:
    """Write the two-domain synthetic benchmark under ``out_dir``; returns a summary dict.

    ``n_train`` normal training images and ``n_test`` test images per category (a third
    of them normal, the rest spread over the category's three defect types). Read a
    domain with ``open_dataset("synthetic:OUT/domain_a")`` (or ``mvtec:``). The summary
    holds ``out_dir``, ``seed``, ``size``, per-domain per-category counts and ``text``
    (a printable table); ``verbose`` prints the table.
    """
    names = _domain_names(size, n_train, n_test, domains)
    out = Path(out_dir)
    spec = _Spec(seed, size, n_train, n_test)
    summary: dict = {"out_dir": str(out), "seed": seed, "size": size, "domains": {}}
    for d_idx, dname in enumerate(DOMAINS):
        if dname in names:
            summary["domains"][dname] = _write_domain(spec, d_idx, dname, out / dname)
    (out / "README.txt").write_text(_readme(summary))
    summary["text"] = _summary_text(summary)
    if verbose:
        print(summary["text"])
    return summary


@dataclass(frozen=True)
class _Spec:
    """What every class of one benchmark shares: the seed, the image size and the split sizes."""

    seed: int
    size: int
    n_train: int
    n_test: int


def _domain_names(size: int, n_train: int, n_test: int, domains: tuple[str, ...] | None) -> tuple[str, ...]:
    """The domains to write (default: all); ValueError on a size, split size or domain out of range."""
    if size < 32:
        raise ValueError(f"size must be at least 32 px, got {size}")
    if n_train < 0 or n_test < 1:
        raise ValueError(f"need n_train >= 0 and n_test >= 1, got n_train={n_train}, n_test={n_test}")
    names = tuple(domains or DOMAINS)
    unknown = [d for d in names if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown synthetic domain(s) {unknown}; known: {', '.join(DOMAINS)}")
    return names


def _write_domain(spec: _Spec, d_idx: int, dname: str, droot: Path) -> dict:
    """Every class of domain ``dname`` (the ``d_idx``-th) under ``droot``, then its meta.json;
    returns the per-class counts."""
    dsum: dict = {}
    for c_idx, cname in enumerate(DOMAINS[dname].categories):
        dsum[cname] = _write_class(spec, (d_idx, c_idx), dname, cname, droot / cname)
    _write_domain_meta(droot)
    return dsum


def _write_class(spec: _Spec, key: tuple[int, int], dname: str, cname: str, croot: Path) -> dict:
    """One class under ``croot``: its normal training images, then its test split; returns its counts.
    Image ``i`` of a split draws from ``rng([seed, d_idx, c_idx, split, i])`` (``key`` = (d_idx, c_idx)),
    so each image is the same whatever else is written."""
    cat = CATEGORIES[cname]
    counts: dict = {"train": spec.n_train, "test_good": 0, "defects": {d: 0 for d in cat.defects}, "mask_pixels": 0}
    for i in range(spec.n_train):
        rng = np.random.default_rng([spec.seed, *key, 0, i])
        _, img, _ = render_item(dname, cname, None, rng, spec.size)
        _save_png(img, croot / "train" / "good" / f"{i:03d}.png")
    _write_test(spec, key, dname, cname, croot, counts)
    return counts


def _write_test(spec: _Spec, key: tuple[int, int], dname: str, cname: str, croot: Path, counts: dict) -> None:
    """The test split of one class: ``test/good`` and ``test/DEFECT`` images numbered per folder, and a
    ``ground_truth/DEFECT/NNN_mask.png`` per defect; adds them to ``counts``."""
    per_folder: dict[str, int] = {}
    for i, defect in enumerate(_split_plan(CATEGORIES[cname], spec.n_test)):
        rng = np.random.default_rng([spec.seed, *key, 1, i])
        _, img, mask = render_item(dname, cname, defect, rng, spec.size)
        folder = defect or "good"
        j = per_folder.get(folder, 0)
        per_folder[folder] = j + 1
        _save_png(img, croot / "test" / folder / f"{j:03d}.png")
        if defect is None:
            counts["test_good"] += 1
        else:
            counts["defects"][defect] += 1
            counts["mask_pixels"] += int(mask.sum())
            _save_png((mask.astype(np.uint8) * 255), croot / "ground_truth" / folder / f"{j:03d}_mask.png")


def _write_domain_meta(droot: Path) -> None:
    from .meta import write_meta

    write_meta(f"synthetic:{droot}", droot / "meta.json")


def _summary_text(summary: dict) -> str:
    lines = [f"synthetic benchmark at {summary['out_dir']} (seed {summary['seed']}, {summary['size']} px)"]
    for dname, dsum in summary["domains"].items():
        lines.append(f"  {dname}:")
        for cname, c in dsum.items():
            defects = ", ".join(f"{d} {n}" for d, n in c["defects"].items())
            lines.append(f"    {cname:<12} train {c['train']:>3}  test good {c['test_good']:>3}  defects: {defects}")
    return "\n".join(lines)


def _readme(summary: dict) -> str:
    return (
        "Procedural two-domain anomaly benchmark written by ssvp.data.make_synthetic.\n"
        "Each domain_* folder is in the MVTec-AD layout (read it as synthetic:<folder> or mvtec:<folder>)\n"
        "and holds a meta.json (AnomalyCLIP/AdaCLIP format). Train on one domain, test on the other.\n\n"
        + _summary_text(summary)
        + "\n\nparameters: "
        + json.dumps({"seed": summary["seed"], "size": summary["size"]})
        + "\n"
    )
