"""Aggregate an ablation grid's trials into the paper's tables, paired comparisons and plots.

Input: the grid (``ablations.spec.Grid``) and its trial records, one dict per
variant-seed (what ``ablations/grid.py`` writes to ``records.jsonl``)::

    {"trial_id": "full__seed0", "variant": "full", "seed": 0,
     "status": "ok" | "failed", "error": "...",
     "metrics": {"mvtec": {"mean": {"image_auroc": 0.91, ...}, "bottle": {...}, ...}}}

Metric values are fractions in [0, 1] (``ssvp.metrics``); tables show them in %.

Output (``write_report``): ``results.md`` and ``results.csv`` (rows variants, columns
I-AUROC, I-F1max, I-AP, P-AUROC, P-AUPRO, P-AP as mean ± std over seeds, per target
and, on request, per class), ``paired.csv`` (each variant minus the reference, paired
by seed: mean difference with a 95 % t-interval; "n/a" below two paired seeds),
``bars_<target>.png`` and, for sensitivity grids, ``sensitivity_<param>_<target>.png``.

Run it on its own to rebuild the report from a finished or partial grid::

    python ablations/aggregate.py --grid ablations/configs/quick.yaml --results runs/ablations/quick
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

if __package__ in (None, ""):
    # Run as a script (`python ablations/grid.py`, also what `ray job submit -- ...` runs): Python put
    # ablations/ first on sys.path; its modules must be imported as ablations.*, from the repo root.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import numpy as np

from ablations.spec import Grid, Variant, load_grid

__all__ = [
    "METRICS",
    "mean_std",
    "PairedDiff",
    "paired_diff",
    "SeedCounts",
    "Row",
    "PairRow",
    "latest_records",
    "class_table",
    "seed_counts",
    "summarize",
    "paired_rows",
    "render_markdown",
    "write_report",
    "read_records",
    "plot_bars",
    "plot_sensitivity",
]

# (key in ssvp.metrics, column title in the paper's tables)
METRICS: list[tuple[str, str]] = [
    ("image_auroc", "I-AUROC"),
    ("image_f1max", "I-F1max"),
    ("image_ap", "I-AP"),
    ("pixel_auroc", "P-AUROC"),
    ("pixel_aupro", "P-AUPRO"),
    ("pixel_ap", "P-AP"),
]
MEAN = "mean"  # the key of the class-mean entry in a target's metrics


# ----- statistics -----
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) of the finite values; std is nan below 2."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


@dataclass(frozen=True)
class PairedDiff:
    n: int  # seeds where both runs succeeded
    mean: float  # mean of (variant - reference)
    lo: float  # lower end of the t-interval (nan when n < 2)
    hi: float

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.n >= 2 and math.isfinite(self.lo) and (self.lo > 0 or self.hi < 0)


def paired_diff(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> PairedDiff:
    """Paired difference x - y over seeds: mean and the two-sided t confidence interval.

    d_i = x_i - y_i;  mean(d) +/- t_{(1+c)/2, n-1} * sd(d, ddof=1) / sqrt(n).
    Pairs where either value is missing or not finite are dropped.
    """
    from scipy import stats

    if len(x) != len(y):
        raise ValueError(f"paired_diff needs equal lengths; got {len(x)} and {len(y)}")
    d = np.asarray(
        [a - b for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)],
        dtype=float,
    )
    n = int(d.size)
    if n == 0:
        return PairedDiff(0, math.nan, math.nan, math.nan)
    m = float(d.mean())
    if n < 2:
        return PairedDiff(n, m, math.nan, math.nan)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    return PairedDiff(n, m, m - half, m + half)


# ----- records -----
def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records from a ``records.jsonl`` file (missing file: none); a bad line names the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not a JSON record ({exc})") from None
    return out


def latest_records(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], Mapping[str, Any]]:
    """The last record of each (variant, seed): a resumed grid's rerun replaces its failure."""
    out: dict[tuple[str, int], Mapping[str, Any]] = {}
    for r in records:
        out[(str(r["variant"]), int(r["seed"]))] = r
    return out


@dataclass(frozen=True)
class SeedCounts:
    ok: int
    failed: int
    missing: int

    @property
    def total(self) -> int:
        return self.ok + self.failed + self.missing

    def text(self) -> str:
        """``3/3 seeds`` or ``2/3 seeds, 1 failed``."""
        s = f"{self.ok}/{self.total} seeds"
        if self.failed:
            s += f", {self.failed} failed"
        if self.missing:
            s += f", {self.missing} missing"
        return s


def seed_counts(latest: Mapping[tuple[str, int], Mapping[str, Any]], variant: str, seeds: Sequence[int]) -> SeedCounts:
    ok = failed = missing = 0
    for s in seeds:
        r = latest.get((variant, s))
        if r is None:
            missing += 1
        elif r.get("status") == "ok":
            ok += 1
        else:
            failed += 1
    return SeedCounts(ok, failed, missing)


def class_table(table: Mapping[str, Any]) -> dict[str, Mapping[str, float]]:
    """``{"mean": {...}, cls: {...}}`` from either that flat form or ``ssvp.engine.evaluate``'s
    ``{"per_class": {cls: {...}}, "mean": {...}}``."""
    if not isinstance(table, Mapping):
        return {}
    out = {k: v for k, v in table.items() if k != "per_class" and isinstance(v, Mapping)}
    per_class = table.get("per_class")
    if isinstance(per_class, Mapping):
        out.update({k: v for k, v in per_class.items() if isinstance(v, Mapping)})
    return out


def _value(r: Mapping[str, Any] | None, target: str, cls: str, metric: str) -> float:
    if r is None or r.get("status") != "ok":
        return math.nan
    try:
        v = class_table(r["metrics"][target])[cls][metric]
    except (KeyError, TypeError):
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _targets_and_classes(latest: Mapping[tuple[str, int], Mapping[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in latest.values():
        if r.get("status") != "ok":
            continue
        for target, table in (r.get("metrics") or {}).items():
            classes = out.setdefault(target, [])
            for cls in class_table(table):
                if cls != MEAN and cls not in classes:
                    classes.append(cls)
    return {t: sorted(c) for t, c in out.items()}


# ----- tables -----
@dataclass
class Row:
    target: str
    cls: str  # "mean" or a class name
    variant: Variant
    counts: SeedCounts
    mean: dict[str, float] = field(default_factory=dict)  # in %
    std: dict[str, float] = field(default_factory=dict)  # in %
    n: dict[str, int] = field(default_factory=dict)  # seeds with a finite value


@dataclass
class PairRow:
    target: str
    cls: str
    variant: Variant
    reference: str
    diffs: dict[str, PairedDiff]  # in % points


def summarize(grid: Grid, records: Iterable[Mapping[str, Any]], seeds: Sequence[int],
              per_class: bool = False) -> list[Row]:
    """Mean ± std (in %) of every metric per target (and class), one row per variant."""
    latest = latest_records(records)
    rows = []
    for target, classes in _targets_and_classes(latest).items():
        for cls in [MEAN, *(classes if per_class else [])]:
            for v in grid.variants:
                counts = seed_counts(latest, v.name, seeds)
                row = Row(target, cls, v, counts)
                for key, _ in METRICS:
                    vals = [100.0 * _value(latest.get((v.name, s)), target, cls, key) for s in seeds]
                    finite = [x for x in vals if math.isfinite(x)]
                    row.mean[key], row.std[key] = mean_std(finite)
                    row.n[key] = len(finite)
                rows.append(row)
    return rows


def paired_rows(grid: Grid, records: Iterable[Mapping[str, Any]], seeds: Sequence[int],
                per_class: bool = False, confidence: float = 0.95) -> list[PairRow]:
    """Each variant minus the reference variant, paired by seed, in % points."""
    latest = latest_records(records)
    ref = grid.reference
    out = []
    for target, classes in _targets_and_classes(latest).items():
        for cls in [MEAN, *(classes if per_class else [])]:
            for v in grid.variants:
                if v.name == ref:
                    continue
                diffs = {}
                for key, _ in METRICS:
                    x = [100.0 * _value(latest.get((v.name, s)), target, cls, key) for s in seeds]
                    y = [100.0 * _value(latest.get((ref, s)), target, cls, key) for s in seeds]
                    diffs[key] = paired_diff(x, y, confidence)
                out.append(PairRow(target, cls, v, ref, diffs))
    return out


def _fmt_cell(mean: float, std: float, n: int) -> str:
    if n == 0 or not math.isfinite(mean):
        return "—"
    if n < 2 or not math.isfinite(std):
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {std:.1f}"


def _fmt_diff(d: PairedDiff) -> str:
    if d.n == 0:
        return "—"
    if d.n < 2:
        return f"{d.mean:+.1f} (n/a)"
    return f"{d.mean:+.1f} [{d.lo:+.1f}, {d.hi:+.1f}]" + (" *" if d.significant else "")


def render_markdown(grid: Grid, rows: Sequence[Row], pairs: Sequence[PairRow], seeds: Sequence[int],
                    confidence: float = 0.95) -> str:
    heads = [title for _, title in METRICS]
    ref = grid.variant(grid.reference)
    lines = [f"# Ablation grid `{grid.name}`", ""]
    if grid.description:
        lines += [grid.description, ""]
    lines += [
        f"Seeds: {', '.join(str(s) for s in seeds)}. Values in %, mean ± sample std (ddof = 1) over the seeds "
        f"that finished; a single seed shows its value alone. Reference for the paired comparison: **{ref.label}**.",
        "",
    ]
    if grid.caption:
        lines += [f"*{grid.caption}*", ""]
    failed = [(r.variant.label, r.counts.text()) for r in rows if r.cls == MEAN and (r.counts.failed or r.counts.missing)]
    seen = set()
    for label, text in failed:
        if label not in seen:
            seen.add(label)
            lines.append(f"- **{label}: {text}**")
    if seen:
        lines.append("")
    for (target, cls), group in _groups(rows).items():
        title = f"## Target `{target}`" + ("" if cls == MEAN else f", class `{cls}`")
        lines += [title, "", "| Variant | Seeds | " + " | ".join(heads) + " |",
                  "|---|---|" + "---|" * len(heads)]
        for r in group:
            label = r.variant.label + (" (ref)" if r.variant.name == grid.reference else "")
            cells = [_fmt_cell(r.mean[k], r.std[k], r.n[k]) for k, _ in METRICS]
            lines.append(f"| {label} | {r.counts.text()} | " + " | ".join(cells) + " |")
        lines.append("")
        pgroup = [p for p in pairs if p.target == target and p.cls == cls]
        if pgroup:
            lines += [
                f"Paired difference vs {ref.label} over seeds (% points): mean [{int(confidence * 100)} % t-interval]; "
                "`*` marks an interval that excludes 0; n/a with fewer than two paired seeds.",
                "",
                "| Variant | Paired seeds | " + " | ".join(heads) + " |",
                "|---|---|" + "---|" * len(heads),
            ]
            for p in pgroup:
                n = max(d.n for d in p.diffs.values())
                cells = [_fmt_diff(p.diffs[k]) for k, _ in METRICS]
                lines.append(f"| {p.variant.label} | {n} | " + " | ".join(cells) + " |")
            lines.append("")
    if not rows:
        lines += ["No trial has finished yet.", ""]
    return "\n".join(lines)


def _groups(rows: Sequence[Row]) -> dict[tuple[str, str], list[Row]]:
    out: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        out.setdefault((r.target, r.cls), []).append(r)
    return out


def _csv_num(x: float) -> str:
    return "" if not math.isfinite(x) else f"{x:.4f}"


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["target", "class", "variant", "letter", "label", "seeds_ok", "seeds_failed", "seeds_missing",
                    "seeds_total", "status", *[f"{t}_{s}" for _, t in METRICS for s in ("mean", "std")]])
        for r in rows:
            w.writerow([r.target, r.cls, r.variant.name, r.variant.letter, r.variant.label, r.counts.ok,
                        r.counts.failed, r.counts.missing, r.counts.total, r.counts.text(),
                        *[_csv_num(v) for k, _ in METRICS for v in (r.mean[k], r.std[k])]])
    return path


def write_paired_csv(pairs: Sequence[PairRow], path: Path, confidence: float = 0.95) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["target", "class", "variant", "reference", "confidence",
                    *[f"{t}_{s}" for _, t in METRICS for s in ("n", "diff", "lo", "hi")]])
        for p in pairs:
            cells = []
            for k, _ in METRICS:
                d = p.diffs[k]
                cells += [d.n, _csv_num(d.mean), _csv_num(d.lo), _csv_num(d.hi)]
            w.writerow([p.target, p.cls, p.variant.name, p.reference, confidence, *cells])
    return path


# ----- plots -----
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(grid: Grid, rows: Sequence[Row], target: str, path: Path) -> Path:
    """One panel per metric: a bar per variant (mean over seeds) with a std error bar."""
    plt = _plt()
    group = [r for r in rows if r.target == target and r.cls == MEAN]
    names = [r.variant.short for r in group]
    fig, axes = plt.subplots(2, 3, figsize=(max(9.0, 1.1 * len(group) * 3), 6.5), squeeze=False)
    colors = plt.cm.tab10(np.arange(len(group)) % 10)
    for ax, (key, title) in zip(axes.ravel(), METRICS):
        means = np.array([r.mean[key] for r in group], dtype=float)
        stds = np.nan_to_num(np.array([r.std[key] for r in group], dtype=float))
        x = np.arange(len(group))
        ax.bar(x, np.nan_to_num(means), yerr=stds, capsize=3, color=colors)
        for xi, (m, r) in enumerate(zip(means, group)):
            if not math.isfinite(m):
                ax.text(xi, 0, "failed" if r.counts.failed else "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        finite = means[np.isfinite(means)]
        if finite.size:
            lo = max(0.0, float(np.min(finite - stds[np.isfinite(means)])) - 5.0)
            hi = min(100.0, float(np.max(finite + stds[np.isfinite(means)])) + 3.0)
            ax.set_ylim(lo, max(hi, lo + 1.0))
        ax.set_title(title)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30 if max(map(len, names or [""])) > 3 else 0, ha="right" if max(map(len, names or [""])) > 3 else "center", fontsize=8)
        ax.set_ylabel("%")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{grid.name} on {target}: mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sensitivity(grid: Grid, rows: Sequence[Row], param: str, target: str, path: Path) -> Path:
    """Metric vs the swept value (Figures 7-8 of the paper), error bars = std over seeds."""
    plt = _plt()
    pts = sorted(
        ((r.variant.coords[param], r) for r in rows
         if r.target == target and r.cls == MEAN and param in r.variant.coords),
        key=lambda t: t[0],
    )
    xs = np.array([p for p, _ in pts], dtype=float)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = "osD^v<"
    for (key, title), mk in zip(METRICS, markers):
        ys = np.array([r.mean[key] for _, r in pts], dtype=float)
        es = np.nan_to_num(np.array([r.std[key] for _, r in pts], dtype=float))
        ok = np.isfinite(ys)
        if ok.any():
            ax.errorbar(xs[ok], ys[ok], yerr=es[ok], marker=mk, capsize=3, label=title)
    center = [p for p, r in pts if r.variant.name == "default"]
    if center:
        ax.axvline(center[0], color="grey", ls="--", lw=0.8)
    symbol = {"gamma": "γ", "xi": "ξ"}.get(param, param)
    ax.set_xlabel(symbol)
    ax.set_ylabel("%")
    ax.set_title(f"Sensitivity to {symbol} on {target} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----- everything -----
def _safe(name: str) -> str:
    """A file-name form of a target spec: ``mvtec:data/mvtec_ad`` -> ``mvtec_mvtec_ad``."""
    fmt, sep, root = name.partition(":")
    if sep:
        name = f"{fmt}_{Path(root.rstrip('/')).name}" if Path(root.rstrip("/")).name else fmt
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_report(grid: Grid, records: Iterable[Mapping[str, Any]], out_dir: str | Path,
                 seeds: Sequence[int] | None = None, per_class: bool = False,
                 confidence: float = 0.95, plots: bool = True) -> dict[str, Path]:
    """Write results.md / results.csv / paired.csv and the PNG plots; return {name: path}."""
    records = list(records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if seeds is None:
        seeds = sorted({int(r["seed"]) for r in records}) or grid.seed_values()
    rows = summarize(grid, records, seeds, per_class=per_class)
    pairs = paired_rows(grid, records, seeds, per_class=per_class, confidence=confidence)
    written = {
        "results.md": out_dir / "results.md",
        "results.csv": write_csv(rows, out_dir / "results.csv"),
        "paired.csv": write_paired_csv(pairs, out_dir / "paired.csv", confidence),
    }
    written["results.md"].write_text(render_markdown(grid, rows, pairs, seeds, confidence))
    if plots:
        for target in dict.fromkeys(r.target for r in rows):
            name = f"bars_{_safe(target)}.png"
            written[name] = plot_bars(grid, rows, target, out_dir / name)
            for param in grid.swept_params:
                name = f"sensitivity_{_safe(param)}_{_safe(target)}.png"
                written[name] = plot_sensitivity(grid, rows, param, target, out_dir / name)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Rebuild an ablation grid's tables and plots from its records.jsonl")
    p.add_argument("--grid", required=True, help="grid YAML file (ablations/configs/NAME.yaml)")
    p.add_argument("--results", required=True, help="the grid's output folder (holds records.jsonl)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds the grid was run with")
    p.add_argument("--per-class", action="store_true", help="also tabulate every class of every target")
    p.add_argument("--out", default=None, help="where to write (default: --results)")
    args = p.parse_args(argv)
    grid = load_grid(args.grid)
    records = read_records(Path(args.results) / "records.jsonl")
    if not records:
        print(f"no records in {Path(args.results) / 'records.jsonl'}", file=sys.stderr)
        return 2
    seeds = grid.seed_values(args.seeds) if args.seeds else None
    written = write_report(grid, records, args.out or args.results, seeds=seeds, per_class=args.per_class)
    print((Path(args.out or args.results) / "results.md").read_text())
    for name, path in written.items():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
