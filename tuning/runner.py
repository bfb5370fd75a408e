"""The Tune runner: ``run_trials`` runs a search or a grid of SSVP trials and records it in MLflow.

``run_trials(base_cfg, param_space, ...)`` is the one entry point that ``tuning/sweep.py``
and ``ablations/`` build on. It

1. validates the space (:func:`tuning.space.parse_space`, errors name the key) and the
   variants before any trial starts, and applies the space's fixed keys to the base;
2. builds a Tune ``Tuner`` over the function trainable :func:`tuning.trial.trial_driver`
   (each trial a Ray Train ``TorchTrainer`` with ``num_workers_per_trial`` workers),
   with Optuna TPE (seeded, paper defaults first, study in SQLite) or a grid
   (``BasicVariantGenerator``), and ASHA on the per-epoch source-validation metric;
3. records the sweep in MLflow (parent run + one child run per trial, see
   :mod:`tuning.tracking`) and, once every trial has ended, the results table, plots
   and best configuration on the parent;
4. evaluates the best trial's best heads on the *target* datasets
   (``ssvp.engine.evaluate`` in a Ray task holding the same resources as one worker)
   and records that as a separate child run tagged ``role=target_eval``.

Selection uses only the source-domain validation split (``val_objective`` from
``fit``); target metrics never feed back into the search.

``resume=True`` continues an interrupted sweep (``Tuner.restore``): finished and
failed trials are kept as they were, unfinished ones continue from their last Ray
Train checkpoint, and MLflow runs are reopened rather than duplicated.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ssvp.config import Config, ConfigError

from .space import SearchSpace, SpaceError, parse_space
from .tracking import MLflowTrialCallback, SweepTracker, error_summary, normalize_tracking_uri, trial_error_text
from .trial import VARIANT_KEY, TrialSettings, flatten_target_report, trial_driver

__all__ = [
    "run_trials",
    "ResultSummary",
    "TrialSummary",
    "SweepExistsError",
    "init_ray",
    "free_port",
    "absolutize_paths",
    "mlflow_ui_command",
    "STATE_FILE",
]

STATE_FILE = "ssvp_sweep.json"
TRIAL_DRIVER_CPU = 0.01  # the trial's driver only waits on its TorchTrainer (Tune refuses cpu: 0)


class SweepExistsError(RuntimeError):
    """A sweep of that name already exists under the storage path (resume it or rename)."""


@dataclass
class TrialSummary:
    trial_id: str
    status: str  # FINISHED | FAILED | KILLED (interrupted) | EARLY_STOPPED
    params: dict[str, Any]  # the sampled keys (and variant)
    variant: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # best_/final_ source-val metrics (+ target_ with target_eval=all)
    objective: float | None = None  # best value of the metric over epochs
    checkpoint: str | None = None  # directory of the best heads (head.pt + config.json)
    run_id: str | None = None
    error: str | None = None
    placement: dict[str, Any] | None = None  # rank-0 worker: node_id, hostname, gpu_ids, device, ...
    target_report: dict[str, Any] = field(default_factory=dict)  # per-class target tables (target_eval="all")
    trial_dir: str | None = None  # the trial's Ray Train run folder


@dataclass
class ResultSummary:
    name: str
    experiment_path: str  # Tune experiment directory (resume from here)
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    metric: str
    mode: str
    trials: list[TrialSummary] = field(default_factory=list)
    best: TrialSummary | None = None
    best_config: dict[str, Any] = field(default_factory=dict)  # resolved config of the best trial (nested)
    target_metrics: dict[str, float] = field(default_factory=dict)
    target_report: dict[str, Any] = field(default_factory=dict)
    target_run_id: str | None = None
    errors: dict[str, str] = field(default_factory=dict)  # trial_id -> reason
    interrupted: bool = False
    optuna_storage: str | None = None
    table_path: str | None = None

    @property
    def mlflow_ui(self) -> str:
        return mlflow_ui_command(self.tracking_uri)

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per trial (what ``results.csv`` holds)."""
        out = []
        for t in self.trials:
            row = {"trial_id": t.trial_id, "status": t.status}
            if t.variant is not None:
                row["variant"] = t.variant
            row.update({k: v for k, v in t.params.items() if k != VARIANT_KEY})
            row[f"best_{self.metric}"] = t.objective
            row.update({k: v for k, v in sorted(t.metrics.items()) if k != f"best_{self.metric}"})
            row["run_id"] = t.run_id
            row["error"] = t.error or ""
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        lines = [f"sweep {self.name}: {len(self.trials)} trials "
                 f"({sum(t.status == 'FINISHED' for t in self.trials)} finished, "
                 f"{sum(t.status == 'EARLY_STOPPED' for t in self.trials)} stopped early, "
                 f"{len(self.errors)} failed)" + ("  [INTERRUPTED]" if self.interrupted else "")]
        if self.best is not None:
            lines.append(f"best trial {self.best.trial_id}: {self.metric} = {self.best.objective:.4f}  params {self.best.params}")
            if self.best.checkpoint:
                lines.append(f"best heads: {self.best.checkpoint}")
        if self.target_metrics:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(self.target_metrics.items()))
            lines.append(f"target evaluation (run {self.target_run_id}): {shown}")
        for tid, err in self.errors.items():
            lines.append(f"failed {tid}: {err}")
        lines.append(f"MLflow parent run {self.parent_run_id} in experiment {self.experiment!r}")
        lines.append(f"view: {self.mlflow_ui}")
        return "\n".join(lines)


def mlflow_ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {tracking_uri}"
    return f"open {tracking_uri} (MLflow tracking server)"


# --------------------------------------------------------------------------- Ray session
def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    resources: Mapping[str, float] | None = None,
    object_store_memory: int = 400 * 1024 * 1024,
    dashboard_port: int | None = None,
) -> None:
    """Connect to a cluster (``address="auto"`` / ``ray://...``) or start Ray in-process.

    A local start binds every port to 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``)
    and keeps memory modest. It runs the dashboard (on 127.0.0.1) because Ray Train's
    placement-group cleaner asks the state API whether a trial's controller is still
    alive, and it exports ``RAY_API_SERVER_ADDRESS`` to every Ray process so that
    lookup finds *this* instance even when other Ray instances run on the machine.
    ``num_gpus=None`` lets Ray count the GPUs.
    """
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # The flag is read when ray is imported; a process that imported ray before setting it
    # would still bind to the outside address, so set the module constant as well.
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    port = dashboard_port or free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # inherited by raylet and workers
    kwargs: dict[str, Any] = dict(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=object_store_memory,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        log_to_driver=True,
    )
    if num_gpus is not None:
        kwargs["num_gpus"] = num_gpus
    if resources:
        kwargs["resources"] = dict(resources)
    ray.init(**kwargs)


# --------------------------------------------------------------------------- helpers
def _abs_spec(spec: str, base_dir: Path) -> str:
    fmt, sep, root = spec.partition(":")
    if not sep or not root or "://" in spec:
        return spec
    path = Path(root).expanduser()
    return f"{fmt}:{path if path.is_absolute() else (base_dir / path).resolve()}"


def absolutize_paths(cfg: Config, base_dir: str | os.PathLike | None = None) -> Config:
    """Make dataset roots, the feature cache and local weight paths absolute.

    Trials run in their own working directories (on other machines of a cluster too),
    so a relative ``synthetic:data/synthetic/domain_a`` would point nowhere there.
    """
    base = Path(base_dir or os.getcwd()).resolve()
    updates: dict[str, Any] = {
        "source": _abs_spec(cfg.data.source, base),
        "targets": [_abs_spec(t, base) for t in cfg.data.targets],
    }
    if cfg.train.feature_cache and not Path(cfg.train.feature_cache).is_absolute():
        updates["feature_cache"] = str((base / cfg.train.feature_cache).resolve())
    for key, value in (("clip_pretrained", cfg.model.clip_pretrained), ("dino_weights", cfg.model.dino_weights)):
        if value and not Path(value).is_absolute() and (base / value).exists():
            updates[key] = str((base / value).resolve())
    return cfg.override(updates)


def _expected_trials(search: str, num_samples: int, space: SearchSpace, variants: Mapping | None) -> int:
    if search == "optuna":
        return num_samples
    n = num_samples
    for p in space.searched.values():
        if p.kind == "grid":
            n *= len(p.values)
    if variants:
        n *= len(variants)
    return n


def _state_path(exp_path: Path) -> Path:
    return exp_path / STATE_FILE


def _log_parent_setup(tracker: SweepTracker, space: SearchSpace, base: Config, settings: dict, extra_params, extra_artifacts) -> None:
    run_id = tracker.parent_run_id
    params = {f"search.{k}": v for k, v in settings.items() if not isinstance(v, (dict, list)) or k == "points_to_evaluate"}
    params.update({f"space.{k}": p.describe() for k, p in space.params.items()})
    params.update(extra_params or {})
    tracker.log_params(run_id, params)
    tracker.log_dict(run_id, space.to_dict(), "search_space.json")
    tracker.log_dict(run_id, base.to_dict(), "base_config.json")
    tracker.log_dict(run_id, settings, "sweep_settings.json")
    if isinstance(extra_artifacts, Mapping):
        items = list(extra_artifacts.items())
    else:
        items = [(None, p) for p in (extra_artifacts or [])]
    for artifact_path, local in items:
        local = Path(local)
        if local.is_dir():
            tracker.log_artifacts(run_id, local, artifact_path or local.name)
        elif local.is_file():
            tracker.log_artifact(run_id, local, artifact_path)
        else:
            raise FileNotFoundError(f"extra parent artifact {local} does not exist")


# --------------------------------------------------------------------------- main entry
def run_trials(
    base_cfg: Config,
    param_space: Mapping[str, Any] | SearchSpace | None,
    *,
    name: str,
    search: str = "optuna",
    num_samples: int = 8,
    seed: int = 0,
    metric: str = "val_objective",
    mode: str = "max",
    points_to_evaluate: str | Sequence[Mapping[str, Any]] | None = "paper",
    scheduler: str | None = "asha",
    grace_period: int = 1,
    reduction_factor: float = 2,
    max_concurrent_trials: int | None = None,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    storage_path: str | os.PathLike = "runs/ray",
    tracking_uri: str | None = None,
    artifact_location: str | None = None,
    experiment: str = "ssvp-sweeps",
    resume: bool = False,
    num_workers_per_trial: int = 1,
    use_gpu: bool | str = "auto",
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 1.0,
    resources_per_worker: Mapping[str, float] | None = None,
    max_failures: int = 1,
    trial_max_failures: int = 0,
    torch_backend: str = "",
    optuna_storage: str | None = None,
    target_eval: str = "best",
    time_budget_s: float | None = None,
    parent_run_tags: Mapping[str, Any] | None = None,
    extra_parent_params: Mapping[str, Any] | None = None,
    extra_parent_artifacts: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike] | None = None,
    on_results: Callable[["ResultSummary"], Mapping[str, str | os.PathLike] | None] | None = None,
    verbose: int = 1,
) -> ResultSummary:
    """Run a hyperparameter search or grid of SSVP trials on Ray and record it in MLflow.

    Args:
        base_cfg: the config every trial starts from (``Config.tiny()``, a loaded YAML, ...).
        param_space: search space in the YAML form of :mod:`tuning.space` (or a parsed
            :class:`SearchSpace`); fixed keys are applied to ``base_cfg``.
        name: sweep name: the Tune experiment folder under ``storage_path``, the MLflow
            parent run name and the ``sweep_id`` tag of every run.
        search: ``"optuna"`` (TPE, seeded by ``seed``) or ``"grid"`` (Tune's
            ``BasicVariantGenerator``: every grid value x ``num_samples`` random draws
            of the other keys).
        num_samples: Optuna trials, or repeats of the grid.
        metric, mode: the per-epoch source-validation metric reported by ``fit`` that
            the search and ASHA optimise (``val_objective``, ``max``).
        points_to_evaluate: ``"paper"`` = the paper's defaults (``ssvp.config``) of the
            searched keys as the first trial; a list of dicts; or ``None``.
        scheduler: ``"asha"`` (time attribute ``epoch``, ``max_t`` = ``epochs``) or None.
        max_concurrent_trials: default = as many trials as the cluster's CPUs (or GPUs)
            fit with ``num_workers_per_trial`` workers each.
        variants: named bundles of config overrides (ablation variants); the trial key
            ``variant`` selects one (grid over all names with ``search="grid"``, a
            choice with Optuna). Tagged ``variant`` on the child runs.
        storage_path: Tune / Train storage (absolute or relative to the working
            directory; shared storage on a multi-node cluster).
        tracking_uri: MLflow tracking URI; default ``sqlite:////CWD/runs/mlflow.db``.
        artifact_location: local artifact root for a new experiment on a SQLite store
            (default ``mlartifacts`` beside the SQLite file, i.e. ``CWD/runs/mlartifacts``).
        experiment: MLflow experiment name (created in the driver if missing).
        resume: continue the interrupted sweep ``name`` (``Tuner.restore``).
        num_workers_per_trial: Ray Train workers per trial (DDP when > 1).
        use_gpu: ``True``/``False``/``"auto"`` (GPUs when the cluster has any).
        cpus_per_worker, gpus_per_worker, resources_per_worker: per-worker resources
            (``resources_per_worker`` adds custom resources, e.g. ``{"fake_gpu": 1}``).
        max_failures: Ray Train worker-group restarts per trial (resume from the last
            checkpoint); ``trial_max_failures``: Tune-level restarts of a whole trial.
        torch_backend: ``""`` (Ray's choice: nccl with GPUs, gloo without), ``"gloo"``.
        optuna_storage: RDB URL of the Optuna study; default
            ``sqlite:///<storage_path>/<name>/optuna.db`` (study name = ``name``).
        target_eval: ``"best"`` (evaluate the best trial on the targets, separate child
            run ``role=target_eval``), ``"all"`` (every finished trial evaluates its best
            heads on the targets inside its worker; metrics ``target_*`` on its own
            child run; what ablations use) or ``"none"``.
        time_budget_s: stop starting / running trials after this many seconds.
        parent_run_tags, extra_parent_params, extra_parent_artifacts: added to the
            parent run (artifacts: paths, or ``{artifact_dir: path}``).
        on_results: called with the :class:`ResultSummary` after the sweep's own report and
            before the parent run is closed; may return ``{artifact_dir: path}`` to log on
            the parent (``""`` = top level). Not called for an interrupted sweep.
        verbose: Tune's console verbosity (0 silent, 1 progress table, 2 per result).

    Returns:
        :class:`ResultSummary`. Failed trials do not raise: they are in ``errors``
        (and FAILED in MLflow with the reason). Bad spaces or configs raise
        :class:`SpaceError` / ``ConfigError`` before any trial starts.
    """
    import ray
    from ray import tune

    # ---------------------------------------------------------------- validate first
    if search not in ("optuna", "grid"):
        raise ValueError(f"search must be 'optuna' or 'grid', got {search!r}")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if target_eval not in ("best", "all", "none"):
        raise ValueError(f"target_eval must be best, all or none, got {target_eval!r}")
    if scheduler not in (None, "asha", "none"):
        raise ValueError(f"scheduler must be 'asha' or None, got {scheduler!r}")
    if num_samples < 1 or num_workers_per_trial < 1:
        raise ValueError("num_samples and num_workers_per_trial must be >= 1")
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"sweep name {name!r} must be a non-empty folder name")
    space = parse_space(param_space, base_cfg)
    space.check_for(search)
    if VARIANT_KEY in space.params:
        raise SpaceError(f"search space key {VARIANT_KEY!r} is reserved for variants")
    base = absolutize_paths(base_cfg.override(space.fixed))
    variants = {str(k): dict(v or {}) for k, v in (variants or {}).items()}
    for vname, overrides in variants.items():
        try:
            base.override(overrides)
        except ConfigError as exc:
            raise SpaceError(f"variant {vname!r}: {exc}") from None
    if points_to_evaluate == "paper":
        points = [space.default_point()] if space.searched else []
        points = [p for p in points if p]
    elif points_to_evaluate in (None, "none"):
        points = []
    else:
        points = [dict(p) for p in points_to_evaluate]  # type: ignore[union-attr]
        for i, point in enumerate(points):
            for key, value in point.items():
                if key not in space.searched:
                    raise SpaceError(f"points_to_evaluate[{i}] key {key!r} is not a searched key of the space")
                try:
                    base.override({key: value})
                except ConfigError as exc:
                    raise SpaceError(f"points_to_evaluate[{i}] key {key!r}: {exc}") from None

    # ---------------------------------------------------------------- Ray and storage
    if not ray.is_initialized():
        init_ray(os.environ.get("RAY_ADDRESS") or None)
    cluster = ray.cluster_resources()
    if use_gpu == "auto":
        use_gpu = cluster.get("GPU", 0) >= gpus_per_worker
    use_gpu = bool(use_gpu)
    if max_concurrent_trials is None:
        per_trial = num_workers_per_trial * (gpus_per_worker if use_gpu else cpus_per_worker)
        pool = cluster.get("GPU", 0) if use_gpu else cluster.get("CPU", 1) - TRIAL_DRIVER_CPU
        for res, amount in (resources_per_worker or {}).items():
            pool = min(pool, cluster.get(res, 0) / (amount or 1) * (gpus_per_worker if use_gpu else cpus_per_worker))
        max_concurrent_trials = max(1, int(pool // per_trial)) if per_trial else 1
    storage = Path(storage_path).expanduser()
    storage = storage if storage.is_absolute() else (Path.cwd() / storage).resolve()
    exp_path = storage / name
    train_storage = storage / f"{name}.train"
    state_file = _state_path(exp_path)
    restoring = False
    if resume:
        if tune.Tuner.can_restore(str(exp_path)):
            restoring = True
        else:
            print(f"[tuning] nothing to resume at {exp_path}: starting sweep {name!r} afresh", flush=True)
    elif (exp_path / "tuner.pkl").exists():
        raise SweepExistsError(
            f"a sweep named {name!r} already exists at {exp_path}; pass resume=True (--resume) "
            "to continue it or choose another name (--name)"
        )

    # ---------------------------------------------------------------- MLflow parent
    if restoring and state_file.is_file():
        state = json.loads(state_file.read_text())
        tracking_uri = state["tracking_uri"]
        experiment = state["experiment"]
    tracking_uri = normalize_tracking_uri(tracking_uri)
    tracker = SweepTracker(tracking_uri, experiment, sweep_id=name, artifact_location=artifact_location)
    tracker.ensure_experiment()
    optuna_url = optuna_storage or f"sqlite:///{exp_path / 'optuna.db'}"
    settings_record = {
        "name": name, "search": search, "num_samples": num_samples, "seed": seed, "metric": metric, "mode": mode,
        "scheduler": scheduler or "none", "grace_period": grace_period, "reduction_factor": reduction_factor,
        "max_concurrent_trials": max_concurrent_trials, "num_workers_per_trial": num_workers_per_trial,
        "use_gpu": use_gpu, "cpus_per_worker": cpus_per_worker, "gpus_per_worker": gpus_per_worker,
        "resources_per_worker": dict(resources_per_worker or {}), "max_failures": max_failures,
        "trial_max_failures": trial_max_failures, "target_eval": target_eval, "storage_path": str(storage),
        "points_to_evaluate": points, "variants": variants,
        "optuna_storage": optuna_url if search == "optuna" else "",
    }
    tags = {"search": search, "storage_path": str(exp_path), **{k: str(v) for k, v in (parent_run_tags or {}).items()}}
    if search == "optuna":
        tags.update({"optuna_storage": optuna_url, "optuna_study": name})
    tracker.start_parent(run_name=name, tags=tags, resume=restoring)
    if not restoring:
        try:
            _log_parent_setup(tracker, space, base, settings_record, extra_parent_params, extra_parent_artifacts)
        except BaseException:
            tracker.end_parent("FAILED")
            raise
    exp_path.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({
        "name": name, "tracking_uri": tracking_uri, "experiment": experiment,
        "experiment_id": tracker.experiment_id, "parent_run_id": tracker.parent_run_id,
    }, indent=2))

    # ---------------------------------------------------------------- Tune objects
    trial_settings = TrialSettings(
        base=base.to_dict(),
        variants=variants,
        workers_per_trial=num_workers_per_trial,
        use_gpu=use_gpu,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        extra_resources=dict(resources_per_worker or {}),
        max_failures=max_failures,
        torch_backend=torch_backend,
        train_storage=str(train_storage),
        target_eval=target_eval,
    )
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, settings=trial_settings), {"cpu": TRIAL_DRIVER_CPU}
    )
    tune_space: dict[str, Any] = space.to_tune()
    if variants:
        tune_space[VARIANT_KEY] = (tune.grid_search if search == "grid" else tune.choice)(list(variants))

    callback = MLflowTrialCallback(
        tracker, base.to_dict(), variants, epochs=base.train.epochs, metric=metric, mode=mode,
        train_storage=str(train_storage),
    )
    started = time.time()
    try:
        if restoring:
            tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True, resume_errored=False)
        else:
            if search == "optuna":
                if optuna_storage is None:
                    exp_path.mkdir(parents=True, exist_ok=True)
                from .search import make_optuna_search

                search_alg = make_optuna_search(name, optuna_url, seed, points)
            else:
                from ray.tune.search.basic_variant import BasicVariantGenerator

                search_alg = BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent_trials or 0)
            sched = None
            if scheduler == "asha":
                from ray.tune.schedulers import ASHAScheduler

                # max_t one past the last epoch: ASHA stops only under-performers early; a trial
                # that reaches its last epoch ends by itself (target evaluation with
                # target_eval="all" and a clean Ray Train shutdown included)
                epochs = base.train.epochs
                sched = ASHAScheduler(
                    time_attr="epoch", max_t=epochs + 1, grace_period=max(1, min(grace_period, epochs)),
                    reduction_factor=reduction_factor,
                )
            tuner = tune.Tuner(
                trainable,
                param_space=tune_space,
                tune_config=tune.TuneConfig(
                    metric=metric,
                    mode=mode,
                    search_alg=search_alg,
                    scheduler=sched,
                    num_samples=num_samples,
                    max_concurrent_trials=max_concurrent_trials if search == "optuna" else None,
                    time_budget_s=time_budget_s,
                    trial_dirname_creator=lambda trial: trial.trial_id,
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=str(storage),
                    callbacks=[callback],
                    failure_config=tune.FailureConfig(max_failures=trial_max_failures),
                    verbose=verbose,
                ),
            )
        results = tuner.fit()
    except BaseException:
        tracker.close_open_children("KILLED")
        tracker.end_parent("FAILED")
        raise

    # ---------------------------------------------------------------- collect and reconcile
    trials = list(results._experiment_analysis.trials)  # Trial objects (status, config, errors)
    # On an interrupt (Ctrl+C / SIGUSR1) Tune saves the experiment state and only then stops
    # the live trials, marking them TERMINATED in memory; the saved state still says which
    # trials really ended (and which a resume will continue), so trust it.
    saved_status = _saved_trial_status(exp_path)
    # the callback that ran is the (possibly restored) one inside the Tuner; use ours to reconcile
    summaries: list[TrialSummary] = []
    errors: dict[str, str] = {}
    interrupted = False
    for trial in trials:
        tid = trial.trial_id
        params = dict(trial.config)
        variant = params.get(VARIANT_KEY)
        trial_status = saved_status.get(tid, trial.status)
        if trial_status == "TERMINATED":
            run = tracker.find_child(tid)
            if run is None or run.info.status != "FINISHED":
                callback.finish_trial(trial, "FINISHED")
            status = "FINISHED"
        elif trial_status == "ERROR":
            text = trial_error_text(trial)
            err = error_summary(text)
            run = tracker.find_child(tid)
            placeholder = run is not None and run.data.tags.get("error", "") in ("", "unknown error", "trial failed (no error text)")
            if run is None or run.info.status != "FAILED" or (placeholder and text):
                callback.finish_trial(trial, "FAILED", error=text or err)
            status, errors[tid] = "FAILED", err
        else:
            interrupted = True
            status = "KILLED"
        run = tracker.find_child(tid)
        metrics: dict[str, float] = {}
        checkpoint = None
        if run is not None:
            metrics = {
                k: v for k, v in run.data.metrics.items()
                if k.startswith(("best_", "final_", "target_")) or k in ("epochs_done",)
            }
            if run.data.tags.get("early_stopped") == "true" and status == "FINISHED":
                status = "EARLY_STOPPED"
            ckpt = run.data.tags.get("checkpoint_path")
            if ckpt and (Path(ckpt) / "best").is_dir():
                checkpoint = str(Path(ckpt) / "best")
        objective = metrics.get(f"best_{metric}")
        trial_dir = train_storage / tid
        placement = _read_json(trial_dir / "placement" / "rank0.json")
        target_report = _read_json(trial_dir / "target_report.json") or {}
        summaries.append(TrialSummary(
            trial_id=tid, status=status, params=params, variant=variant, metrics=metrics,
            objective=objective, checkpoint=checkpoint, run_id=run.info.run_id if run else None,
            error=errors.get(tid), placement=placement, target_report=target_report,
            trial_dir=str(trial_dir) if trial_dir.is_dir() else None,
        ))
    if not interrupted and time_budget_s is None:
        interrupted = len(trials) < _expected_trials(search, num_samples, space, variants)

    summary = ResultSummary(
        name=name, experiment_path=str(exp_path), tracking_uri=tracking_uri, experiment=experiment,
        experiment_id=tracker.experiment_id, parent_run_id=tracker.parent_run_id, metric=metric, mode=mode,
        trials=summaries, errors=errors, interrupted=interrupted,
        optuna_storage=optuna_url if search == "optuna" else None,
    )
    if interrupted:
        tracker.close_open_children("KILLED")
        tracker.client.set_tag(tracker.parent_run_id, "interrupted", "true")
        tracker.end_parent("KILLED")
        if verbose:
            print(f"[tuning] sweep {name!r} was interrupted; continue it with resume=True (--resume)", flush=True)
        return summary

    # ---------------------------------------------------------------- best, target, parent report
    finite = [t for t in summaries if t.objective is not None and math.isfinite(t.objective)]
    if finite:
        pick = max if mode == "max" else min
        summary.best = pick(finite, key=lambda t: t.objective)
        best_cfg, _ = _resolve(base, summary.best.params, variants)
        summary.best_config = best_cfg.to_dict()
        if target_eval == "best" and summary.best.checkpoint:
            _target_eval_run(summary, tracker, best_cfg, trial_settings)
        elif target_eval == "all":
            summary.target_metrics = {k: v for k, v in summary.best.metrics.items() if k.startswith("target_")}
            summary.target_run_id = summary.best.run_id
    _report_parent(summary, tracker, space, started)
    if on_results is not None:
        extra = on_results(summary) or {}
        for artifact_path, local in dict(extra).items():
            local = Path(local)
            if local.is_dir():
                tracker.log_artifacts(tracker.parent_run_id, local, artifact_path or None)
            elif local.is_file():
                tracker.log_artifact(tracker.parent_run_id, local, artifact_path or None)
            else:
                raise FileNotFoundError(f"on_results returned {local}, which does not exist")
    tracker.end_parent("FINISHED")
    return summary


def _saved_trial_status(exp_path: Path) -> dict[str, str]:
    """Trial statuses in the newest experiment state Tune wrote to ``exp_path``."""
    try:
        from ray.tune import ExperimentAnalysis

        return {t.trial_id: t.status for t in ExperimentAnalysis(str(exp_path)).trials}
    except Exception:  # noqa: BLE001 - fall back to the in-memory statuses
        return {}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _resolve(base: Config, params: Mapping[str, Any], variants: Mapping[str, Any]):
    from .trial import resolve_trial_config

    return resolve_trial_config(base.to_dict(), params, variants)


def _evaluate_task(cfg_dict: dict, checkpoint: str, use_gpu: bool) -> dict:
    import torch

    from ssvp import engine

    device = "cuda:0" if use_gpu and torch.cuda.is_available() else "cpu"
    cfg = Config.from_dict(cfg_dict).override({"device": device})
    return engine.evaluate(cfg, checkpoint)


def _target_eval_run(summary: ResultSummary, tracker: SweepTracker, cfg: Config, settings: TrialSettings) -> None:
    """Evaluate the best heads on the target datasets in a Ray task; record a ``role=target_eval`` run."""
    import ray

    best = summary.best
    existing = [r for r in tracker.children(role="target_eval") if r.data.tags.get("trial_id") == best.trial_id]
    if existing and existing[0].info.status == "FINISHED":
        run = existing[0]
        summary.target_run_id = run.info.run_id
        summary.target_metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("target_")}
        return
    run_id = existing[0].info.run_id if existing else tracker.start_child(
        run_name=f"{summary.name}/target_eval",
        tags={"role": "target_eval", "trial_id": best.trial_id, "variant": best.variant or "", "seed": cfg.train.seed},
    )
    if existing:
        tracker.client.update_run(run_id, status="RUNNING")
    try:
        tracker.log_params(run_id, {**cfg.flat(), "checkpoint": best.checkpoint})
        remote = ray.remote(_evaluate_task).options(
            num_cpus=settings.cpus_per_worker,
            num_gpus=settings.gpus_per_worker if settings.use_gpu else 0,
            resources=dict(settings.extra_resources) or None,
        )
        report = ray.get(remote.remote(cfg.to_dict(), best.checkpoint, settings.use_gpu))
        summary.target_report = report
        summary.target_metrics = flatten_target_report(report)
        tracker.log_metrics(run_id, summary.target_metrics)
        tracker.log_dict(run_id, report, "target_report.json")
        tracker.client.set_terminated(run_id, "FINISHED")
    except Exception as exc:  # noqa: BLE001 - the sweep itself succeeded; record and go on
        tracker.client.set_tag(run_id, "error", error_summary(str(exc)))
        tracker.log_text(run_id, repr(exc), "error.txt")
        tracker.client.set_terminated(run_id, "FAILED")
        summary.errors["target_eval"] = error_summary(str(exc))
    summary.target_run_id = run_id
    tracker.client.set_tag(tracker.parent_run_id, "target_eval_run_id", run_id)


def _report_parent(summary: ResultSummary, tracker: SweepTracker, space: SearchSpace, started: float) -> None:
    import tempfile

    from .report import param_importance, plot_importance, plot_objective, write_table

    run_id = tracker.parent_run_id
    client = tracker.client
    rows = summary.rows()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_table(rows, tmp / "results.csv", tmp / "results.md")
        plot_objective([t.objective for t in summary.trials], [t.trial_id for t in summary.trials],
                       summary.metric, summary.mode, tmp / "objective_vs_trial.png")
        imp, method = param_importance([t.params for t in summary.trials], [t.objective for t in summary.trials],
                                       space.params, summary.mode)
        plot_importance(imp, method, tmp / "param_importance.png")
        (tmp / "param_importance.json").write_text(json.dumps({"method": method, "importance": imp}, indent=2))
        if summary.best is not None:
            (tmp / "best_config.json").write_text(json.dumps(summary.best_config, indent=2))
        for f in tmp.iterdir():
            tracker.log_artifact(run_id, f)
    summary.table_path = f"{client.get_run(run_id).info.artifact_uri}/results.csv"
    metrics = {
        "n_trials": len(summary.trials),
        "n_finished": sum(t.status in ("FINISHED", "EARLY_STOPPED") for t in summary.trials),
        "n_early_stopped": sum(t.status == "EARLY_STOPPED" for t in summary.trials),
        "n_failed": sum(t.status == "FAILED" for t in summary.trials),
        "sweep_seconds": time.time() - started,
    }
    if summary.best is not None:
        metrics[f"best_{summary.metric}"] = summary.best.objective
        client.set_tag(run_id, "best_trial_id", summary.best.trial_id)
        client.set_tag(run_id, "best_run_id", summary.best.run_id or "")
        for key, value in summary.best.params.items():
            client.set_tag(run_id, f"best.{key}", str(value))
        if summary.best.checkpoint:
            client.set_tag(run_id, "best_checkpoint", summary.best.checkpoint)
    tracker.log_metrics(run_id, metrics)
