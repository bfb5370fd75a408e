"""Sweeps under faults (issue 11): interrupts, kills, deterministic failures, pre-flight, hostile names.

Fast tests check the pieces with real MLflow (SQLite) and real Ray Train exception objects.
The slow ones run ``tuning/sweep.py`` as a real child process through
``bench/fault_injection.py`` and inject faults with real signals (SIGKILL of the driver,
SIGINT, SIGKILL of a Ray Train worker), then audit the MLflow record.
"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def _client(tmp_path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db")


# --------------------------------------------------------------------------- fast
@pytest.mark.parametrize("name", ["it's", 'say "hi"', "both ' and \" 50%"])
def test_quotes_in_a_sweep_name_find_the_right_parent(mlflow_db, name):
    from tuning.tracking import SweepTracker

    uri = mlflow_db
    other = SweepTracker(uri, "q", sweep_id="both x and y 50%")  # what a LIKE pattern would also match
    other.start_parent("other")
    tracker = SweepTracker(uri, "q", sweep_id=name)
    assert tracker.find_parent() is None
    run_id = tracker.start_parent(name)
    assert SweepTracker(uri, "q", sweep_id=name).find_parent().info.run_id == run_id
    with pytest.raises(RuntimeError, match="already has a sweep"):
        SweepTracker(uri, "q", sweep_id=name).start_parent(name)


def test_parent_artifact_config_file_is_redacted(tmp_path, mlflow_db):
    from tuning.record import log_artifacts
    from tuning.tracking import SweepTracker

    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("search:\n  optuna_storage: postgresql://u:pw1234@db/optuna\n  seed: 0\n")
    tracker = SweepTracker(mlflow_db, "r", sweep_id="s")
    tracker.start_parent("s")
    log_artifacts(tracker, {"sweep_config": cfg}, "missing {path}")
    local = tracker.client.download_artifacts(tracker.parent_run_id, "sweep_config/sweep.yaml", str(tmp_path / "dl"))
    text = Path(local).read_text()
    assert "pw1234" not in text and "postgresql://u:***@db/optuna" in text and "seed: 0" in text


def test_resume_command_repeats_the_original_overrides_redacted():
    from tuning.sweep import resume_command

    cmd = resume_command(["--config", "q.yaml", "--local", "--num-samples", "5", "--set", "epochs=2",
                          "--tracking-uri", "postgresql://u:secret@h/db", "--name", "old"], "q-1")
    assert cmd == ("python tuning/sweep.py --config q.yaml --local --num-samples 5 --set epochs=2 "
                   "--tracking-uri postgresql://u:***@h/db --resume --name q-1")


def test_remembered_args_keep_overrides_and_let_new_flags_win(tmp_path, synthetic_root):
    from tuning.sweep import _remember_launch, _remembered_args, build_parser, sweep_from_args

    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"name: s\nbase:\n  preset: tiny\n  synthetic: {{root: {synthetic_root}}}\n")
    first = ["--config", str(cfg), "--storage-path", str(tmp_path / "ray"), "--num-samples", "5",
             "--set", "epochs=2", "--name", "s-1", "--quiet"]
    parser = build_parser()
    _remember_launch(sweep_from_args(parser.parse_args(first)), first)
    again = ["--config", str(cfg), "--storage-path", str(tmp_path / "ray"), "--resume", "--name", "s-1",
             "--max-concurrent", "1"]
    args, stored = _remembered_args(parser, parser.parse_args(again), again)
    sweep = sweep_from_args(args)
    assert stored == first
    assert sweep.search.num_samples == 5 and sweep.base.train.epochs == 2 and sweep.verbose == 0
    assert sweep.search.max_concurrent_trials == 1 and args.resume and sweep.name == "s-1"
    assert json.loads((tmp_path / "ray" / "s-1" / "launch.json").read_text())["argv"] == first


def test_deterministic_errors_are_not_retried_and_the_root_cause_is_dug_out():
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from ssvp.data import DatasetError
    from ssvp.engine import NonFiniteLossError
    from tuning.trial import _failure_policy, root_cause

    policy = _failure_policy(FailureConfig(max_failures=3))
    nan = WorkerGroupError("Training failed", {1: RuntimeError("collateral"), 0: NonFiniteLossError("loss is nan")})
    assert policy.make_decision(nan) == FailureDecision.RAISE  # no retry, although 3 are allowed
    assert policy.make_decision(WorkerGroupError("x", {0: DatasetError("bad image a.png")})) == FailureDecision.RAISE
    assert policy.make_decision(WorkerGroupError("x", {0: OSError("node lost")})) == FailureDecision.RETRY
    # a worker destroyed because its placement group was removed (the driver released it: the trial is
    # ending), in Ray's words: no retry, which would start a worker group whose placement group leaks
    removed = RuntimeError("A worker health check failed. The actor died unexpectedly before finishing this task. "
                           "Worker exit type: INTENDED_SYSTEM_EXIT Worker exit detail: Destroying worker since its "
                           "placement group was removed. Placement group id: 4925c0e2e9ce5759")
    assert policy.make_decision(WorkerGroupError("x", {0: removed})) == FailureDecision.RAISE
    killed = RuntimeError("A worker health check failed. The actor died unexpectedly before finishing this task. "
                          "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR")
    assert policy.make_decision(WorkerGroupError("x", {0: killed})) == FailureDecision.RETRY  # a killed worker still is
    assert isinstance(root_cause(nan), NonFiniteLossError)
    inner = ValueError("cannot reach the store")
    assert root_cause(ControllerError(inner)) is inner


@pytest.mark.slow  # a training run with checkpoints
def test_training_resumes_from_the_newest_complete_checkpoint_on_disk(tmp_path, synthetic_root):
    from conftest import synthetic_config
    from ssvp import engine
    from tuning.trial import HISTORY_FILE, newest_checkpoint, read_history

    cfg = synthetic_config(synthetic_root, epochs=2, max_steps_per_epoch=1, max_per_class=2, progress=False)
    trial = tmp_path / "t"
    epochs = []

    def save(epoch, metrics, ckpt):  # what the worker does: one Train checkpoint folder per epoch
        epochs.append(dict(metrics, epoch=float(epoch)))
        dst = trial / f"checkpoint_{epoch}"
        import shutil

        shutil.copytree(Path(ckpt).parent, dst)
        (dst / HISTORY_FILE).write_text(json.dumps({"epochs": epochs, "best_epoch": epoch}))

    engine.fit(cfg, checkpoint_dir=str(tmp_path / "work"), on_epoch=save)
    partial = trial / "checkpoint_9"  # a save cut short by a kill: no history, truncated heads
    (partial / "last").mkdir(parents=True)
    (partial / "last" / "head.pt").write_bytes(b"trunc")
    assert newest_checkpoint(trial) == trial / "checkpoint_2"
    assert newest_checkpoint(trial, also=trial / "checkpoint_1") == trial / "checkpoint_2"
    history, best = read_history(trial / "checkpoint_2")
    assert [h["epoch"] for h in history] == [1.0, 2.0] and best == 2


def test_preflight_fails_in_seconds_with_one_line(tmp_path, synthetic_root, capsys, monkeypatch):
    import ray

    import tuning.ray_session
    import tuning.runner
    from tuning.ray_session import free_port
    from tuning.sweep import main

    def no_ray(*args, **kwargs):
        raise AssertionError("a failing pre-flight check must not start or connect to Ray")

    # every way into Ray goes through init_ray; an earlier test's Ray may still be up, so compare
    monkeypatch.setattr(tuning.ray_session, "init_ray", no_ray)
    monkeypatch.setattr(tuning.runner, "init_ray", no_ray)
    monkeypatch.chdir(tmp_path)  # the default MLflow store is <launch dir>/runs/mlflow.db
    ray_was_up = ray.is_initialized()

    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"name: s\nbase:\n  preset: tiny\n  synthetic: {{root: {synthetic_root}}}\n")
    (tmp_path / "file").write_text("x")
    common = ["--config", str(cfg), "--local", "--name", "p", "--storage-path", str(tmp_path / "ray")]
    cases = {
        "tracking server": ["--tracking-uri", f"http://127.0.0.1:{free_port()}"],
        "storage_path": ["--storage-path", str(tmp_path / "file" / "ray")],
        "does not exist": ["--set", f"source=synthetic:{tmp_path / 'nowhere'}"],
        "unknown dataset format": ["--set", "source=nosuchformat:/data"],
        # issue 25: each of these was a traceback, a hang or a silent new sweep
        "resources.cpus_per_worker must be a finite number > 0, got -1.0": ["--cpus-per-worker", "-1"],
        "resources.cpus_per_worker must be a finite number > 0, got nan": ["--cpus-per-worker", "nan"],
        "resources.gpus_per_worker must be a finite number >= 0, got inf": ["--gpus-per-worker", "inf"],
        "--num-cpus must be >= 1, got -2": ["--num-cpus", "-2"],
        "model.clip_layers: unbalanced brackets in '[1,2'": ["--set", "clip_layers=[1,2"],
        "search.optuna_storage postgresql://u:***@127.0.0.1:": [
            "--set-search", f"optuna_storage=postgresql://u:pw5309@127.0.0.1:{free_port()}/o"],
        "search.optuna_storage notadb://h/x cannot be opened": ["--set-search", "optuna_storage=notadb://h/x"],
    }
    for expected, extra in cases.items():
        if extra[0] == "--set-search":  # a search setting: in the sweep file
            cfg.write_text(f"name: s\nbase:\n  preset: tiny\n  synthetic: {{root: {synthetic_root}}}\n"
                           f"search: {{{extra[1].replace('=', ': ', 1)}}}\n")
            extra = []
        else:
            cfg.write_text(f"name: s\nbase:\n  preset: tiny\n  synthetic: {{root: {synthetic_root}}}\n")
        code = main(common + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected in err[0], (expected, err)
    assert "pw5309" not in capsys.readouterr().err
    cfg.write_text(f"name: s\nbase:\n  preset: tiny\n  synthetic: {{root: {synthetic_root}, n_trian: 3}}\n")
    assert main(common) == 2  # a misspelt synthetic option, whether or not the data exists
    err = capsys.readouterr().err.strip()
    assert "base.synthetic: unknown option(s) ['n_trian']; known: root, seed, size, n_train" in err, err
    assert ray.is_initialized() == ray_was_up  # nothing of it needed Ray


def test_empty_class_name_is_refused(capsys):
    from ssvp.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["predict", "--checkpoint", "c", "--input", "i", "--class-name", " "])
    assert exc.value.code == 2 and "--class-name: must not be empty" in capsys.readouterr().err


def test_print_config_redacts_secrets(tmp_path, synthetic_root, capsys):
    from tuning.sweep import main

    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"name: s\nbase:\n  preset: tiny\n  synthetic: {{root: {synthetic_root}}}\n"
                   "search: {optuna_storage: 'postgresql://u:pw9876@db/o'}\n")
    assert main(["--config", str(cfg), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "pw9876" not in out and "postgresql://u:***@db/o" in out


# --------------------------------------------------------------------------- slow: real processes, real signals
@pytest.fixture()
def work(tmp_path_factory):
    from fault_injection import Work

    return Work(tmp_path_factory.mktemp("fi"))


def _assert_clean(res: dict, trials: int) -> None:
    assert res["trials"] == trials and res["trials_lost"] == 0, res
    assert res["epochs_lost"] == 0 and res["epochs_duplicated"] == 0, res
    assert res["running"] == 0 and res["best_mismatch"] == 0 and res["best_is_true_best"], res
    assert res["parent"] == "FINISHED", res
    # issue 25: the Optuna study is as exact as MLflow (state, value, every intermediate value)
    assert res["optuna_trials"] == trials and res["optuna_running"] == 0, res
    assert res["optuna_state_mismatch"] == res["optuna_value_mismatch"] == res["optuna_steps_mismatch"] == 0, res


@pytest.mark.slow
def test_sigint_then_driver_sigkill_then_resume_keeps_every_epoch_once_and_the_overrides(work):
    """Ctrl+C once one trial has finished (exit 130, the ``--resume --name`` command printed, nothing
    left RUNNING, the parent KILLED), ``--resume`` (the finished trial is not run again), SIGKILL of
    that driver mid-epoch, ``--resume`` again: every epoch once, one parent run (the state's), best
    values = the logged heads', the true best trial, ``--num-samples 2`` remembered (every trial runs,
    the sweep is not reported interrupted), the Optuna study as exact as MLflow. After the SIGKILL,
    Tune's saved state may predate a trial's end: Tune then restarts it from its last checkpoint,
    which trains no epoch again (no duplicate) but closes its run anew, so "not run again" is
    asserted for the Ctrl+C only. (This test holds what tests/test_tuning_cluster.py's local-resume
    test asserted; "defaults first" lives in test_tuning_ray.py::test_optuna_sweep_is_recorded_in_mlflow.)"""
    from fault_injection import interrupt_chain

    res = interrupt_chain(work, "chain", [signal.SIGINT, signal.SIGKILL], after_finished=(True, False))
    assert res["faults"] == 2 and res["exit_fault"] == [130, -9], res
    assert res["exit_resume"] == 0, res
    _assert_clean(res, trials=2)
    # after Ctrl+C: the resume command printed, nothing left RUNNING, the parent closed as KILLED
    sigint = res["stages"][0]
    assert sigint["resume_hint"] and sigint["running"] == 0 and sigint["parent"] == "KILLED", sigint
    # one parent run throughout, the one the sweep's state names; the trial that had finished before
    # the Ctrl+C did not run again
    assert len(res["parents"]) == 1 and res["state_parent"] == res["parents"][0], res
    assert len(sigint["finished"]) == 1 and res["rerun"][0] == 0, res


@pytest.mark.slow
def test_same_seed_same_metrics_whatever_the_flags_and_a_nan_trial_fails_once(work):
    """One grid sweep run with ``--verbose`` (Tune's table, Ray's logs), three variants: ``plain`` and
    ``bars`` differ only in ``progress`` (tqdm bars) and log identical per-epoch metrics; ``nan``
    (learning rates 1e30) fails with NonFiniteLossError after one attempt (no Train retry although
    ``max_failures: 1``), its cause in the summary, nothing left RUNNING."""
    from fault_injection import client, trial_runs

    yaml = (work.root / "sweep.yaml").read_text()
    yaml = yaml.replace("search: {algorithm: optuna, num_samples: 1,", "search: {algorithm: grid, num_samples: 1,")
    yaml = yaml.replace("space:\n  gamma: {type: uniform, low: 0.0, high: 1.0}\n",
                        "space: {}\nvariants: {plain: {progress: false}, bars: {progress: true},\n"
                        "           nan: {lr_head: 1.0e+30, lr_prompt: 1.0e+30, grad_clip: 0.0}}\n")
    (work.root / "sweep.yaml").write_text(yaml)
    args = [a for a in work.args("flags") if a != "--quiet"] + ["--verbose"]
    code, _, err = work.run(args)
    assert code == 0, err[-2000:]  # two of three trials finished
    runs = {r.data.tags["variant"]: r for r in trial_runs(work.uri, "flags")}
    assert set(runs) == {"plain", "bars", "nan"}
    assert runs["nan"].info.status == "FAILED" and "NonFiniteLossError" in runs["nan"].data.tags["error"]
    (nan_dir,) = [d for d in (work.root / "ray" / "flags.train").iterdir()
                  if d.name == runs["nan"].data.tags["trial_id"]]
    assert len((nan_dir / "starts.jsonl").read_text().splitlines()) == 1  # one attempt: not retried
    assert "NonFiniteLossError" in (work.root / sorted(p.name for p in work.root.glob("driver-*.log"))[-1]).read_text()
    c = client(work.uri)
    assert all(r.info.status != "RUNNING" for r in c.search_runs([runs["nan"].info.experiment_id]))
    keys = sorted(k for k in runs["plain"].data.metrics if k.startswith(("val/", "train/")))
    assert keys
    for key in keys:
        a = [(m.step, m.value) for m in sorted(c.get_metric_history(runs["plain"].info.run_id, key), key=lambda m: m.step)]
        b = [(m.step, m.value) for m in sorted(c.get_metric_history(runs["bars"].info.run_id, key), key=lambda m: m.step)]
        assert a == b, key


def test_restore_reattaches_this_runs_callbacks_and_the_optuna_searcher(tmp_path, monkeypatch):
    """Issue 25: after a driver kill, ``Tuner.restore`` brought back the *pickled* MLflow callback, with no
    searcher (its ``__getstate__`` drops it), so epochs back-filled on resume never reached Optuna.
    ``reattach`` puts this run's callbacks in and attaches the restored searcher. The study's URL is
    pickled without its secret, which comes back from this process's config, not from the pickle.
    A real ``Tuner`` / ``Tuner.restore`` (no Ray cluster needed for either)."""
    from ray import tune

    from tuning import search as search_mod
    from tuning.integrity import SigningCallback, StateSigner, verify_sweep_state
    from tuning.runner import reattach
    from tuning.tracking import MLflowTrialCallback, SweepTracker, TrialRecordSettings

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    record = TrialRecordSettings(base={"model": {"clip_pretrained": "https://u:wpw/61@h/w.pt"}}, epochs=2)
    url = f"sqlite:///file:{tmp_path}/o.db?mode=rwc&token=tok8812&uri=true"

    def trainable(config):
        return {"x": 1.0}

    tracker = SweepTracker(f"sqlite:///{tmp_path}/m.db", "e", sweep_id="s")
    signer = StateSigner(tmp_path / "s")
    tune.Tuner(trainable, param_space={"g": tune.uniform(0, 1)},
               tune_config=tune.TuneConfig(metric="x", mode="max", num_samples=1,
                                           search_alg=search_mod.make_optuna_search("s", url, 0, None, epochs=2)),
               run_config=tune.RunConfig(name="s", storage_path=str(tmp_path),
                                         callbacks=[MLflowTrialCallback(tracker, record), SigningCallback(signer)]))
    signer.sign_storage()
    assert set(verify_sweep_state(tmp_path / "s")) == {"tuner.pkl"}
    pickled = (tmp_path / "s" / "tuner.pkl").read_bytes()
    assert b"tok8812" not in pickled and b"wpw/61" not in pickled and b"u:***@h" in pickled
    monkeypatch.setattr(search_mod, "_REAL_URLS", {})  # a new driver process: only its config knows the URL
    search_mod.remember_storage_url(url)
    restored = tune.Tuner.restore(str(tmp_path / "s"), trainable=trainable)
    fresh = [MLflowTrialCallback(tracker, record), SigningCallback(signer)]
    reattach(restored, fresh)
    callbacks = restored._local_tuner.get_run_config().callbacks
    searcher = restored._local_tuner._tune_config.search_alg
    assert callbacks[0] is fresh[0] and callbacks[1] is fresh[1] and len(callbacks) == 2
    assert fresh[0].searcher is searcher and isinstance(searcher, search_mod.ResumableOptunaSearch)
    assert searcher._storage.url == url  # the secret put back from this process, not from the pickle


def test_a_trial_lost_by_a_driver_kill_is_handed_out_again_as_the_same_optuna_trial(tmp_path):
    """Issue 25: the driver is killed after Optuna handed out a trial but before Tune's next experiment
    checkpoint. On resume Tune asks for a replacement; the searcher hands out the lost Optuna trial
    again (same number, same parameters), so the study holds exactly the trials MLflow holds; an
    orphan nobody asks for again ends FAIL, never RUNNING forever; a trial's value counts the epochs
    it reported after the saved state too. A real study in SQLite."""
    import optuna
    from ray import tune

    from tuning.search import make_optuna_search

    url = f"sqlite:///{tmp_path}/o.db"

    def searcher():
        s = make_optuna_search("st", url, 0, None, epochs=2)
        s.set_search_properties("val_objective", "max", {"gamma": tune.uniform(0, 1)})
        return s

    first = searcher()
    first.suggest("a")
    first.save(str(tmp_path / "searcher.pkl"))  # Tune's last experiment checkpoint
    lost = first.suggest("b")  # asked from Optuna, then the driver is killed
    first.observe("a", {"val_objective": 0.5, "epoch": 1})  # reported after the saved state: the study has it
    resumed = searcher()
    resumed.restore(str(tmp_path / "searcher.pkl"))
    assert resumed.suggest("c") == lost  # the replacement is the lost trial
    resumed.observe("a", {"val_objective": 0.1, "epoch": 1})  # epoch 1 again (a restart): not reported twice
    resumed.observe("a", {"val_objective": 0.2, "epoch": 2})
    resumed.on_trial_complete("a", {"val_objective": 0.2, "epoch": 2})
    for epoch in (1, 2):
        resumed.observe("c", {"val_objective": 0.1 * epoch, "epoch": epoch})
    resumed.on_trial_complete("c", {"val_objective": 0.2, "epoch": 2})
    resumed.fail_orphans()
    study = optuna.load_study(study_name="st", storage=url)
    assert [(t.number, t.state.name, t.user_attrs["ray_trial_id"]) for t in study.trials] == [
        (0, "COMPLETE", "a"), (1, "COMPLETE", "c")]
    assert study.trials[1].params == lost and study.trials[1].intermediate_values == {1: 0.1, 2: 0.2}
    # a's value is its best epoch over every epoch the study holds, the one reported before the kill too
    assert study.trials[0].intermediate_values == {1: 0.5, 2: 0.2} and study.trials[0].value == 0.5

    lone = searcher()
    lone.suggest("x")
    lone.save(str(tmp_path / "lone.pkl"))
    lone.suggest("y")
    restored = searcher()
    restored.restore(str(tmp_path / "lone.pkl"))
    restored.fail_orphans()  # the sweep ended without asking for it
    states = {t.user_attrs.get("ray_trial_id"): t.state.name for t in optuna.load_study(study_name="st", storage=url).trials}
    assert states["y"] == "FAIL" and states["x"] == "RUNNING"  # x: a trial Tune knows, still to report


def test_quiet_holds_back_tunes_trial_tracebacks():
    """``--quiet`` (verbose 0): Tune's and Train's ERROR records (a failed trial's traceback, logged by
    ``ray.tune.execution.tune_controller``) stay off the console; the default (1) shows warnings and
    errors, and the loggers get their levels back afterwards."""
    import logging

    from tuning.runner import _tune_output

    child = logging.getLogger("ray.tune.execution.tune_controller")
    before = [logging.getLogger(n).level for n in ("ray.tune", "ray.train")]
    with _tune_output(0):
        assert not child.isEnabledFor(logging.ERROR)
        assert not logging.getLogger("ray.train._internal").isEnabledFor(logging.ERROR)
    with _tune_output(1):
        assert child.isEnabledFor(logging.ERROR) and not child.isEnabledFor(logging.INFO)
    assert [logging.getLogger(n).level for n in ("ray.tune", "ray.train")] == before


@pytest.mark.slow
def test_a_time_budget_that_ends_the_sweep_before_any_epoch_is_exit_1_and_no_record_says_finished(work):
    """Issue 25: ``search.time_budget_s`` shorter than a trial's start-up. Before: exit 0, the trial
    recorded FINISHED with no metrics and its Optuna trial left RUNNING. Now: exit 1 with "no trial
    finished an epoch"; no MLflow run and no Optuna trial is left RUNNING, none claims FINISHED/COMPLETE."""
    import optuna

    from fault_injection import client, sweep_runs

    yaml = (work.root / "sweep.yaml").read_text()
    (work.root / "sweep.yaml").write_text(yaml.replace("max_concurrent_trials: 1}", "max_concurrent_trials: 1, time_budget_s: 1}"))
    code, _, err = work.run(work.args("budget"))
    assert code == 1 and "no trial finished an epoch" in err, err[-3000:]
    runs = sweep_runs(client(work.uri), "budget")
    trials = [r for r in runs if r.data.tags.get("role") == "trial"]
    assert trials and all(r.info.status not in ("RUNNING", "FINISHED") for r in trials), \
        [(r.info.status, r.data.tags.get("stopped")) for r in trials]
    assert all(r.info.status != "RUNNING" for r in runs)
    storage = f"sqlite:///{work.root / 'ray' / 'budget' / 'optuna.db'}"
    (study,) = optuna.get_all_study_summaries(storage)
    states = [t.state.name for t in optuna.load_study(study_name=study.study_name, storage=storage).trials]
    assert states and not {"RUNNING", "COMPLETE"} & set(states), states
