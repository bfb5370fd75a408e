"""End-to-end sweeps on a real in-process Ray session (127.0.0.1 only, 2 CPUs, CPU torch).

One Ray session serves the whole module. It also declares 2 logical GPUs and 2 units of
a custom ``fake_gpu`` resource so the worker-placement test can show each worker of a
2-worker (DDP over gloo) trial getting its own device; the other sweeps run with
``use_gpu=False``. MLflow is a real SQLite store queried with ``MlflowClient``; the
Optuna study is a real SQLite study.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import local_ray, synthetic_config
from ssvp.config import Config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    for ray in local_ray(num_cpus=2, num_gpus=2, resources={"fake_gpu": 2}):
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        yield ray


def tiny(root: Path, **overrides) -> Config:
    base = dict(epochs=2, max_steps_per_epoch=2, max_per_class=3, batch_size=4, eval_batch_size=16, progress=False)
    return synthetic_config(root, **{**base, **overrides})


def grid_trials(cfg: Config, tmp_path: Path, name: str, resources: dict, experiment: str, on_results=None, **top):
    """``run_trials`` of a grid sweep with one point per variant, no scheduler, half a CPU per
    worker, quiet, results under ``tmp_path / "ray"``, MLflow in ``tmp_path / "mlflow.db"``."""
    from tuning.runner import run_trials
    from tuning.settings import MlflowSettings, ResourceSettings, SearchSettings, SweepConfig

    sweep = SweepConfig(
        name=name, base=cfg, search=SearchSettings(algorithm="grid", num_samples=1, scheduler=None),
        resources=ResourceSettings(cpus_per_worker=0.5, **resources),
        mlflow=MlflowSettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment=experiment),
        storage_path=str(tmp_path / "ray"), verbose=0, **top,
    )
    return run_trials(sweep, on_results=on_results)


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def trial_runs(client, summary):
    runs = client.search_runs(
        [summary.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'"
    )
    return [r for r in runs if r.data.tags.get("role") == "trial"], [r for r in runs if r.data.tags.get("role") != "trial"]


def test_optuna_sweep_is_recorded_in_mlflow(ray_session, synthetic_root, tmp_path, capsys):
    import re

    import optuna

    from tuning.runner import run_trials
    from tuning.settings import MlflowSettings, ResourceSettings, SearchSettings, SweepConfig

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = {
        "gamma": {"type": "uniform", "low": 0.0, "high": 1.0},
        "lr_head": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
        "epochs": 2,
    }
    sweep = SweepConfig(
        name="opt3",
        base=tiny(synthetic_root),
        space=space,
        search=SearchSettings(algorithm="optuna", num_samples=3, seed=0, scheduler="asha", max_concurrent_trials=2),
        resources=ResourceSettings(use_gpu=False, cpus_per_worker=0.5),
        mlflow=MlflowSettings(tracking_uri=uri, experiment="test-sweep", register_model="ssvp-test-heads"),
        storage_path=str(tmp_path / "ray"),
        verbose=1,  # the console lines, not Tune's table
        description="Tiny Optuna sweep of gamma and lr_head.",
    )
    summary = run_trials(sweep)
    out = capsys.readouterr().out
    assert not summary.interrupted and not summary.errors
    assert len(summary.trials) == 3
    client = client_for(uri)

    # console: one line per finished trial, no Tune table; its "best" is the summary's best (best epoch)
    lines = [ln for ln in out.splitlines() if re.match(r"^\[\d/3\] t\d\d ", ln)]
    assert len(lines) == 3 and "╭" not in out and "Trial status" not in out
    assert {re.match(r"^\[\d/3\] (t\d\d)", ln).group(1) for ln in lines} == {t.label for t in summary.trials}
    assert f"best {summary.best.label} {summary.best.objective:.4f} @ {int(summary.best.metrics['best_epoch'])}" in lines[-1]
    assert client.get_experiment(summary.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    # the summary: the parent run's page in the model-training view, the target metrics as a table
    printed = summary.format()
    assert (f"then open http://127.0.0.1:5000/#/experiments/{summary.experiment_id}/runs/{summary.parent_run_id}"
            "?workflowType=machine_learning") in printed
    table = printed.splitlines()[printed.splitlines().index(next(ln for ln in printed.splitlines()
                                                                  if ln.startswith("target evaluation"))) + 1:]
    assert table[0].split()[0] == "dataset" and "image_auroc" in table[0].split() and table[1].split()[0] == "domain_b"
    assert "models:/ssvp-test-heads/1" in printed
    # descriptions: the sweep's on the experiment and the parent, whose overview holds the results table
    assert client.get_experiment(summary.experiment_id).tags["mlflow.note.content"] == sweep.description
    note = client.get_run(summary.parent_run_id).data.tags["mlflow.note.content"]
    assert note.startswith(sweep.description) and "| trial | best_val_objective |" in note and "| domain_b |" in note

    # Ray's own API reads the same sweep back (README "Results outside this project")
    from ray import tune

    from tuning.trial import trial_driver

    restored = tune.Tuner.restore(summary.experiment_path, trainable=trial_driver).get_results()
    assert len(restored) == 3 and not restored.errors
    ray_best = restored.get_best_result("val_objective", "max", scope="all")
    assert ray_best.metrics["trial_id"] == summary.best.trial_id
    assert ray_best.metrics_dataframe["val_objective"].max() == pytest.approx(summary.best.objective)

    # artifacts go beside the SQLite file, never into the working directory
    assert client.get_experiment(summary.experiment_id).artifact_location.startswith((tmp_path / "mlartifacts").as_uri())
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["role"] == "sweep" and parent.data.tags["sweep_id"] == "opt3"
    assert parent.data.params["space.gamma"] == "uniform[0.0, 1.0]"
    parent_files = {a.path for a in client.list_artifacts(summary.parent_run_id)}
    assert {"results.csv", "results.md", "objective_vs_trial.png", "param_importance.png", "search_space.json",
            "best_config.json", "base_config.json"} <= parent_files

    children, others = trial_runs(client, summary)
    assert len(children) == 3
    assert len({r.data.tags["trial_id"] for r in children}) == 3
    by_trial = {t.trial_id: t for t in summary.trials}
    best_values = []
    for run in children:
        assert run.info.status == "FINISHED"
        trial = by_trial[run.data.tags["trial_id"]]
        assert run.data.tags["early_stopped"] == ("true" if trial.status == "EARLY_STOPPED" else "false")
        assert "epoch" not in run.data.metrics  # step = epoch
        # all params of the resolved config, sampled values included
        assert float(run.data.params["gamma"]) == pytest.approx(trial.params["gamma"])
        assert run.data.params["epochs"] == "2" and run.data.params["clip_model"] == "tiny"
        assert run.data.params["source"] == f"synthetic:{synthetic_root}/domain_a"
        # readable name; selection protocol; per-epoch metrics namespaced, step = epoch, each epoch once
        assert run.info.run_name == f"{trial.label} γ={trial.params['gamma']:.3g} lr_h={trial.params['lr_head']:.3g}"
        assert run.data.tags["protocol"] == "select" and run.data.params["protocol"] == "select"
        hist = client.get_metric_history(run.info.run_id, "val/objective")
        steps = [m.step for m in hist]
        assert steps == sorted(set(steps)) and steps[0] == 1 and max(steps) <= 2
        best = max(m.value for m in hist)
        assert run.data.metrics["best_val_objective"] == pytest.approx(best)
        assert run.data.metrics["best_epoch"] == [m.step for m in hist if m.value == best][0]
        best_values.append(best)
        assert {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")} == set(steps)
        keys = set(run.data.metrics)
        assert {"lr/prompt", "val/image_auroc", "train/loss"} <= keys and "lr_prompt" not in keys
        assert not [k for k in keys if k.startswith(("final_", "val_", "train_"))]  # one name per quantity
        got = Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path / run.info.run_id)))
        assert json.loads(got.read_text())["at_best_epoch"]["val/objective"] == pytest.approx(best)
        assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["domain_a (synthetic)"]
        assert run.data.tags["mlflow.source.git.commit"] == run.data.tags["git_commit"]
        # checkpoint (heads only) and the resolved config as artifacts
        ckpt = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints/best")}
        assert {"checkpoints/best/head.pt", "checkpoints/best/config.json"} <= ckpt
        assert {a.path for a in client.list_artifacts(run.info.run_id, "config")} >= {"config/config.json"}
        assert run.data.tags["git_commit"] and run.data.tags["seed"] == "0"

    # the paper's defaults are the first point; the study lives in SQLite
    study = optuna.load_study(study_name="opt3", storage=f"sqlite:///{tmp_path}/ray/opt3/optuna.db")
    assert len(study.trials) == 3
    # one vocabulary: the study's objective is MLflow's best_val_objective; trials and study point at MLflow and Ray
    assert study.metric_names == ["best_val_objective"]
    assert study.user_attrs["mlflow_parent_run_id"] == summary.parent_run_id and study.user_attrs["sweep_name"] == "opt3"
    assert {(ot.user_attrs["ray_trial_id"], ot.user_attrs["mlflow_run_id"]) for ot in study.trials} == {
        (t.trial_id, t.run_id) for t in summary.trials}
    assert study.trials[0].params == {"gamma": 0.5, "lr_head": pytest.approx(1e-4)}
    # Optuna stores what MLflow reports: the best epoch; ASHA stops are PRUNED with their epochs
    mlflow_best = {t.number: t.objective for t in summary.trials}
    for ot in study.trials:
        trial = next(t for t in summary.trials if t.number == ot.number)
        hist = {m.step: m.value for m in client.get_metric_history(trial.run_id, "val/objective")}
        assert ot.intermediate_values == pytest.approx(hist)
        if trial.status == "EARLY_STOPPED":
            assert ot.state == optuna.trial.TrialState.PRUNED and max(hist) < 2
        else:
            assert ot.state == optuna.trial.TrialState.COMPLETE
        assert ot.value == pytest.approx(mlflow_best[ot.number])  # a pruned trial's too: its best epoch
    complete = [t for t in summary.trials if t.status == "FINISHED"]
    assert study.best_value == pytest.approx(max(t.objective for t in complete))
    assert any(t.params == {"gamma": 0.5, "lr_head": pytest.approx(1e-4)} for t in summary.trials)

    # the best trial is the one with the best source-validation objective
    assert summary.best.objective == pytest.approx(max(best_values))
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.tags["best_trial_id"] == summary.best.trial_id
    assert parent.data.metrics["best_val_objective"] == pytest.approx(max(best_values))
    assert Path(summary.best.checkpoint, "head.pt").is_file()

    # refit: the best configuration on all source classes, paper protocol, all epochs, last epoch
    (refit_run,) = [r for r in others if r.data.tags.get("role") == "refit"]
    assert refit_run.info.status == "FINISHED" and refit_run.info.run_name == f"refit best={summary.best.label}"
    assert refit_run.data.tags["protocol"] == "paper" and refit_run.data.params["protocol"] == "paper"
    assert refit_run.data.tags["trial_id"] == summary.best.trial_id
    assert float(refit_run.data.params["gamma"]) == pytest.approx(summary.best.params["gamma"])
    assert [m.step for m in client.get_metric_history(refit_run.info.run_id, "train/loss")] == [1, 2]
    assert not [k for k in refit_run.data.metrics if k.startswith("val/")]  # nothing held out
    assert refit_run.data.tags["source_run_id"] == summary.best.run_id
    # an MLflow 3 LoggedModel of the refit run, registered as asked
    (logged,) = client.search_logged_models(experiment_ids=[summary.experiment_id])
    assert logged.source_run_id == refit_run.info.run_id and logged.name == "model"
    assert summary.model_uri == f"models:/{logged.model_id}" and summary.registered_model == "models:/ssvp-test-heads/1"
    assert client.get_model_version("ssvp-test-heads", "1").run_id == refit_run.info.run_id
    import mlflow.pyfunc
    import pandas as pd

    mlflow.set_tracking_uri(uri)
    image = sorted((synthetic_root / "domain_b").rglob("test/*/*.png"))[0]
    for model_uri in ("models:/ssvp-test-heads/1", summary.model_uri):
        scorer = mlflow.pyfunc.load_model(model_uri)
        scored = scorer.predict(pd.DataFrame({"path": [str(image)], "class_name": [image.parts[-4]]}))
        assert 0.0 <= float(scored["score"][0]) <= 1.0
    assert "checkpoints/final/head.pt" in {a.path for a in client.list_artifacts(refit_run.info.run_id, "checkpoints/final")}
    assert summary.refit_run_id == refit_run.info.run_id and Path(summary.refit_checkpoint, "head.pt").is_file()
    # the refit heads are the last epoch's, and they are not the selected trial's heads
    import torch

    refit_state = torch.load(Path(summary.refit_checkpoint, "head.pt"), weights_only=True)
    assert int(refit_state["epoch"]) == 1  # 0-based: epoch 2 of 2

    # target evaluation of the refit model: a separate child run
    (target_run,) = [r for r in others if r.data.tags.get("role") == "target_eval"]
    assert target_run.info.status == "FINISHED" and target_run.info.run_name == f"target-eval best={summary.best.label}"
    assert target_run.data.tags["trial_id"] == summary.best.trial_id
    assert target_run.data.tags["protocol"] == "paper" and target_run.data.tags["model"] == "refit"
    assert target_run.data.tags["model_run_id"] == refit_run.info.run_id
    assert target_run.data.params["checkpoint"] == summary.refit_checkpoint
    assert [d.dataset.name for d in target_run.inputs.dataset_inputs] == ["domain_b (synthetic)"]
    assert 0.0 <= target_run.data.metrics["target/domain_b/image_auroc"] <= 1.0
    assert summary.target_metrics["target/domain_b/image_auroc"] == target_run.data.metrics["target/domain_b/image_auroc"]
    per_class = client.load_table(summary.experiment_id, "target_per_class.json", run_ids=[target_run.info.run_id])
    assert set(per_class["dataset"]) == {"domain_b"} and "mean" in set(per_class["class"])
    mean_row = per_class[per_class["class"] == "mean"].iloc[0]
    assert mean_row["image_auroc"] == pytest.approx(target_run.data.metrics["target/domain_b/image_auroc"])
    # importance: Optuna's evaluator on the study's COMPLETE trials, how many, indicative
    imp = json.loads(Path(client.download_artifacts(summary.parent_run_id, "param_importance.json",
                                                    str(tmp_path / "imp"))).read_text())
    assert imp["n_trials"] == sum(t.status == "FINISHED" for t in summary.trials) and imp["indicative"] is True
    # nothing left running
    assert all(r.info.status != "RUNNING" for r in client.search_runs([summary.experiment_id]))


def test_failing_trial_is_recorded_failed_and_the_sweep_goes_on(ray_session, synthetic_root, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(synthetic_root / "domain_a", corrupt / "domain_a")
    # zero-shot training reads the source's test split (the one with masks): break fabric's images there
    broken = sorted((corrupt / "domain_a" / "fabric" / "test").rglob("*.png"))
    assert len(broken) >= 3
    for png in broken:
        png.write_bytes(b"this is not a png")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    summary = grid_trials(
        tiny(synthetic_root),
        tmp_path,
        "failing",
        variants={"ok": {}, "corrupt": {"source": f"synthetic:{corrupt}/domain_a"}},
        experiment="test-failing",
        resources=dict(use_gpu=False, max_failures=0),
        target_eval="all",  # every finished trial is evaluated on the targets inside its worker
        on_results=lambda s: {"hook": _write(tmp_path / "hook" / "n.txt", str(len(s.trials)))},
    )
    assert not summary.interrupted
    status = {t.variant: t.status for t in summary.trials}
    assert status == {"ok": "FINISHED", "corrupt": "FAILED"}
    (failed_id,) = summary.errors
    # the root cause raised in the worker, not Ray's wrapper exception
    assert summary.errors[failed_id].startswith("ssvp.data.base.DatasetError: cannot read image")
    assert "fabric/test" in summary.errors[failed_id]

    client = client_for(uri)
    children, _ = trial_runs(client, summary)
    runs = {r.data.tags["variant"]: r for r in children}
    assert runs["corrupt"].info.status == "FAILED"
    assert "cannot read image" in runs["corrupt"].data.tags["error"]
    assert "error.txt" in {a.path for a in client.list_artifacts(runs["corrupt"].info.run_id)}
    assert runs["ok"].info.status == "FINISHED" and runs["ok"].data.metrics["best_val_objective"] > 0
    assert runs["ok"].info.run_name == "ok" and runs["corrupt"].info.run_name == "corrupt"  # variant names
    assert not [r for r in client.search_runs([summary.experiment_id]) if r.data.tags.get("role") == "refit"]
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["n_failed"] == 1 and parent.data.metrics["n_finished"] == 1
    assert {a.path for a in client.list_artifacts(summary.parent_run_id, "hook")} == {"hook/n.txt"}
    # target_eval="all": target metrics and the per-class report on the finished trial's own run
    ok = next(t for t in summary.trials if t.variant == "ok")
    spec = f"synthetic:{synthetic_root}/domain_b"
    assert set(ok.target_report) == {spec}
    assert ok.metrics["target/domain_b/image_auroc"] == pytest.approx(ok.target_report[spec]["mean"]["image_auroc"])
    assert runs["ok"].data.metrics["target/domain_b/pixel_auroc"] == pytest.approx(
        ok.target_report[spec]["mean"]["pixel_auroc"]
    )
    assert "target_report.json" in {a.path for a in client.list_artifacts(runs["ok"].info.run_id)}
    assert ok.placement["world_rank"] == 0 and ok.placement["node_id"]
    assert summary.target_run_id == ok.run_id  # no separate target_eval run in this mode


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path.parent


def test_each_worker_of_a_two_worker_trial_gets_its_own_device(ray_session, synthetic_root, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    summary = grid_trials(
        tiny(synthetic_root, epochs=1),
        tmp_path,
        "ddp2",
        experiment="test-placement",
        # the session's 2 logical GPUs; torch sees no CUDA, so training runs on CPU
        resources=dict(workers_per_trial=2, use_gpu=True, torch_backend="gloo", extra={"fake_gpu": 1}),
        target_eval="none",
    )
    (trial,) = summary.trials
    assert trial.status == "FINISHED", summary.errors
    placement_dir = tmp_path / "ray" / "ddp2.train" / trial.trial_id / "placement"
    records = [json.loads((placement_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 and r["distributed"] for r in records)  # DDP process group (gloo)
    assert records[0]["node_id"] == records[1]["node_id"]
    assert {tuple(r["gpu_ids"]) for r in records} == {("0",), ("1",)}  # distinct GPUs
    assert {r["gpu_ordinal"] for r in records} == {0, 1}  # -> cuda:0 and cuda:1 with CUDA present
    assert all(r["assigned_resources"]["fake_gpu"] == 1.0 and r["assigned_resources"]["GPU"] == 1.0 for r in records)
    assert all(r["device"] == "cpu" for r in records)  # no CUDA in this torch build
    client = client_for(uri)
    placement = {a.path for a in client.list_artifacts(trial.run_id, "placement")}
    assert placement == {"placement/rank0.json", "placement/rank1.json"}


def test_killed_worker_resumes_from_its_last_checkpoint(ray_session, synthetic_root, tmp_path):
    """SIGKILL the trial's Ray Train worker after its first checkpoint: Train restarts the worker
    group (FailureConfig(max_failures=1)) and the new worker continues from that checkpoint."""
    import signal
    import threading
    import time

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    train_dir = tmp_path / "ray" / "killed.train"
    killed: dict = {}

    def first_epoch_recorded() -> bool:
        # epoch 1 in MLflow = Train registered its checkpoint and passed the report on to Tune
        try:
            client = client_for(uri)
            exp = client.get_experiment_by_name("test-kill")
            runs = client.search_runs([exp.experiment_id], "tags.role = 'trial'") if exp else []
            return any(client.get_metric_history(r.info.run_id, "val/objective") for r in runs)
        except Exception:  # noqa: BLE001 - store not created yet
            return False

    def killer():
        deadline = time.time() + 600
        while time.time() < deadline:
            records = list(train_dir.glob("*/placement/rank0.json"))
            if records and first_epoch_recorded():
                pid = json.loads(records[0].read_text())["pid"]
                os.kill(pid, signal.SIGKILL)  # the Ray Train worker process of this test's trial
                killed["pid"] = pid
                return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = grid_trials(
        tiny(synthetic_root, epochs=5),
        tmp_path,
        "killed",
        experiment="test-kill",
        resources=dict(use_gpu=False, max_failures=1),
        target_eval="none",
    )
    thread.join(timeout=5)
    (trial,) = summary.trials
    assert "pid" in killed, "the worker finished before it could be killed"
    assert trial.status == "FINISHED", summary.errors
    record = trial.placement
    assert record["pid"] != killed["pid"]  # a new worker process ...
    assert record["resumed_epochs"] >= 1  # ... that started from the checkpoint, not from epoch 0
    client = client_for(uri)
    steps = [m.step for m in client.get_metric_history(trial.run_id, "val/objective")]
    assert steps == [1, 2, 3, 4, 5]  # every epoch logged once across the restart
    run = client.get_run(trial.run_id)
    assert run.data.tags["restarts"] == "1" and run.data.metrics["restarts"] == 1  # the restart is on record
    # the best heads survive the restart (carried over even when no later epoch improves on them)
    assert {"checkpoints/best/head.pt", "checkpoints/best/config.json"} <= {
        a.path for a in client.list_artifacts(trial.run_id, "checkpoints/best")
    }
    assert Path(trial.checkpoint, "head.pt").is_file()
