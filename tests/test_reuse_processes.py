"""Reused trial processes (``resources.reuse_processes: true``) on a real local Ray.

One-worker trials train inside their Tune actor, which Tune keeps for the next trial: the
process, its imports and (with a feature cache) its text tower live across trials. The test
runs three trials one at a time on one actor (the first and third have the same config) and
checks: one process ran all three, in order; nothing of one trial leaks into the next (the
third trial's metrics equal the first's); the metrics equal the same trials run as Ray Train
runs; checkpoints, placement and start records land where a Train run puts them, and the
MLflow record (FINISHED child runs with their best heads) is the same as in Train mode. Each
trial holds half of one logical GPU (``gpus_per_worker: 0.5``), as K = 2 trials per GPU would.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import local_ray, synthetic_config

pytestmark = pytest.mark.slow


def test_reuse_processes_needs_one_worker_per_trial():
    from tuning.settings import ResourceSettings, SweepConfig, SweepConfigError
    from tuning.trial import TrialSettings

    with pytest.raises(SweepConfigError, match="reuse_processes: true needs workers_per_trial: 1"):
        SweepConfig(name="x", base=synthetic_config("/nowhere"),
                    resources=ResourceSettings(workers_per_trial=2, reuse_processes=True)).validate()
    with pytest.raises(SweepConfigError, match="reuse_processes must be true or false"):
        SweepConfig(name="x", base=synthetic_config("/nowhere"),
                    resources=ResourceSettings(reuse_processes="yes")).validate()
    with pytest.raises(ValueError, match="workers_per_trial: 1"):
        TrialSettings(base={}, workers_per_trial=2, reuse_processes=True)


@pytest.fixture(scope="module")
def ray_one_gpu():
    yield from local_ray(num_cpus=2, num_gpus=1)  # one logical GPU: torch sees no CUDA and trains on the CPU


def _sweep(cfg, tmp_path: Path, name: str, reuse: bool, variants: dict):
    from tuning.runner import run_trials
    from tuning.settings import MlflowSettings, ResourceSettings, SearchSettings, SweepConfig

    sweep = SweepConfig(
        name=name, base=cfg,
        search=SearchSettings(algorithm="grid", num_samples=1, scheduler=None, max_concurrent_trials=1),
        # half a GPU per trial (the K-trials-per-GPU setting); gloo: Ray Train picks NCCL with use_gpu
        resources=ResourceSettings(cpus_per_worker=1, use_gpu=True, gpus_per_worker=0.5, reuse_processes=reuse,
                                   torch_backend="gloo"),
        mlflow=MlflowSettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment=f"test-reuse-{name}"),
        storage_path=str(tmp_path / "ray"), verbose=0, target_eval="none", refit=False,
        variants=variants,
    )
    return run_trials(sweep)


def _val_metrics(trial) -> dict:
    keys = [k for k in trial.metrics if k.startswith(("best_val", "final_val", "final_train"))]
    assert keys
    return {k: trial.metrics[k] for k in keys}


def test_trials_share_one_process_and_match_train_runs(ray_one_gpu, synthetic_root, tmp_path):
    import mlflow

    from ssvp.engine import fit

    cfg = synthetic_config(synthetic_root, epochs=2, max_steps_per_epoch=2, max_per_class=3, batch_size=4,
                           eval_batch_size=16, progress=False, feature_cache=str(tmp_path / "cache"))
    fit(cfg.override({"epochs": 1}))  # warm the cache: every trial below reads the same stored features
    variants = {"a": {"gamma": 0.3}, "b": {"gamma": 0.7}, "c": {"gamma": 0.3}}
    reused = _sweep(cfg, tmp_path, "reused", True, variants)
    assert {t.variant: t.status for t in reused.trials} == dict.fromkeys("abc", "FINISHED"), reused.errors
    by = {t.variant: t for t in reused.trials}
    pids = {t.placement["pid"] for t in reused.trials}
    assert len(pids) == 1, "the three trials ran in one process"
    assert sorted(t.placement["trial_in_process"] for t in reused.trials) == [1, 2, 3]
    for t in reused.trials:
        p = t.placement
        assert p["process"] == "reused Tune actor" and p["placement_group_id"] is None
        assert p["gpu_ids"] == ["0"] and p["assigned_resources"]["GPU"] == 0.5 and p["gpu_memory_fraction"] == 0.5
    assert _val_metrics(by["a"]) == _val_metrics(by["c"])  # same config, later in the same process
    assert _val_metrics(by["a"]) != _val_metrics(by["b"])
    for t in reused.trials:
        trial_dir = Path(t.trial_dir)
        ckpts = sorted(p.name for p in trial_dir.glob("checkpoint_*"))
        assert ckpts == ["checkpoint_epoch_0002"], ckpts  # checkpoints_to_keep = 1, the newest epoch
        assert (trial_dir / "checkpoint_epoch_0002" / "best" / "head.pt").is_file()
        assert len((trial_dir / "starts.jsonl").read_text().splitlines()) == 1

    train = _sweep(cfg, tmp_path, "train", False, {"a": variants["a"], "b": variants["b"]})
    assert {t.variant: t.status for t in train.trials} == {"a": "FINISHED", "b": "FINISHED"}, train.errors
    assert len({t.placement["pid"] for t in train.trials}) == 2  # a worker process per Train run
    for t in train.trials:
        assert _val_metrics(t) == _val_metrics(by[t.variant]), t.variant

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("test-reuse-reused")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("role") == "trial"]
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints/best")], run.info.run_name
        assert run.data.tags["checkpoint_path"].endswith("checkpoint_epoch_0002")


def test_trials_stopped_by_asha_hand_their_actor_on(ray_one_gpu, synthetic_root, tmp_path):
    """Optuna + ASHA, one trial at a time on reused actors: a trial ASHA stops ends at its next report
    and the next trial gets its actor (Tune waits for the stopped trial's thread first; a wait that
    runs out fails the *next* trial with "Trainable runner reuse requires reset_config()"). Seeded
    search and deterministic training: the same trials stop on every run."""
    from tuning.runner import run_trials
    from tuning.settings import MlflowSettings, ResourceSettings, SearchSettings, SweepConfig

    cfg = synthetic_config(synthetic_root, epochs=3, max_steps_per_epoch=2, max_per_class=3, batch_size=4,
                           eval_batch_size=16, progress=False)
    sweep = SweepConfig(
        name="asha", base=cfg,
        space={"gamma": {"type": "uniform", "low": 0.0, "high": 1.0},
               "lr_head": {"type": "loguniform", "low": 1e-5, "high": 1e-2}},
        search=SearchSettings(algorithm="optuna", num_samples=6, seed=0, scheduler="asha", grace_period=1,
                              reduction_factor=2, max_concurrent_trials=1),
        resources=ResourceSettings(cpus_per_worker=1, use_gpu=False, reuse_processes=True),
        mlflow=MlflowSettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="test-reuse-asha"),
        storage_path=str(tmp_path / "ray"), verbose=0, target_eval="none", refit=False,
    )
    summary = run_trials(sweep)
    statuses = [t.status for t in summary.trials]
    assert not summary.errors and set(statuses) <= {"FINISHED", "EARLY_STOPPED"}, summary.errors
    assert "EARLY_STOPPED" in statuses and "FINISHED" in statuses, statuses
    assert len({t.placement["pid"] for t in summary.trials}) == 1
    for t in summary.trials:
        if t.status == "EARLY_STOPPED":  # its last checkpoint is complete and its heads were logged
            assert t.checkpoint and (Path(t.checkpoint) / "head.pt").is_file()
