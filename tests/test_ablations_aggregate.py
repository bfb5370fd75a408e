"""Aggregation of ablation grids: statistics against hand-computed values, tables, CSV, plots."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from ablations.aggregate import (
    MIN_SPAN,
    WIDE_HALF_WIDTH,
    _span_limits,
    class_table,
    dataset_name,
    dataset_names,
    latest_records,
    mean_std,
    paired_diff,
    read_records,
    render_markdown,
    paired_rows,
    render_latex,
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
    assert d.status == "single" and not d.significant and d.values == (0.5,)
    d = paired_diff([3.0, 5.0], [1.0, 1.0])  # d = 2, 4: mean 3, sd sqrt(2)
    assert d.hi - 3.0 == pytest.approx(T_975_DF1 * math.sqrt(2) / math.sqrt(2))
    with pytest.raises(ValueError):
        paired_diff([1.0], [1.0, 2.0])


def test_significance_only_with_three_seeds_and_spread():
    # n = 2 whose t-interval excludes 0 (d = 10, 10.1: 10.05 +/- 12.706 * 0.0707 / 1.414 = +/- 0.64):
    # not claimed, flagged as 'two'
    d = paired_diff([10.0, 10.1], [0.0, 0.0])
    assert d.lo > 0 and d.status == "two" and not d.significant and not d.has_interval
    # the case: n = 2 with the same difference twice ("+2.9 [+2.9, +2.9] *" before)
    d = paired_diff([92.9, 95.9], [90.0, 93.0])
    assert d.sd == pytest.approx(0.0, abs=1e-12) and d.status == "zero_spread" and not d.significant
    # n = 3, zero spread: still no claim
    d = paired_diff([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])
    assert d.n == 3 and d.status == "zero_spread" and not d.significant
    # n = 3 with spread, interval excludes 0: significant
    d = paired_diff([2.0, 2.2, 2.4], [0.0, 0.0, 0.0])  # mean 2.2, sd 0.2, half 4.303 * 0.2 / 1.732 = 0.497
    assert d.status == "ok" and d.significant and d.lo == pytest.approx(2.2 - T_975_DF2 * 0.2 / math.sqrt(3))
    # a very wide interval is flagged (half-width > WIDE_HALF_WIDTH points) and not significant here
    d = paired_diff([90.0, 20.0, 95.0], [91.0, 91.0, 91.0])
    assert (d.hi - d.lo) / 2 > WIDE_HALF_WIDTH and d.status == "wide" and not d.significant
    assert paired_diff([], []).status == "none"


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


def test_markdown_shows_values_failures_and_caveats(tmp_path):
    grid = parse_grid(GRID)
    seeds = [0, 1, 2]
    md = render_markdown(grid, summarize(grid, _records(), seeds), paired_rows(grid, _records(), seeds), seeds)
    # letter, description (name when there is none), Table 3's component columns; best in bold
    assert "| Row | Variant | HSVS | VCPG | VTAM | Seeds | I-AUROC |" in md
    assert "| A | base | ✗ | ✗ | ✗ | 3/3 seeds | 82.0 ± 2.0 |" in md
    assert "| E | full (ref) | ✓ (ATF) | ✓ | ✓ | 2/3 seeds, 1 failed | **92.5 ± 3.5** |" in md
    assert "**E (full): 2/3 seeds, 1 failed**" in md
    # dataset by display name, never the spec, in the heading
    assert "## MVTec-AD\n" in md and "## mvtec:" not in md
    # two paired seeds (full seed 1 failed): mean shown, no interval, no star, the caveat printed
    assert "| A | base | 2 | -10.5 ² |" in md and "*" not in md.split("Paired difference")[1].split("\n\n", 2)[1]
    assert "² two paired seeds" in md and "not meaningful" in md
    # one seed: no std, the paired difference without interval, both caveats printed
    one = [_rec("base", 0, 0.80), _rec("full", 0, 0.90)]
    md1 = render_markdown(grid, summarize(grid, one, [0]), paired_rows(grid, one, [0]), [0])
    assert "| A | base | ✗ | ✗ | ✗ | 1/1 seeds | 80.0 | 80.0 |" in md1
    assert "| A | base | 1 | -10.0 ¹ |" in md1 and "¹ one paired seed: no spread" in md1
    assert "Cells without ± come from a single seed" in md1
    # a variant whose every seed failed shows as failed with dashes, not missing
    allfail = [_rec("base", 0, 0.80), _rec("full", 0, 0.0, status="failed")]
    md2 = render_markdown(grid, summarize(grid, allfail, [0]), paired_rows(grid, allfail, [0]), [0])
    assert "| E | full (ref) | ✓ (ATF) | ✓ | ✓ | 0/1 seeds, 1 failed | — | — |" in md2


def _three(diffs_by_seed, ref=0.90):
    """base = ref + d (per seed), full = ref: paired differences d (fractions) on 3 seeds."""
    recs = []
    for s, d in enumerate(diffs_by_seed):
        recs += [_rec("base", s, ref + d), _rec("full", s, ref)]
    return recs


def test_markdown_three_seeds_star_zero_spread_and_wide():
    grid = parse_grid(GRID)
    seeds = [0, 1, 2]

    def md_of(recs):
        return render_markdown(grid, summarize(grid, recs, seeds), paired_rows(grid, recs, seeds), seeds)

    # n = 3 with spread, interval excludes 0: starred, no caveat
    md = md_of(_three([0.020, 0.022, 0.024]))
    cell = "+2.2 [+1.7, +2.7] *"
    assert f"| A | base | 3 | {cell} |" in md and "- ²" not in md and "- ⁰" not in md
    # n = 3, identical differences: no interval, no star, zero-spread caveat
    md = md_of(_three([0.029, 0.029, 0.029], ref=0.5))
    assert "| A | base | 3 | +2.9 ⁰ |" in md and "⁰ the same difference on every seed" in md
    assert "+2.9 [" not in md and "+2.9 ⁰ *" not in md
    # float noise around 0 shows as +0.0, never -0.0
    md = md_of(_three([-1e-12, -1e-12, -1e-12], ref=0.3))
    assert "| A | base | 3 | +0.0 ⁰ |" in md and "-0.0" not in md
    # n = 3, very wide interval: shown, flagged, caveat printed
    md = md_of(_three([-0.70, 0.05, 0.10]))
    line = next(x for x in md.splitlines() if x.startswith("| A | base | 3 |"))
    assert "⚠" in line and "*" not in line and "interval wider than ±10 points" in md


def test_dataset_display_names():
    assert dataset_name("mvtec:/data/mvtec_anomaly_detection") == "MVTec-AD"
    assert dataset_name("mvtec_ad:data/mvtec") == "MVTec-AD"  # an alias of the format
    assert dataset_name("visa:data/VisA") == "VisA"
    assert dataset_name("synthetic:/abs/path/data/synthetic/domain_b/") == "synthetic domain_b"
    assert dataset_name("mvtec:/work/shared/data/mvtec3d_tire_rgb") == "MVTec 3D-AD"
    assert dataset_name("meta:/d/mpdd/meta.json") == "MPDD"
    two = dataset_names(["mvtec:/a/mvtec_one", "mvtec:/b/mvtec_two", "visa:/v"])
    assert two == {"mvtec:/a/mvtec_one": "MVTec-AD (mvtec_one)", "mvtec:/b/mvtec_two": "MVTec-AD (mvtec_two)",
                   "visa:/v": "VisA"}


def test_latex_booktabs_best_bold_and_escaping():
    grid = parse_grid({**GRID, "description": "50% of 'A_B' & more, a -> b", "variants": [
        {"name": "base", "letter": "A", "description": "CLIP only, γ = 0.5", "overrides": {"fusion": "none"}},
        {"name": "full", "letter": "E", "description": "+ VTAM = full SSVP", "overrides": {}}]})
    tex = render_latex(grid, summarize(grid, _records(), [0, 1, 2]), [0, 1, 2])
    for cmd in ("\\toprule", "\\midrule", "\\bottomrule", "\\begin{tabular}", "\\caption{", "\\label{tab:"):
        assert cmd in tex
    caption = tex.split("\\caption{")[1].split("\n")[0]
    assert "50\\% of 'A\\_B' \\& more, a $\\rightarrow$ b" in caption
    # short row labels; the long descriptions in the caption
    assert "Rows: A: CLIP only, $\\gamma$ = 0.5; E: + VTAM = full SSVP." in caption
    body = tex.split("\\midrule")[1]
    a_line = next(x for x in body.splitlines() if x.startswith("A & "))
    e_line = next(x for x in body.splitlines() if x.startswith("E (ref)$^\\dagger$ & "))
    assert "CLIP only" not in body and "full SSVP" not in body
    assert "$82.0 \\pm 2.0$" in a_line and "\\mathbf" not in a_line
    assert "$\\mathbf{92.5 \\pm 3.5}$" in e_line
    assert "Not every seed finished: E: 2/3 seeds, 1 failed" in tex
    assert "\\checkmark" in e_line and "$\\times$" in a_line  # the HSVS / VCPG / VTAM columns
    assert tex.count("\\begin{table}") == 1
    table_lines = [x for x in tex.splitlines() if x.endswith("\\\\")]
    assert len(table_lines) == 3 and len({x.count(" & ") for x in table_lines}) == 1  # header + 2 rows, same width
    assert table_lines[0] == "Model & HSVS & VCPG & VTAM & I-AUROC & I-F1max & I-AP & P-AUROC & P-AUPRO & P-AP \\\\"
    two = render_latex(grid, summarize(grid, _records(), [0, 1, 2]), [0, 1, 2], columns="P-AUROC,image_auroc")
    assert "Model & HSVS & VCPG & VTAM & P-AUROC & I-AUROC \\\\" in two


def test_metric_columns_by_title_or_key_and_mistakes():
    from ablations.aggregate import metric_columns

    assert metric_columns(None) == metric_columns("") == metric_columns([])
    assert len(metric_columns(None)) == 6
    assert metric_columns("I-AUROC,P-AUROC") == [("image_auroc", "I-AUROC"), ("pixel_auroc", "P-AUROC")]
    assert metric_columns(["p-aupro", "image_ap", "P-AUPRO"]) == [("pixel_aupro", "P-AUPRO"), ("image_ap", "I-AP")]
    with pytest.raises(ValueError, match=r"unknown column 'I-AUCROC'; did you mean I-AUROC\?"):
        metric_columns("I-AUCROC,P-AUROC")


def test_markdown_columns_pick_and_order_the_metrics():
    grid = parse_grid(GRID)
    seeds = [0, 1, 2]
    md = render_markdown(grid, summarize(grid, _records(), seeds), paired_rows(grid, _records(), seeds), seeds,
                         columns=["P-AUROC", "I-AUROC"])
    assert "| Row | Variant | HSVS | VCPG | VTAM | Seeds | P-AUROC | I-AUROC |\n" in md
    assert "| E | full (ref) | ✓ (ATF) | ✓ | ✓ | 2/3 seeds, 1 failed | **92.5 ± 3.5** | **92.5 ± 3.5** |\n" in md
    assert "| Row | Variant | Paired seeds | P-AUROC | I-AUROC |\n" in md and "I-AP" not in md


def test_grid_columns_key_and_aggregate_flag(tmp_path, capsys):
    import json

    import yaml

    from ablations.aggregate import main
    from ablations.spec import GridError

    grid = parse_grid({**GRID, "columns": ["i-auroc", "P-AUROC"]})
    assert grid.columns == ["I-AUROC", "P-AUROC"]
    with pytest.raises(GridError, match=r"grid <grid>: columns: unknown column 'PAUROC'; did you mean P-AUROC"):
        parse_grid({**GRID, "columns": ["PAUROC"]})
    grid_file = tmp_path / "mini.yaml"
    grid_file.write_text(yaml.safe_dump({**GRID, "columns": ["I-AUROC", "P-AUROC"]}))
    results = tmp_path / "res"
    results.mkdir()
    (results / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    args = ["--grid", str(grid_file), "--results", str(results), "--no-plots"]
    assert main(args) == 0  # the grid's columns
    assert "| Seeds | I-AUROC | P-AUROC |\n" in capsys.readouterr().out
    assert "& I-AUROC & P-AUROC \\\\" in (results / "results.tex").read_text()
    assert len((results / "results.csv").read_text().splitlines()[0].split(",")) > 20  # the CSV keeps all metrics
    assert main(args + ["--columns", "P-AUPRO"]) == 0  # the flag wins
    assert "| Seeds | P-AUPRO |\n" in capsys.readouterr().out
    assert main(args + ["--columns", "P-AUPR0"]) == 2
    assert "did you mean P-AUPRO?" in capsys.readouterr().err


def test_point_plot_range_is_never_narrow():
    lo, hi = _span_limits([92.0, 92.2, 92.1])
    assert hi - lo >= MIN_SPAN - 1e-9 and lo < 92.0 and hi > 92.2  # a 0.2-point gap is not blown up
    lo, hi = _span_limits([99.5, 99.9])
    assert hi == 100.0 and hi - lo >= MIN_SPAN - 1e-9
    lo, hi = _span_limits([20.0, 99.0])
    assert lo < 20.0 and hi <= 100.0 and lo >= 0.0


def test_write_report_files(tmp_path):
    grid = parse_grid(GRID)
    written = write_report(grid, _records(), tmp_path, seeds=[0, 1, 2], per_class=True)
    assert {"results.md", "results.csv", "paired.csv", "results.tex", "points_MVTec-AD.png",
            "forest_MVTec-AD.png"} <= set(written)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    full = [r for r in rows if r["variant"] == "full" and r["class"] == "mean"][0]
    assert full["status"] == "2/3 seeds, 1 failed" and full["seeds_failed"] == "1"
    assert full["dataset"] == "MVTec-AD" and full["target"] == "mvtec:data/mvtec" and full["letter"] == "E"
    assert float(full["I-AUROC_mean"]) == pytest.approx(92.5) and full["I-AUROC_n"] == "2"
    assert float(full["P-AP_std"]) == pytest.approx(math.sqrt(12.5), rel=1e-4)
    assert len(rows) == 2 * 3  # 2 variants x (mean + 2 classes)
    with open(tmp_path / "paired.csv") as f:
        prow = [r for r in csv.DictReader(f) if r["class"] == "mean"][0]
    assert prow["variant"] == "base" and float(prow["I-AUROC_diff"]) == pytest.approx(-10.5)
    # n = 2: the interval is left out, the caveat and the per-seed differences are in
    assert prow["I-AUROC_lo"] == "" and prow["I-AUROC_significant"] == "0"
    assert "two paired seeds" in prow["I-AUROC_caveat"]
    assert [float(x) for x in prow["I-AUROC_per_seed"].split()] == pytest.approx([-10.0, -11.0])
    for name in ("points_MVTec-AD.png", "forest_MVTec-AD.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (tmp_path / "results.tex").read_text().count("\\begin{table}") == 1  # class means only


def test_sensitivity_plot_and_class_table(tmp_path):
    grid = parse_grid({"name": "g", "base": {"preset": "tiny"}, "seeds": 2,
                       "sweeps": [{"param": "gamma", "values": [0.1, 0.5, 0.9]}]})
    recs = [_rec(v.name, s, 0.5 + 0.1 * i + 0.01 * s) for i, v in enumerate(grid.variants) for s in (0, 1)]
    written = write_report(grid, recs, tmp_path)
    assert (tmp_path / "sensitivity_gamma_MVTec-AD.png").stat().st_size > 10_000
    assert "sensitivity_gamma_MVTec-AD.png" in written
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
    assert "| E | full (ref) | ✓ (ATF) | ✓ | ✓ | 2/3 seeds, 1 failed | **92.5 ± 3.5** |" in out
    assert ", class `screw`" in (results / "results.md").read_text()
    assert main(["--grid", str(grid_file), "--results", str(tmp_path / "empty")]) == 2


# ----- the Markdown report, pinned: render_markdown's output for these cases is what the
# function printed before it was split into pieces (tests/golden/aggregate_markdown.md) -----
def _markdown_cases():
    """(name, grid, records, seeds, per_class) covering every branch of render_markdown."""
    described = {**GRID, "description": "A grid | with a pipe.", "caption": "What the rows mean.",
                 "variants": [{"name": "base", "letter": "A", "description": "CLIP only",
                               "overrides": {"fusion": "none", "vcpg": False, "vtam": False}},
                              {"name": "full", "letter": "E", "overrides": {}},
                              {"name": "plain", "overrides": {"fusion": "concat"}}]}
    sweep = {"name": "g", "base": {"preset": "tiny"}, "seeds": 2,
             "sweeps": [{"param": "gamma", "values": [0.1, 0.5, 0.9]}]}
    sweep_grid = parse_grid(sweep)
    sweep_recs = [_rec(v.name, s, 0.5 + 0.1 * i + 0.01 * s) for i, v in enumerate(sweep_grid.variants) for s in (0, 1)]
    return [
        ("failures, per class", parse_grid(GRID), _records(), [0, 1, 2], True),
        ("one seed", parse_grid(GRID), [_rec("base", 0, 0.80), _rec("full", 0, 0.90)], [0], False),
        ("three seeds", parse_grid(GRID), _three([0.020, 0.022, 0.024]), [0, 1, 2], False),
        ("zero spread and wide", parse_grid(GRID), _three([0.029, 0.029, 0.029], ref=0.5), [0, 1, 2], False),
        ("wide", parse_grid(GRID), _three([-0.70, 0.05, 0.10]), [0, 1, 2], False),
        ("described, missing seed", parse_grid(described),
         [_rec("base", 0, 0.8), _rec("full", 0, 0.9), _rec("plain", 0, 0.85), _rec("base", 1, 0.7)], [0, 1], False),
        ("sensitivity", sweep_grid, sweep_recs, [0, 1], False),
        ("nothing yet", parse_grid(GRID), [], [0, 1, 2], False),
    ]


def _markdown_of_cases() -> str:
    parts = []
    for name, grid, recs, seeds, per_class in _markdown_cases():
        md = render_markdown(grid, summarize(grid, recs, seeds, per_class=per_class),
                             paired_rows(grid, recs, seeds, per_class=per_class), seeds)
        parts.append(f"<<<<< {name}\n{md}")
    return "\n".join(parts)


def test_markdown_report_is_unchanged():
    golden = Path(__file__).parent / "golden" / "aggregate_markdown.md"
    assert _markdown_of_cases() == golden.read_text(encoding="utf-8")


# ----- LaTeX that fits: compiled with pdflatex in an `article` (skips without texlive) -----
# Paper Table 3 (I-AUC, P-AUC per row), spread over three seeds as mean - s, mean, mean + s.
TABLE3_PAPER = {"baseline": (91.3, 0.6, 91.2, 0.4), "hsvs_concat": (90.8, 0.3, 91.0, 0.4),
                "hsvs_atf": (91.4, 0.2, 92.1, 0.3), "atf_vcpg": (92.6, 0.3, 92.5, 0.3), "full": (93.0, 0.2, 92.6, 0.4)}


def _table3_records(grid):
    target = grid.base_config().data.targets[0]
    recs = []
    for name, (i_m, i_s, p_m, p_s) in TABLE3_PAPER.items():
        for seed, k in zip(grid.seed_values(), (-1, 0, 1)):
            mean = {key: 0.8 for key in KEYS} | {"image_auroc": (i_m + k * i_s) / 100, "pixel_auroc": (p_m + k * p_s) / 100}
            recs.append({"variant": name, "seed": seed, "status": "ok", "metrics": {target: {"mean": mean}}})
    return recs


def _overfull(tex_dir: Path, scale: bool = True) -> list[float]:
    """Compile results.tex in a one-column `article`; the overfull-hbox widths (pt) pdflatex reports.
    ``scale=False`` turns the report's \\resizebox into a plain box: the table's natural width."""
    import re
    import subprocess

    noscale = "" if scale else "\\renewcommand{\\resizebox}[3]{\\mbox{#3}}\n"
    (tex_dir / "doc.tex").write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage{amssymb}\n\\usepackage{graphicx}\n"
        f"{noscale}\\begin{{document}}\n\\input{{results.tex}}\n\\end{{document}}\n")
    out = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tex_dir,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:]
    return [float(x) for x in re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide\)", out.stdout)]


@pytest.mark.skipif(not __import__("shutil").which("pdflatex"), reason="pdflatex (texlive) not installed")
def test_latex_table3_preset_fits_a_one_column_article(tmp_path):
    from ablations.spec import load_grid

    repo = Path(__file__).resolve().parents[1]
    grid = load_grid(repo / "ablations" / "configs" / "table3.yaml")
    assert grid.columns == ["I-AUROC", "P-AUROC"]  # the paper's two columns by default
    write_report(grid, _table3_records(grid), tmp_path, plots=False)
    tex = (tmp_path / "results.tex").read_text()
    assert "Model & HSVS & VCPG & VTAM & I-AUROC & P-AUROC \\\\" in tex
    assert "\nB & \\checkmark (Concat) & $\\times$ & $\\times$ & $90.8 \\pm 0.3$ & $91.0 \\pm 0.4$ \\\\" in tex
    assert "E (ref) & \\checkmark (ATF) & \\checkmark & \\checkmark & $\\mathbf{93.0 \\pm 0.2}$" in tex
    assert "A: Bayes-PFL on CLIP (no DINO, no VCPG, no VTAM); B: + HSVS with Concat fusion" in tex  # caption
    assert _overfull(tmp_path, scale=False) == []  # fits at its natural size: nothing scaled
    # every metric (the quick grid, six columns) is too wide at its natural size: scaled to fit
    quick = load_grid(repo / "ablations" / "configs" / "quick.yaml")
    recs = [_rec(v.name, s, 0.8 + 0.01 * i) | {"metrics": {quick.base_config().data.targets[0]: {"mean": {
        k: 0.8 + 0.01 * i + 0.001 * s for k in KEYS}}}} for i, v in enumerate(quick.variants) for s in (0, 1)]
    write_report(quick, recs, tmp_path, plots=False)
    assert max(_overfull(tmp_path, scale=False)) > 100
    assert _overfull(tmp_path) == []


def test_grid_columns_flag_checked_first_and_used_when_reprinting(tmp_path, capsys):
    """grid.py --columns: a mistyped column fails before anything starts; the command of a finished
    grid, run again with --columns, rebuilds its tables with those columns (nothing runs)."""
    import json

    from ablations.grid import main
    from ablations.spec import load_grid

    assert main(["--grid", "quick", "--dry-run", "--columns", "I-AUROC,PAUROC"]) == 2
    assert "--columns: unknown column 'PAUROC'; did you mean P-AUROC?" in capsys.readouterr().err
    grid = load_grid(Path(__file__).resolve().parents[1] / "ablations" / "configs" / "quick.yaml")
    out = tmp_path / "quick"
    out.mkdir()
    (out / "grid.json").write_text(json.dumps({"name": "quick", "seeds": [0, 1], "variants": grid.variant_names,
                                               "set": {}, "interrupted": False}))
    target = grid.base_config().data.targets[0]
    (out / "records.jsonl").write_text("".join(
        json.dumps({"variant": v, "seed": s, "status": "ok", "metrics": {target: {"mean": {k: 0.5 for k in KEYS}}}})
        + "\n" for v in grid.variant_names for s in (0, 1)))
    assert main(["--grid", "quick", "--out", str(out), "--columns", "P-AUROC,I-AUROC"]) == 0
    assert "| Seeds | P-AUROC | I-AUROC |" in capsys.readouterr().out
    assert "& P-AUROC & I-AUROC \\\\" in (out / "results.tex").read_text()
