"""``ssvp`` command line: train, eval, predict, make-synthetic (examples: ``ssvp --help``)."""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
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


def _check_checkpoint(value: str) -> Path:
    """``--checkpoint`` must exist: a missing folder is named as such, with the closest folder
    beside it (``runs/tiny/checkpoints/bset`` -> ``did you mean runs/tiny/checkpoints/best?``)."""
    from .config import close_match

    path = Path(value)
    if path.exists():
        return path
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: the folder does not exist (nor does {parent})")
    close = close_match(path.name, [p.name for p in parent.iterdir() if p.is_dir()])
    hint = f"; did you mean {parent / close}?" if close else ""
    raise FileNotFoundError(f"--checkpoint {path}: the folder does not exist{hint}")


def _config(args: argparse.Namespace) -> Config:
    """The config of the command line, its paths resolved by ``ssvp.paths`` (``data/...`` under
    SSVP_DATA_ROOT, the feature cache from SSVP_FEATURE_CACHE, relative ones against the launch folder)."""
    from .paths import resolve_config_paths

    if getattr(args, "checkpoint", None):
        _check_checkpoint(args.checkpoint)
    overrides = _parse_sets(getattr(args, "set", None))
    if getattr(args, "config", None):
        return resolve_config_paths(load_config(args.config, overrides))
    if getattr(args, "checkpoint", None):
        from .engine import config_from_checkpoint

        return resolve_config_paths(config_from_checkpoint(args.checkpoint).override(overrides))
    return resolve_config_paths(load_config(None, overrides))


def _metric_table(report: dict) -> str:
    from .metrics import format_table

    table = format_table(report)
    align = report.get("alignment", {}).get("mean")
    if align:  # Table 4 (Eq. 23-24), raw values as the paper prints them
        table += ("\nalignment (Table 4): TIR-FG {tir_fg:.4f}  SCD-Normal {scd_normal:.4f}  "
                  "SCD-Abnormal {scd_abnormal:.4f}").format(**align)
    return table


def _write_report(results: dict, out: Path) -> None:
    """The report as one atomic write: a failure (disk full, unwritable folder) leaves no
    half-written ``out`` and no temporary file, and is an ``OSError`` naming ``out``."""
    from .features import _atomic_write

    if out.suffix == ".csv":
        buf = io.StringIO()
        writer = None
        for target, report in results.items():
            rows = [*report["per_class"].items(), ("mean", report["mean"])]
            for cls, metrics in rows:
                row = {"target": target, "class": cls, **{k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}}
                if writer is None:
                    writer = csv.DictWriter(buf, fieldnames=list(row), extrasaction="ignore", lineterminator="\n")
                    writer.writeheader()
                writer.writerow(row)
        text = buf.getvalue()
    else:
        text = json.dumps(results, indent=2, default=float)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(out, lambda fh: fh.write(text.encode("utf-8")))
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {out}: {exc.strerror or exc}") from None


def _check_out_file(value: str, flag: str = "--out") -> Path:
    """``value`` as an output file, checked before any work: not a folder, its folder creatable."""
    out = Path(value)
    if out.is_dir():
        raise ValueError(f"{flag} {out} is a folder; name a file (.json, or .csv)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{flag} {out}: cannot create its folder {out.parent}: {exc.strerror or exc}") from None
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"{flag} {out}: its folder {out.parent} is not writable")
    return out


def cmd_make_synthetic(args: argparse.Namespace) -> int:
    from .data import make_synthetic

    summary = make_synthetic(args.out, seed=args.seed)
    print(f"wrote synthetic benchmark to {args.out}")
    if isinstance(summary, dict) and "text" in summary:
        print(summary["text"])
    return 0


class EpochPrinter:
    """``on_epoch`` callback of ``fit``: one console line per epoch with the training losses, the
    validation metrics and the best objective so far (reads the metrics only: no RNG, no state)."""

    VAL = (("image_auroc", "I-AUROC"), ("pixel_auroc", "P-AUROC"), ("pixel_aupro", "P-AUPRO"))

    def __init__(self, epochs: int, stream=None):
        import time

        self.epochs = epochs
        self.stream = stream or sys.stdout
        self.best: tuple[float, int] | None = None
        self.clock = time.monotonic
        self.start = self.clock()

    def __call__(self, epoch: int, metrics: dict, checkpoint: str | None) -> None:
        import math

        now = self.clock()
        parts = [f"epoch {epoch:>{len(str(self.epochs))}}/{self.epochs}"]
        if isinstance(metrics.get("train_loss"), float):
            loss = f"loss {metrics['train_loss']:.4f}"
            terms = [f"{k[len('train_'):]} {v:.4f}" for k, v in metrics.items()
                     if k.startswith("train_") and k not in ("train_loss", "train_total") and isinstance(v, float)]
            parts.append(loss + (f" ({', '.join(terms)})" if terms else ""))
        val = [f"{title} {metrics['val_' + k]:.4f}" for k, title in self.VAL
               if isinstance(metrics.get("val_" + k), float) and math.isfinite(metrics["val_" + k])]
        obj = metrics.get("val_objective")
        if isinstance(obj, float) and math.isfinite(obj):
            val.append(f"objective {obj:.4f}")
            if self.best is None or obj > self.best[0]:
                self.best = (obj, epoch)
        if val:
            parts.append("val " + ", ".join(val))
        if self.best is not None:
            parts.append(f"best {self.best[0]:.4f} @ epoch {self.best[1]}" + (" *" if self.best[1] == epoch else ""))
        parts.append(f"{now - self.start:.1f}s")
        self.start = now
        print(" | ".join(parts), file=self.stream, flush=True)


def _print_config(cfg: Config) -> int:
    import yaml

    print(f"# resolved ssvp config (ssvp {_version()})")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


MLFLOW_HELP = ("record the run in MLflow (also when MLFLOW_TRACKING_URI is set): the sweeps' names, "
               "train/… val/… per epoch, target/<dataset>/<metric>; store MLFLOW_TRACKING_URI, "
               "else sqlite:///./runs/mlflow.db, experiment MLFLOW_EXPERIMENT_NAME, else ssvp-runs")
RECORDER = "tuning.single_run"  # the MLflow recorder of single runs (the platform layer; see _recorder)


def _recorder(args: argparse.Namespace, command: str, cfg: Config, checkpoint: str | None = None):
    """The run's MLflow recorder when asked (``--mlflow`` or ``MLFLOW_TRACKING_URI`` set), else None.

    ``ssvp`` imports neither Ray nor MLflow: the recorder lives in the platform layer
    (``tuning/single_run.py``) and is loaded by name, only then. It takes ``on_epoch`` (as
    ``fit``'s callback), ``trained``, ``evaluated`` and ``end``."""
    import importlib
    import os

    if not (getattr(args, "mlflow", False) or os.environ.get("MLFLOW_TRACKING_URI")):
        return None
    try:
        module = importlib.import_module(RECORDER)
    except ImportError as exc:
        raise ValueError(f"--mlflow: cannot load the MLflow recorder {RECORDER} ({exc}); "
                         "install the platform layer (ray, mlflow) or leave --mlflow out") from None
    rec = module.start_run(command, cfg, checkpoint=checkpoint)
    print(f"MLflow run: {rec.url}", flush=True)
    return rec


def _each(*callbacks):
    """One ``on_epoch`` callback calling each of ``callbacks`` (None skipped)."""
    live = [c for c in callbacks if c is not None]
    return lambda epoch, metrics, checkpoint: [c(epoch, metrics, checkpoint) for c in live] and None


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.print_config:
        return _print_config(cfg)
    rec = _recorder(args, "train", cfg)
    try:
        _train(args, cfg, rec)
    except BaseException:
        if rec is not None:
            rec.end("FAILED")
        raise
    if rec is not None:
        rec.end("FINISHED")
    return 0


def _train(args: argparse.Namespace, cfg: Config, rec) -> None:
    from .engine import evaluate, fit

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    result = fit(cfg, checkpoint_dir=out / "checkpoints", resume_from=args.resume,
                 on_epoch=_each(EpochPrinter(cfg.train.epochs), rec and rec.on_epoch))
    if rec is not None:
        rec.trained(result.history, result.best_epoch, out / "checkpoints" / "best")
    from .features import _atomic_write

    _atomic_write(out / "history.json", lambda fh: fh.write(json.dumps(result.history, indent=2).encode("utf-8")))
    if cfg.train.protocol == "paper":  # §4.1-4.2: all source classes, the last epoch is the model
        print(f"protocol paper: trained on all source classes; the model is the last epoch ({result.best_epoch})")
        print(f"checkpoints: {out / 'checkpoints' / 'last'} (= {out / 'checkpoints' / 'best'})")
    else:
        print(f"protocol select: best epoch {result.best_epoch}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in result.best_metrics.items() if k.startswith("val_") and isinstance(v, float)
        ))
        print(f"checkpoints: {out / 'checkpoints' / 'best'} (best), {out / 'checkpoints' / 'last'} (last)")
    if not args.no_eval:
        results = evaluate(cfg, out / "checkpoints" / "best")
        for target, report in results.items():
            print(f"\n## {target}\n{_metric_table(report)}")
        _write_report(results, out / "eval.json")
        print(f"\ntarget evaluation written to {out / 'eval.json'}")
        if rec is not None:
            rec.evaluated(results)


def cmd_eval(args: argparse.Namespace) -> int:
    from .engine import evaluate

    cfg = _config(args)
    if args.print_config:
        return _print_config(cfg)
    if args.out:
        _check_out_file(args.out)
    rec = _recorder(args, "eval", cfg.override({"targets": list(args.targets)}) if args.targets else cfg,
                    checkpoint=args.checkpoint)
    try:
        results = evaluate(cfg, args.checkpoint, datasets=args.targets or None)
    except BaseException:
        if rec is not None:
            rec.end("FAILED")
        raise
    for target, report in results.items():
        print(f"\n## {target}\n{_metric_table(report)}")
    if args.out:
        _write_report(results, Path(args.out))
        print(f"\nwritten to {args.out}")
    if rec is not None:
        rec.evaluated(results)
        rec.end("FINISHED")
    return 0


def _thresholds(args: argparse.Namespace) -> tuple[float | None, float | None, str]:
    """(image threshold, pixel threshold, where they come from): the flags, else the validation
    F1-max thresholds stored with the checkpoint (``ssvp.thresholds``), else none."""
    stored: dict = {}
    protocol = ""
    try:
        from .engine import load_checkpoint

        state = load_checkpoint(args.checkpoint)
        stored, protocol = dict(state.get("thresholds") or {}), str(state.get("protocol") or "")
    except Exception as exc:  # noqa: BLE001 - the model load reports a bad checkpoint itself
        logging.getLogger("ssvp.cli").debug("no stored thresholds: %s", exc)
    image, pixel = args.threshold, args.pixel_threshold
    if image is not None:
        source = "--threshold"
    elif stored.get("image") is not None:
        image = float(stored["image"])
        source = (f"validation F1-max on the source validation classes "
                  f"({', '.join(stored.get('classes') or []) or '?'}; epoch {stored.get('epoch', '?')})")
    else:
        source = ("none: this checkpoint stores no validation threshold"
                  + (" (train.protocol=paper holds no source classes out)" if protocol == "paper" else "")
                  + "; labels are left empty. Pass --threshold T, or train with --set train.protocol=select")
    if pixel is None:
        pixel = stored.get("pixel") if stored.get("pixel") is not None else image
    return image, (None if pixel is None else float(pixel)), source


def _class_word(text: str) -> str:
    """``--class-name``: the word the prompts are built from; an empty one would prompt about nothing."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (the object's class word, e.g. tire)")
    return text.strip()


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from .data import load_image
    from .engine import predict_paths
    from .metrics import smooth_maps
    from .viz import find_mask, known_good, save_overlay, save_panel

    cfg = _config(args)
    if args.print_config:
        return _print_config(cfg)
    src = Path(args.input)
    if src.is_file():
        paths = [src]
    elif src.is_dir():
        paths = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        raise FileNotFoundError(f"--input {src} is neither an image file nor a folder")
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {src}")
    if args.masks and not Path(args.masks).is_dir():
        raise FileNotFoundError(f"--masks {args.masks} is not a folder")
    threshold, pixel_threshold, source = _thresholds(args)
    print(f"threshold: {'%.4f' % threshold if threshold is not None else 'none'} ({source})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = predict_paths(cfg, args.checkpoint, paths, args.class_name)
    n_anomalous = 0
    with (out / "scores.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "score", "label", "threshold", "width", "height", "mask", "overlay", "panel"])
        for r in results:
            rel = Path(r["path"]).relative_to(src) if src.is_dir() else Path(Path(r["path"]).name)
            photo = load_image(r["path"])  # the photo at its own size: outputs keep its size and aspect
            amap = r["map"]
            if cfg.data.smoothing_sigma > 0:  # as for the pixel metrics and the validation threshold
                amap = np.asarray(smooth_maps(amap[None], cfg.data.smoothing_sigma))[0]
            label = "" if threshold is None else ("anomalous" if r["score"] >= threshold else "normal")
            n_anomalous += label == "anomalous"
            mask = find_mask(r["path"], args.masks, src if src.is_dir() else src.parent)
            truth = mask if mask is not None else (np.zeros(photo.shape[-2:], bool) if known_good(r["path"]) else None)
            overlay = save_overlay(photo, amap, out / rel.with_suffix(".overlay.png"))
            panel = out / rel.with_suffix(".panel.png")
            if not args.no_panel:
                save_panel(photo, amap, panel, score=r["score"], threshold=threshold, pixel_threshold=pixel_threshold,
                           mask=truth, title=f"{r['path']}  (class '{args.class_name}')")
            writer.writerow([r["path"], f"{r['score']:.6f}", label,
                             "" if threshold is None else f"{threshold:.6f}", photo.shape[-1], photo.shape[-2],
                             str(mask or ""), str(overlay), "" if args.no_panel else str(panel)])
            print(f"{r['score']:.4f}  {label or '-':9s}  {r['path']}")
    summary = f"{len(results)} image(s)"
    if threshold is not None:
        summary += f", {n_anomalous} anomalous at threshold {threshold:.4f}"
    print(f"{summary}; scores: {out / 'scores.csv'}; overlays and panels under {out}")
    return 0


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ssvp-platform")
    except Exception:  # noqa: BLE001 - not installed: the source tree's version
        from . import __version__

        return __version__


EPILOG = """examples:
  ssvp make-synthetic --out data/synthetic
  ssvp train --config configs/tiny.yaml --out runs/tiny
  ssvp train --config configs/tiny.yaml --set gamma=0.3 --set vcpg=false --print-config
  ssvp eval --checkpoint runs/tiny/checkpoints/best --out runs/tiny/eval.csv
  ssvp predict --checkpoint runs/tiny/checkpoints/best --input photos/ --class-name tire --out preds/

Run 'ssvp COMMAND --help' for the options of a command."""

SET_HELP = "override one config key, e.g. --set gamma=0.3 or --set train.epochs=5 (repeatable; KEY or SECTION.KEY)"
PRINT_CONFIG_HELP = "print the resolved config (file + checkpoint + --set) as YAML and exit without running"


def _command(sub, name: str, help: str, description: str, examples: str):
    import textwrap

    return sub.add_parser(name, help=help, description=textwrap.fill(description, 88), epilog="examples:\n" + examples,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    """--checkpoint, --config and --set of the commands that run a trained checkpoint."""
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory (holds head.pt and config.json)")
    p.add_argument("--config", help="config file (default: the one stored with the checkpoint)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)


def _add_make_synthetic(sub) -> None:
    """``ssvp make-synthetic``: where to write the built-in benchmark, and its seed."""
    p = _command(sub, "make-synthetic", "generate the built-in synthetic benchmark (MVTec-AD layout)",
                 "Write the built-in synthetic benchmark: two visual domains (domain_a, domain_b) of "
                 "several classes each, with pixel masks, in the MVTec-AD folder layout.",
                 "  ssvp make-synthetic --out data/synthetic\n  ssvp make-synthetic --out /tmp/syn --seed 3")
    p.add_argument("--out", required=True, help="folder to write the benchmark into (created)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the generator (default: 0)")
    p.set_defaults(func=cmd_make_synthetic)


def _add_train(sub) -> None:
    """``ssvp train``: config, overrides, output folder, resume, and what to skip or print."""
    p = _command(sub, "train", "train the SSVP heads on the source dataset",
                 "Train the SSVP heads on data.source (one line per epoch), then evaluate the model on "
                 "data.targets. train.protocol=paper (default, arXiv 2601.09147 §4.1-4.2): every source class "
                 "trains and the last epoch is the model; train.protocol=select: source classes are held out "
                 "(data.val_classes / val_fraction) and the best epoch on them is the model.",
                 "  ssvp train --config configs/tiny.yaml --out runs/tiny\n"
                 "  ssvp train --config configs/paper.yaml --set train.epochs=5 --out runs/paper\n"
                 "  ssvp train --config configs/tiny.yaml --print-config\n"
                 "  ssvp train --config configs/tiny.yaml --resume runs/tiny/checkpoints/last --out runs/tiny")
    p.add_argument("--config", help="YAML/JSON config file (default: the built-in paper config; "
                                    "'preset: tiny' in the file selects the tiny backbones)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--out", default="runs/ssvp", help="output folder for config.yaml, checkpoints/{best,last}, "
                                                      "history.json and eval.json (default: runs/ssvp)")
    p.add_argument("--resume", metavar="CHECKPOINT_DIR", help="checkpoint directory to continue from (e.g. OUT/checkpoints/last)")
    p.add_argument("--no-eval", action="store_true", help="skip the target evaluation after training")
    p.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    p.add_argument("--mlflow", action="store_true", help=MLFLOW_HELP)
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    """``ssvp eval``: the checkpoint, the target datasets and where the results go."""
    p = _command(sub, "eval", "evaluate a checkpoint on the target datasets",
                 "Evaluate a checkpoint on the target datasets: per-class and mean I-AUROC, I-F1max, I-AP, "
                 "P-AUROC, P-AUPRO, P-AP.",
                 "  ssvp eval --checkpoint runs/tiny/checkpoints/best\n"
                 "  ssvp eval --checkpoint runs/tiny/checkpoints/best --targets mvtec:/data/mvtec_ad --out eval.csv")
    _checkpoint_args(p)
    p.add_argument("--targets", nargs="*", metavar="FORMAT:ROOT",
                   help="datasets to evaluate on, e.g. mvtec:/data/mvtec_ad visa:/data/VisA (default: data.targets)")
    p.add_argument("--out", metavar="FILE", help="also write the results to FILE (.json, or .csv: one row per class)")
    p.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    p.add_argument("--mlflow", action="store_true", help=MLFLOW_HELP)
    p.set_defaults(func=cmd_eval)


def _add_predict(sub) -> None:
    """``ssvp predict``: the checkpoint, the images and their class word, thresholds, outputs."""
    p = _command(sub, "predict", "score images and write anomaly-map overlays, panels and labels",
                 "Score images with a checkpoint. Writes OUT/scores.csv (path, score, label, threshold, size, "
                 "files) and, per image, <name>.overlay.png (heatmap over the photo, at the photo's size) and "
                 "<name>.panel.png (image | ground truth where a mask exists | heatmap with colour bar | "
                 "predicted mask). The label threshold is --threshold, else the validation F1-max threshold "
                 "stored with the checkpoint.",
                 "  ssvp predict --checkpoint runs/tiny/checkpoints/best --input photos/ --class-name tire\n"
                 "  ssvp predict --checkpoint CKPT --input mvtec/tire/test --class-name tire --threshold 0.62 --out preds/")
    _checkpoint_args(p)
    p.add_argument("--input", required=True, metavar="PATH", help="an image file or a folder of images (searched recursively)")
    p.add_argument("--class-name", required=True, metavar="WORD", type=_class_word,
                   help="object class word used in the prompts (e.g. tire, bottle)")
    p.add_argument("--out", default="predictions", metavar="DIR", help="output folder for scores.csv, overlays and panels "
                                                        "(default: predictions)")
    p.add_argument("--threshold", type=float, metavar="T",
                   help="image-score threshold: score >= T is labelled anomalous (default: the validation "
                        "threshold stored with the checkpoint)")
    p.add_argument("--pixel-threshold", type=float, metavar="T",
                   help="anomaly-map threshold of the predicted mask (default: the stored validation pixel "
                        "threshold, else the image threshold)")
    p.add_argument("--masks", metavar="DIR",
                   help="ground-truth masks mirroring --input (NAME_mask.png or NAME.png); default: found "
                        "automatically in the MVTec-AD layout (CLASS/ground_truth/DEFECT/NAME_mask.png)")
    p.add_argument("--no-panel", action="store_true", help="write only the overlays, no panels")
    p.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    p.set_defaults(func=cmd_predict)


def build_parser() -> argparse.ArgumentParser:
    """The ``ssvp`` parser: the global flags, then one ``_add_*`` per command, in ``--help``'s order."""
    parser = argparse.ArgumentParser(
        prog="ssvp", description="SSVP zero-shot industrial anomaly detection (frozen CLIP + DINOv3, learned heads)",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and library messages (INFO level)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_make_synthetic(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_predict(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:  # bad input: config, data, checkpoint, flags
        print(f"ssvp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, unwritable output, I/O errors: one line naming the file
        where = f": {exc.filename}" if exc.filename and str(exc.filename) not in str(exc.strerror) else ""
        print(f"ssvp {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = " (checkpoints written so far are complete: --resume OUT/checkpoints/last)" if args.command == "train" else ""
        print(f"ssvp {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        from .engine import NonFiniteLossError

        if not isinstance(exc, NonFiniteLossError):
            raise
        print(f"ssvp {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
