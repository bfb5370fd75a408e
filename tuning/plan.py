"""Phase 1, plan: everything a sweep decides before Tune starts.

:func:`make_plan` turns a validated :class:`tuning.settings.SweepConfig` into a :class:`Plan`:
the parsed space, the base config with the space's fixed keys applied and its paths made
absolute, the points evaluated first, the resources resolved against the cluster
(``use_gpu="auto"``, ``max_concurrent_trials=None``), the folders (:class:`SweepPaths`) and
whether this is a resume (``Tuner.restore``). The builders below turn a plan into Tune's
pieces: :func:`make_search` (Optuna TPE / NSGA-II on one or several objectives, or grid),
:func:`make_scheduler` (ASHA),
:func:`tune_space`, :func:`make_trial_settings` (what each trial's driver gets).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ssvp.config import Config

from .settings import ResourceSettings, SweepConfig
from .space import SearchSpace
from .trial import VARIANT_KEY, TrialSettings

__all__ = [
    "Plan", "SweepPaths", "SweepExistsError", "make_plan", "make_search", "make_scheduler", "tune_space",
    "make_trial_settings", "absolutize_paths", "trial_base", "expected_trials", "STATE_FILE", "TRIAL_DRIVER_CPU",
]

STATE_FILE = "ssvp_sweep.json"  # MLflow ids of the sweep, beside Tune's experiment state
TRIAL_DRIVER_CPU = 0.01  # the trial's driver only waits on its TorchTrainer (Tune refuses cpu: 0)


class SweepExistsError(RuntimeError):
    """A sweep of that name already exists under the storage path (resume it or rename)."""


@dataclass(frozen=True)
class SweepPaths:
    """Where a sweep's files live (absolute; shared storage on a multi-node cluster)."""

    # Path for a local (shared) folder, tuning.storage.RemotePath for s3://... (same calls)
    storage: Path  # Tune/Train storage root
    experiment: Path  # <storage>/<name>: Tune's experiment state (resume from here), optuna.db
    train: Path  # <storage>/<name>.train: the trials' Ray Train runs
    state_file: Path  # <storage>/<name>/ssvp_sweep.json: MLflow ids for a resume

    @classmethod
    def of(cls, storage_path: str | os.PathLike, name: str) -> "SweepPaths":
        from .storage import storage_path as _storage_path

        storage = _storage_path(storage_path)
        if isinstance(storage, Path) and not storage.is_absolute():
            storage = (Path.cwd() / storage).resolve()
        exp = storage / name
        return cls(storage=storage, experiment=exp, train=storage / f"{name}.train", state_file=exp / STATE_FILE)


@dataclass
class Plan:
    """A sweep made concrete for this cluster and this storage; what the other phases read."""

    sweep: SweepConfig
    space: SearchSpace
    base: Config  # space.fixed applied, dataset / cache / weight paths absolute
    variants: dict[str, dict[str, Any]]
    points: list[dict[str, Any]]  # evaluated first (Optuna)
    paths: SweepPaths
    use_gpu: bool
    max_concurrent: int | None
    restoring: bool  # Tuner.restore of an interrupted sweep
    optuna_url: str | None
    replicas: list[dict[str, Any]] = None  # class folds x seeds of every trial (tuning.folds); [] = one fit

    @property
    def name(self) -> str:
        return self.sweep.name


# --------------------------------------------------------------------------- plan
def make_plan(sweep: SweepConfig, resume: bool = False) -> Plan:
    """Validate ``sweep``, connect to Ray if needed, and fix every decision of the run."""
    import ray

    space = sweep.validate()
    from .folds import replicas

    trial_replicas = replicas(sweep.fold_classes(), sweep.search.seeds_per_trial)  # before Ray: the same every trial
    base = absolutize_paths(trial_base(sweep, space))
    from .preflight import check_before_ray, check_resources

    check_before_ray(sweep.replace(base=base))  # data, storage, tracking store: seconds, before Ray
    if not ray.is_initialized():
        from .ray_session import init_ray

        init_ray(os.environ.get("RAY_ADDRESS") or None)
    use_gpu, max_concurrent = resolve_resources(sweep.resources, sweep.search.max_concurrent_trials,
                                                ray.cluster_resources())
    check_resources(sweep.resources, use_gpu, ray.cluster_resources())
    paths = SweepPaths.of(sweep.storage_path, sweep.name)
    return Plan(
        sweep=sweep, space=space, base=base, variants=dict(sweep.variants), points=first_points(sweep, space),
        paths=paths, use_gpu=use_gpu, max_concurrent=max_concurrent, replicas=trial_replicas,
        restoring=resume_state(paths, sweep.name, resume),
        # on an object store the study lives in Tune's experiment state (no SQLite file there)
        optuna_url=sweep.search.optuna_storage or (
            f"sqlite:///{paths.experiment / 'optuna.db'}" if isinstance(paths.experiment, Path) else None),
    )


def trial_base(sweep: SweepConfig, space: SearchSpace) -> Config:
    """The config every trial starts from: the space's fixed keys on ``sweep.base``, and the protocol.

    ``sweep.protocol="select"`` (a search): every trial selects on held-out *source* classes
    (``train.protocol=select``, ``val_objective``); the paper protocol (all source classes, last
    epoch) is then the refit's. ``sweep.protocol=None`` (an ablation grid): each trial keeps its
    config's ``train.protocol``, ``paper`` unless the grid asks for ``select``.
    """
    forced = {"protocol": sweep.protocol} if sweep.protocol else {}
    return sweep.base.override({**forced, **space.fixed})


def first_points(sweep: SweepConfig, space: SearchSpace) -> list[dict[str, Any]]:
    """``points_to_evaluate``: ``"paper"`` = the paper's defaults of the searched keys."""
    points = sweep.search.points_to_evaluate
    if points == "paper":
        return [p for p in ([space.default_point()] if space.searched else []) if p]
    if points in (None, "none"):
        return []
    return [dict(p) for p in points]


def resolve_resources(
    res: ResourceSettings, max_concurrent: int | None, cluster: Mapping[str, float]
) -> tuple[bool, int | None]:
    """``use_gpu="auto"`` -> whether the cluster has the GPUs; ``max_concurrent=None`` -> what fits."""
    use_gpu = res.use_gpu
    if use_gpu == "auto":
        use_gpu = cluster.get("GPU", 0) >= res.gpus_per_worker
    use_gpu = bool(use_gpu)
    if max_concurrent is None:
        per_worker = res.gpus_per_worker if use_gpu else res.cpus_per_worker
        per_trial = res.workers_per_trial * per_worker
        driver_cpu = 0.0 if res.reuse_processes else TRIAL_DRIVER_CPU  # reused: the actor is the worker
        pool = cluster.get("GPU", 0) if use_gpu else cluster.get("CPU", 1) - driver_cpu
        for name, amount in (res.extra or {}).items():
            pool = min(pool, cluster.get(name, 0) / (amount or 1) * per_worker)
        max_concurrent = max(1, int(pool // per_trial)) if per_trial else 1
    return use_gpu, max_concurrent


def resume_state(paths: SweepPaths, name: str, resume: bool) -> bool:
    """Whether Tune restores ``paths.experiment``; refuses to overwrite a sweep without ``resume``."""
    from ray import tune

    if resume:
        if tune.Tuner.can_restore(str(paths.experiment)):
            return True
        print(f"[tuning] nothing to resume at {paths.experiment}: starting sweep {name!r} afresh", flush=True)
    elif (paths.experiment / "tuner.pkl").exists():
        raise SweepExistsError(
            f"a sweep named {name!r} already exists at {paths.experiment}; pass resume=True (--resume) "
            "to continue it or choose another name (--name)"
        )
    return False


def expected_trials(plan: Plan) -> int:
    """How many trials a complete run has (fewer after the run = it was interrupted)."""
    search = plan.sweep.search
    if search.algorithm == "optuna":
        return search.num_samples
    n = search.num_samples
    for p in plan.space.searched.values():
        if p.kind == "grid":
            n *= len(p.values)
    return n * (len(plan.variants) if plan.variants else 1)


# --------------------------------------------------------------------------- Tune pieces
def make_search(plan: Plan):
    """Optuna TPE (seeded, study in ``plan.optuna_url``) or Tune's grid generator."""
    search = plan.sweep.search
    if search.algorithm == "optuna":
        from .search import make_optuna_search

        plan.paths.experiment.mkdir(parents=True, exist_ok=True)
        objectives, modes = search.objective_list(), search.mode_list()
        searcher = make_optuna_search(plan.name, plan.optuna_url, search.seed, plan.points,
                                      epochs=plan.base.train.epochs, objectives=objectives, modes=modes,
                                      sampler=search.sampler)
        if not search.multi and own_metrics(plan):  # Tune's metric is unset: the searcher holds its own
            searcher._metric, searcher._mode = objectives[0], modes[0]
        return searcher
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=search.seed, max_concurrent=plan.max_concurrent or 0)


def own_metrics(plan: Plan) -> bool:
    """Whether the searcher and the scheduler hold their metrics themselves (Tune's metric/mode unset):
    several objectives, or ASHA on a ``scheduler_metric`` of its own."""
    s = plan.sweep.search
    return s.multi or (s.scheduler == "asha" and bool(s.scheduler_metric))


def scheduler_metric(plan: Plan) -> tuple[str, str]:
    """``(metric, mode)`` ASHA ranks trials on: ``scheduler_metric`` (mode: its objective's, else min for
    ``train_*``, max otherwise) or the sweep's metric."""
    from .pareto import metric_key

    s = plan.sweep.search
    if not s.scheduler_metric:
        return s.metric, s.mode
    key = metric_key(s.scheduler_metric)
    modes = dict(zip(s.objective_list(), s.mode_list()))
    return key, modes.get(key, "min" if key.startswith("train_") else "max")


def make_scheduler(plan: Plan):
    """ASHA on ``epoch`` or None.

    ``max_t`` is one past the last epoch: ASHA stops only under-performers early; a trial that
    reaches its last epoch ends by itself (target evaluation with target_eval="all" and a
    clean Ray Train shutdown included). With several objectives ASHA needs one metric of its own
    (``search.scheduler_metric``, refused otherwise before Ray starts); with class folds it sees the
    per-epoch fold mean, as every other metric.
    """
    search = plan.sweep.search
    if search.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    epochs = plan.base.train.epochs
    metric, mode = scheduler_metric(plan) if own_metrics(plan) else (None, None)
    return ASHAScheduler(
        time_attr="epoch", max_t=epochs + 1, grace_period=max(1, min(search.grace_period, epochs)),
        reduction_factor=search.reduction_factor, metric=metric, mode=mode,
    )


def tune_space(plan: Plan) -> dict[str, Any]:
    """Tune's ``param_space``: the searched keys, plus ``variant`` over the variant names."""
    from ray import tune

    out: dict[str, Any] = plan.space.to_tune()
    if plan.variants:
        pick = tune.grid_search if plan.sweep.search.algorithm == "grid" else tune.choice
        out[VARIANT_KEY] = pick(list(plan.variants))
    return out


def make_trial_settings(plan: Plan) -> TrialSettings:
    """What every trial's driver needs besides its hyperparameters."""
    res = plan.sweep.resources
    return TrialSettings(
        base=plan.base.to_dict(),
        variants=plan.variants,
        workers_per_trial=res.workers_per_trial,
        use_gpu=plan.use_gpu,
        cpus_per_worker=res.cpus_per_worker,
        gpus_per_worker=res.gpus_per_worker,
        extra_resources=dict(res.extra or {}),
        max_failures=res.max_failures,
        torch_backend=res.torch_backend,
        reuse_processes=res.reuse_processes,
        train_storage=str(plan.paths.train),
        target_eval=plan.sweep.target_eval,
        replicas=plan.replicas,
        selected=selected_metrics(plan),
        risk=plan.sweep.search.risk,
    )


def selected_metrics(plan: Plan) -> dict[str, str]:
    """The metrics a replicated trial reports per replica and with their spread: {metric: mode}."""
    s = plan.sweep.search
    return {"val_objective": "max", **dict(zip(s.objective_list(), s.mode_list())),
            **dict([scheduler_metric(plan)] if s.scheduler_metric else [])}


# --------------------------------------------------------------------------- paths in the config
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
    from ssvp.paths import ENV_LAUNCH_DIR, resolve_config_paths

    environ = dict(os.environ, **({ENV_LAUNCH_DIR: str(Path(base_dir).resolve())} if base_dir else {}))
    return resolve_config_paths(cfg, environ=environ)  # the one rule of ssvp/paths.py
