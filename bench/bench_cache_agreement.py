"""Agreement of the int8 feature cache with the fp16 one (issue: 8-bit feature cache).

Two measurements, each printed as a table (nothing is asserted; the tests in
``tests/test_features.py`` hold the error bounds):

``--tiny`` (default): the tiny preset (``Config.tiny``) trained on the synthetic two-domain data
(source ``domain_a``, target ``domain_b``) from an fp16 cache and from an int8 cache, same seed,
for each of ``--seeds``; the target metrics after training (``evaluate`` on the target test
split) side by side, in points (x100), with their difference.

``--full``: full-size backbones with random weights in the real formats (CLIP ViT-L/14 @ 518 px,
DINOv3 ViT-L/16 @ 592 px, the paper's taps and grid 37) on a few images: each image's features
from the backbones (float32), and as an fp16 and an int8 cache serve them. Max abs error of the
patch features against float32, and the Spearman correlation between the fp16-fed and the
int8-fed heads (the same randomly initialised heads) of image scores (images x class prompts)
and of anomaly-map pixels.

    nice -n 10 python bench/bench_cache_agreement.py --tiny --seeds 0 1 2
    nice -n 10 python bench/bench_cache_agreement.py --full --images 3 --threads 2
    nice -n 10 python bench/bench_cache_agreement.py --quant-error --images 4
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")
TIRE = REPO / ".." / "shared" / "data" / "mvtec3d_tire_rgb"


def _target_means(report: dict) -> dict[str, float]:
    (per_target,) = report.values()
    return {k: float(v) for k, v in per_target["mean"].items() if k in METRICS}


def run_tiny(args) -> dict:
    from ssvp.config import Config
    from ssvp.data import make_synthetic
    from ssvp.engine import evaluate, fit

    work = Path(tempfile.mkdtemp(prefix="bench_cache_agreement_"))
    try:
        make_synthetic(work / "data", seed=0, size=128, n_train=args.n_train, n_test=args.n_test)
        rows = []
        for seed in args.seeds:
            row = {"seed": seed}
            for dtype in args.dtypes:
                cfg = Config.tiny(source=f"synthetic:{work}/data/domain_a", targets=[f"synthetic:{work}/data/domain_b"],
                                  seed=seed, epochs=args.epochs, device="cpu", progress=False,
                                  feature_cache=str(work / f"cache-{dtype}"), feature_cache_dtype=dtype)
                t = time.perf_counter()
                result = fit(cfg, checkpoint_dir=work / f"ckpt-{dtype}-{seed}")
                row[dtype] = _target_means(evaluate(cfg, str(Path(result.checkpoint_dir) / "best")))
                row[f"{dtype}_s"] = time.perf_counter() - t
            rows.append(row)
            print(json.dumps(row), flush=True)
        from ssvp.data import open_dataset

        target = open_dataset(f"synthetic:{work}/data/domain_b", split="test", image_size=112)
        labels = np.asarray(target.labels)
        per_class = {}
        for rec, y in zip(target.records, labels):
            per_class.setdefault(rec.cls_name, [0, 0])[int(y)] += 1
        pairs = [n * a for n, a in per_class.values()]
        return {"mode": "tiny", "epochs": args.epochs, "rows": rows, "target_images": int(len(labels)),
                "pair_points": 100.0 / min(pairs)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (average ranks for ties) of two flat arrays."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a.ravel()), rankdata(b.ravel())
    return float(np.corrcoef(ra, rb)[0, 1])


def _images(n: int, size: int, dino_size: int):
    """The tire photographs when present (real image statistics), else random images."""
    from ssvp.data import load_image

    files = sorted(p for p in TIRE.rglob("*.png") if "ground_truth" not in p.parts)[:n] if TIRE.is_dir() else []
    if len(files) == n:
        return (torch.stack([load_image(f, size) for f in files]), torch.stack([load_image(f, dino_size) for f in files]),
                f"{n} tire photographs")
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=gen), None, f"{n} random images"


def run_full(args) -> dict:
    from ssvp.config import Config
    from ssvp.engine import build_model
    from ssvp.features import FeatureCache

    cfg = Config.from_dict({"clip_pretrained": "", "dino_weights": "", "device": "cpu"})
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"), lazy=False).eval()
    bb = model.backbones
    images, images_dino, what = _images(args.images, bb.clip_image_size, bb.dino_image_size)
    work = Path(tempfile.mkdtemp(prefix="bench_cache_agreement_full_"))
    try:
        t = time.perf_counter()
        with torch.no_grad():
            fresh = bb(images) if images_dino is None else bb(images, images_dino)
        backbone_s = time.perf_counter() - t
        served = {}
        for dtype in ("float16", "int8"):
            cache = FeatureCache(work, bb, cfg.model, dtype=dtype)
            keys = [f"{i:064x}" for i in range(len(images))]
            cache.put(keys, fresh)  # what the backbones gave (no second forward) ...
            served[dtype] = cache.get_keyed(keys, None)  # ... read back from the files
            served[f"{dtype}_bytes"] = cache.path_for(keys[0]).stat().st_size
        out = {"mode": "full", "images": what, "backbone_s": backbone_s, "bytes_per_image": {
            d: served[f"{d}_bytes"] for d in ("float16", "int8")}}
        for name in ("clip_patch", "dino_patch", "clip_global", "dino_global"):
            ref = getattr(fresh, name)
            out[f"{name}_absmax"] = float(ref.abs().max())
            for dtype in ("float16", "int8"):
                out[f"{name}_maxerr_{dtype}"] = float((getattr(served[dtype], name) - ref).abs().max())
        classes = args.classes
        scores, maps = {}, {}
        served["float32"] = fresh  # the reference: the backbones' own output
        with torch.no_grad():
            for dtype in ("float32", "float16", "int8"):
                s, m = [], []
                for cls in classes:
                    o = model.head(served[dtype], [cls] * len(images), args.map_size)
                    s.append(o.score.float().numpy())
                    m.append(o.anomaly_map.float().numpy())
                scores[dtype], maps[dtype] = np.stack(s), np.stack(m)
        out["score_points"] = int(scores["int8"].size)
        out["map_pixels"] = int(maps["int8"].size)
        out["spearman_image_scores"] = _spearman(scores["float16"], scores["int8"])
        out["spearman_map_pixels"] = _spearman(maps["float16"], maps["int8"])
        for dtype in ("float16", "int8"):  # each against the float32 features (the noise floor of fp16)
            out[f"spearman_image_scores_{dtype}_vs_float32"] = _spearman(scores["float32"], scores[dtype])
            out[f"spearman_map_pixels_{dtype}_vs_float32"] = _spearman(maps["float32"], maps[dtype])
        out["map_range"] = [float(maps["float32"].min()), float(maps["float32"].max())]
        out["max_abs_score_diff"] = float(np.abs(scores["float16"] - scores["int8"]).max())
        out["max_abs_map_diff"] = float(np.abs(maps["float16"] - maps["int8"]).max())
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fp8_rows(x: torch.Tensor) -> torch.Tensor:
    """fp8 e4m3 with a per-token scale (absmax -> 448, the format's largest normal), read back as float32."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / 448.0
    return (x / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale


def run_quant_error(args) -> dict:
    """int8 (per-token absmax) vs fp8 e4m3 (per-token scale) vs fp16: relative RMS and max error of
    the tiny preset's patch features of a few images (the tire photographs when present)."""
    from ssvp.backbones import Backbones
    from ssvp.config import Config
    from ssvp.features import dequantize_rows, quantize_rows

    bb = Backbones(Config.tiny().model)
    images, images_dino, what = _images(args.images, bb.clip_image_size, bb.dino_image_size or bb.clip_image_size)
    with torch.no_grad():
        feats = bb(images) if images_dino is None else bb(images, images_dino)
    out = {"mode": "quant_error", "images": what}
    for name in ("clip_patch", "dino_patch"):
        x = getattr(feats, name).float()
        rows = x.reshape(-1, x.shape[-1]).numpy()
        q, s = quantize_rows(rows)
        got = {"int8": torch.from_numpy(dequantize_rows(q, s)).reshape(x.shape), "fp8_e4m3": _fp8_rows(x),
               "float16": x.half().float()}
        rms = x.pow(2).mean().sqrt()
        for fmt, y in got.items():
            out[f"{name}_{fmt}_rel_rms"] = float((y - x).pow(2).mean().sqrt() / rms)
            out[f"{name}_{fmt}_max_rel_to_token_absmax"] = float(((y - x).abs() / x.abs().amax(-1, keepdim=True)).max())
    return out


def report(res: dict) -> str:
    if res["mode"] in ("full", "quant_error"):
        return json.dumps(res, indent=2)
    ref = "float32" if "float32" in res["rows"][0] else None
    head = "fp32 / fp16 / int8" if ref else "fp16 / int8"
    lines = ["| seed | " + " | ".join(f"{m}: {head} (int8 - fp16)" for m in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    diffs = {m: [] for m in METRICS}
    floor = {m: [] for m in METRICS}
    for row in res["rows"]:
        cells = []
        for m in METRICS:
            a, b = 100 * row["float16"][m], 100 * row["int8"][m]
            diffs[m].append(b - a)
            first = f"{100 * row[ref][m]:.2f} / " if ref else ""
            if ref:
                floor[m].append(a - 100 * row[ref][m])
            cells.append(f"{first}{a:.2f} / {b:.2f} ({b - a:+.2f})")
        lines.append(f"| {row['seed']} | " + " | ".join(cells) + " |")
    lines.append("| max abs int8 - fp16 | " + " | ".join(f"{max(abs(d) for d in diffs[m]):.2f}" for m in METRICS) + " |")
    if ref:
        lines.append("| max abs fp16 - fp32 | " + " | ".join(f"{max(abs(d) for d in floor[m]):.2f}" for m in METRICS) + " |")
    lines.append(f"(points; epochs {res['epochs']}, target test images {res.get('target_images')}, "
                 f"one (normal, anomalous) pair = {res.get('pair_points', float('nan')):.3f} image AUROC points per class)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="tiny preset, fp16 vs int8 training, target metrics (default)")
    mode.add_argument("--full", action="store_true", help="full-size random-weight backbones, feature errors, Spearman")
    mode.add_argument("--quant-error", action="store_true", help="int8 vs fp8 e4m3 vs fp16 error on tiny features")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float16", "int8"], help="--tiny: cache formats (float16 and int8 needed)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=8, help="synthetic images per class (train split)")
    ap.add_argument("--n-test", type=int, default=12, help="synthetic images per class (test split)")
    ap.add_argument("--images", type=int, default=3, help="--full: number of images")
    ap.add_argument("--classes", nargs="+", default=["tire", "bottle", "screw", "carpet"], help="--full: class prompts")
    ap.add_argument("--map-size", type=int, default=128, help="--full: anomaly map side")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run_full(args) if args.full else run_quant_error(args) if args.quant_error else run_tiny(args)
    return emit(report(res), res, args.json)


def emit(text: str, res: dict, json_path: Path | None) -> int:
    """Print the report, write the figures as JSON when asked; the exit status."""
    print(text)
    if json_path:
        json_path.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
