"""Sweep configuration files (``tuning/configs/*.yaml``).

::

    name: quick                      # default sweep name (folder under storage_path, MLflow parent run)
    base:
      preset: tiny                   # tiny | full (paper defaults) | path/to/config.yaml
      overrides: {epochs: 2, ...}    # any model/train/data keys (flat or dotted)
      synthetic: {root: data/synthetic, seed: 0}   # optional: generate the built-in data if missing
                                     # and use domain_a as source, domain_b as target
    space: {gamma: {type: uniform, low: 0.0, high: 1.0}, ...}   # see tuning.space
    variants: {}                     # optional named override bundles (ablation variants)
    search:
      algorithm: optuna              # optuna | grid
      num_samples: 8
      seed: 0
      metric: val_objective
      mode: max
      points_to_evaluate: paper      # paper | none | list of points
      scheduler: asha                # asha | none
      grace_period: 1
      reduction_factor: 2
      max_concurrent_trials: null    # null = what the cluster fits
      optuna_storage: null           # null = sqlite:///<storage_path>/<name>/optuna.db
      time_budget_s: null
    resources:
      workers_per_trial: 1           # Ray Train workers per trial (DDP when > 1)
      use_gpu: auto                  # auto | true | false
      cpus_per_worker: 1
      gpus_per_worker: 1
      extra: {}                      # custom resources per worker
      max_failures: 1                # Ray Train restarts per trial (from the last checkpoint)
      trial_max_failures: 0          # Tune restarts of a whole trial
      torch_backend: ""              # "" = nccl with GPUs, gloo without
    mlflow:
      tracking_uri: null             # null = sqlite:////CWD/runs/mlflow.db
      artifact_location: null        # null = CWD/runs/mlartifacts
      experiment: ssvp-sweeps
    storage_path: runs/ray
    target_eval: best                # best | all | none

Unknown keys anywhere are refused with a message naming them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from ssvp.config import Config, ConfigError, load_config

__all__ = [
    "SweepConfigError",
    "SearchSettings",
    "ResourceSettings",
    "MlflowSettings",
    "SweepConfig",
    "load_sweep_config",
    "build_base_config",
    "CONFIG_DIR",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class SweepConfigError(ValueError):
    """A sweep config file is invalid; the message names the file and field."""


@dataclass
class SearchSettings:
    algorithm: str = "optuna"
    num_samples: int = 8
    seed: int = 0
    metric: str = "val_objective"
    mode: str = "max"
    points_to_evaluate: Any = "paper"
    scheduler: str | None = "asha"
    grace_period: int = 1
    reduction_factor: float = 2
    max_concurrent_trials: int | None = None
    optuna_storage: str | None = None
    time_budget_s: float | None = None


@dataclass
class ResourceSettings:
    workers_per_trial: int = 1
    use_gpu: Any = "auto"
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    extra: dict = field(default_factory=dict)
    max_failures: int = 1
    trial_max_failures: int = 0
    torch_backend: str = ""


@dataclass
class MlflowSettings:
    tracking_uri: str | None = None
    artifact_location: str | None = None
    experiment: str = "ssvp-sweeps"


@dataclass
class SweepConfig:
    name: str = "sweep"
    base: dict = field(default_factory=lambda: {"preset": "tiny", "overrides": {}})
    space: dict = field(default_factory=dict)
    variants: dict = field(default_factory=dict)
    search: SearchSettings = field(default_factory=SearchSettings)
    resources: ResourceSettings = field(default_factory=ResourceSettings)
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)
    storage_path: str = "runs/ray"
    target_eval: str = "best"
    description: str = ""
    source_file: str = ""

    def run_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`tuning.runner.run_trials` (besides base config and space)."""
        s, r, m = self.search, self.resources, self.mlflow
        use_gpu = r.use_gpu
        if isinstance(use_gpu, str) and use_gpu.lower() in ("true", "false"):
            use_gpu = use_gpu.lower() == "true"
        return dict(
            name=self.name,
            search=s.algorithm,
            num_samples=s.num_samples,
            seed=s.seed,
            metric=s.metric,
            mode=s.mode,
            points_to_evaluate=s.points_to_evaluate,
            scheduler=None if s.scheduler in (None, "none") else s.scheduler,
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
            max_concurrent_trials=s.max_concurrent_trials,
            optuna_storage=s.optuna_storage,
            time_budget_s=s.time_budget_s,
            variants=self.variants or None,
            storage_path=self.storage_path,
            tracking_uri=m.tracking_uri,
            artifact_location=m.artifact_location,
            experiment=m.experiment,
            num_workers_per_trial=r.workers_per_trial,
            use_gpu=use_gpu,
            cpus_per_worker=r.cpus_per_worker,
            gpus_per_worker=r.gpus_per_worker,
            resources_per_worker=r.extra or None,
            max_failures=r.max_failures,
            trial_max_failures=r.trial_max_failures,
            torch_backend=r.torch_backend,
            target_eval=self.target_eval,
        )


def _section(cls, raw: Any, where: str):
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise SweepConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise SweepConfigError(f"{where}: unknown key(s) {unknown}; known: {', '.join(sorted(names))}")
    return cls(**dict(raw))


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Read a sweep YAML; ``path`` may also be a bare name of a file in ``tuning/configs``."""
    p = Path(path)
    if not p.is_file() and not p.suffix and (CONFIG_DIR / f"{p.name}.yaml").is_file():
        p = CONFIG_DIR / f"{p.name}.yaml"
    if not p.is_file():
        raise SweepConfigError(f"sweep config {path} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SweepConfigError(f"cannot parse sweep config {p}: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise SweepConfigError(f"sweep config {p} must hold a mapping at top level")
    top = {f.name for f in fields(SweepConfig)} - {"source_file"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise SweepConfigError(f"sweep config {p}: unknown key(s) {unknown}; known: {', '.join(sorted(top))}")
    where = str(p)
    cfg = SweepConfig(
        name=str(raw.get("name") or p.stem),
        base=dict(raw.get("base") or {"preset": "tiny"}),
        space=dict(raw.get("space") or {}),
        variants=dict(raw.get("variants") or {}),
        search=_section(SearchSettings, raw.get("search"), f"{where}: search"),
        resources=_section(ResourceSettings, raw.get("resources"), f"{where}: resources"),
        mlflow=_section(MlflowSettings, raw.get("mlflow"), f"{where}: mlflow"),
        storage_path=str(raw.get("storage_path") or "runs/ray"),
        target_eval=str(raw.get("target_eval") or "best"),
        description=str(raw.get("description") or ""),
        source_file=str(p.resolve()),
    )
    unknown_base = sorted(set(cfg.base) - {"preset", "overrides", "synthetic"})
    if unknown_base:
        raise SweepConfigError(f"{where}: base: unknown key(s) {unknown_base}; known: overrides, preset, synthetic")
    return cfg


def build_base_config(sweep: SweepConfig, base_dir: str | Path | None = None) -> Config:
    """The trials' base ``Config``: preset (+ file), overrides, and the synthetic data if requested.

    With ``base.synthetic`` the built-in benchmark is generated (``ssvp.data.make_synthetic``)
    into ``root`` when missing, here in the driver before any trial starts, and the config
    points at ``domain_a`` (source) and ``domain_b`` (target).
    """
    base = dict(sweep.base)
    base_dir = Path(base_dir or Path.cwd()).resolve()
    preset = base.get("preset", "tiny")
    overrides = copy.deepcopy(base.get("overrides") or {})
    try:
        if preset == "tiny":
            cfg = Config.tiny()
        elif preset in ("full", "paper", None):
            cfg = Config()
        else:
            file = Path(str(preset))
            if not file.is_absolute():
                cand = [base_dir / file, Path(sweep.source_file).parent / file]
                file = next((c for c in cand if c.is_file()), cand[0])
            cfg = load_config(file)
        synthetic = base.get("synthetic")
        if synthetic:
            if not isinstance(synthetic, Mapping):
                raise SweepConfigError(f"{sweep.source_file}: base.synthetic must be a mapping {{root, seed}}")
            root = Path(str(synthetic.get("root", "data/synthetic")))
            root = root if root.is_absolute() else base_dir / root
            ensure_synthetic(root, int(synthetic.get("seed", 0)), {k: v for k, v in synthetic.items() if k not in ("root", "seed")})
            overrides.setdefault("source", f"synthetic:{root / 'domain_a'}")
            overrides.setdefault("targets", [f"synthetic:{root / 'domain_b'}"])
        return cfg.override(overrides)
    except ConfigError as exc:
        raise SweepConfigError(f"{sweep.source_file or 'sweep config'}: base: {exc}") from None


def ensure_synthetic(root: Path, seed: int = 0, options: Mapping[str, Any] | None = None) -> Path:
    """Generate the synthetic two-domain benchmark into ``root`` unless it is already there."""
    done = root / "domain_a" / "meta.json"
    if not (done.is_file() and (root / "domain_b" / "meta.json").is_file()):
        from ssvp.data import make_synthetic

        make_synthetic(root, seed=seed, **dict(options or {}))
    return root
