"""Run a hyperparameter sweep of SSVP on Ray Tune + Ray Train, recorded in MLflow.

Local (Ray started in this process on 127.0.0.1; one GPU per trial if there are GPUs,
else CPU)::

    python tuning/sweep.py --config tuning/configs/quick.yaml --local

On an existing Ray cluster (``ray.init(address="auto")`` inside the job)::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python tuning/sweep.py --config tuning/configs/paper.yaml \\
        --tracking-uri http://MLFLOW:5000 --storage-path /shared/ray_results

(with ``--working-dir .`` the job runs in a copy of the repository, so give absolute or
shared locations for ``--storage-path`` and a tracking server or an absolute
``sqlite:////...`` path for ``--tracking-uri``: the copy is deleted after the job).

Continue an interrupted sweep (finished trials are not run again; unfinished ones go
on from their last checkpoint; MLflow runs are reopened, not duplicated)::

    python tuning/sweep.py --config tuning/configs/quick.yaml --local --resume [--name NAME]

Without ``--name`` a new sweep is named ``<config name>-<YYYYmmdd-HHMMSS>``. ``--resume`` needs
``--name`` (without it, it lists the sweeps of that config and starts none), and loads Tune's
pickled state only when this user's key signed it (:mod:`tuning.integrity`).

See the results (parent run = the sweep, child runs = its trials, plus the
``role=target_eval`` run of the best configuration on the target datasets)::

    mlflow ui --backend-store-uri sqlite:///$PWD/runs/mlflow.db

Refit another point of a finished sweep (the knee, the best on one objective, or a trial by
number) without searching again; a new ``role=refit`` run under the same parent::

    python tuning/sweep.py --config tuning/configs/quick.yaml --local --refit-only --pick trial:7 [--name NAME]

Check what would run (the file, ``--set`` and the flags, base config resolved) without
starting anything::

    python tuning/sweep.py --config tuning/configs/quick.yaml --set epochs=2 --print-config

Exit status: 0 when the sweep ran to its end and at least one trial finished (failed trials
are listed with their causes), 1 when no trial finished or the record could not be written
(disk full, store unreachable mid-run: one line, runs closed), 2 for a bad config, search
space or pre-flight check (data, storage, tracking store, resources; found in seconds,
before Ray starts any trial), 130 when interrupted (the printed resume command repeats the
original arguments; ``--resume`` also remembers them by itself, from ``launch.json``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _ensure_importable() -> None:
    """``python tuning/sweep.py`` puts tuning/ (not the repo root) first on sys.path.

    Drop tuning/ (its modules must be imported as ``tuning.*``) and put the repository
    root on the path when ``ssvp`` / ``tuning`` are not installed, e.g. inside the copy
    of the repository that ``ray job submit --working-dir .`` runs in. Ray hands the
    driver's sys.path to its workers, so trials import the same code.
    """
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    try:
        import ssvp  # noqa: F401
        import tuning  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))


def _bool_or_auto(text: str):
    low = text.lower()
    if low == "auto":
        return "auto"
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}")


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    """The command line, one declaration per flag (kept as one flat list so ``--help`` order and the code
    read alike; splitting it would only scatter the flags)."""
    p = argparse.ArgumentParser(
        prog="python tuning/sweep.py",
        description="SSVP hyperparameter sweep on Ray Tune/Train with Optuna and MLflow.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="View results: mlflow ui --backend-store-uri sqlite:///ABS/PATH/runs/mlflow.db",
    )
    p.add_argument("--config", required=True, help="sweep YAML (or the name of one in tuning/configs)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="start Ray in this process (127.0.0.1 only)")
    where.add_argument("--address", default=None, help="Ray cluster address (default: auto, i.e. RAY_ADDRESS or a local head)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep (Tuner.restore)")
    p.add_argument("--refit-only", action="store_true",
                   help="refit a point of a finished sweep (--name, or the newest of the config) without searching")
    p.add_argument("--pick", default=None, metavar="RULE",
                   help="which trial's configuration the refit trains: knee | best:<metric> | trial:<n> "
                        "(default: the config's refit.pick, knee)")
    p.add_argument("--name", default=None, help="sweep name (default <config name>-<timestamp>)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the "
                   "config's mlflow.tracking_uri, else sqlite:////CWD/runs/mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment name")
    p.add_argument("--register-model", default=None, metavar="NAME",
                   help="register the refit model in the MLflow model registry as NAME "
                        "(models:/NAME/<version>; default: the config's mlflow.register_model, else not registered)")
    p.add_argument("--storage-path", default=None,
                   help="Ray Tune/Train storage: a shared folder or s3://BUCKET/PATH (default: SSVP_STORAGE_PATH, "
                        "else the config's storage_path)")
    p.add_argument("--data-root", default=None, help="folder that data/ in dataset paths stands for "
                   "(default: SSVP_DATA_ROOT, else ./data)")
    p.add_argument("--feature-cache", default=None,
                   help="frozen-feature cache folder (default: SSVP_FEATURE_CACHE, else the config's train.feature_cache)")
    p.add_argument("--num-samples", type=int, default=None, help="number of trials (Optuna) / grid repeats")
    p.add_argument("--workers-per-trial", type=int, default=None, help="Ray Train workers per trial (DDP when > 1)")
    p.add_argument("--use-gpu", type=_bool_or_auto, default=None, help="auto | true | false")
    p.add_argument("--gpus-per-worker", type=float, default=None)
    p.add_argument("--cpus-per-worker", type=float, default=None)
    p.add_argument("--max-concurrent", type=int, default=None, help="trials running at once (default: what fits)")
    p.add_argument("--reuse-processes", action=argparse.BooleanOptionalAction, default=None,
                   help="one-worker trials train in reused Tune actors: imports, the text tower and Ray's worker "
                        "start once per process, not per trial (default: the config's resources.reuse_processes)")
    p.add_argument("--objectives", type=_names, default=None, metavar="M1,M2",
                   help="several objectives, e.g. val/image_auroc,val/pixel_aupro (a Pareto front; default: the "
                        "config's search.objectives, else search.metric)")
    p.add_argument("--modes", type=_names, default=None, metavar="max,max", help="one max/min per objective")
    p.add_argument("--sampler", choices=("tpe", "nsga2"), default=None, help="Optuna sampler (default tpe)")
    p.add_argument("--scheduler", choices=("asha", "none"), default=None,
                   help="asha | none (FIFO: every trial runs all epochs; what several objectives need unless "
                        "--scheduler-metric names the one ASHA stops on)")
    p.add_argument("--scheduler-metric", default=None, help="the metric ASHA ranks trials on")
    p.add_argument("--class-folds", type=int, default=None,
                   help="k > 1: each trial trains k disjoint held-out source-class folds; objective = fold mean")
    p.add_argument("--seeds-per-trial", type=int, default=None, help="n > 1: each fold trained with n seeds")
    p.add_argument("--risk", type=float, default=None, metavar="KAPPA",
                   help="objective = mean - KAPPA * std over folds/seeds")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a --local Ray (default: all)")
    p.add_argument("--target-eval", choices=("best", "all", "none"), default=None)
    p.add_argument("--set", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config key (repeatable), e.g. --set epochs=3")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--quiet", action="store_true", help="print only the final summary")
    out.add_argument("--verbose", action="store_true",
                     help="also Tune's progress table and Ray's own logs (default: one line per finished trial)")
    p.add_argument("--print-config", action="store_true",
                   help="print the sweep as it would run (file + --set + flags, base config resolved) and exit")
    return p


def _sweeps_under(storage, prefix: str = "") -> list[str]:
    """The sweeps under the storage path (folders with Tune's ``tuner.pkl`` or a ``launch.json``), newest first."""
    from tuning.storage import exists, join, list_dirs

    found = [(mtime, name) for name, mtime in list_dirs(storage) if name.startswith(prefix)
             and (exists(join(storage, name, "tuner.pkl")) or exists(join(storage, name, LAUNCH_FILE)))]
    return [name for _, name in sorted(found, reverse=True)]


def _resume_name(storage, name: str | None, config_name: str) -> str:
    """``--resume`` continues the sweep named with ``--name`` and never picks one by itself: a folder
    anyone could write under a shared storage path must not be chosen for the user."""
    from tuning.settings import SweepConfigError

    def listing(sweeps: list[str]) -> str:
        return ", ".join(sweeps[:10]) + (f" (+{len(sweeps) - 10} more)" if len(sweeps) > 10 else "") or "none"

    if not name:
        raise SweepConfigError(f"--resume needs --name (it never picks a sweep by itself); sweeps of config "
                               f"{config_name!r} under {storage}, newest first: {listing(_sweeps_under(storage, config_name + '-'))}")
    if name not in _sweeps_under(storage):
        raise SweepConfigError(f"--resume --name {name!r}: no such sweep under {storage}; sweeps there, newest first: "
                               f"{listing(_sweeps_under(storage))}")
    return name


# command-line flag -> (section, field) of the SweepConfig
_FLAGS = (
    ("tracking_uri", "mlflow", "tracking_uri"), ("experiment", "mlflow", "experiment"),
    ("register_model", "mlflow", "register_model"),
    ("num_samples", "search", "num_samples"), ("max_concurrent", "search", "max_concurrent_trials"),
    ("workers_per_trial", "resources", "workers_per_trial"), ("use_gpu", "resources", "use_gpu"),
    ("gpus_per_worker", "resources", "gpus_per_worker"), ("cpus_per_worker", "resources", "cpus_per_worker"),
    ("reuse_processes", "resources", "reuse_processes"),
    ("objectives", "search", "objectives"), ("modes", "search", "modes"), ("sampler", "search", "sampler"),
    ("scheduler", "search", "scheduler"), ("scheduler_metric", "search", "scheduler_metric"),
    ("class_folds", "search", "class_folds"), ("seeds_per_trial", "search", "seeds_per_trial"),
    ("risk", "search", "risk"),
)


def _login_to_env(tracking_uri: str | None) -> str | None:
    """An ``http(s)://user:password@host`` tracking URI without its login, which goes to MLflow's
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (unless already set): no copy of the
    sweep (``launch.json``, ``ssvp_sweep.json``, ``tuner.pkl``, MLflow tags) then holds the password."""
    from tuning.redact import split_userinfo

    uri, user, password = split_userinfo(tracking_uri)
    if user and not os.environ.get("MLFLOW_TRACKING_USERNAME"):
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
    if password and not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    return uri


def sweep_from_args(args: argparse.Namespace):
    """The :class:`tuning.settings.SweepConfig` of the command line: the file, ``--set`` and the flags.

    Raises ``SweepConfigError`` / ``SpaceError`` / ``ConfigError`` naming the bad field.
    """
    from ssvp.paths import apply_flags
    from tuning.paths import resolve_locations, source_tags
    from tuning.settings import SweepConfigError, load_sweep

    apply_flags(args.data_root, args.feature_cache)  # before the base config (synthetic data) is built
    sweep = load_sweep(args.config, overrides=dict(args.set))
    config_tracking_uri = sweep.mlflow.tracking_uri
    for flag, section, key in _FLAGS:
        value = getattr(args, flag, None)
        if value is not None:
            setattr(getattr(sweep, section), key, value)
    where = resolve_locations(tracking_uri=args.tracking_uri, storage_path=args.storage_path,
                              config_tracking_uri=config_tracking_uri, config_storage_path=sweep.storage_path,
                              config_artifact_location=sweep.mlflow.artifact_location)
    storage = sweep.storage_path = where.storage_path
    sweep.mlflow.tracking_uri, sweep.mlflow.artifact_location = _login_to_env(where.tracking_uri), where.artifact_location
    sweep.target_eval = args.target_eval or sweep.target_eval
    if getattr(args, "pick", None):
        sweep.refit_pick = args.pick
    sweep.verbose = 0 if args.quiet else 2 if getattr(args, "verbose", False) else 1
    sweep.mlflow.parent_tags = {**source_tags(sweep.source_file), "launcher": "tuning/sweep.py"}
    sweep.mlflow.parent_artifacts = {"sweep_config": sweep.source_file}
    if args.resume or getattr(args, "refit_only", False):  # never picks a sweep by itself
        sweep.name = _resume_name(storage, args.name, sweep.name)
    elif args.name:
        sweep.name = args.name
    else:
        sweep.name = f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep.validate()  # the flags too, before Ray starts
    return sweep


def _connect(args: argparse.Namespace) -> bool:
    from tuning.runner import init_ray

    quiet_ray = not args.verbose  # Ray's worker logs and start-up lines only with --verbose
    if args.local:
        init_ray(None, num_cpus=args.num_cpus, log_to_driver=not quiet_ray)
        return True
    try:
        init_ray(args.address or "auto", log_to_driver=not quiet_ray)
    except ConnectionError as exc:
        print(f"error: no Ray cluster at {args.address or 'auto'} ({exc}); start one with "
              "`ray start --head` or run with --local", file=sys.stderr)
        return False
    return True


LAUNCH_FILE = "launch.json"  # <storage>/<name>/launch.json: the command line a sweep was started with
_NOT_REMEMBERED = ("--resume", "--print-config", "--refit-only")


def _launch_file(storage, name: str):
    from tuning.storage import storage_path

    return storage_path(storage) / name / LAUNCH_FILE


def _remembered_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]):
    """On ``--resume``: the arguments the sweep was started with, then this command line's on top.

    The first run stores its command line (``launch.json``, JSON) beside Tune's state, so a
    resume keeps ``--num-samples``, ``--set`` and every other override without repeating them.
    Returns ``(args, original argv or None)``.
    """
    import json

    from tuning.settings import SweepConfigError

    try:
        sweep = sweep_from_args(args)
    except SweepConfigError:
        if args.name:
            return args, None
        raise
    from tuning.integrity import verify_sweep_state
    from tuning.storage import join

    verify_sweep_state(join(sweep.storage_path, sweep.name))  # launch.json and Tune's pickles: this user's
    try:
        stored = json.loads(_launch_file(sweep.storage_path, sweep.name).read_text())["argv"]
    except (OSError, ValueError, KeyError, TypeError):
        return args, None
    merged = parser.parse_args([a for a in stored if a not in _NOT_REMEMBERED])
    merged = parser.parse_args(argv, namespace=merged)  # flags given now win; --set adds to the stored ones
    merged.name = sweep.name
    return merged, list(stored)


def _remember_launch(sweep, argv: list[str]) -> None:
    """Write ``launch.json`` for a new sweep (never over an existing sweep's)."""
    import json

    from tuning.storage import storage_path

    exp = storage_path(sweep.storage_path) / sweep.name
    if (exp / "tuner.pkl").exists() or (exp / LAUNCH_FILE).exists():
        return
    from ssvp.paths import launch_dir
    from tuning.integrity import StateSigner
    from tuning.paths import config_name
    from tuning.redact import redact_text

    exp.mkdir(parents=True, exist_ok=True)
    # cwd: where the user launched from (SSVP_LAUNCH_DIR under `ray job submit`, not the job's temporary copy);
    # no password in the storage folder: a resume takes it from the environment or a flag given again
    (exp / LAUNCH_FILE).write_text(json.dumps({"argv": [redact_text(a) for a in argv if a not in _NOT_REMEMBERED],
                                               "cwd": str(launch_dir()), "config_file": config_name(sweep.source_file),
                                               "time": time.time()}, indent=2))
    StateSigner(str(exp)).sign_storage()


def resume_command(argv: list[str], name: str) -> str:
    """The command that continues this sweep: its original arguments, ``--resume --name NAME``."""
    import shlex

    from tuning.redact import redact_text

    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in _NOT_REMEMBERED:
            continue
        if a == "--name":
            skip = True
            continue
        if a.startswith("--name="):
            continue
        out.append(a)
    return redact_text(" ".join(["python tuning/sweep.py", *map(shlex.quote, out), "--resume", "--name",
                                 shlex.quote(name)]))


def _error(exc: BaseException, code: int) -> int:
    from tuning.redact import redact_text

    print(f"error: {redact_text(str(exc) or type(exc).__name__)}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.local:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: loopback only
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # MLflow's "View run ... at URL" lines
    if args.quiet:  # the summary only: no store set-up lines, no Tune warning about a trial with no result
        import logging

        for name in ("mlflow.store.db.utils", "alembic", "ray.tune.analysis.experiment_analysis"):
            logging.getLogger(name).setLevel(logging.ERROR)
    _ensure_importable()

    from ssvp.config import ConfigError
    from tuning.space import SpaceError

    if args.num_cpus is not None and args.num_cpus < 1:
        return _error(f"--num-cpus must be >= 1, got {args.num_cpus}", 2)
    resolved = _resolve(parser, args, argv)
    if isinstance(resolved, int):
        return resolved
    args, sweep, started_with = resolved
    if args.print_config:
        from tuning.redact import redact_text

        print(redact_text(sweep.to_yaml()), end="", flush=True)
        return 0

    from tuning.preflight import check_before_ray
    from tuning.runner import SweepExistsError, run_trials

    try:
        check_before_ray(sweep)  # data, storage, tracking store: seconds, before Ray starts
    except ValueError as exc:
        return _error(exc, 2)
    if not _connect(args):
        return 2
    from tuning.redact import redact_text

    print(redact_text(f"[sweep] {sweep.name}: {sweep.search.algorithm} search, {sweep.search.num_samples} samples, "
                      f"storage {sweep.storage_path}, MLflow {sweep.mlflow.tracking_uri}"), flush=True)
    if args.refit_only:
        return _refit_only(sweep)
    try:
        if not args.resume:
            _remember_launch(sweep, argv)
        summary = run_trials(sweep, resume=args.resume)
    except KeyboardInterrupt:
        print(f"\ninterrupted; resume with: {resume_command(started_with, sweep.name)}", file=sys.stderr, flush=True)
        return 130
    except (SpaceError, ConfigError, SweepExistsError, ValueError) as exc:  # PreflightError is a ValueError
        return _error(exc, 2)
    except OSError as exc:  # disk full, unwritable folder: the runs are closed, say it in one line
        return _error(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else exc, 1)
    except Exception as exc:  # noqa: BLE001 - MLflow / Ray failures: one line, the runs are closed
        if type(exc).__module__.split(".")[0] not in ("mlflow", "ray", "optuna", "sqlalchemy"):
            raise
        return _error(f"{type(exc).__name__}: {exc}".splitlines()[0], 1)
    return _report(summary, started_with)


def _resolve(parser, args, argv: list[str]):
    """``(args, sweep, started_with)``: with ``--resume`` / ``--refit-only`` the arguments the sweep was
    started with, under the new ones; the sweep they describe. An exit status (2, one line said) when
    the config, the space, a path or the stored state is wrong."""
    from ssvp.config import ConfigError
    from ssvp.paths import PathError
    from tuning.integrity import UntrustedStateError
    from tuning.settings import SweepConfigError
    from tuning.space import SpaceError

    started_with = argv
    try:
        if args.resume or args.refit_only:
            args, stored = _remembered_args(parser, args, argv)
            started_with = stored or argv
        return args, sweep_from_args(args), started_with
    except (SweepConfigError, SpaceError, ConfigError, PathError, UntrustedStateError) as exc:
        return _error(exc, 2)


def _report(summary, started_with: list[str]) -> int:
    """Print the finished sweep's summary; the exit status: 130 interrupted (with the resume command),
    1 when no trial finished or none finished an epoch, else 0."""
    from tuning.redact import redact_text

    print()
    print(redact_text(summary.format()), flush=True)  # a tracking URI may carry a password
    if summary.interrupted:
        print(f"\nresume with: {resume_command(started_with, summary.name)}", flush=True)
        return 130
    finished = any(t.status in ("FINISHED", "EARLY_STOPPED") for t in summary.trials)
    no_epoch = not any(t.objective is not None or t.metrics.get("epochs_done") for t in summary.trials)
    # no epoch anywhere, and no trial failed (some finished, or the time budget stopped them all)
    if no_epoch and (finished or all(t.status == "STOPPED" for t in summary.trials)):
        print("\nno trial finished an epoch (search.time_budget_s too short?)", file=sys.stderr, flush=True)
        return 1
    if summary.trials and not finished:
        print("\nno trial finished (causes in the summary above)", file=sys.stderr, flush=True)
        return 1
    return 0


def _refit_only(sweep) -> int:
    """``--refit-only``: refit the ``refit.pick`` point of a finished sweep; prints the pick and the refit."""
    from tuning.redact import redact_text
    from tuning.runner import refit_only

    try:
        summary = refit_only(sweep, sweep.refit_pick)
    except ValueError as exc:  # PickError, no such sweep
        return _error(exc, 2)
    if summary.best is None:
        print("no trial with a finite point to refit", file=sys.stderr, flush=True)
        return 1
    print(redact_text(summary.format()), flush=True)
    return 1 if {"refit", "target_eval"} & set(summary.errors) else 0


if __name__ == "__main__":
    sys.exit(main())
