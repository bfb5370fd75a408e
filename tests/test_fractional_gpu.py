"""Several trials on one GPU (``resources.gpus_per_worker`` < 1), on a CPU with logical GPUs.

A real in-process Ray session declares one logical GPU; with ``gpus_per_worker=0.5`` two
one-worker trials hold half of it each, at the same time. Torch sees no CUDA here, so each
worker selects the CPU (``select_device``) and records the memory fraction it would cap its
CUDA allocator to. The same two trials run with a whole GPU each (one after the other) give
the same metrics.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import local_ray, synthetic_config

pytestmark = pytest.mark.slow


def test_apply_gpu_share_and_settings_guard():
    from tuning.trial import TrialSettings, apply_gpu_share

    assert apply_gpu_share("cpu", 0.25) == 0.25  # recorded; nothing to cap without CUDA
    assert apply_gpu_share("cpu", 1.0) is None and apply_gpu_share("cpu", 0.0) is None
    with pytest.raises(ValueError, match="NCCL"):
        TrialSettings(base={}, workers_per_trial=2, use_gpu=True, gpus_per_worker=0.5)
    TrialSettings(base={}, workers_per_trial=2, use_gpu=True, gpus_per_worker=0.5, torch_backend="gloo")
    TrialSettings(base={}, workers_per_trial=1, use_gpu=True, gpus_per_worker=0.25)


@pytest.fixture(scope="module")
def ray_one_gpu():
    yield from local_ray(num_cpus=2, num_gpus=1)


def _sweep(root: Path, tmp_path: Path, name: str, gpus_per_worker: float):
    from tuning.runner import run_trials
    from tuning.settings import MlflowSettings, ResourceSettings, SearchSettings, SweepConfig

    cfg = synthetic_config(root, epochs=1, max_steps_per_epoch=2, max_per_class=3, batch_size=4,
                           eval_batch_size=16, progress=False)
    sweep = SweepConfig(
        name=name, base=cfg, search=SearchSettings(algorithm="grid", num_samples=1, scheduler=None),
        # gloo: Ray Train picks NCCL for use_gpu=True, which needs real GPUs
        resources=ResourceSettings(cpus_per_worker=0.5, use_gpu=True, gpus_per_worker=gpus_per_worker,
                                   torch_backend="gloo"),
        mlflow=MlflowSettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="test-fractional"),
        storage_path=str(tmp_path / "ray"), verbose=0, target_eval="none",
        variants={"a": {"gamma": 0.3}, "b": {"gamma": 0.7}},
    )
    return run_trials(sweep)


def _last_write(trial_dir: str) -> float:
    return max(p.stat().st_mtime for p in Path(trial_dir).rglob("*") if p.is_file())


def test_two_trials_share_one_gpu_and_match_whole_gpu_trials(ray_one_gpu, synthetic_root, tmp_path):
    shared = _sweep(synthetic_root, tmp_path, "half", 0.5)
    assert {t.variant: t.status for t in shared.trials} == {"a": "FINISHED", "b": "FINISHED"}, shared.errors
    recs = {t.variant: t.placement for t in shared.trials}
    for rec in recs.values():
        assert rec["gpu_ids"] == ["0"]  # the one logical GPU, for both trials
        assert rec["assigned_resources"]["GPU"] == 0.5
        assert rec["gpu_memory_fraction"] == 0.5  # each trial's own budget on a CUDA device
        assert rec["device"] == "cpu"  # no CUDA in this torch build: select_device falls back
    assert recs["a"]["pid"] != recs["b"]["pid"]
    # they ran at the same time: each started before the other's last write
    ends = {t.variant: _last_write(t.trial_dir) for t in shared.trials}
    assert recs["a"]["started_at"] < ends["b"] and recs["b"]["started_at"] < ends["a"]

    whole = _sweep(synthetic_root, tmp_path, "whole", 1.0)  # one trial at a time on the whole GPU
    assert {t.variant: t.status for t in whole.trials} == {"a": "FINISHED", "b": "FINISHED"}, whole.errors
    assert all(t.placement["gpu_memory_fraction"] is None for t in whole.trials)
    for t in whole.trials:
        other = next(s for s in shared.trials if s.variant == t.variant)
        keys = [k for k in t.metrics if k.startswith(("best_val", "final_val", "final_train"))]
        assert keys
        assert {k: t.metrics[k] for k in keys} == {k: other.metrics[k] for k in keys}, t.variant
    json.dumps([t.placement for t in whole.trials])  # placement records stay JSON
