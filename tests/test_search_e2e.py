"""Slow tier: a two-objective sweep whose trials each train two class folds (tiny preset, Ray, MLflow,
Optuna), the front and the knee refit recorded, a resume that rebuilds the front, and a refit of another
point of the finished sweep without searching again."""
from __future__ import annotations

import contextlib
import io
import re

import pytest

from conftest import local_ray, synthetic_config

pytestmark = pytest.mark.slow
OBJECTIVES = ["val_image_auroc", "val_pixel_aupro"]


@pytest.fixture(scope="module")
def ray_session():
    yield from local_ray(num_cpus=2)


@pytest.fixture(scope="module")
def finished(ray_session, synthetic_root, tmp_path_factory):
    from tuning.runner import run_trials
    from tuning.settings import MlflowSettings, ResourceSettings, SearchSettings, SweepConfig

    tmp = tmp_path_factory.mktemp("mo")
    base = synthetic_config(synthetic_root, epochs=2, max_steps_per_epoch=1, max_per_class=2, batch_size=4,
                            eval_batch_size=16, progress=False)
    sweep = SweepConfig(
        name="mo2", base=base, space={"gamma": {"type": "uniform", "low": 0.0, "high": 1.0}},
        search=SearchSettings(num_samples=3, seed=0, objectives=["val/image_auroc", "val/pixel_aupro"],
                              modes=["max", "max"], scheduler=None, class_folds=2, max_concurrent_trials=2),
        resources=ResourceSettings(use_gpu=False, cpus_per_worker=0.5, reuse_processes=True),
        mlflow=MlflowSettings(tracking_uri=f"sqlite:///{tmp}/mlflow.db", experiment="mo"),
        storage_path=str(tmp / "ray"), verbose=1, target_eval="none",
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the console lines (module scope: no capsys)
        summary = run_trials(sweep)
    return sweep, summary, tmp, out.getvalue()


def test_two_objectives_two_folds_front_resume_and_refit_only(finished):
    import json

    import optuna
    from mlflow import MlflowClient

    sweep, summary, tmp, console = finished
    assert not summary.errors and len(summary.trials) == 3
    lines = [ln for ln in console.splitlines() if re.match(r"^\[\d/3\] t\d\d ", ln)]
    assert len(lines) == 3 and all(re.search(r"\[fold0 \d\.\d{4} fold1 \d\.\d{4} ±\d\.\d{4}\]", ln) for ln in lines)
    assert "Pareto front over val_image_auroc, val_pixel_aupro" in summary.format()
    client = MlflowClient(tracking_uri=sweep.mlflow.tracking_uri)
    folds = sweep.fold_classes()
    assert len(folds) == 2 and sorted(sum(folds, [])) == ["bottle_cap", "fabric", "pill", "tile", "wood"]

    # folds: per-fold values each epoch, the objective is their mean, the same folds in every trial
    for t in summary.trials:
        run = client.get_run(t.run_id)
        for key in OBJECTIVES + ["val_objective"]:
            name = key.replace("_", "/", 1)
            f0, f1, mean = (client.get_metric_history(t.run_id, f"{name}{sfx}") for sfx in ("_fold0", "_fold1", ""))
            assert len(f0) == len(f1) == len(mean) == 2
            for a, b, m in zip(*(sorted(h, key=lambda x: x.step) for h in (f0, f1, mean))):
                assert m.value == pytest.approx((a.value + b.value) / 2)
            assert client.get_metric_history(t.run_id, f"{name}_std")
        ckpt = run.data.tags["checkpoint_path"]
        history = json.loads(open(f"{ckpt}/history.json").read())
        assert history["replicas"] == ["fold0", "fold1"]
        cfgs = [json.loads(open(f"{ckpt}/{d}/config.json").read()) for d in ("last", "replica_1/last")]
        assert [c["data"]["val_classes"] for c in cfgs] == folds

    # the front: recorded on the parent (table, plot), its trials tagged, the knee refit
    assert summary.objectives == OBJECTIVES and summary.front
    parent = client.get_run(summary.parent_run_id)
    files = {a.path for a in client.list_artifacts(summary.parent_run_id)}
    assert {"pareto_front.md", "pareto_front.png", "pareto_front.json", "results.md"} <= files
    assert parent.data.tags["pareto_front"] == ",".join(summary.front)
    assert parent.data.tags["refit_pick"] == "knee" and parent.data.tags["refit_point"].startswith(summary.best.label)
    from tuning.pareto import knee

    points = {t.number: [t.values[k] for k in OBJECTIVES] for t in summary.trials}
    assert summary.best.number == knee(points, ["max", "max"])
    for t in summary.trials:
        assert client.get_run(t.run_id).data.tags["pareto_front"] == ("true" if t.label in summary.front else "false")
    refits = [r for r in client.search_runs([summary.experiment_id]) if r.data.tags.get("role") == "refit"]
    assert len(refits) == 1 and refits[0].data.tags["trial_id"] == summary.best.trial_id

    # Optuna: a two-objective study with the objectives named (optuna-dashboard shows them)
    study = optuna.load_study(study_name="mo2", storage=summary.optuna_storage)
    assert study.metric_names == OBJECTIVES and len(study.directions) == 2
    complete = [tr for tr in study.trials if tr.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    by_number = {t.number: t for t in summary.trials}
    for tr in complete:
        assert tr.values == pytest.approx([by_number[tr.number].values[k] for k in OBJECTIVES])

    # resume of the finished sweep: nothing run again or duplicated, the front rebuilt from the record
    from tuning.runner import refit_only, run_trials

    again = run_trials(sweep, resume=True)
    assert again.front == summary.front and again.best.trial_id == summary.best.trial_id
    runs = client.search_runs([summary.experiment_id])
    assert sum(r.data.tags.get("role") == "trial" for r in runs) == 3
    assert sum(r.data.tags.get("role") == "refit" for r in runs) == 1
    assert len(optuna.load_study(study_name="mo2", storage=summary.optuna_storage).trials) == 3

    # --refit-only --pick trial:<n>: another point refit, no search
    other = next(t for t in summary.trials if t.trial_id != summary.best.trial_id)
    from tuning.pareto import PickError

    with pytest.raises(PickError, match="trial:99 has no finished result"):
        refit_only(sweep, "trial:99")
    picked = refit_only(sweep, f"trial:{other.number}")
    assert picked.best.trial_id == other.trial_id and picked.front == summary.front
    runs = client.search_runs([summary.experiment_id])
    refits = {r.data.tags["trial_id"] for r in runs if r.data.tags.get("role") == "refit"}
    assert refits == {summary.best.trial_id, other.trial_id}
    assert sum(r.data.tags.get("role") == "trial" for r in runs) == 3
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["refit_pick"] == f"trial:{other.number}"
    assert parent.data.tags["refit_point"].startswith(other.label)
