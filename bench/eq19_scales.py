"""Eq. 19's two terms on a trained tiny model: their spread, and image AUROC against gamma.

For each backbone setting x seed x reading of Eq. 19 (``--variant``), trains the tiny preset
(``configs/tiny.yaml``: synthetic domain_a -> domain_b, paper protocol, 4 epochs), then scores the
target images and prints std(S_global) / std(S_local term) (the terms Eq. 19 mixes) and the image
AUROC of S_final. ``--gammas`` retrains at each gamma (the sweep's view of the gamma axis); ``--mix`` re-mixes the
trained model's two terms at each gamma (evaluation only: where gamma puts the balance).

    python bench/eq19_scales.py --data data/synthetic --variant before --variant prob --seeds 0 1 2
    python bench/eq19_scales.py --data data/synthetic --variant before --variant prob --gammas 0 0.25 0.5 0.75 1

``before`` is main's former default (s_global=inner, train.grad_clip=1); ``prob`` / ``logit`` /
``cosine`` are the readings of ``model.s_global`` with the current defaults otherwise.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from ssvp.config import load_config
from ssvp.data import open_dataset
from ssvp.engine import FeatureSource, _loader, build_model, fit, image_size_of, load_head, with_backbone_sizes
from ssvp.metrics import auroc
from ssvp.vtam import local_term

VARIANTS = {
    "before": {"s_global": "inner", "grad_clip": 1.0},
    "prob": {"s_global": "prob"},
    "logit": {"s_global": "logit"},
    "cosine": {"s_global": "cosine"},
}


@torch.no_grad()
def target_terms(cfg, ckpt: Path) -> dict[str, np.ndarray]:
    """S_global, the S_local term of Eq. 19, S_final and labels of every target image."""
    device = torch.device("cpu")
    model = build_model(cfg, device)
    load_head(model, ckpt)
    model.head.eval()
    ds = with_backbone_sizes(open_dataset(cfg.data.targets[0], split="test", image_size=image_size_of(cfg)), model)
    features = FeatureSource(cfg, model, device)
    rows: dict[str, list] = {"s_global": [], "s_local": [], "s_final": [], "label": [], "cls": []}
    for batch in _loader(features.dataset(ds), 16, False, cfg, 0):
        out = model.head(features.batch(batch), list(batch["cls_name"]), batch["mask"].shape[-1])
        rows["s_global"] += out.aux["s_global"].tolist()
        rows["s_local"] += local_term(out.aux["s_local"], cfg.model.s_global, cfg.model.tau).tolist()
        rows["s_final"] += out.score_logit.tolist()
        rows["label"] += batch["label"].tolist()
        rows["cls"] += list(batch["cls_name"])
    return {k: np.asarray(v, dtype=None if k == "cls" else np.float64) for k, v in rows.items()}


def class_mean_auroc(t: dict[str, np.ndarray]) -> float:
    """Image AUROC per target class, averaged over the classes (as ``ssvp eval`` reports it)."""
    return float(np.mean([auroc(t["label"][t["cls"] == c], t["s_final"][t["cls"] == c]) for c in np.unique(t["cls"])]))


def run(args, variant: str, dino: str, seed: int, gamma: float, tmp: Path) -> dict[str, float]:
    overrides = {
        **VARIANTS[variant], "dino_model": dino, "gamma": gamma, "train.seed": seed, "train.device": "cpu",
        "data.source": f"synthetic:{args.data}/domain_a", "data.targets": [f"synthetic:{args.data}/domain_b"],
        "train.feature_cache": str(args.cache / dino),
    }
    cfg = load_config(args.config, overrides)
    ckpt = tmp / f"{variant}-{dino}-{seed}-{gamma}"
    fit(cfg, checkpoint_dir=ckpt)
    t = target_terms(cfg, ckpt / "last")
    i_auroc = class_mean_auroc(t)
    curve = {g: 100 * class_mean_auroc({**t, "s_final": (1 - g) * t["s_global"] + g * t["s_local"]}) for g in args.mix}
    ratio = float(np.std(t["s_global"]) / max(np.std(t["s_local"]), 1e-12))
    row = {"ratio": ratio, "auroc": 100 * i_auroc, "std_g": float(np.std(t["s_global"])), "std_l": float(np.std(t["s_local"]))}
    print(f"{variant:7s} {dino:12s} seed {seed} gamma {gamma:.2f}: std(S_global) {row['std_g']:.4f} "
          f"std(S_local) {row['std_l']:.4f} ratio {ratio:.2f} image AUROC {row['auroc']:.1f}; re-mixed at gamma "
          + " / ".join(f"{g:g}: {a:.1f}" for g, a in curve.items()), flush=True)
    row.update({f"mix{g:g}": a for g, a in curve.items()})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder of `ssvp make-synthetic`")
    ap.add_argument("--cache", type=Path, default=Path("runs/bench_eq19_features"))
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS), required=True)
    ap.add_argument("--dino", nargs="+", default=["dinov3_tiny", "dinov2_tiny"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--gammas", nargs="+", type=float, default=[0.5], help="train at each gamma")
    ap.add_argument("--mix", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                    help="re-mix the trained model's two terms at each gamma (evaluation only)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for dino in args.dino:
            for gamma in args.gammas:
                rows: dict[str, list] = {v: [] for v in args.variant}
                for seed in args.seeds:  # both readings on a seed before the next seed
                    for variant in args.variant:
                        rows[variant].append(run(args, variant, dino, seed, gamma, Path(tmp)))
                for variant, got in rows.items():
                    summarise(variant, dino, gamma, got, args.mix)


def summarise(variant: str, dino: str, gamma: float, rows: list[dict], mix: list[float]) -> None:
    def fmt(key: str) -> str:
        return f"{statistics.fmean(r[key] for r in rows):.2f} ± {statistics.pstdev(r[key] for r in rows):.2f}"

    print(f"== {variant} {dino} gamma {gamma:.2f} ({len(rows)} seeds): ratio {fmt('ratio')}, image AUROC "
          f"{fmt('auroc')}; re-mixed " + ", ".join(f"{g:g}: {fmt(f'mix{g:g}')}" for g in mix), flush=True)

if __name__ == "__main__":
    main()
