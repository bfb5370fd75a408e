"""What a sweep shows without running one: run names, metric names, console lines, results order.

(The end-to-end checks of the same things on a real Ray sweep, MLflow store and Optuna study
are in tests/test_tuning_ray.py::test_optuna_sweep_is_recorded_in_mlflow.)
"""
from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from tuning.console import SweepConsole
from tuning.results import ResultSummary, TrialSummary
from tuning.settings import SweepConfig, SweepConfigError
from tuning.tracking import mlflow_metric_name, trial_number, trial_run_name


def test_metric_names_are_namespaced_one_per_quantity():
    assert mlflow_metric_name("train_loss") == "train/loss"
    assert mlflow_metric_name("train_focal") == "train/focal"
    assert mlflow_metric_name("val_objective") == "val/objective"
    assert mlflow_metric_name("val_image_auroc") == "val/image_auroc"
    assert mlflow_metric_name("lr_prompt") == "lr/prompt"  # never the name of the lr_prompt parameter
    assert mlflow_metric_name("target/domain_b/image_auroc") == "target/domain_b/image_auroc"


def test_run_names_read_as_the_paper_writes_the_values():
    trial = SimpleNamespace(experiment_tag="4_gamma=0.94,xi=0.73")
    assert trial_number(trial, offset=1) == 3  # Optuna's counter starts at 1, its trial numbers at 0
    assert trial_number(SimpleNamespace(experiment_tag="0_variant=full")) == 0
    assert trial_number(SimpleNamespace(experiment_tag="")) is None
    name = trial_run_name(3, "abc", {"gamma": 0.9412, "xi": 0.7311, "beta": 0.0123, "tau": 0.07})
    assert name == "t03 γ=0.941 ξ=0.731 β=0.0123"
    assert trial_run_name(1, "abc", {"seed": 1, "variant": "full"}, "full", "E/full") == "E/full seed=1"
    assert trial_run_name(None, "abc1234", {"gamma": 0.5}) == "abc1234 γ=0.5"


def _trial(tid: str, tag: str, config: dict, status: str = "TERMINATED"):
    return SimpleNamespace(trial_id=tid, experiment_tag=tag, config=config, status=status)


def test_console_prints_one_line_per_trial_with_the_best_epoch():
    out = io.StringIO()
    con = SweepConsole("val_objective", "max", total=3, epochs=3, number_offset=1, stream=out)
    a, b, c = (_trial("a", "1_x", {"gamma": 0.5}), _trial("b", "2_x", {"gamma": 0.25}),
               _trial("c", "3_x", {"gamma": 0.75}, status="RUNNING"))
    for epoch, value in ((1, 0.6), (2, 0.8), (3, 0.7)):  # best epoch 2, not the last
        con.on_trial_result(0, [a, b, c], a, {"val_objective": value, "epoch": epoch})
    con.on_trial_complete(0, [a, b, c], a)
    con.on_trial_result(0, [a, b, c], b, {"val_objective": 0.5, "epoch": 1})
    con.on_trial_complete(0, [a, b, c], b)  # stopped by ASHA after epoch 1
    con.on_trial_complete(0, [a, b, c], b)  # reported twice: printed once
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[1/3] t00 γ=0.5  best_val_objective 0.8000 @ epoch 2/3")
    assert lines[0].endswith("| best t00 0.8000 @ 2 | 1 running")
    assert "best_val_objective 0.5000 @ epoch 1/3  stopped early (ASHA)" in lines[1]
    assert "best t00 0.8000 @ 2" in lines[1]


def test_console_names_the_variant_of_a_grid_cell():
    out = io.StringIO()
    con = SweepConsole("val_objective", "max", total=2, epochs=1, stream=out, variant_labels={"full": "E/full"})
    a, b = _trial("a", "0_seed=1,variant=full", {"seed": 1, "variant": "full"}), _trial("b", "1_x", {"seed": 0, "variant": "x"})
    for t in (a, b):
        con.on_trial_result(0, [a, b], t, {"val_objective": 0.5, "epoch": 1})
        con.on_trial_complete(0, [a, b], t)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[1/2] t00 E/full seed=1  best_val_objective 0.5000 @ epoch 1/1")
    assert lines[1].startswith("[2/2] t01 x seed=0  best_val_objective")  # no label: the variant's name


def _summary(objectives: list) -> ResultSummary:
    trials = [TrialSummary(f"id{i}", "FINISHED", {"gamma": 0.1 * i}, metrics={"best_val_objective": v, "best_epoch": 2.0,
                                                                               "final_val_objective": 0.1}
                           if v is not None else {}, objective=v, number=i)
              for i, v in enumerate(objectives)]
    return ResultSummary("s", "/x", "sqlite:////x.db", "e", "1", "p", "val_objective", "max", trials=trials,
                         optuna_storage="sqlite:////x/optuna.db")


def test_results_table_is_best_first_with_the_objective_in_front():
    s = _summary([0.5, None, 0.9, 0.7])
    rows = s.rows(full=False)
    assert [r["trial"] for r in rows] == ["t02", "t03", "t00", "t01"]
    assert list(rows[0])[:4] == ["trial", "best_val_objective", "best_epoch", "status"]
    assert "final_val_objective" not in rows[0] and "run_id" not in rows[0]
    assert {"final_val_objective", "run_id", "trial_id"} <= set(s.rows()[0])  # results.csv keeps them
    s.best = s.trials[2]
    text = s.format()
    assert "best trial t02 (id2): val_objective = 0.9000 @ epoch 2" in text
    assert "optuna-dashboard sqlite:////x/optuna.db" in text


def test_refit_setting_is_validated():
    assert SweepConfig().refit is True
    with pytest.raises(SweepConfigError, match="refit"):
        SweepConfig(refit="yes").validate()
