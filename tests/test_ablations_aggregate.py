"""Aggregation of ablation grids: statistics against hand-computed values, tables, CSV, plots."""
from __future__ import annotations

import csv
import math

import pytest

from ablations.aggregate import (
    class_table,
    latest_records,
    mean_std,
    paired_diff,
    read_records,
    render_markdown,
    paired_rows,
    seed_counts,
    summarize,
    write_report,
)
from ablations.spec import parse_grid

T_975_DF2 = 4.302652729749464  # Student t quantile, 97.5 %, 2 degrees of freedom (tables)
T_975_DF1 = 12.706204736174698


def test_mean_std_is_sample_std():
    m, s = mean_std([0.90, 0.80, 0.85])
    assert m == pytest.approx(0.85)
    assert s == pytest.approx(0.05)  # sqrt((0.05^2 + 0.05^2 + 0) / 2)
    m1, s1 = mean_std([0.7])
    assert m1 == pytest.approx(0.7) and math.isnan(s1)
    m2, s2 = mean_std([0.7, float("nan"), 0.9])  # non-finite values are dropped
    assert m2 == pytest.approx(0.8) and s2 == pytest.approx(math.sqrt(0.02))


def test_paired_diff_t_interval_hand_computed():
    d = paired_diff([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])  # differences 1, 2, 3: mean 2, sd 1
    half = T_975_DF2 * 1.0 / math.sqrt(3)
    assert d.n == 3 and d.mean == pytest.approx(2.0)
    assert d.lo == pytest.approx(2.0 - half, rel=1e-9) and d.hi == pytest.approx(2.0 + half, rel=1e-9)
    assert not d.significant  # lo = -0.484 < 0 < hi

    # Pairing matters: a constant +1 shift with large between-seed spread is still significant.
    x = [50.0, 70.0, 90.0, 60.0]
    y = [49.0, 69.1, 88.9, 59.0]
    d = paired_diff(x, y)
    diffs = [1.0, 0.9, 1.1, 1.0]
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in diffs) / 3)
    assert d.mean == pytest.approx(mean) and d.significant
    assert d.hi - d.lo == pytest.approx(2 * 3.182446305284263 * sd / 2.0, rel=1e-9)

    # a pair with a missing side is dropped; one pair left -> no interval
    d = paired_diff([1.0, float("nan")], [0.5, 0.2])
    assert d.n == 1 and d.mean == pytest.approx(0.5) and math.isnan(d.lo) and math.isnan(d.hi)
    d = paired_diff([3.0, 5.0], [1.0, 1.0])  # d = 2, 4: mean 3, sd sqrt(2)
    assert d.hi - 3.0 == pytest.approx(T_975_DF1 * math.sqrt(2) / math.sqrt(2))
    with pytest.raises(ValueError):
        paired_diff([1.0], [1.0, 2.0])


GRID = {
    "name": "mini",
    "base": {"preset": "tiny"},
    "seeds": 3,
    "reference": "full",
    "variants": [
        {"name": "base", "letter": "A", "overrides": {"fusion": "none", "vcpg": False, "vtam": False}},
        {"name": "full", "letter": "E", "overrides": {}},
    ],
}
KEYS = ["image_auroc", "image_f1max", "image_ap", "pixel_auroc", "pixel_aupro", "pixel_ap"]


def _rec(variant, seed, value, status="ok", evaluate_form=False):
    """A record whose metrics are all `value`, per class bottle=value, screw=value-0.1."""
    mean = {k: value for k in KEYS}
    classes = {"bottle": {k: value for k in KEYS}, "screw": {k: value - 0.1 for k in KEYS}}
    table = {"per_class": classes, "mean": mean} if evaluate_form else {"mean": mean, **classes}
    rec = {"trial_id": f"{variant}__seed{seed}", "variant": variant, "seed": seed, "status": status}
    if status == "ok":
        rec["metrics"] = {"mvtec:data/mvtec": table}
    else:
        rec["error"] = "RuntimeError: boom"
    return rec


def _records():
    return [
        _rec("base", 0, 0.80), _rec("base", 1, 0.82, evaluate_form=True), _rec("base", 2, 0.84),
        _rec("full", 0, 0.90), _rec("full", 1, 0.0, status="failed"), _rec("full", 2, 0.95),
    ]


def test_summary_rows_and_failure_counts():
    grid = parse_grid(GRID)
    rows = summarize(grid, _records(), seeds=[0, 1, 2])
    by = {r.variant.name: r for r in rows}
    assert set(by) == {"base", "full"}
    assert by["base"].mean["image_auroc"] == pytest.approx(82.0)
    assert by["base"].std["pixel_ap"] == pytest.approx(2.0)
    assert by["full"].mean["image_auroc"] == pytest.approx(92.5)  # failed seed 1 left out
    assert by["full"].std["image_auroc"] == pytest.approx(math.sqrt(12.5))
    assert by["full"].counts.text() == "2/3 seeds, 1 failed"
    assert by["base"].counts.text() == "3/3 seeds"
    # per class, from both record forms
    rows = summarize(grid, _records(), seeds=[0, 1, 2], per_class=True)
    screw = [r for r in rows if r.cls == "screw" and r.variant.name == "base"][0]
    assert screw.mean["image_ap"] == pytest.approx(72.0)
    assert {r.cls for r in rows} == {"mean", "bottle", "screw"}


def test_resume_record_replaces_failure_and_missing_counts():
    grid = parse_grid(GRID)
    records = _records() + [_rec("full", 1, 0.92)]
    latest = latest_records(records)
    assert latest[("full", 1)]["status"] == "ok"
    assert seed_counts(latest, "full", [0, 1, 2]).text() == "3/3 seeds"
    assert seed_counts(latest, "full", [0, 1, 2, 3]).text() == "3/4 seeds, 1 missing"
    rows = summarize(grid, records, seeds=[0, 1, 2])
    full = [r for r in rows if r.variant.name == "full"][0]
    assert full.mean["image_auroc"] == pytest.approx(92.333333, rel=1e-6)


def test_paired_rows_against_reference():
    grid = parse_grid(GRID)
    pairs = paired_rows(grid, _records(), seeds=[0, 1, 2])
    assert len(pairs) == 1 and pairs[0].variant.name == "base" and pairs[0].reference == "full"
    d = pairs[0].diffs["image_auroc"]
    # seeds 0 and 2 pair up (full seed 1 failed): diffs 80-90 = -10, 84-95 = -11
    assert d.n == 2 and d.mean == pytest.approx(-10.5)
    assert d.hi - d.mean == pytest.approx(T_975_DF1 * math.sqrt(0.5) / math.sqrt(2))


def test_markdown_shows_values_failures_and_na(tmp_path):
    grid = parse_grid(GRID)
    seeds = [0, 1, 2]
    md = render_markdown(grid, summarize(grid, _records(), seeds), paired_rows(grid, _records(), seeds), seeds)
    assert "| A: base | 3/3 seeds | 82.0 ± 2.0 |" in md
    assert "| E: full (ref) | 2/3 seeds, 1 failed | 92.5 ± 3.5 |" in md
    assert "**E: full: 2/3 seeds, 1 failed**" in md
    assert "-10.5 [" in md
    # one seed: no std, and the paired comparison says n/a
    one = [_rec("base", 0, 0.80), _rec("full", 0, 0.90)]
    md1 = render_markdown(grid, summarize(grid, one, [0]), paired_rows(grid, one, [0]), [0])
    assert "| A: base | 1/1 seeds | 80.0 | 80.0 |" in md1
    assert "-10.0 (n/a)" in md1
    # a variant whose every seed failed shows as failed with dashes, not missing
    allfail = [_rec("base", 0, 0.80), _rec("full", 0, 0.0, status="failed")]
    md2 = render_markdown(grid, summarize(grid, allfail, [0]), paired_rows(grid, allfail, [0]), [0])
    assert "| E: full (ref) | 0/1 seeds, 1 failed | — | — |" in md2


def test_write_report_files(tmp_path):
    grid = parse_grid(GRID)
    written = write_report(grid, _records(), tmp_path, seeds=[0, 1, 2], per_class=True)
    assert {"results.md", "results.csv", "paired.csv", "bars_mvtec_mvtec.png"} <= set(written)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    full = [r for r in rows if r["variant"] == "full" and r["class"] == "mean"][0]
    assert full["status"] == "2/3 seeds, 1 failed" and full["seeds_failed"] == "1"
    assert float(full["I-AUROC_mean"]) == pytest.approx(92.5)
    assert float(full["P-AP_std"]) == pytest.approx(math.sqrt(12.5), rel=1e-4)
    assert len(rows) == 2 * 3  # 2 variants x (mean + 2 classes)
    with open(tmp_path / "paired.csv") as f:
        prow = [r for r in csv.DictReader(f) if r["class"] == "mean"][0]
    assert prow["variant"] == "base" and float(prow["I-AUROC_diff"]) == pytest.approx(-10.5)
    png = (tmp_path / "bars_mvtec_mvtec.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_sensitivity_plot_and_class_table(tmp_path):
    grid = parse_grid({"name": "g", "base": {"preset": "tiny"}, "seeds": 2,
                       "sweeps": [{"param": "gamma", "values": [0.1, 0.5, 0.9]}]})
    recs = [_rec(v.name, s, 0.5 + 0.1 * i + 0.01 * s) for i, v in enumerate(grid.variants) for s in (0, 1)]
    written = write_report(grid, recs, tmp_path)
    assert (tmp_path / "sensitivity_gamma_mvtec_mvtec.png").stat().st_size > 10_000
    assert "sensitivity_gamma_mvtec_mvtec.png" in written
    assert class_table({"per_class": {"a": {"x": 1}}, "mean": {"x": 2}}) == {"a": {"x": 1}, "mean": {"x": 2}}


def test_read_records_names_bad_line(tmp_path):
    p = tmp_path / "records.jsonl"
    p.write_text('{"variant": "a", "seed": 0, "status": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="records.jsonl:2"):
        read_records(p)
    assert read_records(tmp_path / "absent.jsonl") == []


def test_aggregate_cli_rebuilds_report_from_records(tmp_path, capsys):
    import json

    import yaml

    from ablations.aggregate import main

    grid_file = tmp_path / "mini.yaml"
    grid_file.write_text(yaml.safe_dump(GRID))
    results = tmp_path / "res"
    results.mkdir()
    (results / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    assert main(["--grid", str(grid_file), "--results", str(results), "--per-class"]) == 0
    out = capsys.readouterr().out
    assert "| E: full (ref) | 2/3 seeds, 1 failed | 92.5 ± 3.5 |" in out
    assert ", class `screw`" in (results / "results.md").read_text()
    assert main(["--grid", str(grid_file), "--results", str(tmp_path / "empty")]) == 2
