"""``ssvp`` command line: train, eval, predict, make-synthetic.

    ssvp make-synthetic --out data/synthetic
    ssvp train --config configs/tiny.yaml --set gamma=0.3 --out runs/ssvp
    ssvp eval --checkpoint runs/ssvp/checkpoints/best --out runs/ssvp/eval.json
    ssvp predict --checkpoint runs/ssvp/checkpoints/best --input photos/ --class-name tire --out preds/
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load_config

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _config(args: argparse.Namespace) -> Config:
    overrides = _parse_sets(getattr(args, "set", None))
    if getattr(args, "config", None):
        return load_config(args.config, overrides)
    if getattr(args, "checkpoint", None):
        from .engine import config_from_checkpoint

        return config_from_checkpoint(args.checkpoint).override(overrides)
    return load_config(None, overrides)


def _metric_table(report: dict) -> str:
    from .metrics import format_table

    return format_table(report)


def _write_report(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        with out.open("w", newline="") as fh:
            writer = None
            for target, report in results.items():
                rows = [*report["per_class"].items(), ("mean", report["mean"])]
                for cls, metrics in rows:
                    row = {"target": target, "class": cls, **{k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}}
                    if writer is None:
                        writer = csv.DictWriter(fh, fieldnames=list(row), extrasaction="ignore")
                        writer.writeheader()
                    writer.writerow(row)
    else:
        out.write_text(json.dumps(results, indent=2, default=float))


def cmd_make_synthetic(args: argparse.Namespace) -> int:
    from .data import make_synthetic

    summary = make_synthetic(args.out, seed=args.seed)
    print(f"wrote synthetic benchmark to {args.out}")
    if isinstance(summary, dict) and "text" in summary:
        print(summary["text"])
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .engine import evaluate, fit

    cfg = _config(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    result = fit(cfg, checkpoint_dir=out / "checkpoints", resume_from=args.resume)
    (out / "history.json").write_text(json.dumps(result.history, indent=2))
    print(f"best epoch {result.best_epoch}: " + ", ".join(
        f"{k}={v:.4f}" for k, v in result.best_metrics.items() if k.startswith("val_") and isinstance(v, float)
    ))
    print(f"checkpoints: {out / 'checkpoints' / 'best'} (best), {out / 'checkpoints' / 'last'} (last)")
    if not args.no_eval:
        results = evaluate(cfg, out / "checkpoints" / "best")
        for target, report in results.items():
            print(f"\n## {target}\n{_metric_table(report)}")
        _write_report(results, out / "eval.json")
        print(f"\ntarget evaluation written to {out / 'eval.json'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .engine import evaluate

    cfg = _config(args)
    results = evaluate(cfg, args.checkpoint, datasets=args.targets or None)
    for target, report in results.items():
        print(f"\n## {target}\n{_metric_table(report)}")
    if args.out:
        _write_report(results, Path(args.out))
        print(f"\nwritten to {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .engine import predict_paths
    from .viz import save_overlay

    cfg = _config(args)
    src = Path(args.input)
    if src.is_file():
        paths = [src]
    elif src.is_dir():
        paths = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        raise FileNotFoundError(f"--input {src} is neither an image file nor a folder")
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {src}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = predict_paths(cfg, args.checkpoint, paths, args.class_name)
    with (out / "scores.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "score", "overlay"])
        for i, r in enumerate(results):
            rel = Path(r["path"]).relative_to(src) if src.is_dir() else Path(Path(r["path"]).name)
            overlay = out / rel.with_suffix(".overlay.png")
            save_overlay(r["image"], r["map"], overlay, title=f"score {r['score']:.3f}")
            writer.writerow([r["path"], f"{r['score']:.6f}", str(overlay)])
            print(f"{r['score']:.4f}  {r['path']}")
    print(f"scores: {out / 'scores.csv'}; overlays under {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssvp", description="SSVP zero-shot anomaly detection")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-synthetic", help="generate the built-in synthetic benchmark (MVTec-AD layout)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_synthetic)

    p = sub.add_parser("train", help="train the SSVP heads on the source dataset")
    p.add_argument("--config", help="YAML/JSON config (preset: tiny for the tiny backbones)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key (repeatable)")
    p.add_argument("--out", default="runs/ssvp", help="output folder (config, checkpoints, history, eval)")
    p.add_argument("--resume", help="checkpoint directory to continue from")
    p.add_argument("--no-eval", action="store_true", help="skip the target evaluation after training")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the target datasets")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config", help="config file (default: the one stored with the checkpoint)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--targets", nargs="*", help="FORMAT:ROOT datasets (default: data.targets)")
    p.add_argument("--out", help="write results to .json or .csv")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="score images and write anomaly-map overlays")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--input", required=True, help="an image or a folder of images")
    p.add_argument("--class-name", required=True, help="object class word used in the prompts")
    p.add_argument("--out", default="predictions")
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"ssvp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
