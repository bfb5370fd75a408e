"""``tuning/sweep.py`` as users run it: ``ray job submit`` to a real head, and ``--local`` + ``--resume``.

Everything binds to 127.0.0.1. The head is started by the test with
``ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1`` in its own
process group and temp dir, and stopped in a ``finally`` by killing exactly that group
(``ray stop`` would also stop unrelated Ray instances on a shared machine).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    from tuning.runner import free_port as fp

    return fp()


def write_sweep(path: Path, synthetic_root: Path, num_samples: int) -> Path:
    cfg = {
        "name": "t",
        "base": {
            "preset": "tiny",
            "overrides": {
                "source": f"synthetic:{synthetic_root}/domain_a",
                "targets": [f"synthetic:{synthetic_root}/domain_b"],
                "epochs": 2,
                "max_steps_per_epoch": 2,
                "max_per_class": 3,
                "batch_size": 4,
                "progress": False,
            },
        },
        "space": {
            "gamma": {"type": "uniform", "low": 0.0, "high": 1.0},
            "lr_head": {"type": "loguniform", "low": 1.0e-5, "high": 1.0e-3},
        },
        "search": {"algorithm": "optuna", "num_samples": num_samples, "seed": 0, "scheduler": "none"},
        "resources": {"workers_per_trial": 1, "use_gpu": False, "cpus_per_worker": 1, "max_failures": 1},
        "mlflow": {"experiment": "cluster-test"},
        "target_eval": "best",
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        MPLBACKEND="Agg",
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.update(extra)
    return env


def kill_group(pgid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        for _ in range(20):
            time.sleep(0.5)
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return


def mlflow_runs(db: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("cluster-test")
    if exp is None:
        return client, []
    return client, client.search_runs([exp.experiment_id])


def test_ray_job_submit_runs_the_sweep_on_a_head(synthetic_root, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    gcs_port, dash_port = free_port(), free_port()
    temp_dir = Path("/tmp") / f"ssvp_head_{os.getpid()}_{gcs_port}"  # short: Ray's socket paths have a length limit
    env = clean_env(RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dash_port}")
    sweep_yaml = write_sweep(tmp_path / "job.yaml", synthetic_root, num_samples=2)
    db = tmp_path / "mlflow.db"
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
         "--port", str(gcs_port), "--dashboard-port", str(dash_port), "--num-cpus", "2",
         "--include-dashboard", "true", "--temp-dir", str(temp_dir), "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        out, _ = head.communicate(timeout=180)
        assert head.returncode == 0, out
        address = f"http://127.0.0.1:{dash_port}"
        client = None
        for _ in range(120):
            try:
                client = JobSubmissionClient(address)
                client.list_jobs()
                break
            except Exception:  # noqa: BLE001 - dashboard still starting
                time.sleep(1)
        assert client is not None
        submit = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--submission-id", "ssvp-sweep-test",
             "--no-wait", "--working-dir", str(REPO), "--",
             "python", "tuning/sweep.py", "--config", str(sweep_yaml), "--name", "jobsweep",
             "--tracking-uri", f"sqlite:///{db}", "--storage-path", str(tmp_path / "ray"),
             "--cpus-per-worker", "0.5", "--quiet"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=180,
        )
        assert submit.returncode == 0, submit.stdout + submit.stderr
        status = None
        deadline = time.time() + 600
        while time.time() < deadline:
            status = client.get_job_status("ssvp-sweep-test")
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            time.sleep(2)
        logs = client.get_job_logs("ssvp-sweep-test")
        assert status == JobStatus.SUCCEEDED, logs[-4000:]
        assert "best trial" in logs and f"mlflow ui --backend-store-uri sqlite:///{db}" in logs

        mclient, runs = mlflow_runs(db)
        roles = sorted(r.data.tags.get("role") for r in runs)
        assert roles == ["sweep", "target_eval", "trial", "trial"]
        assert all(r.info.status == "FINISHED" for r in runs)
        parent = next(r for r in runs if r.data.tags["role"] == "sweep")
        assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs if r is not parent)
    finally:
        kill_group(head.pid)


def _sweep_cmd(config: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "tuning" / "sweep.py"), "--config", str(config), "--local", "--num-cpus", "2",
            "--name", "res", "--storage-path", str(tmp_path / "ray"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--max-concurrent", "2", "--cpus-per-worker", "0.5", "--quiet", *extra]


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(synthetic_root, tmp_path):
    import optuna

    config = write_sweep(tmp_path / "res.yaml", synthetic_root, num_samples=3)
    db = tmp_path / "mlflow.db"
    env = clean_env()
    log1 = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(_sweep_cmd(config, tmp_path), env=env, cwd=tmp_path, stdout=log1,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # interrupt (Ctrl+C) once one trial has finished and the next one has started logging
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            time.sleep(2)
            if not db.exists():
                continue
            try:
                _, runs = mlflow_runs(db)
            except Exception:  # noqa: BLE001 - database still being created
                continue
            trials = [r for r in runs if r.data.tags.get("role") == "trial"]
            if sum(r.info.status == "FINISHED" for r in trials) >= 1 and any(r.info.status == "RUNNING" for r in trials):
                break
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            kill_group(proc.pid)
        log1.close()
    first_log = (tmp_path / "first.log").read_text()
    assert rc == 130, first_log[-3000:]
    assert "--resume --name res" in first_log

    client, runs = mlflow_runs(db)
    assert all(r.info.status != "RUNNING" for r in runs)  # closed as KILLED, not left RUNNING
    parent = next(r for r in runs if r.data.tags.get("role") == "sweep")
    assert parent.info.status == "KILLED"
    finished_before = {
        r.data.tags["trial_id"]: (r.info.run_id, r.info.end_time, len(client.get_metric_history(r.info.run_id, "val_objective")))
        for r in runs if r.data.tags.get("role") == "trial" and r.info.status == "FINISHED"
    }
    assert len(finished_before) >= 1

    resumed = subprocess.run(_sweep_cmd(config, tmp_path, "--resume"), env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]

    client, runs = mlflow_runs(db)
    trials = [r for r in runs if r.data.tags.get("role") == "trial"]
    assert len(trials) == 3 and len({r.data.tags["trial_id"] for r in trials}) == 3  # no duplicate runs
    assert all(r.info.status == "FINISHED" for r in runs)
    parents = [r for r in runs if r.data.tags.get("role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.run_id == parent.info.run_id
    for r in trials:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_objective")]
        assert steps == [1, 2], (r.data.tags["trial_id"], steps)  # every epoch once, none twice
        if r.data.tags["trial_id"] in finished_before:
            run_id, end_time, n = finished_before[r.data.tags["trial_id"]]
            assert (r.info.run_id, r.info.end_time, len(steps)) == (run_id, end_time, n)  # not rerun
    # the Optuna study (SQLite) holds exactly the sweep's trials, none left running, defaults first
    study = optuna.load_study(study_name="res", storage=f"sqlite:///{tmp_path}/ray/res/optuna.db")
    assert len(study.trials) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert study.trials[0].params["gamma"] == 0.5
    state = json.loads((tmp_path / "ray" / "res" / "ssvp_sweep.json").read_text())
    assert state["parent_run_id"] == parent.info.run_id
