"""Fault injection: kill, interrupt and starve real sweeps, then audit what MLflow recorded.

Each scenario runs ``python tuning/sweep.py`` as a child process (local Ray on 127.0.0.1,
tiny random-weight backbones, the built-in synthetic data, SQLite MLflow, all under one
work folder), injects one fault with a real signal or a bad setting, resumes where that
makes sense, and audits the record:

=====================  ======================================================================
scenario               fault
=====================  ======================================================================
driver-sigkill         SIGKILL of the sweep driver after its first logged epoch, then --resume
sigint                 SIGINT (Ctrl+C) of the driver after its first logged epoch, then --resume
worker-kill            SIGKILL of the trial's Ray Train worker after its first epoch
nan                    a trial whose loss becomes NaN (deterministic: must fail once, no retry)
tracking-down          --tracking-uri of a server that is not there
bad-storage            --storage-path below a regular file
missing-data           --set source=... naming a folder that does not exist
=====================  ======================================================================

Figures per scenario: exit codes, seconds, trials lost (not finished though the sweep
ended), epochs lost / duplicated in the trials' MLflow histories, runs left RUNNING, trials
whose ``best_*`` disagree with the ``checkpoints/best`` heads they logged, whether the
parent's best trial is the true best, Train restarts recorded, lines printed on stderr.

    python bench/fault_injection.py                       # every scenario (~10 min on 2 cores)
    python bench/fault_injection.py driver-sigkill nan    # some
    python bench/fault_injection.py --work /tmp/fi --keep # keep the work folder
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EPOCHS = 4
SWEEP_YAML = """\
name: fi
base:
  preset: tiny
  synthetic: {{root: {data}, seed: 0}}
  overrides: {{epochs: {epochs}, batch_size: 4, max_steps_per_epoch: 2, max_per_class: 3, eval_batch_size: 16,
              progress: false}}
space:
  gamma: {{type: uniform, low: 0.0, high: 1.0}}
search: {{algorithm: optuna, num_samples: 1, seed: 0, points_to_evaluate: none, scheduler: none,
         max_concurrent_trials: 1}}
resources: {{use_gpu: false, cpus_per_worker: 0.5, max_failures: 1}}
target_eval: none
"""


# --------------------------------------------------------------------------- running sweeps
class Work:
    """One work folder: synthetic data, the sweep file, storage and the SQLite store."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "sweep.yaml").write_text(SWEEP_YAML.format(data=root / "data", epochs=EPOCHS))
        self.uri = f"sqlite:///{root / 'mlflow.db'}"

    def args(self, name: str, *extra: str) -> list[str]:
        return ["--config", str(self.root / "sweep.yaml"), "--local", "--num-cpus", "2", "--quiet", "--name", name,
                "--storage-path", str(self.root / "ray"), "--tracking-uri", self.uri, "--experiment", "fi", *extra]

    def start(self, args: list[str]) -> subprocess.Popen:
        env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", HF_HUB_OFFLINE="1", MPLBACKEND="Agg",
                   PYTHONUNBUFFERED="1")
        log = open(self.root / f"driver-{time.time():.0f}-{os.getpid()}.log", "w")  # noqa: SIM115
        return subprocess.Popen([sys.executable, str(REPO / "tuning" / "sweep.py"), *args], cwd=self.root, env=env,
                                stdout=log, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def run(self, args: list[str], timeout: float = 900) -> tuple[int, float, str]:
        """``(exit code, seconds, stderr)`` of a sweep run to its end."""
        t0 = time.time()
        proc = self.start(args)
        try:
            _, err = proc.communicate(timeout=timeout)
        finally:
            reap(proc)
        return proc.returncode, time.time() - t0, err or ""


def reap(proc: subprocess.Popen) -> None:
    """Kill what is left of a driver's process group (its Ray processes), after it ended."""
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def val_key() -> str:
    from tuning.tracking import mlflow_metric_name

    return mlflow_metric_name("val_objective")


def sweep_runs(c, sweep: str) -> list:
    """Every run of ``sweep`` (parent, trials, refit, ...) in the work folder's experiment."""
    exp = c.get_experiment_by_name("fi")
    return [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("sweep_id") == sweep] if exp else []


def trial_runs(uri: str, sweep: str) -> list:
    try:
        c = client(uri)
        exp = c.get_experiment_by_name("fi")
        if exp is None:
            return []
        return [r for r in c.search_runs([exp.experiment_id], "tags.role = 'trial'")
                if r.data.tags.get("sweep_id") == sweep]
    except Exception:  # noqa: BLE001 - store not created yet
        return []


def wait_for_epoch(uri: str, sweep: str, proc: subprocess.Popen, n: int = 1, timeout: float = 600) -> bool:
    """Until some trial of ``sweep`` has ``n`` epochs in MLflow (False: the driver ended first)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        for r in trial_runs(uri, sweep):
            if len(client(uri).get_metric_history(r.info.run_id, val_key())) >= n:
                return True
        time.sleep(0.5)
    return False


# --------------------------------------------------------------------------- audit
def audit(uri: str, sweep: str, expect_trials: int) -> dict[str, Any]:
    """What the record of ``sweep`` says, against what it should say."""
    import torch  # noqa: F401 - checkpoint loading

    from ssvp import engine

    c = client(uri)
    runs = trial_runs(uri, sweep)
    all_runs = sweep_runs(c, sweep)
    parents = [r for r in all_runs if r.data.tags.get("role") == "sweep"]
    out: dict[str, Any] = {"trials": len(runs), "epochs_lost": 0, "epochs_duplicated": 0, "best_mismatch": 0,
                           "restarts": 0, "backfilled": 0,
                           "running": sum(r.info.status == "RUNNING" for r in all_runs),
                           "finished": sum(r.info.status == "FINISHED" for r in runs)}
    out["trials_lost"] = expect_trials - out["finished"]
    best = {}
    for r in runs:
        steps = [m.step for m in c.get_metric_history(r.info.run_id, val_key())]
        done = int(r.data.metrics.get("epochs_done", max(steps, default=0)))
        out["epochs_lost"] += len(set(range(1, done + 1)) - set(steps))
        out["epochs_duplicated"] += len(steps) - len(set(steps))
        out["restarts"] += int(r.data.tags.get("restarts", "0"))
        out["backfilled"] += int(r.data.tags.get("backfilled_epochs", "0"))
        if r.info.status != "FINISHED":
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = c.download_artifacts(r.info.run_id, "checkpoints/best", tmp)
                state = engine.load_checkpoint(local)
            except Exception:  # noqa: BLE001 - no checkpoint logged
                out["best_mismatch"] += 1
                continue
        ck_epoch = int(state["epoch"]) + 1
        ck_value = float(state["best_metrics"]["val_objective"])
        logged = r.data.metrics.get("best_val_objective")
        if int(r.data.metrics.get("best_epoch", -1)) != ck_epoch or logged is None or abs(logged - ck_value) > 1e-9:
            out["best_mismatch"] += 1
        best[r.data.tags["trial_id"]] = ck_value
    out.update(audit_optuna(c, runs, study_db(uri, sweep), sweep))
    parent = parents[0] if parents else None
    out["parent"] = parent.info.status if parent else "none"
    true_best = max(best, key=best.get) if best else None
    out["best_is_true_best"] = (parent is not None and true_best is not None
                                and parent.data.tags.get("best_trial_id") == true_best)
    return out


def study_db(uri: str, sweep: str) -> Path:
    """The sweep's Optuna study: ``<storage>/<sweep>/optuna.db`` beside the work folder's MLflow store."""
    return Path(uri.removeprefix("sqlite:///")).parent / "ray" / sweep / "optuna.db"


def audit_optuna(c, runs: list, db: Path, sweep: str) -> dict[str, int]:
    """Each MLflow trial against its Optuna trial (``trial_number`` tag = Optuna's number): the same
    state (FINISHED = COMPLETE, or PRUNED when stopped early; FAILED = FAIL), value (the run's
    ``best_val_objective``) and intermediate values (the run's per-epoch history)."""
    import optuna

    out = {"optuna_trials": 0, "optuna_state_mismatch": 0, "optuna_value_mismatch": 0,
           "optuna_steps_mismatch": 0, "optuna_running": 0}
    if not db.is_file():
        return out
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=sweep, storage=f"sqlite:///{db}")
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    out["optuna_trials"] = len(trials)
    out["optuna_running"] = sum(t.state.name == "RUNNING" for t in trials.values())
    want = {"FINISHED": ("COMPLETE", "PRUNED"), "FAILED": ("FAIL",), "KILLED": ("FAIL",)}
    for r in runs:
        t = trials.get(int(r.data.tags.get("trial_number", -1) or -1))
        if t is None:
            out["optuna_state_mismatch"] += 1
            continue
        history = {m.step: m.value for m in c.get_metric_history(r.info.run_id, val_key())}
        if t.state.name not in want.get(r.info.status, ()) or (t.state.name == "PRUNED") != (
                r.data.tags.get("early_stopped") == "true"):
            out["optuna_state_mismatch"] += 1
        if t.intermediate_values != history:
            out["optuna_steps_mismatch"] += 1
        best = r.data.metrics.get("best_val_objective")
        if t.state.name == "COMPLETE" and (best is None or t.value is None or abs(t.value - best) > 1e-9):
            out["optuna_value_mismatch"] += 1
    return out


# --------------------------------------------------------------------------- scenarios
def _interrupt_then_resume(work: Work, name: str, sig: int, samples: int = 2) -> dict[str, Any]:
    t0 = time.time()
    proc = work.start(work.args(name, "--num-samples", str(samples)))
    hit = wait_for_epoch(work.uri, name, proc)
    if hit:
        (os.kill if sig == signal.SIGINT else os.kill)(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=600)
    finally:
        reap(proc)
    first = proc.returncode
    running_after_fault = audit(work.uri, name, samples)["running"]
    # resume WITHOUT repeating --num-samples: the sweep remembers how it was started
    code, _, err2 = work.run(work.args(name, "--resume"))
    res = audit(work.uri, name, samples)
    res.update(faults=int(hit), exit_fault=first, exit_resume=code, running_after_fault=running_after_fault,
               seconds=round(time.time() - t0, 1), stderr_lines=len((err2 or "").strip().splitlines()))
    return res


def _logged_epochs(uri: str, sweep: str) -> int:
    c = client(uri)
    return sum(len(c.get_metric_history(r.info.run_id, val_key())) for r in trial_runs(uri, sweep))


def interrupt_chain(work: Work, name: str, signals: list[int], samples: int = 2,
                    after_finished: tuple[bool, ...] = ()) -> dict[str, Any]:
    """One sweep hit by each of ``signals`` in turn (each after one more epoch was logged and, where
    ``after_finished[i]``, once a trial has finished), resumed after each with ``--resume`` alone,
    then run to its end and audited. ``stages``: after each fault,
    what the driver printed and what the record held (:func:`_stage`); ``rerun``: per fault, the trials
    finished before it whose MLflow run (id, end time) changed afterwards; ``parents``: sweep parent runs."""
    t0 = time.time()
    exits, hits, seen, stages = [], 0, 0, []
    for i, sig in enumerate(signals):
        proc = work.start(work.args(name, "--num-samples", str(samples)) if i == 0 else work.args(name, "--resume"))
        deadline = time.time() + 600
        finished = i < len(after_finished) and after_finished[i]
        while time.time() < deadline and proc.poll() is None and (_logged_epochs(work.uri, name) <= seen or (
                finished and not any(r.info.status == "FINISHED" for r in trial_runs(work.uri, name)))):
            time.sleep(0.5)
        if proc.poll() is None:
            os.kill(proc.pid, sig)
            hits += 1
        try:
            _, err = proc.communicate(timeout=600)
        finally:
            reap(proc)
        exits.append(proc.returncode)
        seen = _logged_epochs(work.uri, name)
        stages.append(_stage(work, name, err or ""))
    code, _, _ = work.run(work.args(name, "--resume"))
    res = audit(work.uri, name, samples)
    end = _stage(work, name, "")
    res.update(faults=hits, exit_fault=exits, exit_resume=code, seconds=round(time.time() - t0, 1), stages=stages,
               rerun=[sum(end["finished"].get(t) != ran for t, ran in st["finished"].items()) for st in stages],
               parents=end["parents"], state_parent=end["state_parent"])
    return res


def _stage(work: Work, name: str, stderr: str) -> dict[str, Any]:
    """After a fault: the printed resume hint, runs left RUNNING, the parent's status, the finished
    trials (trial id -> (run id, end time)), the sweep parents and the parent run id in ssvp_sweep.json."""
    logs = sorted(work.root.glob("driver-*.log"), key=lambda p: p.stat().st_mtime)
    printed = (logs[-1].read_text() if logs else "") + stderr
    runs = sweep_runs(client(work.uri), name)
    parents = [r for r in runs if r.data.tags.get("role") == "sweep"]
    try:
        state_parent = json.loads((work.root / "ray" / name / "ssvp_sweep.json").read_text()).get("parent_run_id")
    except (OSError, ValueError):
        state_parent = None
    return {"resume_hint": f"--resume --name {name}" in printed,
            "running": sum(r.info.status == "RUNNING" for r in runs),
            "parent": parents[0].info.status if parents else "none",
            "parents": [r.info.run_id for r in parents], "state_parent": state_parent,
            "finished": {r.data.tags["trial_id"]: (r.info.run_id, r.info.end_time) for r in runs
                         if r.data.tags.get("role") == "trial" and r.info.status == "FINISHED"}}


def driver_sigkill(work: Work) -> dict[str, Any]:
    return _interrupt_then_resume(work, "kill", signal.SIGKILL)


def sigint(work: Work) -> dict[str, Any]:
    return _interrupt_then_resume(work, "int", signal.SIGINT)


def worker_kill(work: Work) -> dict[str, Any]:
    t0 = time.time()
    name = "wk"
    proc = work.start(work.args(name, "--num-samples", "1"))
    killed = 0
    if wait_for_epoch(work.uri, name, proc):
        for rec in (work.root / "ray" / f"{name}.train").glob("*/placement/rank0.json"):
            try:
                os.kill(json.loads(rec.read_text())["pid"], signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, ValueError, KeyError):
                pass
    try:
        proc.communicate(timeout=600)
    finally:
        reap(proc)
    res = audit(work.uri, name, 1)
    res.update(faults=killed, exit_fault=proc.returncode, seconds=round(time.time() - t0, 1))
    return res


def nan(work: Work) -> dict[str, Any]:
    name = "nan"
    code, secs, err = work.run(work.args(name, "--num-samples", "1", "--set", "lr_head=1e30", "--set",
                                         "lr_prompt=1e30", "--set", "grad_clip=0"))
    res = audit(work.uri, name, 0)
    starts = list((work.root / "ray" / f"{name}.train").glob("*/starts.jsonl"))
    attempts = sum(len(p.read_text().splitlines()) for p in starts)
    res.update(faults=1, exit_fault=code, seconds=round(secs, 1), attempts=attempts,
               cause_reported="NonFiniteLossError" in err or "NonFiniteLossError" in _stdout(work),
               stderr_lines=len(err.strip().splitlines()))
    return res


def _stdout(work: Work) -> str:
    logs = sorted(work.root.glob("driver-*.log"), key=lambda p: p.stat().st_mtime)
    return logs[-1].read_text() if logs else ""


def _preflight(work: Work, name: str, *extra: str) -> dict[str, Any]:
    code, secs, err = work.run(work.args(name, *extra), timeout=300)
    res = audit(work.uri, name, 0)
    res.update(faults=1, exit_fault=code, seconds=round(secs, 1), stderr_lines=len(err.strip().splitlines()),
               message=err.strip().splitlines()[-1][:160] if err.strip() else "")
    return res


def tracking_down(work: Work) -> dict[str, Any]:
    from tuning.ray_session import free_port

    return _preflight(work, "down", "--tracking-uri", f"http://127.0.0.1:{free_port()}")


def bad_storage(work: Work) -> dict[str, Any]:
    (work.root / "a_file").write_text("x")
    return _preflight(work, "badstore", "--storage-path", str(work.root / "a_file" / "ray"))


def missing_data(work: Work) -> dict[str, Any]:
    return _preflight(work, "nodata", "--set", f"source=synthetic:{work.root / 'nowhere'}")


SCENARIOS = {"driver-sigkill": driver_sigkill, "sigint": sigint, "worker-kill": worker_kill, "nan": nan,
             "tracking-down": tracking_down, "bad-storage": bad_storage, "missing-data": missing_data}
COLUMNS = ("faults", "exit_fault", "exit_resume", "seconds", "trials_lost", "epochs_lost", "epochs_duplicated",
           "running_after_fault", "running", "best_mismatch", "best_is_true_best", "parent", "restarts",
           "backfilled", "optuna_trials", "optuna_state_mismatch", "optuna_value_mismatch", "optuna_steps_mismatch",
           "optuna_running", "attempts", "stderr_lines")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenarios", nargs="*", choices=[[], *SCENARIOS], default=[], metavar="SCENARIO",
                   help=f"any of {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    root = Path(args.work or tempfile.mkdtemp(prefix="ssvp-fi-"))
    work = Work(root)
    results = {}
    try:
        for name in args.scenarios or list(SCENARIOS):
            print(f"[fault-injection] {name} ...", flush=True)
            results[name] = SCENARIOS[name](work)
            print(f"[fault-injection] {name}: {json.dumps(results[name])}", flush=True)
    finally:
        if not (args.keep or args.work):
            shutil.rmtree(root, ignore_errors=True)
    print()
    print("| scenario | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, res in results.items():
        print(f"| {name} | " + " | ".join(str(res.get(c, "")) for c in COLUMNS) + " |")
    lost = sum(r.get("trials_lost", 0) for r in results.values() if r.get("exit_resume", r.get("exit_fault")) == 0)
    bad = sum(r.get("epochs_lost", 0) + r.get("epochs_duplicated", 0) + r.get("running", 0) + r.get("best_mismatch", 0)
              + sum(v for k, v in r.items() if k.startswith("optuna_") and k != "optuna_trials")
              for r in results.values())
    print(f"\ntotal: {len(results)} scenarios, trials lost in completed sweeps {lost}, "
          f"epochs lost/duplicated + runs RUNNING + best mismatches {bad}")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
