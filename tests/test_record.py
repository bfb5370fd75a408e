"""The record a researcher opens, without Ray: launch records, links, tables, MLflow's own printing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_launch_record_names_the_launch_folder_and_the_config_as_named(tmp_path, monkeypatch):
    """Under `ray job submit` the process runs in Ray's copy of the repository: launch.json says where
    the user launched from (SSVP_LAUNCH_DIR) and the config as they named it, not the copy."""
    sys.path.insert(0, str(REPO / "tuning"))
    try:
        import sweep as sweep_cli
    finally:
        sys.path.remove(str(REPO / "tuning"))
    from tuning.settings import SweepConfig

    copy = tmp_path / "_ray_pkg_abc"  # the job's working-directory copy
    (copy / "tuning" / "configs").mkdir(parents=True)
    (copy / "tuning" / "configs" / "quick.yaml").write_text("name: quick\n")
    launch = tmp_path / "home"
    launch.mkdir()
    monkeypatch.chdir(copy)
    monkeypatch.setenv("SSVP_LAUNCH_DIR", str(launch))
    sweep = SweepConfig(name="s1", storage_path=str(tmp_path / "ray"),
                        source_file=str(REPO / "tuning" / "configs" / "quick.yaml"))
    sweep_cli._remember_launch(sweep, ["--config", "tuning/configs/quick.yaml"])
    record = json.loads((tmp_path / "ray" / "s1" / "launch.json").read_text())
    assert record["cwd"] == str(launch) and record["config_file"] == "tuning/configs/quick.yaml"


def test_run_url_opens_the_model_training_view_without_credentials():
    from tuning.results import run_url

    assert run_url("sqlite:////x/mlflow.db", "3", "abc") == (
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert run_url("https://admin:secret@mlflow.lab:8443/", "3", "abc") == (
        "https://mlflow.lab:8443/#/experiments/3/runs/abc?workflowType=machine_learning")


def test_summary_prints_target_metrics_as_a_table_and_the_parent_link():
    from tuning.results import ResultSummary

    s = ResultSummary(name="s", experiment_path="/x", tracking_uri="http://u:pw@mlflow:5000", experiment="e",
                      experiment_id="7", parent_run_id="p1", metric="val_objective", mode="max",
                      target_metrics={"target/mvtec/image_auroc": 0.91, "target/mvtec/pixel_auroc": 0.8,
                                      "target/visa/image_auroc": 0.7, "target/visa/pixel_auroc": 0.6},
                      target_run_id="t1", refit_checkpoint="/c", model_uri="models:/m-1",
                      registered_model="models:/heads/2")
    lines = s.format().splitlines()
    i = lines.index("target evaluation of the refit model (run t1):")
    assert lines[i + 1].split() == ["dataset", "image_auroc", "pixel_auroc"]
    assert lines[i + 2].split() == ["mvtec", "0.9100", "0.8000"] and lines[i + 3].split() == ["visa", "0.7000", "0.6000"]
    assert "view: http://mlflow:5000/#/experiments/7/runs/p1?workflowType=machine_learning" in lines
    assert any(ln.startswith("refit model: models:/heads/2") for ln in lines)
    assert "pw" not in s.format()


def test_the_project_silences_mlflows_own_run_links():
    """MLflow prints a "View run … at <URL>" line per run it ends on a server; importing tuning stops that."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"}
    code = "import tuning, os; print(os.environ['MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "true"


def test_per_class_target_report_rows():
    from tuning.tracking import target_rows

    report = {"synthetic:/d/domain_b": {"mean": {"image_auroc": 0.75}, "per_class": {
        "a": {"image_auroc": 0.5}, "b": {"image_auroc": 1.0}}}}
    assert target_rows(report) == [{"dataset": "domain_b", "class": "a", "image_auroc": 0.5},
                                   {"dataset": "domain_b", "class": "b", "image_auroc": 1.0},
                                   {"dataset": "domain_b", "class": "mean", "image_auroc": 0.75}]


def test_ui_check_fails_on_an_empty_chart_section_or_a_missing_run_name():
    """bench/mlflow_ui_screenshot.py's check of the rendered pages can fail (it printed ok on an empty chart view)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ui_check", REPO / "bench" / "mlflow_ui_screenshot.py")
    ui = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ui)
    names = {"runs_table": ["t00 γ=0.5", "refit best=t00"]}
    sections = {"best_trial_metrics": ("train", "val", "lr"), "chart_view": ("train", "val", "lr")}
    good = {"runs_table": "Run Name\nt00 γ=0.5\nrefit best=t00", "best_trial_metrics": "train (8)\nval (7)\nlr (1)",
            "chart_view": "train (8)\nval (7)\nlr (1)\nval/objective\ntrain/loss"}
    assert ui.check_pages(good, names, sections) == []
    assert ui.check_pages({**good, "runs_table": "Run Name\nt00 γ=0.5"}, names, sections) == [
        "run name 'refit best=t00' not on the runs_table page"]
    assert ui.check_pages({**good, "best_trial_metrics": "train (8)\nval (0)\nlr (1)"}, names, sections) == [
        "the 'val' chart section on the best_trial_metrics page is empty"]
    # what MLflow 3.17 drew for a sweep's chart view: sections without charts
    empty_view = "lr (0)\nNo charts in this section\ntrain (0)\nNo charts in this section\nval (0)"
    assert ui.check_pages({**good, "chart_view": empty_view}, names, sections) == [
        "the 'train' chart section on the chart_view page is empty", "the 'val' chart section on the chart_view page is empty",
        "the 'lr' chart section on the chart_view page is empty", "chart_view page shows 'No charts in this section'"]
    # a section per dataset, as the UI groups target/<dataset>/<metric>
    target = {"target_eval_run": ("target",)}
    assert ui.check_pages({**good, "target_eval_run": "target/domain_b (9)"}, names, {**sections, **target}) == []
    # a page whose sections hold charts, with MLflow's own default section left empty: a note, not a failure
    leftover = "target/domain_b (9)\nModel metrics (0)\nNo charts in this section"
    assert ui.check_pages({**good, "target_eval_run": leftover}, names, {**sections, **target}) == []
    assert ui.empty_sections(leftover) == ["Model metrics"]
    assert ui.check_pages({**good, "target_eval_run": "target/domain_b (0)"}, names, {**sections, **target}) == [
        "the 'target' chart section on the target_eval_run page is empty"]
