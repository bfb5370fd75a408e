"""Does the selection objective predict target performance? (issue 22, part 3)

N configurations are drawn from a sweep's search space (seeded, uniform over each key's range,
log-uniform where the space says so). Each is trained and scored three ways, with no Ray and no
MLflow (``ssvp.engine`` directly, one process, the frozen-feature cache shared by every fit):

- **k = 1**: the sweep's objective on the base config's held-out source classes (``train.protocol
  = select``; ``val_objective`` = mean of image and pixel AUROC, plus ``val_image_auroc`` and
  ``val_pixel_aupro`` for the two-objective pick), at the best epoch;
- **k = 3**: the same over three disjoint held-out class folds (``tuning.folds``, the fold mean
  per epoch, its best epoch), as ``search.class_folds: 3`` does in a sweep;
- **target**: the configuration refit on every source class with the paper protocol and
  evaluated zero-shot on the target (``target`` = mean of the target's image and pixel AUROC).

It prints and writes (``--out``) Spearman's rank correlation between each objective and the
target metric with a bootstrap interval over configurations, and the regret of each selection
rule (target of the best-by-target configuration minus target of the picked one): k = 1 vs k = 3,
single objective (best ``val_objective``) vs two objectives (knee of the image-AUROC /
pixel-AUPRO front). Synthetic benchmark by default; ``--source`` / ``--target`` name any two
datasets and ``--preset`` a config file (real weights), unchanged::

    nice -n 10 python bench/selection_study.py --n-configs 16 --epochs 1
    python bench/selection_study.py --preset full --source visa:/data/VisA \\
        --target mvtec:/data/mvtec_anomaly_detection --epochs 15 --n-configs 32 --feature-cache /data/ssvp-cache
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="quick", help="sweep YAML whose space is sampled (name in tuning/configs or a path)")
    p.add_argument("--preset", default="tiny", help="tiny | full | a config file (the base config)")
    p.add_argument("--source", default=None, help="FORMAT:ROOT of the source (default: synthetic domain_a)")
    p.add_argument("--target", default=None, help="FORMAT:ROOT of the target (default: synthetic domain_b)")
    p.add_argument("--synthetic-root", default=None, help="where the synthetic benchmark is (generated if missing)")
    p.add_argument("--n-configs", type=int, default=16)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-per-class", type=int, default=4, help="images per class and split (0 = all)")
    p.add_argument("--max-steps", type=int, default=3, help="steps per epoch (0 = a full pass)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--feature-cache", default=None, help="frozen-feature cache folder (default: a temporary one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a base config key")
    p.add_argument("--out", default=None, help="folder for study.json, study.md and study.png")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="score only configurations i, i+N, ... into OUT/rows_I.json (run N shards side by side, "
                        "then once more without --shard: the rows found in OUT are reused)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- configurations
def sample_points(space, n: int, seed: int) -> list[dict]:
    """``n`` points of a :class:`tuning.space.SearchSpace` (seeded; log scales sampled in log space)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        point = {}
        for key, p in space.searched.items():
            if p.kind == "uniform":
                point[key] = float(rng.uniform(p.low, p.high))
            elif p.kind == "loguniform":
                point[key] = float(math.exp(rng.uniform(math.log(p.low), math.log(p.high))))
            elif p.kind in ("int", "logint"):
                point[key] = int(rng.integers(int(p.low), int(p.high) + 1))
            else:
                point[key] = p.values[int(rng.integers(len(p.values)))]
        out.append(point)
    return out


def base_config(args):
    from tuning.settings import build_base_config, read_sweep_file

    _, raw = read_sweep_file(args.space)
    overrides = {"epochs": args.epochs, "max_per_class": args.max_per_class, "max_steps_per_epoch": args.max_steps,
                 "progress": False, "protocol": "select"}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value) if value[:1] in "[{0123456789-tf" and value not in ("tiny",) else value
    base = {"preset": args.preset, "overrides": overrides}
    if args.source and args.target:
        overrides.update(source=args.source, targets=[args.target])
    else:
        root = Path(args.synthetic_root or REPO / "data" / "synthetic").resolve()
        base["synthetic"] = {"root": str(root), "seed": 0}
    return build_base_config(base, base_dir=REPO), raw.get("space") or {}


# --------------------------------------------------------------------------- scoring one configuration
def _history(cfg) -> list[dict]:
    from ssvp import engine

    return [dict(h) for h in engine.fit(cfg).history]


def _at_best(history: list[dict], keys: tuple[str, ...]) -> dict:
    from tuning.folds import best_epoch

    epoch = best_epoch(history) or int(history[-1]["epoch"])
    row = next(h for h in history if int(h["epoch"]) == epoch)
    return {k: float(row.get(k, math.nan)) for k in keys}


KEYS = ("val_objective", "val_image_auroc", "val_pixel_aupro")


def score(cfg, folds: list[list[str]]) -> dict:
    """k = 1 and k = fold-mean source objectives, and the target metric of the paper-protocol refit."""
    from ssvp import engine
    from tuning.folds import aggregate

    k1 = _at_best(_history(cfg), KEYS)
    runs = [_history(cfg.override({"val_classes": f})) for f in folds]
    mean_hist = [aggregate([r[e] for r in runs], [f"fold{i}" for i in range(len(runs))],
                           {k: "max" for k in KEYS}) for e in range(min(map(len, runs)))]
    kf = _at_best(mean_hist, KEYS)
    with tempfile.TemporaryDirectory(prefix="ssvp-study-") as work:
        paper = cfg.override({"protocol": "paper"})
        engine.fit(paper, checkpoint_dir=work)
        report = engine.evaluate(paper, str(Path(work) / "last"))
    mean = next(iter(report.values()))["mean"]
    target = {f"target_{k}": float(mean.get(k, math.nan)) for k in ("image_auroc", "pixel_auroc", "pixel_aupro")}
    target["target"] = float((target["target_image_auroc"] + target["target_pixel_auroc"]) / 2)
    return {**{f"k1_{k}": v for k, v in k1.items()}, **{f"kf_{k}": v for k, v in kf.items()}, **target}


# --------------------------------------------------------------------------- statistics
def ranks(values) -> "np.ndarray":
    """Average ranks (ties share their mean rank)."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    order = values.argsort(kind="mergesort")
    r = np.empty(len(values))
    r[order] = np.arange(len(values), dtype=float)
    for v in np.unique(values):
        tie = values == v
        r[tie] = r[tie].mean()
    return r


def spearman(x, y) -> float:
    import numpy as np

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def bootstrap_interval(x, y, reps: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of Spearman's rho over configurations drawn with replacement."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x, y = np.asarray(x, float), np.asarray(y, float)
    rhos = [spearman(x[i], y[i]) for i in (rng.integers(0, len(x), len(x)) for _ in range(reps))]
    rhos = np.asarray([r for r in rhos if math.isfinite(r)])
    if not len(rhos):
        return float("nan"), float("nan")
    a = (1 - level) / 2
    return float(np.quantile(rhos, a)), float(np.quantile(rhos, 1 - a))


def regrets(rows: list[dict]) -> dict[str, dict]:
    """Target regret of each selection rule: single objective vs the two-objective knee, k = 1 vs k = folds."""
    from tuning.pareto import knee

    best_target = max(r["target"] for r in rows)
    out = {}
    for k in ("k1", "kf"):
        rules = {
            f"{k} single (val_objective)": max(range(len(rows)), key=lambda i: (rows[i][f"{k}_val_objective"], -i)),
            f"{k} two objectives (knee)": knee({i: [rows[i][f"{k}_val_image_auroc"], rows[i][f"{k}_val_pixel_aupro"]]
                                                for i in range(len(rows))}, ["max", "max"]),
        }
        for name, i in rules.items():
            if i is None:
                out[name] = {"picked": None, "regret": float("nan")}
            else:
                out[name] = {"picked": int(i), "target": rows[i]["target"], "regret": best_target - rows[i]["target"]}
    return out


def summarize(rows: list[dict], reps: int, seed: int, folds: int) -> dict:
    targets = [r["target"] for r in rows]
    corr = {}
    for name, key in ((f"k=1 val_objective", "k1_val_objective"), (f"k={folds} val_objective", "kf_val_objective"),
                      ("k=1 val_image_auroc", "k1_val_image_auroc"), ("k=1 val_pixel_aupro", "k1_val_pixel_aupro")):
        xs = [r[key] for r in rows]
        lo, hi = bootstrap_interval(xs, targets, reps, seed)
        corr[name] = {"spearman": spearman(xs, targets), "ci95": [lo, hi]}
    return {"spearman": corr, "regret": regrets(rows)}


# --------------------------------------------------------------------------- report
def markdown(result: dict, folds: int) -> str:
    lines = ["| objective (source, held-out classes) | Spearman rho vs target | 95% bootstrap interval |", "|---|---|---|"]
    for name, c in result["spearman"].items():
        lines.append(f"| {name} | {c['spearman']:+.3f} | [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] |")
    lines += ["", "| selection rule | picked config | its target | regret |", "|---|---|---|---|"]
    for name, r in result["regret"].items():
        name = name.replace("kf", f"k={folds}").replace("k1", "k=1")
        picked = "-" if r["picked"] is None else f"c{r['picked']:02d}"
        lines.append(f"| {name} | {picked} | {r.get('target', float('nan')):.4f} | {r['regret']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], folds: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, key, name in ((axes[0], "k1_val_objective", "k=1"), (axes[1], "kf_val_objective", f"k={folds}")):
        ax.scatter([r[key] for r in rows], [r["target"] for r in rows], s=18)
        for i, r in enumerate(rows):
            ax.annotate(f"c{i:02d}", (r[key], r["target"]), fontsize=6)
        ax.set_xlabel(f"source held-out objective ({name})")
    axes[0].set_ylabel("target (mean image/pixel AUROC)")
    fig.suptitle("Does the selection objective predict the target?")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def score_all(args, cfg, points: list[dict], folds: list[list[str]]) -> tuple[list[dict], float]:
    """Every configuration's row (this shard's only, with ``--shard``); rows already in OUT are reused."""
    out = Path(args.out) if args.out else None
    done = {}
    if out is not None:
        for f in out.glob("rows_*.json"):
            done.update({r["config"]: r for r in json.loads(f.read_text())})
    shard, count = (int(x) for x in args.shard.split("/")) if args.shard else (0, 1)
    rows, started = [], time.time()
    for i, point in enumerate(points):
        name = f"c{i:02d}"
        if name in done and not args.shard:
            rows.append(done[name])
            continue
        if i % count != shard:
            continue
        row = {"config": name, **point, **score(cfg.override(point), folds)}
        rows.append(row)
        print(f"[study] {name}  k=1 {row['k1_val_objective']:.4f}  k={args.folds} {row['kf_val_objective']:.4f}  "
              f"target {row['target']:.4f}  ({time.time() - started:.0f} s)", flush=True)
        if args.shard and out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"rows_{shard}.json").write_text(json.dumps(rows, indent=2, default=float))
    return rows, started


def main(argv=None) -> int:
    args = parse_args(argv)
    from ssvp.data import open_dataset
    from tuning.folds import assign_folds
    from tuning.space import parse_space

    cfg, raw_space = base_config(args)
    cache = args.feature_cache or tempfile.mkdtemp(prefix="ssvp-study-cache-")
    cfg = cfg.override({"feature_cache": str(Path(cache).resolve())})
    space = parse_space(raw_space, cfg)
    classes = open_dataset(cfg.data.source, split="test", classes=cfg.data.source_classes or None).classes
    folds = assign_folds(classes, args.folds, args.seed)
    points = sample_points(space, args.n_configs, args.seed)
    print(f"[study] {args.n_configs} configs x (1 + {args.folds} folds + refit) fits, {args.epochs} epoch(s); "
          f"source {cfg.data.source} ({len(classes)} classes), target {cfg.data.targets[0]}", flush=True)
    rows, started = score_all(args, cfg, points, folds)
    if args.shard:
        return 0
    result = {"args": vars(args), "folds": folds, "rows": rows,
              **summarize(rows, args.bootstrap, args.seed, args.folds), "seconds": time.time() - started}
    table = markdown(result, args.folds)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "study.json").write_text(json.dumps(result, indent=2, default=float))
        (out / "study.md").write_text(table)
        plot(rows, args.folds, out / "study.png")
        print(f"[study] wrote {out}/study.json, study.md, study.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
