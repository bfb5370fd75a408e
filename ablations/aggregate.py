"""Aggregate an ablation grid's trials into the paper's tables, paired comparisons and plots.

Input: the grid (``ablations.spec.Grid``) and its trial records, one dict per
variant-seed (what ``ablations/grid.py`` writes to ``records.jsonl``)::

    {"trial_id": "full__seed0", "variant": "full", "seed": 0,
     "status": "ok" | "failed", "error": "...",
     "metrics": {"mvtec:data/mvtec": {"mean": {"image_auroc": 0.91, ...}, "bottle": {...}, ...}}}

Metric values are fractions in [0, 1] (``ssvp.metrics``); tables show them in %. The Markdown and
LaTeX tables show the metric columns chosen by ``--columns`` / the grid's ``columns`` (default: all
six of ``METRICS``); the CSV files and plots keep every metric.

Rows are labelled as in the paper: the variant's letter (Table 3: A-E) and its description;
targets by their dataset's display name ("MVTec-AD", "VisA", "synthetic domain_b").

Output (``write_report``):

* ``results.md``: per target (and, on request, per class) the variants' mean ± sample std over
  seeds, best value per column in bold; then each variant minus the reference, paired by seed,
  with a 95 % t-interval, and the caveats that apply to it (see ``PairedDiff.status``);
* ``results.csv`` / ``paired.csv``: the same numbers, machine-readable (with the per-seed
  differences and the caveat of every paired cell);
* ``results.tex``: the class-mean tables in LaTeX (booktabs, best in bold), rows by short label
  (the letter, else the name) with the descriptions in the caption; scaled to ``\\linewidth``
  only when wider than the text;
* ``points_<dataset>.png``: mean ± std per variant with every seed as a dot (y-axis spans at
  least ``MIN_SPAN`` points, so small gaps are not blown up);
  ``forest_<dataset>.png``: the paired differences to the reference (per-seed dots, mean,
  interval where one is meaningful, 0 marked); for sensitivity grids
  ``sensitivity_<param>_<dataset>.png``.

Significance (``*``) is claimed only when it means something: at least ``MIN_SEEDS_FOR_CI`` = 3
paired seeds, a non-zero spread of the differences, and a t-interval that excludes 0.
With one paired seed there is no spread; with two, the 95 % t-interval uses t = 12.7 and is
not meaningful; identical differences on every seed (zero spread) give no interval; an
interval wider than ``WIDE_HALF_WIDTH`` points either side is flagged as inconclusive.

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
    # Run as a script (`python ablations/aggregate.py`): Python put ablations/ first on sys.path;
    # its modules must be imported as ablations.*, from the repo root.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import numpy as np

from ablations.spec import Grid, Variant, load_grid

__all__ = [
    "METRICS",
    "MIN_SEEDS_FOR_CI",
    "WIDE_HALF_WIDTH",
    "MIN_SPAN",
    "mean_std",
    "PairedDiff",
    "paired_diff",
    "SeedCounts",
    "Row",
    "PairRow",
    "dataset_name",
    "dataset_names",
    "variant_text",
    "latest_records",
    "class_table",
    "seed_counts",
    "summarize",
    "paired_rows",
    "metric_columns",
    "render_markdown",
    "render_latex",
    "write_report",
    "rebuild_report",
    "read_records",
    "plot_points",
    "plot_forest",
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
MIN_SEEDS_FOR_CI = 3  # fewer paired seeds: no interval, no significance claim
WIDE_HALF_WIDTH = 10.0  # % points: a wider half-interval is flagged as inconclusive
MIN_SPAN = 10.0  # % points: the smallest y-range of the point plots

# caveats of a paired cell: status -> (marker in the tables, footnote)
CAVEATS: dict[str, tuple[str, str]] = {
    "single": ("¹", "one paired seed: no spread, no interval; run more seeds to compare"),
    "two": ("²", "two paired seeds: a 95 % t-interval from 2 seeds (t = 12.7) is not meaningful; "
                 f"no significance claimed below {MIN_SEEDS_FOR_CI} seeds"),
    "zero_spread": ("⁰", "the same difference on every seed (zero spread): no interval and no "
                         "significance claim (a seed-independent or deterministic effect)"),
    "wide": ("⚠", f"interval wider than ±{WIDE_HALF_WIDTH:g} points: the seeds disagree too much to "
                  "conclude; run more seeds"),
}


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
    lo: float  # lower end of the t-interval (nan when there is no meaningful interval)
    hi: float
    sd: float = math.nan  # sample std of the per-seed differences (nan when n < 2)
    values: tuple[float, ...] = ()  # the per-seed differences

    @property
    def zero_spread(self) -> bool:
        return self.n >= 2 and math.isfinite(self.sd) and self.sd <= 1e-9 * max(1.0, abs(self.mean))

    @property
    def status(self) -> str:
        """``none`` (no pair), ``single``, ``two``, ``zero_spread``, ``wide`` or ``ok``."""
        if self.n == 0:
            return "none"
        if self.n == 1:
            return "single"
        if self.zero_spread:
            return "zero_spread"
        if self.n < MIN_SEEDS_FOR_CI:
            return "two"
        if (self.hi - self.lo) / 2 > WIDE_HALF_WIDTH:
            return "wide"
        return "ok"

    @property
    def has_interval(self) -> bool:
        """An interval worth showing: >= 3 paired seeds and a non-zero spread."""
        return self.status in ("ok", "wide")

    @property
    def significant(self) -> bool:
        """>= 3 paired seeds, non-zero spread, and the interval excludes zero."""
        return self.has_interval and (self.lo > 0 or self.hi < 0)


def paired_diff(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> PairedDiff:
    """Paired difference x - y over seeds: mean and the two-sided t confidence interval.

    d_i = x_i - y_i;  mean(d) +/- t_{(1+c)/2, n-1} * sd(d, ddof=1) / sqrt(n).
    Pairs where either value is missing or not finite are dropped. The interval is computed
    for every n >= 2 (``lo``/``hi``); ``status`` says when it means something.
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
        return PairedDiff(n, m, math.nan, math.nan, math.nan, tuple(d.tolist()))
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return PairedDiff(n, m, m - half, m + half, sd, tuple(d.tolist()))


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


# ----- names -----
_DATASET_NAMES = {
    "mvtec": "MVTec-AD", "visa": "VisA", "btad": "BTAD", "ksdd2": "KSDD2", "rsdd": "RSDD",
    "dagm": "DAGM", "dtd": "DTD-Synthetic", "mpdd": "MPDD",
}


def dataset_name(spec: str) -> str:
    """Display name of a ``FORMAT:ROOT`` dataset spec: ``mvtec:/data/mvtec_ad`` -> ``MVTec-AD``,
    ``synthetic:/abs/data/synthetic/domain_b`` -> ``synthetic domain_b``, ``meta:/d/mpdd/meta.json``
    -> ``mpdd``; anything else -> the spec itself."""
    fmt, sep, root = str(spec).partition(":")
    if not sep:
        return str(spec)
    fmt = fmt.strip().lower()
    try:  # the format's canonical name (aliases such as mvtec_ad -> mvtec)
        from ssvp.data import parse_spec

        fmt = parse_spec(f"{fmt}:.")[0]
    except Exception:  # noqa: BLE001 - an unknown format keeps its own name
        pass
    path = Path(root.strip().rstrip("/"))
    base = path.name
    if fmt == "meta":
        folder = path.parent.name if path.suffix.lower() == ".json" else base
        return _DATASET_NAMES.get(folder.lower(), folder or spec)
    if fmt == "synthetic":
        return f"synthetic {base}" if base else "synthetic"
    if fmt == "mvtec" and "3d" in base.lower():
        return "MVTec 3D-AD"
    return _DATASET_NAMES.get(fmt, fmt)


def dataset_names(specs: Iterable[str]) -> dict[str, str]:
    """Display names for several specs; two specs with the same name get their folder appended."""
    specs = list(dict.fromkeys(specs))
    plain = {s: dataset_name(s) for s in specs}
    names = dict(plain)
    for s in specs:
        if list(plain.values()).count(plain[s]) > 1:
            folder = Path(str(s).partition(":")[2].rstrip("/")).name
            names[s] = f"{plain[s]} ({folder})" if folder else s
    if len(set(names.values())) < len(names):  # still clashing: the specs themselves
        names = {s: s for s in specs}
    return names


def variant_text(v: Variant) -> str:
    """The row's text: the variant's description (Table 3: ``+ VTAM = full SSVP``), else its name."""
    return v.description or v.name


def _letter_col(variants: Sequence[Variant]) -> bool:
    return any(v.letter for v in variants)


_SWITCHES = ("HSVS", "VCPG", "VTAM")


def _switches(grid: Grid) -> dict[str, tuple[str, str, str]]:
    """Table 3's component columns (HSVS fusion, VCPG, VTAM) per variant, when they vary in the grid."""
    out: dict[str, tuple[str, str, str]] = {}
    try:
        for v in grid.variants:
            m = grid.variant_config(v.name).model
            hsvs = {"none": "✗", "concat": "✓ (Concat)", "atf": "✓ (ATF)"}.get(m.fusion, str(m.fusion))
            out[v.name] = (hsvs, "✓" if m.vcpg else "✗", "✓" if m.vtam else "✗")
    except Exception:  # noqa: BLE001 - a grid whose configs no longer build: no component columns
        return {}
    return out if len(set(out.values())) > 1 else {}


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
    values: dict[str, list[float]] = field(default_factory=dict)  # finite per-seed values, in %


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
                    row.values[key] = finite
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


def _best(group: Sequence[Row], key: str) -> set[int]:
    """Indices of the rows with the best (highest, at display precision) mean; none with < 2 values."""
    vals = [(i, round(r.mean[key], 1)) for i, r in enumerate(group) if math.isfinite(r.mean[key])]
    if len(vals) < 2:
        return set()
    top = max(v for _, v in vals)
    return {i for i, v in vals if v == top}


def _r1(x: float) -> float:
    """Rounded to the shown precision, without a negative zero (-0.04 shows as +0.0, not -0.0)."""
    return round(x, 1) + 0.0


def _fmt_cell(mean: float, std: float, n: int) -> str:
    if n == 0 or not math.isfinite(mean):
        return "—"
    if n < 2 or not math.isfinite(std):
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {std:.1f}"


def _fmt_diff(d: PairedDiff) -> str:
    status = d.status
    if status == "none":
        return "—"
    if status in ("single", "two", "zero_spread"):
        return f"{_r1(d.mean):+.1f} {CAVEATS[status][0]}"
    cell = f"{_r1(d.mean):+.1f} [{_r1(d.lo):+.1f}, {_r1(d.hi):+.1f}]"
    if status == "wide":
        cell += f" {CAVEATS['wide'][0]}"
    return cell + (" *" if d.significant else "")


def _groups(rows: Sequence[Any]) -> dict[tuple[str, str], list[Any]]:
    out: dict[tuple[str, str], list[Any]] = {}
    for r in rows:
        out.setdefault((r.target, r.cls), []).append(r)
    return out


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def metric_columns(names: Iterable[str] | str | None = None) -> list[tuple[str, str]]:
    """The (key, title) pairs of the chosen table columns, in the order given: titles (``I-AUROC``)
    or ``ssvp.metrics`` keys (``image_auroc``), any case, a list or one comma-separated string;
    none = all of ``METRICS``. An unknown name raises ``ValueError`` with the closest one."""
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    names = [str(n).strip() for n in (names or []) if str(n).strip()]
    if not names:
        return list(METRICS)
    lookup = {k.lower(): (k, t) for k, t in METRICS} | {t.lower(): (k, t) for k, t in METRICS}
    out: list[tuple[str, str]] = []
    for name in names:
        col = lookup.get(name.lower())
        if col is None:
            from ssvp.config import did_you_mean

            hint = did_you_mean(name, [t for _, t in METRICS] + [k for k, _ in METRICS], lower=True)
            raise ValueError(f"unknown column {name!r}" + (f"; {hint}" if hint else "")
                             + f"; columns: {', '.join(t for _, t in METRICS)}")
        if col not in out:
            out.append(col)
    return out


@dataclass(frozen=True)
class _Labels:
    """How a grid's rows are labelled: a letter column (Table 3), the component columns (when they
    vary), the reference marked in the main table."""

    reference: str
    lettered: bool
    switches: dict[str, tuple[str, str, str]]

    @classmethod
    def of(cls, grid: Grid) -> "_Labels":
        return cls(grid.reference, _letter_col(grid.variants), _switches(grid))

    def md_head(self, main_table: bool) -> tuple[str, str]:
        cols = (["Row"] if self.lettered else []) + ["Variant"] + (
            list(_SWITCHES) if self.switches and main_table else [])
        return " | ".join(cols), "---|" * len(cols)

    def md_cells(self, v: Variant, main_table: bool) -> str:
        text = _md_escape(variant_text(v)) + (" (ref)" if main_table and v.name == self.reference else "")
        cells = ([v.letter or "—"] if self.lettered else []) + [text]
        if self.switches and main_table:
            cells += list(self.switches.get(v.name, ("",) * 3))
        return " | ".join(cells)


def _md_preamble(grid: Grid, rows: Sequence[Row], seeds: Sequence[int]) -> list[str]:
    """Title, description, how to read the cells, caption and the variants that lack seeds."""
    ref = grid.variant(grid.reference)
    lines = [f"# Ablation grid `{grid.name}`", ""]
    if grid.description:
        lines += [grid.description, ""]
    lines += [
        f"Seeds: {', '.join(str(s) for s in seeds)}. Values in %, mean ± sample std (ddof = 1) over the seeds "
        f"that finished (a single seed shows its value alone); best per column in **bold**. "
        f"Reference for the paired comparison: **{(ref.letter + ' — ') if ref.letter else ''}{variant_text(ref)}**.",
        "",
    ]
    if grid.caption:
        lines += [f"*{grid.caption}*", ""]
    lines += _md_row_changes(grid)
    seen: set[str] = set()
    for r in rows:
        if r.cls == MEAN and (r.counts.failed or r.counts.missing) and r.variant.name not in seen:
            seen.add(r.variant.name)
            lines.append(f"- **{_row_name(r.variant)}: {r.counts.text()}**")
    return lines + ([""] if seen else [])


def _md_row_changes(grid: Grid) -> list[str]:
    """What each row changes from the row above (its config keys), so a build-up like Table 3 shows
    that every row adds exactly the module it names."""
    changes = grid.row_changes()
    if not changes or not all(v.letter for v in grid.variants):  # only a lettered build-up (Table 3)
        return []

    def show(x: Any) -> str:
        return str(x).lower() if isinstance(x, bool) else str(x)

    lines = ["What each row changes from the row above:", ""]
    for v in grid.variants[1:]:
        diff = ", ".join(f"`{k}` {show(a)} → {show(b)}" for k, a, b in changes.get(v.name, [])) or "nothing"
        lines.append(f"- {_md_escape(_row_name(v))}: {diff}")
    return lines + [""]


def _md_values(group: Sequence[Row], labels: _Labels, metrics: Sequence[tuple[str, str]]) -> list[str]:
    """One target's (and class's) table: mean ± std per variant, best per column in bold."""
    hc, hs = labels.md_head(True)
    lines = [f"| {hc} | Seeds | " + " | ".join(t for _, t in metrics) + " |", f"|{hs}---|" + "---|" * len(metrics)]
    best = {k: _best(group, k) for k, _ in metrics}
    for i, r in enumerate(group):
        cells = []
        for k, _ in metrics:
            c = _fmt_cell(r.mean[k], r.std[k], r.n[k])
            cells.append(f"**{c}**" if i in best[k] else c)
        lines.append(f"| {labels.md_cells(r.variant, True)} | {r.counts.text()} | " + " | ".join(cells) + " |")
    lines.append("")
    if any(r.n[k] == 1 for r in group for k, _ in metrics):
        lines += ["Cells without ± come from a single seed: no spread.", ""]
    return lines


def _md_paired(pgroup: Sequence[PairRow], ref: Variant, labels: _Labels, metrics: Sequence[tuple[str, str]],
               confidence: float) -> list[str]:
    """One target's paired differences to the reference, then the footnotes of the caveats used."""
    hc, hs = labels.md_head(False)
    lines = [
        f"Paired difference to {_row_name(ref)} over seeds (% points): mean [{int(round(confidence * 100))} % "
        f"t-interval]; `*` marks an interval that excludes 0 (only with ≥ {MIN_SEEDS_FOR_CI} paired seeds "
        "and a non-zero spread).",
        "",
        f"| {hc} | Paired seeds | " + " | ".join(t for _, t in metrics) + " |",
        f"|{hs}---|" + "---|" * len(metrics),
    ]
    used: list[str] = []
    for p in pgroup:
        n = max(d.n for d in p.diffs.values())
        lines.append(f"| {labels.md_cells(p.variant, False)} | {n} | "
                     + " | ".join(_fmt_diff(p.diffs[k]) for k, _ in metrics) + " |")
        used += [p.diffs[k].status for k, _ in metrics if p.diffs[k].status in CAVEATS]
    lines.append("")
    notes = [f"- {CAVEATS[s][0]} {CAVEATS[s][1]}." for s in CAVEATS if s in used]
    return lines + notes + ([""] if notes else [])


def render_markdown(grid: Grid, rows: Sequence[Row], pairs: Sequence[PairRow], seeds: Sequence[int],
                    confidence: float = 0.95, columns: Iterable[str] | str | None = None) -> str:
    """``results.md``: the preamble, then per target (and class) the values table and the paired
    differences to the reference; ``columns`` picks the metric columns (default: all six)."""
    metrics = metric_columns(columns)
    labels = _Labels.of(grid)
    names = dataset_names(r.target for r in rows)
    lines = _md_preamble(grid, rows, seeds)
    for (target, cls), group in _groups(rows).items():
        lines += [f"## {names[target]}" + ("" if cls == MEAN else f", class `{cls}`"), ""]
        if cls == MEAN:
            lines += [f"Dataset `{target}`; class mean.", ""]
        lines += _md_values(group, labels, metrics)
        pgroup = [p for p in pairs if p.target == target and p.cls == cls]
        if pgroup:
            lines += _md_paired(pgroup, grid.variant(grid.reference), labels, metrics, confidence)
    if not rows:
        lines += ["No trial has finished yet.", ""]
    return "\n".join(lines)


def _row_name(v: Variant) -> str:
    return f"{v.letter} ({variant_text(v)})" if v.letter else variant_text(v)


# ----- LaTeX -----
_TEX_CHARS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "γ": r"$\gamma$", "ξ": r"$\xi$", "β": r"$\beta$", "λ": r"$\lambda$", "τ": r"$\tau$",
    "<": r"$<$", ">": r"$>$", "±": r"$\pm$", "—": "--", "–": "--", "→": r"$\rightarrow$", "✓": r"\checkmark", "✗": r"$\times$",
}


def tex_escape(text: str) -> str:
    """Plain text for LaTeX: specials escaped, ``->`` / ``<`` / ``>`` and Greek letters as math
    (in the default OT1 encoding a bare ``<`` or ``>`` prints as ``¡`` / ``¿``)."""
    parts = str(text).split("->")
    return r"$\rightarrow$".join("".join(_TEX_CHARS.get(c, c) for c in part) for part in parts)


def _tex_cell(mean: float, std: float, n: int, bold: bool) -> str:
    if n == 0 or not math.isfinite(mean):
        return "--"
    body = f"{mean:.1f}" if n < 2 or not math.isfinite(std) else f"{mean:.1f} \\pm {std:.1f}"
    return f"$\\mathbf{{{body}}}$" if bold else f"${body}$"


def _tex_label(v: Variant, reference: str) -> str:
    """A row's short label: the letter (Table 3), else the name; the reference marked."""
    return tex_escape(v.short) + (" (ref)" if v.name == reference else "")


def _tex_legend(variants: Sequence[Variant]) -> str:
    """``A: Bayes-PFL on CLIP (...); B: ...``: the rows' long descriptions, for the caption
    (a description that only repeats the label is left out)."""
    def same(a: str, b: str) -> bool:
        return a.replace(" ", "").lower() == b.replace(" ", "").lower()

    items = [f"{tex_escape(v.short)}: {tex_escape(v.description)}" for v in variants
             if v.description and not same(v.description, v.short)]
    return ("Rows: " + "; ".join(items) + ".") if items else ""


def _tex_caption(grid: Grid, group: Sequence[Row], seeds: Sequence[int], dataset: str,
                 metrics: Sequence[tuple[str, str]]) -> str:
    caption = f"{tex_escape(grid.description or grid.name)} Target: {tex_escape(dataset)}."
    legend = _tex_legend([r.variant for r in group])
    if legend:
        caption += " " + legend
    caption += (f" Values in \\%, mean $\\pm$ std over {len(seeds)} seed{'s' if len(seeds) != 1 else ''}; "
                "best in bold.")
    incomplete = [r for r in group if r.counts.ok < r.counts.total]
    if incomplete:
        caption += " $^\\dagger$Not every seed finished: " + "; ".join(
            f"{tex_escape(r.variant.short)}: {tex_escape(r.counts.text())}" for r in incomplete) + "."
    if any(r.n[k] == 1 for r in group for k, _ in metrics):
        caption += " A value without $\\pm$ comes from a single seed."
    return caption


def _tex_tabular(grid: Grid, group: Sequence[Row], metrics: Sequence[tuple[str, str]]) -> list[str]:
    """The booktabs tabular of one target: short row labels, component columns, chosen metrics."""
    lettered = _letter_col(grid.variants)
    switches = _switches(grid)
    heads = ["Model" if lettered else "Variant"] + (list(_SWITCHES) if switches else []) + [t for _, t in metrics]
    spec = "l" + ("c" * 3 if switches else "") + "c" * len(metrics)
    lines = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule", " & ".join(heads) + " \\\\", "\\midrule"]
    best = {k: _best(group, k) for k, _ in metrics}
    for i, r in enumerate(group):
        text = _tex_label(r.variant, grid.reference)
        if r.counts.ok < r.counts.total:
            text += "$^\\dagger$"
        cells = [text] + ([tex_escape(s) for s in switches.get(r.variant.name, ("",) * 3)] if switches else [])
        cells += [_tex_cell(r.mean[k], r.std[k], r.n[k], i in best[k]) for k, _ in metrics]
        lines.append(" & ".join(cells) + " \\\\")
    return lines + ["\\bottomrule", "\\end{tabular}"]


def render_latex(grid: Grid, rows: Sequence[Row], seeds: Sequence[int],
                 columns: Iterable[str] | str | None = None) -> str:
    """The class-mean table of every target as a LaTeX ``table`` (booktabs; best per column in bold).

    Rows carry short labels (the letter, else the name); their long descriptions go in the
    caption. A table at most as wide as the text is set as it is; a wider one (many columns) is
    scaled down to ``\\linewidth``. ``columns`` picks the metric columns (default: all six).
    Needs ``\\usepackage{booktabs}``, ``\\usepackage{amssymb}`` (``\\checkmark``) and
    ``\\usepackage{graphicx}`` (``\\resizebox``)."""
    metrics = metric_columns(columns)
    names = dataset_names(r.target for r in rows)
    out = [f"% Ablation grid {grid.name}: written by ablations/aggregate.py",
           "% needs \\usepackage{booktabs}, \\usepackage{amssymb} and \\usepackage{graphicx}; a table wider",
           "% than the text (\\linewidth) is scaled down to it", ""]
    for (target, cls), group in _groups(rows).items():
        if cls != MEAN:
            continue
        label = "".join(c if c.isalnum() else "-" for c in f"{grid.name}-{names[target]}").lower().strip("-")
        out += ["\\begin{table}[t]", "\\centering",
                f"\\caption{{{_tex_caption(grid, group, seeds, names[target], metrics)}}}",
                f"\\label{{tab:{label}}}", "\\sbox0{%", *_tex_tabular(grid, group, metrics),
                "}%", "\\ifdim\\wd0>\\linewidth\\resizebox{\\linewidth}{!}{\\usebox0}\\else\\usebox0\\fi",
                "\\end{table}", ""]
    return "\n".join(out)


# ----- CSV -----
def _csv_num(x: float) -> str:
    return "" if not math.isfinite(x) else f"{x:.4f}"


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    names = dataset_names(r.target for r in rows)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "target", "class", "variant", "letter", "description", "label", "seeds_ok",
                    "seeds_failed", "seeds_missing", "seeds_total", "status",
                    *[f"{t}_{s}" for _, t in METRICS for s in ("mean", "std", "n")]])
        for r in rows:
            v = r.variant
            w.writerow([names[r.target], r.target, r.cls, v.name, v.letter, v.description, v.label, r.counts.ok,
                        r.counts.failed, r.counts.missing, r.counts.total, r.counts.text(),
                        *[c for k, _ in METRICS for c in (_csv_num(r.mean[k]), _csv_num(r.std[k]), r.n[k])]])
    return path


def write_paired_csv(pairs: Sequence[PairRow], path: Path, confidence: float = 0.95) -> Path:
    names = dataset_names(p.target for p in pairs)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "target", "class", "variant", "letter", "description", "reference", "confidence",
                    *[f"{t}_{s}" for _, t in METRICS
                      for s in ("n", "diff", "sd", "lo", "hi", "significant", "caveat", "per_seed")]])
        for p in pairs:
            cells: list[Any] = []
            for k, _ in METRICS:
                d = p.diffs[k]
                shown = d.has_interval
                cells += [d.n, _csv_num(d.mean), _csv_num(d.sd), _csv_num(d.lo) if shown else "",
                          _csv_num(d.hi) if shown else "", int(d.significant),
                          CAVEATS[d.status][1] if d.status in CAVEATS else "",
                          " ".join(f"{x:.4f}" for x in d.values)]
            w.writerow([names.get(p.target, p.target), p.target, p.cls, p.variant.name, p.variant.letter,
                        p.variant.description, p.reference, confidence, *cells])
    return path


# ----- plots -----
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tick(v: Variant, width: int = 22) -> str:
    """A short axis label: the letter, else the name (descriptions are in the legend/table)."""
    if v.letter:
        return v.letter
    return v.name if len(v.name) <= width else v.name[: width - 1] + "…"


def _span_limits(values: Sequence[float], min_span: float = MIN_SPAN, clip: tuple[float, float] = (0.0, 100.0)):
    vals = [x for x in values if math.isfinite(x)]
    if not vals:
        return clip
    lo, hi = min(vals), max(vals)
    pad = 0.08 * max(hi - lo, 1e-9)
    lo, hi = lo - pad, hi + pad
    if hi - lo < min_span:
        mid = (hi + lo) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    if lo < clip[0]:
        lo, hi = clip[0], max(hi, clip[0] + min_span)
    if hi > clip[1]:
        lo, hi = min(lo, clip[1] - min_span), clip[1]
    return lo, hi


def _jitter(n: int, width: float = 0.18) -> np.ndarray:
    return np.zeros(n) if n < 2 else np.linspace(-width, width, n)


def plot_points(grid: Grid, rows: Sequence[Row], target: str, path: Path, dataset: str | None = None) -> Path:
    """One panel per metric: mean ± std per variant (black), every seed as a dot; reference mean dashed.

    The y-range covers the data and spans at least ``MIN_SPAN`` points, so that a 0.2-point gap
    does not look like a large effect."""
    plt = _plt()
    group = [r for r in rows if r.target == target and r.cls == MEAN]
    ticks = [_tick(r.variant) for r in group]
    rotate = max(map(len, ticks or [""])) > 3
    fig, axes = plt.subplots(2, 3, figsize=(max(10.0, 0.55 * len(group) * 3 + 4), 7.0), squeeze=False)
    x = np.arange(len(group))
    for ax, (key, title) in zip(axes.ravel(), METRICS):
        everything: list[float] = []
        for xi, r in zip(x, group):
            vals = r.values.get(key, [])
            m, s = r.mean[key], r.std[key]
            is_ref = r.variant.name == grid.reference
            if vals:  # seeds to the right of the mean, so none hides behind it
                ax.scatter(xi + 0.16 + _jitter(len(vals), 0.08), vals, s=22, facecolors="none",
                           edgecolors="tab:red" if is_ref else "tab:blue", linewidths=1.0, zorder=3,
                           label="seed" if xi == 0 else None)
                everything += vals
            if math.isfinite(m):
                ax.errorbar(xi - 0.08, m, yerr=s if math.isfinite(s) else None, fmt="s", color="black",
                            markersize=5, capsize=4, elinewidth=1.2, zorder=4)
                everything += [m - (s if math.isfinite(s) else 0), m + (s if math.isfinite(s) else 0)]
                if is_ref:
                    ax.axhline(m, color="tab:red", ls="--", lw=0.8, zorder=1)
        lo, hi = _span_limits(everything)
        ax.set_ylim(lo, hi)
        for xi, r in zip(x, group):
            if not math.isfinite(r.mean[key]):
                ax.text(xi, lo + 0.05 * (hi - lo), "failed" if r.counts.failed else "n/a", ha="center",
                        va="bottom", fontsize=7, rotation=90, color="grey")
        ax.set_title(title)
        ax.set_xticks(x)
        ax.set_xticklabels(ticks, rotation=30 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
        ax.set_xlim(-0.6, len(group) - 0.4)
        ax.set_ylabel("%")
        ax.grid(axis="y", alpha=0.3)
    name = dataset or dataset_names([target])[target]
    n_seeds = max((r.counts.total for r in group), default=0)
    fig.suptitle(f"{grid.name} on {name}: mean ± std (black), seeds (circles; reference red, dashed line), "
                 f"{n_seeds} seed(s)\ny-axis spans ≥ {MIN_SPAN:g} points and does not start at 0", fontsize=10)
    _legend_of_letters(fig, group)
    fig.tight_layout(rect=(0, 0.06 if any(r.variant.letter for r in group) else 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _legend_of_letters(fig, group: Sequence[Any]) -> None:
    """Under the plot: ``A = CLIP only ...; B = + HSVS with Concat fusion; ...`` for lettered variants."""
    items = [f"{r.variant.letter} = {variant_text(r.variant)}" for r in group if r.variant.letter]
    if not items:
        return
    text, line = [], ""
    for it in items:
        if line and len(line) + len(it) > 150:
            text.append(line)
            line = ""
        line = f"{line};  {it}" if line else it
    text.append(line)
    fig.text(0.01, 0.01, "\n".join(text), fontsize=7.5, va="bottom", ha="left")


def plot_forest(grid: Grid, pairs: Sequence[PairRow], target: str, path: Path, dataset: str | None = None,
                confidence: float = 0.95) -> Path:
    """Forest plot of the paired differences to the reference: one panel per metric, one line per
    variant; per-seed differences as dots, the mean as a square, the t-interval as a bar where
    one is meaningful (>= 3 seeds, non-zero spread), red when it excludes 0; 0 marked."""
    plt = _plt()
    group = [p for p in pairs if p.target == target and p.cls == MEAN]
    ref = grid.variant(grid.reference)
    per_panel = 0.5 + 0.5 * max(1, len(group))
    fig, axes = plt.subplots(2, 3, figsize=(13.0, 2 * per_panel + 2.0), squeeze=False)
    y = np.arange(len(group))[::-1]
    for ax, (key, title) in zip(axes.ravel(), METRICS):
        dots = [v for p in group for v in p.diffs[key].values] + [0.0]
        means = [p.diffs[key].mean for p in group if math.isfinite(p.diffs[key].mean)]
        lo_d, hi_d = min(dots + means), max(dots + means)
        reach = max(hi_d - lo_d, 2.0)
        xlo, xhi = lo_d - 0.6 * reach, hi_d + 0.6 * reach  # intervals beyond this are clipped (arrow)
        for yi, p in zip(y, group):
            d = p.diffs[key]
            if d.values:
                ax.scatter(d.values, yi + _jitter(len(d.values), 0.12), s=16, facecolors="none",
                           edgecolors="tab:blue", linewidths=0.9, zorder=3)
            if not math.isfinite(d.mean):
                ax.text(0, yi, "no pair", fontsize=7, ha="center", va="center", color="grey")
                continue
            if d.has_interval:
                color = "tab:red" if d.significant else "black"
                a, b = max(d.lo, xlo), min(d.hi, xhi)
                ax.plot([a, b], [yi, yi], color=color, lw=1.6, zorder=2)
                for end, clipped, mk in ((a, d.lo < xlo, "<"), (b, d.hi > xhi, ">")):
                    ax.plot([end], [yi], marker=mk if clipped else "|", color=color, markersize=7, zorder=2)
                ax.plot([d.mean], [yi], marker="s", color=color, markersize=5, zorder=4)
                if d.status == "wide":
                    ax.text(d.mean, yi - 0.36, f"wide: ±{(d.hi - d.lo) / 2:.0f}", fontsize=6.5, ha="center",
                            va="center", color="tab:orange")
            else:
                ax.plot([d.mean], [yi], marker="s", color="grey", markersize=5, zorder=4)
                note = {"single": "n=1", "two": "n=2: no CI", "zero_spread": "sd=0: no CI"}[d.status]
                ax.text(d.mean, yi - 0.36, note, fontsize=6.5, ha="center", va="center", color="grey")
        ax.axvline(0, color="grey", lw=0.9, ls="--")
        ax.set_xlim(xlo, xhi)
        ax.set_ylim(-0.7, len(group) - 0.3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("Δ % points", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        ax.set_yticks(y)
        ax.set_yticklabels([_tick(p.variant, 28) for p in group], fontsize=8)
    name = dataset or dataset_names([target])[target]
    fig.suptitle(f"{grid.name} on {name}: each variant minus {ref.letter or ref.name} (paired by seed); "
                 f"bar = {int(round(confidence * 100))} % t-interval (≥ {MIN_SEEDS_FOR_CI} seeds), red = excludes 0; "
                 "circles = seeds", fontsize=9.5)
    _legend_of_letters(fig, group)
    bottom = 0.07 if any(p.variant.letter for p in group) else 0
    fig.tight_layout(rect=(0, bottom, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sensitivity(grid: Grid, rows: Sequence[Row], param: str, target: str, path: Path,
                     dataset: str | None = None) -> Path:
    """Metric vs the swept value (Figures 7-8 of the paper): mean ± std over seeds and every seed as a dot."""
    plt = _plt()
    pts = sorted(
        ((r.variant.coords[param], r) for r in rows
         if r.target == target and r.cls == MEAN and param in r.variant.coords),
        key=lambda t: t[0],
    )
    xs = np.array([p for p, _ in pts], dtype=float)
    fig, ax = plt.subplots(figsize=(7.0, 4.8))
    markers = "osD^v<"
    everything: list[float] = []
    for (key, title), mk in zip(METRICS, markers):
        ys = np.array([r.mean[key] for _, r in pts], dtype=float)
        es = np.nan_to_num(np.array([r.std[key] for _, r in pts], dtype=float))
        ok = np.isfinite(ys)
        if ok.any():
            line = ax.errorbar(xs[ok], ys[ok], yerr=es[ok], marker=mk, capsize=3, label=title)
            for xv, (_, r) in zip(xs, pts):
                vals = r.values.get(key, [])
                ax.scatter([xv] * len(vals), vals, s=10, marker=mk, facecolors="none",
                           edgecolors=line[0].get_color(), alpha=0.6, linewidths=0.7)
                everything += vals
            everything += list(ys[ok] - es[ok]) + list(ys[ok] + es[ok])
    ax.set_ylim(*_span_limits(everything))
    center = [p for p, r in pts if r.variant.name == "default"]
    if center:
        ax.axvline(center[0], color="grey", ls="--", lw=0.8)
    symbol = {"gamma": "γ", "xi": "ξ"}.get(param, param)
    name = dataset or dataset_names([target])[target]
    ax.set_xlabel(symbol)
    ax.set_ylabel("%")
    ax.set_title(f"Sensitivity to {symbol} on {name}\nmean ± std over seeds, small markers = seeds; "
                 f"dashed = base value", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----- everything -----
def _safe(name: str) -> str:
    """A file-name form: ``synthetic domain_b`` -> ``synthetic_domain_b``, ``MVTec-AD`` -> ``MVTec-AD``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_report(grid: Grid, records: Iterable[Mapping[str, Any]], out_dir: str | Path,
                 seeds: Sequence[int] | None = None, per_class: bool = False,
                 confidence: float = 0.95, plots: bool = True,
                 columns: Iterable[str] | str | None = None) -> dict[str, Path]:
    """Write results.md / results.csv / paired.csv / results.tex and the PNG plots; return {name: path}.

    ``columns`` (default: the grid's ``columns``, else all six) picks the metric columns of the
    Markdown and LaTeX tables; the CSV files and the plots keep every metric.

    Eight parameters on purpose: after the grid, its records and the folder come five independent
    report options with defaults (``seeds``, ``per_class``, ``confidence``, ``plots``, ``columns``;
    all but ``confidence`` are command-line flags here and in ``ablations.grid``); ``rebuild_report``,
    ``ablations.grid`` and the tests each set one or two of them by name, which an options object
    would turn into a construction at every call."""
    columns = metric_columns(columns or grid.columns)
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
        "results.tex": out_dir / "results.tex",
    }
    written["results.md"].write_text(render_markdown(grid, rows, pairs, seeds, confidence, [t for _, t in columns]))
    written["results.tex"].write_text(render_latex(grid, rows, seeds, [t for _, t in columns]))
    if plots:
        names = dataset_names(r.target for r in rows)
        for target, dataset in names.items():
            tag = _safe(dataset)
            name = f"points_{tag}.png"
            written[name] = plot_points(grid, rows, target, out_dir / name, dataset)
            if any(p.target == target for p in pairs):
                name = f"forest_{tag}.png"
                written[name] = plot_forest(grid, pairs, target, out_dir / name, dataset, confidence)
            for param in grid.swept_params:
                name = f"sensitivity_{_safe(param)}_{tag}.png"
                written[name] = plot_sensitivity(grid, rows, param, target, out_dir / name, dataset)
    return written


def rebuild_report(grid: Grid, out_dir: str | Path, seeds: Sequence[int] | None = None, per_class: bool = False,
                   plots: bool = True, results: str | Path | None = None,
                   columns: Iterable[str] | str | None = None) -> tuple[str, dict[str, Path]]:
    """Rebuild a grid's tables and plots in ``out_dir`` from ``records.jsonl`` (in ``results``,
    default ``out_dir``), without running anything; returns (results.md text, written files).
    Raises FileNotFoundError when there are no records."""
    src = Path(results or out_dir) / "records.jsonl"
    records = read_records(src)
    if not records:
        raise FileNotFoundError(f"no records in {src}")
    written = write_report(grid, records, out_dir, seeds=seeds, per_class=per_class, plots=plots, columns=columns)
    return written["results.md"].read_text(), written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Rebuild an ablation grid's tables (Markdown, CSV, LaTeX) and plots from its records.jsonl",
        epilog="example: python ablations/aggregate.py --grid ablations/configs/quick.yaml --results runs/ablations/quick",
    )
    p.add_argument("--grid", required=True, help="grid YAML file (ablations/configs/NAME.yaml)")
    p.add_argument("--results", required=True, help="the grid's output folder (holds records.jsonl)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds the grid was run with")
    p.add_argument("--per-class", action="store_true", help="also tabulate every class of every target")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--out", default=None, help="where to write (default: --results)")
    p.add_argument("--columns", default=None, metavar="I-AUROC,P-AUROC,...",
                   help=f"metric columns of the Markdown and LaTeX tables, in order (default: the grid's "
                        f"'columns', else all: {','.join(t for _, t in METRICS)})")
    args = p.parse_args(argv)
    try:
        grid = load_grid(args.grid)
        seeds = grid.seed_values(args.seeds) if args.seeds else None
        text, written = rebuild_report(grid, args.out or args.results, seeds=seeds, per_class=args.per_class,
                                       plots=not args.no_plots, results=args.results, columns=args.columns)
    except (FileNotFoundError, ValueError) as exc:  # no records, a bad grid file or column name
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    for name, path in written.items():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
