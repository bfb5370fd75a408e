"""Grid files: the shipped grids, expansion into variants x seeds, errors, the launcher CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ablations.spec import GridError, load_grid, parse_grid

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "ablations" / "configs"


def test_every_shipped_grid_loads_and_every_variant_builds():
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert {"quick", "table3", "components", "backbones", "gamma", "xi"} <= set(names)
    for name in names:
        grid = load_grid(CONFIGS / f"{name}.yaml")
        assert grid.name == name
        for v in grid.variants:
            cfg = grid.variant_config(v.name, seed=5)
            assert cfg.train.seed == 5
            for key, value in v.overrides.items():
                assert cfg.flat()[key.rpartition(".")[2]] == value


def test_table3_letters_and_switches():
    grid = load_grid(CONFIGS / "table3.yaml")
    assert [v.label for v in grid.variants] == [
        "A: baseline", "B: hsvs_concat", "C: hsvs_atf", "D: atf_vcpg", "E: full"]
    # the paper's rows: A = Bayes-PFL; B, C add HSVS to it (default reading); D swaps its prompt flows
    # for VCPG on Bayes-PFL's head; E adds VTAM (full SSVP)
    want = {"A": ("bayes_pfl", "none", False, False), "B": ("bayes_pfl", "concat", False, False),
            "C": ("bayes_pfl", "atf", False, False), "D": ("bayes_pfl_vcpg", "atf", True, False),
            "E": ("vcpg", "atf", True, True)}
    static = load_grid(CONFIGS / "table3_static.yaml")  # the other reading: B, C on static prompts
    for g, rows in ((grid, want), (static, {**want, "B": ("static", "concat", False, False),
                                             "C": ("static", "atf", False, False), "D": ("vcpg", "atf", True, False)})):
        for letter, (prompting, fusion, vcpg, vtam) in rows.items():
            m = g.variant_config(letter).model
            assert (m.prompting, m.fusion, m.vcpg, m.vtam) == (prompting, fusion, vcpg, vtam)
        assert g.reference == "full" and "Bayes-PFL" in g.caption and "not comparable" not in g.caption
    base = grid.base_config()
    assert base.model.clip_model == "ViT-L-14-336" and base.model.dino_model == "dinov3_vitl16"
    assert base.data.source.startswith("visa:") and base.data.targets[0].startswith("mvtec:")
    assert grid.resources == {"cpu": 8.0, "gpu": 1.0}


def test_table3_rows_change_only_what_they_name_and_the_report_says_so():
    """Row D differs from row C by the prompt generator alone (the config and the head: only the flows
    go and VCPG comes); the report lists each row's changes from the row above; every other
    difference (E's head) is named in the caption."""
    from ablations.aggregate import render_markdown
    from ssvp.model import SSVPHead, head_class
    from ssvp.pfl_vcpg import PFLVCPGHead

    grid = load_grid(CONFIGS / "table3.yaml")
    changes = {name: {k: (a, b) for k, a, b in diff} for name, diff in grid.row_changes().items()}
    assert changes == {
        "hsvs_concat": {"fusion": ("none", "concat")}, "hsvs_atf": {"fusion": ("concat", "atf")},
        "atf_vcpg": {"prompting": ("bayes_pfl", "bayes_pfl_vcpg"), "vcpg": (False, True)},
        "full": {"prompting": ("bayes_pfl_vcpg", "vcpg"), "vtam": (False, True)}}
    assert head_class(grid.variant_config("D").model) is PFLVCPGHead
    assert head_class(grid.variant_config("E").model) is SSVPHead
    for named in ("prompt bank", "residual cross-modal attention", "Dice", "decoupled"):
        assert named in grid.caption, named
    md = render_markdown(grid, [], [], [0, 1, 2])
    assert "What each row changes from the row above:" in md
    assert "- D (+ VCPG (replaces the prompt flows; Bayes-PFL's bank, RCA and losses kept)): `vcpg` false → true, " \
           "`prompting` bayes_pfl → bayes_pfl_vcpg" in md
    quick = load_grid(CONFIGS / "quick.yaml")
    assert quick.variant("A").name == "bayes_pfl" and quick.variant("A").overrides["prompting"] == "bayes_pfl"


def test_components_backbones_and_sensitivity_grids():
    comp = load_grid(CONFIGS / "components.yaml")
    got = {v.name: (c.fusion, c.vcpg, c.vtam) for v in comp.variants for c in [comp.variant_config(v.name).model]}
    assert got == {"full": ("atf", True, True), "no_vcpg": ("atf", False, True),
                   "no_vtam": ("atf", True, False), "concat": ("concat", True, True)}
    bb = load_grid(CONFIGS / "backbones.yaml")
    assert [bb.variant_config(v.name).model.dino_model for v in bb.variants] == [
        "mae_vitl16", "dinov2_vitl14", "dinov3_vits16plus", "dinov3_vitb16", "dinov3_vitl16"]
    for name, center in (("gamma", 0.5), ("xi", 0.85)):
        g = load_grid(CONFIGS / f"{name}.yaml")
        other = "xi" if name == "gamma" else "gamma"
        assert g.reference == "default" and g.swept_params == [name]
        values = [g.variant_config(v.name).flat()[name] for v in g.variants]
        assert values == sorted(values) and center in values  # one-at-a-time, ordered, center included
        assert {g.variant_config(v.name).flat()[other] for v in g.variants} == {0.85 if name == "gamma" else 0.5}
        assert g.variant("default").coords == {name: center}


def test_paper_grids_run_the_paper_setup_with_clip_336():
    """Every paper-scale grid starts from configs/paper.yaml: OpenAI's CLIP ViT-L/14-336 on the 37 x 37
    grid (518 px; the 24 x 24 positions resized), DINOv3 ViT-L/16, 15 epochs, the paper protocol."""
    from ssvp.config import load_config

    paper = load_config(CONFIGS.parent.parent / "configs" / "paper.yaml")
    assert (paper.model.clip_model, paper.model.clip_pretrained, paper.model.grid) == ("ViT-L-14-336", "openai", 37)
    for path in sorted(CONFIGS.glob("*.yaml")):
        if path.stem == "quick":
            continue
        base = load_grid(path).base_config()
        assert base.model == paper.model or path.stem == "backbones", path.stem
        assert (base.model.clip_model, base.model.grid, base.train.epochs, base.train.protocol) == (
            "ViT-L-14-336", 37, 15, "paper"), path.stem


def test_quick_grid_is_small():
    grid = load_grid(CONFIGS / "quick.yaml")
    base = grid.base_config()
    assert base.model.clip_model == "tiny" and base.train.epochs <= 2 and base.data.max_per_class <= 8
    assert grid.seeds == 2 and grid.resources["gpu"] == 0
    assert base.data.source.startswith("synthetic:")


def test_expansion_variants_times_seeds():
    grid = parse_grid({
        "name": "g", "base": {"preset": "tiny"}, "seeds": 3, "seed_base": 10,
        "variants": [{"name": "a", "overrides": {"gamma": 0.2}}, {"name": "full", "overrides": {}}],
    })
    trials = grid.trials()
    assert [(t.variant, t.seed) for t in trials] == [
        ("a", 10), ("a", 11), ("a", 12), ("full", 10), ("full", 11), ("full", 12)]
    assert trials[0].overrides == {"gamma": 0.2, "seed": 10} and trials[0].trial_id == "a__seed10"
    assert len(grid.trials(seeds=1)) == 2 and grid.reference == "full"
    with pytest.raises(GridError, match="seeds must be an integer >= 1"):
        grid.trials(seeds=0)


def test_two_sweeps_share_one_center_point():
    grid = parse_grid({"name": "s", "base": {"preset": "tiny", "gamma": 0.5, "xi": 0.85},
                       "sweeps": [{"param": "gamma", "values": [0.3, 0.5, 0.7]},
                                  {"param": "model.xi", "values": [0.8, 0.85, 0.9]}]})
    assert grid.variant_names == ["gamma=0.3", "default", "gamma=0.7", "xi=0.8", "xi=0.9"]
    assert grid.variant("xi=0.9").overrides == {"xi": 0.9}
    assert grid.variant_config("gamma=0.7").model.xi == 0.85  # one at a time
    assert grid.swept_params == ["gamma", "xi"] and grid.reference == "default"


@pytest.mark.parametrize("data, match", [
    ({"name": "g", "variants": [{"name": "a", "overrides": {"gama": 0.2}}]}, r"variants\[0\] \(a\).*unknown config key 'gama'"),
    ({"name": "g", "variants": [{"name": "a", "overrides": {"gamma": 1.5}}]}, r"variant 'a'.*model.gamma must be <= 1"),
    ({"name": "g", "variants": [{"name": "a", "overrides": {"seed": 3}}]}, r"'seed' is set per trial"),
    ({"name": "g", "variants": [{"name": "a"}, {"name": "a"}]}, r"duplicate variant name\(s\) a"),
    ({"name": "g", "variants": [{"name": "a", "overides": {}}]}, r"variants\[0\]: unknown key\(s\) overides"),
    ({"name": "g", "variants": [{"name": "a"}], "reference": "b"}, r"no variant named 'b'"),
    ({"name": "g", "variants": [{"name": "a"}], "seeds": 0}, r"'seeds' must be an integer >= 1"),
    ({"name": "g", "variants": [{"name": "a"}], "resources": {"tpu": 1}}, r"resources: unknown key\(s\) tpu"),
    ({"name": "g", "variants": [{"name": "a"}], "colour": 1}, r"unknown key\(s\) colour"),
    ({"name": "g"}, r"needs at least one entry under 'variants' or 'sweeps'"),
    ({"name": "g", "sweeps": [{"param": "fusion", "values": ["atf"]}]}, r"not numeric"),
    ({"name": "g", "sweeps": [{"param": "gamma", "values": [0.1, 0.1]}]}, r"duplicates"),
    ({"name": "g", "base": {"preset": "huge"}, "variants": [{"name": "a"}]}, r"base.preset must be tiny or paper"),
    ({"name": "g", "base": {"epochs": 0}, "variants": [{"name": "a"}]}, r"base: .*train.epochs must be an integer >= 1"),
])
def test_bad_grids_name_file_and_field(data, match, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(GridError, match=match) as info:
        load_grid(path)
    assert str(path) in str(info.value)


def test_missing_or_unparsable_file(tmp_path):
    with pytest.raises(GridError, match="does not exist"):
        load_grid(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(GridError, match="cannot parse grid file"):
        load_grid(bad)


def _script_env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(HF_HUB_OFFLINE="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    return env


def test_launcher_runs_as_a_script_from_the_repo_root():
    """What `ray job submit -- python ablations/grid.py ...` executes: no package install needed."""
    out = subprocess.run(
        [sys.executable, "ablations/grid.py", "--grid", "ablations/configs/table3.yaml", "--seeds", "2", "--dry-run",
         "--set", "source=visa:/data/VisA", "--set", "targets=mvtec:/data/mvtec,btad:/data/btad"],
        cwd=REPO, env=_script_env(), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "5 variants x 2 seeds = 10 trials" in out.stdout
    assert "A: baseline" in out.stdout and "E: full" in out.stdout
    assert "source=visa:/data/VisA targets=['mvtec:/data/mvtec', 'btad:/data/btad']" in out.stdout
    bad = subprocess.run([sys.executable, "ablations/grid.py", "--grid", "quick", "--set", "gama=1", "--dry-run"],
                         cwd=REPO, env=_script_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown config key 'gama'" in bad.stderr


def test_records_from_a_runner_summary():
    from ablations.grid import records_from_summary
    from tuning.runner import ResultSummary, TrialSummary
    from tuning.trial import target_metric_name
    from ssvp.config import Config

    cfg = Config.tiny(targets=["synthetic:/x/domain_b"])
    metrics = {target_metric_name("synthetic:/x/domain_b", k): 0.5 for k in
               ("image_auroc", "image_f1max", "image_ap", "pixel_auroc", "pixel_aupro", "pixel_ap")}
    summary = ResultSummary(
        name="g", experiment_path="/nonexistent/g", tracking_uri="sqlite:////tmp/x.db", experiment="e",
        experiment_id="1", parent_run_id="p", metric="val_objective", mode="max",
        trials=[
            TrialSummary("t0", "FINISHED", {"seed": 0, "variant": "full"}, "full", {**metrics, "best_val_objective": 0.7}),
            TrialSummary("t1", "FAILED", {"seed": 1, "variant": "full"}, "full", {}, error="BackboneWeightsError: no"),
            TrialSummary("t2", "KILLED", {"seed": 0, "variant": "a"}, "a", {}),
            TrialSummary("t3", "FINISHED", {"seed": 1, "variant": "a"}, "a", {"best_val_objective": 0.7}),
        ],
    )
    recs = {(r["variant"], r["seed"]): r for r in records_from_summary(summary, cfg)}
    assert set(recs) == {("full", 0), ("full", 1), ("a", 1)}  # the interrupted trial is missing, not failed
    ok = recs[("full", 0)]
    assert ok["status"] == "ok" and ok["metrics"] == {"synthetic:/x/domain_b": {"mean": {
        k: 0.5 for k in ("image_auroc", "image_f1max", "image_ap", "pixel_auroc", "pixel_aupro", "pixel_ap")}}}
    assert recs[("full", 1)]["status"] == "failed" and "BackboneWeightsError" in recs[("full", 1)]["error"]
    assert recs[("a", 1)]["status"] == "failed" and "without target metrics" in recs[("a", 1)]["error"]
