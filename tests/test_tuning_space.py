"""Fast tests of the tuning layer that need no Ray session: spaces, sweep files, devices, reports."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from ssvp.config import Config
from tuning.space import SpaceError, parse_space
from tuning.trial import (
    flatten_target_report,
    gpu_index_for_worker,
    resolve_trial_config,
    select_device,
    target_metric_name,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- space validation
@pytest.mark.parametrize(
    "space, key, fragment",
    [
        ({"gama": {"type": "uniform", "low": 0, "high": 1}}, "gama", "not a model/train/data config key; did you mean gamma"),
        ({"gamma": {"type": "uniform", "low": 0.9, "high": 0.1}}, "gamma", "low (0.9) > high (0.1)"),
        ({"beta": {"type": "loguniform", "low": 0.0, "high": 0.1}}, "beta", "log scale needs low > 0"),
        ({"lambda2": {"type": "loguniform", "low": -1.0, "high": 1.0}}, "lambda2", "log scale needs low > 0"),
        ({"gamma": {"type": "uniform", "low": 0.0, "high": 1.5}}, "gamma", "high=1.5"),
        ({"fusion": {"type": "choice", "values": ["atf", "bogus"]}}, "fusion", "values[1]='bogus'"),
        ({"gamma": {"type": "normal", "low": 0, "high": 1}}, "gamma", "type must be one of"),
        ({"gamma": {"type": "uniform", "low": 0}}, "gamma", "needs 'high'"),
        ({"gamma": {"type": "int", "low": 0, "high": 1}}, "gamma", "non-integer config key"),
        ({"epochs": {"type": "uniform", "low": 1, "high": 3}}, "epochs", "integer config key"),
        ({"n_prompts": {"type": "int", "low": 0, "high": 3}}, "n_prompts", "low=0"),
        ({"lr_head": {"type": "loguniform", "low": 1e-5, "hihg": 1e-3}}, "lr_head", "unknown field"),
        ({"train.gamma": {"type": "uniform", "low": 0, "high": 1}}, "train.gamma", "belongs to section 'model'"),
        ({"tau": {"type": "choice", "values": []}}, "tau", "non-empty list"),
    ],
)
def test_bad_space_is_rejected_naming_the_key(space, key, fragment):
    with pytest.raises(SpaceError) as info:
        parse_space(space, Config.tiny())
    message = str(info.value)
    assert repr(key) in message, message
    assert fragment in message, message


def test_config_bounds_come_from_ssvp_config():
    # xi is bounded [-1, 1] by ssvp.config; tau must stay > 0
    with pytest.raises(SpaceError, match=r"'xi'.*high=1.2.*<= 1.0"):
        parse_space({"xi": {"type": "uniform", "low": 0.5, "high": 1.2}}, Config.tiny())
    with pytest.raises(SpaceError, match=r"'tau'.*low=0.0"):
        parse_space({"tau": {"type": "uniform", "low": 0.0, "high": 0.2}}, Config.tiny())


def test_valid_space_parses_and_splits_fixed_and_searched():
    space = parse_space(
        {
            "model.gamma": {"type": "uniform", "low": 0.0, "high": 1.0},
            "beta": {"type": "loguniform", "low": "1e-3", "high": 0.1},  # YAML string number
            "n_prompts": {"type": "int", "low": 2, "high": 4},
            "fusion": {"type": "choice", "values": ["atf", "concat"]},
            "epochs": 2,
            "clip_layers": [1, 2, 3, 4],
            "seed": {"type": "grid", "values": [0, 1]},
        },
        Config.tiny(),
    )
    assert set(space.searched) == {"gamma", "beta", "n_prompts", "fusion", "seed"}
    assert space.fixed == {"epochs": 2, "clip_layers": [1, 2, 3, 4]}
    assert space.params["beta"].low == pytest.approx(1e-3)
    assert space.has_grid
    with pytest.raises(SpaceError, match="'seed'.*grid"):
        space.check_for("optuna")
    space.check_for("grid")


def test_tune_domains_match_specs():
    from ray import tune  # only the domain classes; no Ray session

    space = parse_space(
        {
            "gamma": {"type": "uniform", "low": 0.2, "high": 0.8},
            "lr_prompt": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
            "n_prompts": {"type": "int", "low": 2, "high": 4},
            "fusion": {"type": "choice", "values": ["atf", "concat"]},
        },
        Config.tiny(),
    )
    dom = space.to_tune()
    assert isinstance(dom["gamma"], tune.search.sample.Float)
    assert (dom["gamma"].lower, dom["gamma"].upper) == (0.2, 0.8)
    assert isinstance(dom["lr_prompt"].get_sampler(), tune.search.sample.LogUniform)
    # inclusive YAML bounds -> Tune's exclusive upper bound
    assert (dom["n_prompts"].lower, dom["n_prompts"].upper) == (2, 5)
    samples = {dom["n_prompts"].sample() for _ in range(200)}
    assert samples == {2, 3, 4}
    assert dom["fusion"].categories == ["atf", "concat"]


def test_paper_default_point_is_clipped_into_the_space():
    space = parse_space(
        {
            "gamma": {"type": "uniform", "low": 0.6, "high": 0.9},  # paper 0.5 -> clipped to 0.6
            "xi": {"type": "uniform", "low": 0.5, "high": 0.95},  # paper 0.85 kept
            "n_prompts": {"type": "int", "low": 4, "high": 6},  # paper 3 -> 4
            "seed": {"type": "grid", "values": [0, 1]},  # grids are not part of the point
        },
        Config.tiny(),
    )
    assert space.default_point() == {"gamma": 0.6, "xi": 0.85, "n_prompts": 4}


# --------------------------------------------------------------------------- sweep files
@pytest.mark.parametrize("name", ["quick", "paper"])
def test_shipped_sweep_configs_validate(name, tmp_path, monkeypatch):
    import yaml

    from tuning.settings import load_sweep

    path = REPO / "tuning" / "configs" / f"{name}.yaml"
    if name == "quick":
        # the quick config generates the synthetic data on the fly: point it at a temp dir
        raw = yaml.safe_load(path.read_text())
        raw["base"]["synthetic"] = {"root": str(tmp_path / "synthetic"), "seed": 0, "n_train": 2, "n_test": 3}
        path = tmp_path / "quick.yaml"
        path.write_text(yaml.safe_dump(raw))
    sweep = load_sweep(path, base_dir=tmp_path)
    base = sweep.base
    space = sweep.validate()
    assert {"gamma", "xi", "beta", "lambda1", "lambda2", "focal_lambda", "tau", "lr_prompt", "lr_head"} <= set(space.searched)
    assert sweep.search.metric == "val_objective" and sweep.search.mode == "max"
    assert sweep.search.scheduler == "asha" and sweep.search.algorithm == "optuna"
    # --print-config: the object round-trips through YAML with every section
    printed = yaml.safe_load(sweep.to_yaml())
    assert {"base", "space", "search", "resources", "mlflow", "storage_path", "target_eval"} <= set(printed)
    assert printed["base"]["model"]["clip_model"] == base.model.clip_model
    if name == "quick":
        assert base.model.clip_model == "tiny"
        assert base.data.source == f"synthetic:{tmp_path / 'synthetic' / 'domain_a'}"
        assert (tmp_path / "synthetic" / "domain_b" / "meta.json").is_file()
    else:
        assert base.model.clip_model == "ViT-L-14-336" and base.model.dino_model == "dinov3_vitl16"  # configs/paper.yaml
        assert base.data.source.startswith("visa:") and base.data.targets[0].startswith("mvtec:")
        assert sweep.resources.use_gpu is True and sweep.resources.workers_per_trial == 1


@pytest.mark.parametrize("text, error, match", [
    ("search: {algorithm: optuna, num_sample: 3}", "config",
     r"bad.yaml: search: unknown key\(s\) num_sample; did you mean num_samples\?$"),
    ("spaces: {}", "config", r"unknown key\(s\) spaces; did you mean space\?$"),
    ("resources: {use_gpus: true, cpus_per_workr: 2}", "config", r"resources: unknown key\(s\) cpus_per_workr, "
     r"use_gpus; did you mean cpus_per_worker for cpus_per_workr, use_gpu for use_gpus\?$"),
    ("resources: {tpu: 1}", "config", r"resources: unknown key\(s\) tpu; known: cpus_per_worker, extra, "),  # none close
    # values are checked once, at load, naming the file and the section
    ("search: {algorithm: random}", "config", r"bad.yaml: search: algorithm must be 'optuna' or 'grid'"),
    ("target_eval: some", "config", r"bad.yaml: target_eval: must be best, all or none"),
    ("search: {points_to_evaluate: [{gamma: 0.5}]}", "space", r"points_to_evaluate\[0\] key 'gamma' is not a searched key"),
])
def test_sweep_config_errors_name_file_and_key(tmp_path, text, error, match):
    from tuning.settings import SweepConfigError, load_sweep

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: x\n{text}\n")
    with pytest.raises(SweepConfigError if error == "config" else SpaceError, match=match):
        load_sweep(bad)


# --------------------------------------------------------------------------- devices
def test_select_device_maps_each_worker_to_its_own_gpu():
    # two workers on one node, each holding one GPU; Ray Train shares CUDA_VISIBLE_DEVICES
    assert select_device(0, True, 2, gpu_ids=["0"], cuda_visible_devices="0,1") == "cuda:0"
    assert select_device(1, True, 2, gpu_ids=["1"], cuda_visible_devices="0,1") == "cuda:1"
    # the node's GPUs 2 and 3: physical id 3 is ordinal 1 inside the visible list
    assert select_device(1, True, 2, gpu_ids=["3"], cuda_visible_devices="2,3") == "cuda:1"
    # no Ray information: local rank is the ordinal
    assert select_device(3, True, 4) == "cuda:3"
    assert gpu_index_for_worker(1, None, None) == 1
    # CPU trials, or no CUDA device visible in the worker
    assert select_device(1, False, 2, gpu_ids=["1"], cuda_visible_devices="0,1") == "cpu"
    assert select_device(0, True, 0, gpu_ids=["0"], cuda_visible_devices="0") == "cpu"


# --------------------------------------------------------------------------- trial config and metrics
def test_resolve_trial_config_applies_variant_then_params():
    base = Config.tiny().to_dict()
    variants = {"A": {"fusion": "none", "vcpg": False}, "C": {}}
    cfg, variant = resolve_trial_config(base, {"variant": "A", "gamma": 0.25}, variants)
    assert variant == "A" and cfg.model.fusion == "none" and cfg.model.vcpg is False
    assert cfg.model.gamma == 0.25
    with pytest.raises(ValueError, match="unknown variant 'Z'"):
        resolve_trial_config(base, {"variant": "Z"}, variants)


def test_flatten_target_report_names_and_means():
    report = {
        "synthetic:/data/synth/domain_b": {"mean": {"image_auroc": 0.8, "pixel_auroc": 0.6}, "per_class": {}},
        "mvtec:/data/mvtec_anomaly_detection/": {"mean": {"image_auroc": 0.6, "pixel_auroc": float("nan")}},
    }
    flat = flatten_target_report(report)
    assert flat["target/domain_b/image_auroc"] == pytest.approx(0.8)
    assert flat["target/mvtec_anomaly_detection/image_auroc"] == pytest.approx(0.6)
    assert flat["target/mean/image_auroc"] == pytest.approx(0.7)
    assert flat["target/mean/pixel_auroc"] == pytest.approx(0.6)  # NaN left out of the mean
    assert target_metric_name("visa:data/VisA", "pixel_aupro") == "target/VisA/pixel_aupro"


# --------------------------------------------------------------------------- tracking helpers
def test_tracking_uri_is_made_absolute(tmp_path):
    from tuning.tracking import default_tracking_uri, normalize_tracking_uri

    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db"
    assert normalize_tracking_uri("sqlite:///runs/x.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/runs/x.db"
    assert normalize_tracking_uri("runs/y.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/runs/y.db"
    assert normalize_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    with pytest.raises(ValueError, match="file store"):
        normalize_tracking_uri("file:///tmp/mlruns")


def test_error_summary_finds_the_engine_error_inside_ray_wrappers():
    from tuning.tracking import error_summary

    trace = (
        "Traceback (most recent call last):\n"
        "ray.train.v2.api.exceptions.TrainingFailedError: Training failed due to worker errors:\n"
        "  File \"engine.py\", line 1, in fit\n"
        "ssvp.data.base.DatasetError: cannot read image /x/fabric/train/good/000.png: UnidentifiedImageError: bad\n"
        "ray.exceptions.RayTaskError(TrainingFailedError): wrapped\n"
    )
    assert error_summary(trace).startswith("ssvp.data.base.DatasetError: cannot read image /x/fabric")
    assert error_summary(None) == "unknown error"


# --------------------------------------------------------------------------- reports
def test_results_table_and_importance(tmp_path):
    from tuning.report import param_importance, plot_importance, plot_objective, write_table

    rows = [{"trial_id": "a", "gamma": 0.1, "best_val_objective": 0.5}, {"trial_id": "b", "gamma": 0.9, "error": "x"}]
    cols = write_table(rows, tmp_path / "r.csv", tmp_path / "r.md")
    assert cols == ["trial_id", "gamma", "best_val_objective", "error"]
    with (tmp_path / "r.csv").open() as fh:
        got = list(csv.DictReader(fh))
    assert got[1] == {"trial_id": "b", "gamma": "0.9", "best_val_objective": "", "error": "x"}
    assert (tmp_path / "r.md").read_text().splitlines()[2] == "| a | 0.1 | 0.5 |  |"

    space = parse_space(
        {"gamma": {"type": "uniform", "low": 0, "high": 1}, "xi": {"type": "uniform", "low": 0, "high": 1}},
        Config.tiny(),
    )
    # Optuna's own evaluator (PED-ANOVA, what optuna-dashboard shows), on the trials with a value
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    params = [{"gamma": g, "xi": 0.5 + 0.01 * i} for i, g in enumerate((0.1, 0.3, 0.5, 0.7, 0.2, 0.9))]
    values = [3 * p["gamma"] + 0.01 * p["xi"] for p in params]
    got = param_importance(params + [{"gamma": 0.4, "xi": 0.1}], values + [None], space.params)
    assert got["method"] == "optuna-ped-anova" and got["n_trials"] == 6 and got["indicative"]
    assert "indicative" in got["note"] and math.isclose(sum(got["importance"].values()), 1.0, rel_tol=1e-6)
    assert got["importance"]["gamma"] > got["importance"]["xi"]
    # on a real study it is what the dashboard computes for the same study
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: 3 * t.suggest_float("gamma", 0, 1) + 0.1 * t.suggest_float("xi", 0, 1), n_trials=25)
    on_study = param_importance([], [], space.params, study=study)
    assert not on_study["indicative"] and on_study["n_trials"] == 25
    assert on_study["importance"] == pytest.approx(get_param_importances(study, evaluator=PedAnovaImportanceEvaluator()))
    # too few trials: none, and said so
    few = param_importance(params[:1], values[:1], space.params)
    assert few["importance"] == {} and few["n_trials"] == 1 and "no importance" in few["note"]
    imp5, method5 = got["importance"], got["method"]
    assert plot_objective([0.2, None, 0.7], ["a", "b", "c"], "val_objective", "max", tmp_path / "o.png").stat().st_size > 1000
    assert plot_importance(imp5, method5, tmp_path / "i.png").stat().st_size > 1000
