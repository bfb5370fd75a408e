"""A sweep as a few plain, typed objects that mirror the sweep YAML (``tuning/configs/*.yaml``).

::

    SweepConfig                       # the one object tuning.runner.run_trials takes
      name, description               # sweep name (folder under storage_path, MLflow parent run)
      base: ssvp Config               # WHAT is searched from: the config every trial starts from
      space: {key: spec}              #   ... the searched / fixed keys (tuning.space)
      variants: {name: overrides}     #   ... named override bundles (ablation variants)
      search: SearchSettings          # HOW: algorithm, samples, seed, metric, points, scheduler
      resources: ResourceSettings     # ON WHAT: workers, GPUs/CPUs, custom resources, restarts
      mlflow: MlflowSettings          # RECORDED WHERE: tracking URI, artifacts, experiment, parent extras
      storage_path: str               #   ... Ray Tune/Train storage
      target_eval: best | all | none  # after the search: evaluate on the target datasets
      refit: bool                     # after the search: retrain the best config with the paper protocol
      verbose: int                    # console: 0 silent, 1 a line per trial, 2 + Tune's table and Ray's logs

The YAML::

    name: quick
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
      objectives: []                 # several: [val/image_auroc, val/pixel_aupro] (tuning.pareto); [] = [metric]
      modes: []                      # one max/min per objective; [] = mode for each
      sampler: tpe                   # tpe | nsga2 (Optuna)
      scheduler_metric: null         # ASHA with several objectives needs one metric to stop on (or scheduler: none)
      class_folds: 1                 # k > 1: k disjoint held-out source-class sets per trial (tuning.folds)
      seeds_per_trial: 1             # n > 1: each fold trained with n seeds
      risk: null                     # kappa: objective = fold mean - kappa * std (max) / + (min)
    resources:
      workers_per_trial: 1           # Ray Train workers per trial (DDP when > 1)
      use_gpu: auto                  # auto | true | false
      cpus_per_worker: 1
      gpus_per_worker: 1
      extra: {}                      # custom resources per worker
      max_failures: 1                # Ray Train restarts per trial (from the last checkpoint)
      trial_max_failures: 0          # Tune restarts of a whole trial
      torch_backend: ""              # "" = nccl with GPUs, gloo without
      reuse_processes: false         # true: one-worker trials train in reused Tune actors (no Train run per trial)
    mlflow:
      tracking_uri: null             # null = sqlite:////CWD/runs/mlflow.db
      artifact_location: null        # null = CWD/runs/mlartifacts
      experiment: ssvp-sweeps
    storage_path: runs/ray
    target_eval: best                # best | all | none
    refit: true                      # best config retrained on all source classes (paper protocol), evaluated on targets
                                     # or {pick: knee | best:<metric> | trial:<n>}: which trial's config (default knee)

:func:`load_sweep` reads a file, builds the base ``Config`` and validates everything once
(unknown keys anywhere are refused with a message naming the file and field);
:meth:`SweepConfig.validate` checks an object built in code (``ablations/grid.py``, tests);
:meth:`SweepConfig.to_yaml` is what ``sweep.py --print-config`` prints.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from ssvp.config import Config, ConfigError, load_config, unknown_keys_message

__all__ = [
    "SweepConfigError",
    "SearchSettings",
    "ResourceSettings",
    "MlflowSettings",
    "SweepConfig",
    "load_sweep",
    "read_sweep_file",
    "build_base_config",
    "ensure_synthetic",
    "CONFIG_DIR",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SEARCHES = ("optuna", "grid")
MODES = ("max", "min")
TARGET_EVALS = ("best", "all", "none")
SCHEDULERS = (None, "asha")
SAMPLERS = ("tpe", "nsga2")


class SweepConfigError(ValueError):
    """A sweep config is invalid; the message names the file (when there is one) and the field."""


@dataclass
class SearchSettings:
    """How the space is searched (YAML ``search:``)."""

    algorithm: str = "optuna"  # optuna (TPE, seeded) | grid (BasicVariantGenerator)
    num_samples: int = 8  # Optuna trials, or repeats of the grid
    seed: int = 0
    metric: str = "val_objective"  # per-epoch SOURCE-validation metric reported by fit
    mode: str = "max"
    points_to_evaluate: Any = "paper"  # paper (defaults of the searched keys first) | none | [dict]
    scheduler: str | None = "asha"  # asha (on `epoch`, max_t = epochs + 1) | none
    grace_period: int = 1
    reduction_factor: float = 2
    max_concurrent_trials: int | None = None  # None = what the cluster fits
    optuna_storage: str | None = None  # None = sqlite:///<storage_path>/<name>/optuna.db
    time_budget_s: float | None = None
    # several objectives (tuning.pareto): [] = [metric]; names as fit reports them or as MLflow shows
    # them (val/image_auroc); with several, `metric`/`mode` become the first objective's
    objectives: list = field(default_factory=list)
    modes: list = field(default_factory=list)  # [] = `mode` for every objective
    sampler: str = "tpe"  # tpe | nsga2 (Optuna; both search one or several objectives)
    scheduler_metric: str | None = None  # ASHA with several objectives stops on this one metric
    # class-fold-robust objective (tuning.folds): k held-out class sets, n seeds, mean - kappa * std
    class_folds: int = 1
    seeds_per_trial: int = 1
    risk: float | None = None  # kappa; None = the plain mean over replicas

    def objective_list(self) -> list[str]:
        """The objectives as ``fit`` reports them (``val_image_auroc``), ``[metric]`` when none are named."""
        from .pareto import metric_key

        return [metric_key(o) for o in self.objectives] or [metric_key(self.metric)]

    def mode_list(self) -> list[str]:
        return [str(m) for m in self.modes] or [self.mode] * len(self.objective_list())

    @property
    def multi(self) -> bool:
        return len(self.objective_list()) > 1


@dataclass
class ResourceSettings:
    """What every trial runs on (YAML ``resources:``)."""

    workers_per_trial: int = 1  # Ray Train workers per trial (DDP when > 1)
    use_gpu: Any = "auto"  # auto | True | False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    extra: dict = field(default_factory=dict)  # custom Ray resources per worker, e.g. {"fake_gpu": 1}
    max_failures: int = 1  # Ray Train worker-group restarts per trial (from the last checkpoint)
    trial_max_failures: int = 0  # Tune restarts of a whole trial
    torch_backend: str = ""  # "" = Ray's choice (nccl with GPUs, gloo without)
    # True: each one-worker trial trains inside its Tune actor, which Tune keeps for the next trial
    # (imports, the text tower and Ray's actor start are paid once per process, not per trial);
    # Ray Train's worker-group restarts (max_failures) do not apply, trial_max_failures does
    reuse_processes: bool = False


@dataclass
class MlflowSettings:
    """Where the sweep is recorded (YAML ``mlflow:``; the parent_* fields are set by launchers)."""

    tracking_uri: str | None = None  # None = sqlite:////CWD/runs/mlflow.db
    artifact_location: str | None = None  # None = mlartifacts/ beside the SQLite file
    experiment: str = "ssvp-sweeps"
    parent_tags: dict = field(default_factory=dict)  # extra tags of the parent run
    parent_params: dict = field(default_factory=dict)  # extra params of the parent run
    parent_artifacts: Any = field(default_factory=dict)  # {artifact_dir: path} or [path]
    run_labels: dict = field(default_factory=dict)  # variant -> run-name label, e.g. {"full": "E/full"}
    register_model: str = ""  # "" = not registered; NAME = the refit model registered as models:/NAME/<version>


# keys a sweep YAML may hold in each section (the parent_* fields are not file settings)
_FILE_KEYS = {
    SearchSettings: {f.name for f in fields(SearchSettings)},
    ResourceSettings: {f.name for f in fields(ResourceSettings)},
    MlflowSettings: {"tracking_uri", "artifact_location", "experiment", "register_model"},
}
_TOP_KEYS = {"name", "description", "base", "space", "variants", "search", "resources", "mlflow",
             "storage_path", "target_eval", "refit"}


@dataclass
class SweepConfig:
    """One sweep: what is searched (base, space, variants), how (search), on what (resources),
    recorded where (mlflow, storage_path), and what follows the search (target_eval)."""

    name: str = "sweep"
    base: Config = field(default_factory=Config.tiny)
    space: dict = field(default_factory=dict)
    variants: dict = field(default_factory=dict)
    search: SearchSettings = field(default_factory=SearchSettings)
    resources: ResourceSettings = field(default_factory=ResourceSettings)
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)
    storage_path: str = "runs/ray"
    target_eval: str = "best"  # best | all | none
    # trials select on held-out source classes (train.protocol=select); with refit the best
    # configuration is then trained on every source class with the paper protocol (all epochs,
    # last epoch) and THAT model is evaluated on the targets (target_eval="best"; not with "all")
    refit: bool = True
    # the protocol forced on every trial: "select" (a search, above); None = each trial's own
    # train.protocol (ablations/grid.py: the paper protocol unless the grid asks for select)
    protocol: str | None = "select"
    # which configuration the refit trains (tuning.pareto): knee | best:<metric> | trial:<n>
    refit_pick: str = "knee"
    verbose: int = 1  # console: 0 silent, 1 a line per finished trial, 2 + Tune's table and Ray's logs, 3 + per result
    description: str = ""
    source_file: str = ""  # the YAML it was read from ("" when built in code)

    # ----- validation (once, before Ray starts) -----
    def validate(self):
        """Check every section against ``ssvp.config``; returns the parsed :class:`SearchSpace`.

        Raises :class:`SweepConfigError` (bad setting) or :class:`tuning.space.SpaceError`
        (bad space, variant or point), each naming the field.
        """
        self._normalize()
        self._check_settings()
        self._check_objectives()
        space = self._check_space()
        fixed_base = self.base.override(space.fixed)
        self._check_variants(fixed_base)
        self._check_points(space, fixed_base)
        self.fold_classes()  # class_folds > 1: the source's classes split, or the refusal naming the key
        return space

    def _where(self, section: str) -> str:
        return f"{self.source_file}: {section}" if self.source_file else section

    def _normalize(self) -> None:
        s, r = self.search, self.resources
        if s.scheduler == "none":
            s.scheduler = None
        if s.points_to_evaluate == "none":
            s.points_to_evaluate = None
        if isinstance(r.use_gpu, str) and r.use_gpu.lower() in ("true", "false"):
            r.use_gpu = r.use_gpu.lower() == "true"
        self.variants = {str(k): dict(v or {}) for k, v in (self.variants or {}).items()}

    def _check_settings(self) -> None:
        s, r = self.search, self.resources
        checks = (
            (s.algorithm in SEARCHES, "search", f"algorithm must be 'optuna' or 'grid', got {s.algorithm!r}"),
            (s.mode in MODES, "search", f"mode must be 'max' or 'min', got {s.mode!r}"),
            (s.scheduler in SCHEDULERS, "search", f"scheduler must be 'asha' or none, got {s.scheduler!r}"),
            (self.target_eval in TARGET_EVALS, "target_eval", f"must be best, all or none, got {self.target_eval!r}"),
            (isinstance(self.refit, bool), "refit", f"must be true or false, got {self.refit!r}"),
            (self.protocol in (None, "select", "paper"), "protocol", f"must be select, paper or none, got {self.protocol!r}"),
            (isinstance(s.num_samples, int) and s.num_samples >= 1, "search", "num_samples must be >= 1"),
            (isinstance(r.workers_per_trial, int) and r.workers_per_trial >= 1, "resources",
             "workers_per_trial must be >= 1"),
            (r.use_gpu in (True, False, "auto"), "resources", f"use_gpu must be auto, true or false, got {r.use_gpu!r}"),
            (isinstance(r.reuse_processes, bool), "resources",
             f"reuse_processes must be true or false, got {r.reuse_processes!r}"),
            (not r.reuse_processes or r.workers_per_trial == 1, "resources",
             f"reuse_processes: true needs workers_per_trial: 1 (got {r.workers_per_trial}); multi-worker trials "
             "run as Ray Train runs"),
            (bool(self.name) and "/" not in self.name and not self.name.startswith("."), "name",
             f"sweep name {self.name!r} must be a non-empty folder name"),
        )
        for ok, section, message in checks:
            if not ok:
                raise SweepConfigError(f"{self._where(section)}: {message}")

    def _check_objectives(self) -> None:
        """Objectives, modes, sampler, the scheduler with several objectives, folds, seeds, risk, refit.pick."""
        from .pareto import PickError, known_objectives, metric_key, parse_pick

        s = self.search
        known = known_objectives()
        if not isinstance(s.objectives, list) or not isinstance(s.modes, list):
            self._refuse("search", "objectives and modes must be lists, e.g. objectives: [val/image_auroc, "
                         "val/pixel_aupro], modes: [max, max]")
        for name in s.objectives:
            if metric_key(name) not in known:
                self._refuse("search", f"objectives: unknown objective {name!r}; known: {', '.join(known)} "
                             "(or their MLflow names, val/image_auroc)")
        if len(set(map(metric_key, s.objectives))) != len(s.objectives):
            self._refuse("search", f"objectives: {s.objectives} names one metric twice")
        if s.modes and len(s.modes) != len(s.objective_list()):
            self._refuse("search", f"modes: {len(s.modes)} mode(s) {s.modes} for {len(s.objective_list())} "
                         f"objective(s) {s.objective_list()}; give one max/min per objective")
        if any(m not in MODES for m in s.mode_list()):
            self._refuse("search", f"modes must each be 'max' or 'min', got {s.modes}")
        if s.objectives:  # the first objective is the metric the console, ASHA's default and best_ show
            s.metric, s.mode = s.objective_list()[0], s.mode_list()[0]
        if s.sampler not in SAMPLERS:
            self._refuse("search", f"sampler must be one of {', '.join(SAMPLERS)}, got {s.sampler!r}")
        if s.scheduler_metric is not None and metric_key(s.scheduler_metric) not in known:
            self._refuse("search", f"scheduler_metric: unknown metric {s.scheduler_metric!r}; known: {', '.join(known)}")
        if s.multi and s.scheduler == "asha" and not s.scheduler_metric:
            self._refuse("search", f"scheduler: asha cannot rank {len(s.objective_list())} objectives at once; set "
                         "scheduler: none (every trial runs all epochs) or scheduler_metric: <one metric> "
                         "(ASHA stops trials on that metric alone)")
        self._check_replicas()
        try:
            parse_pick(self.refit_pick, s.objective_list())
        except PickError as exc:
            self._refuse("refit", str(exc))

    def _check_replicas(self) -> None:
        s = self.search
        for key in ("class_folds", "seeds_per_trial"):
            value = getattr(s, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                self._refuse("search", f"{key} must be an integer >= 1, got {value!r}")
        if s.risk is not None and (isinstance(s.risk, bool) or not isinstance(s.risk, (int, float)) or s.risk < 0):
            self._refuse("search", f"risk must be a number kappa >= 0 (objective = mean - kappa * std), got {s.risk!r}")
        replicated = s.class_folds > 1 or s.seeds_per_trial > 1
        if s.risk and not replicated:
            self._refuse("search", "risk needs class_folds > 1 or seeds_per_trial > 1 (a spread to weigh)")
        if replicated and self.target_eval == "all":
            self._refuse("target_eval", "'all' evaluates one model per trial; with class_folds or seeds_per_trial > 1 "
                         "a trial trains several, use target_eval: best (the refit is evaluated)")
        if s.class_folds > 1 and self.base.data.val_classes:
            self._refuse("search", f"class_folds: {s.class_folds} chooses the held-out classes itself; remove "
                         f"data.val_classes {self.base.data.val_classes} from the base config")

    def fold_classes(self) -> list[list[str]]:
        """The held-out class sets of ``search.class_folds`` (``[]`` for one fold); reads the source's class list."""
        from .folds import FoldError, assign_folds

        s = self.search
        if s.class_folds <= 1:
            return []
        from ssvp.data import open_dataset
        from ssvp.data.base import DatasetError

        data = self.base.data
        try:
            classes = open_dataset(data.source, split="test", classes=data.source_classes or None).classes
        except (DatasetError, OSError) as exc:
            self._refuse("search", f"class_folds: cannot list the classes of data.source {data.source!r}: {exc}")
        try:
            return assign_folds(classes, s.class_folds, s.seed)
        except FoldError as exc:
            raise SweepConfigError(f"{self.source_file}: {exc}" if self.source_file else str(exc)) from None

    def _refuse(self, section: str, message: str):
        raise SweepConfigError(f"{self._where(section)}: {message}")

    def _check_space(self):
        from .space import SpaceError, parse_space
        from .trial import VARIANT_KEY

        space = parse_space(self.space, self.base)
        space.check_for(self.search.algorithm)
        if VARIANT_KEY in space.params:
            raise SpaceError(f"search space key {VARIANT_KEY!r} is reserved for variants")
        return space

    def _check_variants(self, fixed_base: Config) -> None:
        from .space import SpaceError

        for vname, overrides in self.variants.items():
            try:
                fixed_base.override(overrides)
            except ConfigError as exc:
                raise SpaceError(f"variant {vname!r}: {exc}") from None

    def _check_points(self, space, fixed_base: Config) -> None:
        from .space import SpaceError

        points = self.search.points_to_evaluate
        if points in (None, "paper"):
            return
        for i, point in enumerate(points):
            for key, value in dict(point).items():
                if key not in space.searched:
                    raise SpaceError(f"points_to_evaluate[{i}] key {key!r} is not a searched key of the space")
                try:
                    fixed_base.override({key: value})
                except ConfigError as exc:
                    raise SpaceError(f"points_to_evaluate[{i}] key {key!r}: {exc}") from None

    # ----- printing -----
    def to_dict(self) -> dict[str, Any]:
        """Plain data in the YAML's section order (``base`` resolved to the full config)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["base"] = self.base.to_dict()
        for key in ("search", "resources", "mlflow"):
            out[key] = asdict(out[key])
        out["refit"] = {"enabled": out["refit"], "pick": out.pop("refit_pick")}
        return out

    def to_yaml(self) -> str:
        """What ``sweep.py --print-config`` prints."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def replace(self, **changes: Any) -> "SweepConfig":
        """A copy with top-level fields changed (sections are copied, not shared)."""
        sections = {k: replace(getattr(self, k)) for k in ("search", "resources", "mlflow") if k not in changes}
        return replace(self, **sections, **changes)


# ----- reading a sweep YAML -----
def _section(cls, raw: Any, where: str):
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise SweepConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    names = _FILE_KEYS[cls]
    unknown = sorted(set(raw) - names)
    if unknown:
        raise SweepConfigError(f"{where}: {unknown_keys_message(unknown, names)}")
    return cls(**dict(raw))


def resolve_config_path(path: str | Path) -> Path:
    """``path``, or the file of that bare name in ``tuning/configs``."""
    p = Path(path)
    if not p.is_file() and not p.suffix and (CONFIG_DIR / f"{p.name}.yaml").is_file():
        p = CONFIG_DIR / f"{p.name}.yaml"
    if not p.is_file():
        raise SweepConfigError(f"sweep config {path} does not exist")
    return p


def read_sweep_file(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The YAML mapping of a sweep file (top-level and ``base`` keys checked); no config built."""
    p = resolve_config_path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SweepConfigError(f"cannot parse sweep config {p}: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise SweepConfigError(f"sweep config {p} must hold a mapping at top level")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise SweepConfigError(f"sweep config {p}: {unknown_keys_message(unknown, _TOP_KEYS)}")
    base_keys = {"preset", "overrides", "synthetic"}
    unknown_base = sorted(set(raw.get("base") or {}) - base_keys)
    if unknown_base:
        raise SweepConfigError(f"{p}: base: {unknown_keys_message(unknown_base, base_keys)}")
    return p, dict(raw)


def load_sweep(
    path: str | Path, overrides: Mapping[str, Any] | None = None, base_dir: str | Path | None = None
) -> SweepConfig:
    """Read, build and validate a sweep file: the :class:`SweepConfig` that ``run_trials`` takes.

    ``overrides`` (``sweep.py --set``) are applied to the base config; ``base_dir`` anchors
    relative paths in ``base`` (default: the working directory). Generates the synthetic data
    of ``base.synthetic`` if missing.
    """
    p, raw = read_sweep_file(path)
    where = str(p.resolve())
    base = build_base_config(raw.get("base") or {"preset": "tiny"}, where, base_dir)
    if overrides:
        try:
            base = base.override(dict(overrides))
        except ConfigError as exc:
            raise SweepConfigError(f"{where}: --set: {exc}") from None
    sweep = SweepConfig(
        name=str(raw.get("name") or p.stem),
        base=base,
        space=dict(raw.get("space") or {}),
        variants=dict(raw.get("variants") or {}),
        search=_section(SearchSettings, raw.get("search"), f"{p}: search"),
        resources=_section(ResourceSettings, raw.get("resources"), f"{p}: resources"),
        mlflow=_section(MlflowSettings, raw.get("mlflow"), f"{p}: mlflow"),
        storage_path=str(raw.get("storage_path") or "runs/ray"),
        target_eval=str(raw.get("target_eval") or "best"),
        **_refit_settings(raw.get("refit", True), f"{p}: refit"),
        description=str(raw.get("description") or ""),
        source_file=where,
    )
    sweep.validate()
    return sweep


def _refit_settings(raw: Any, where: str) -> dict[str, Any]:
    """``refit: true | false | {pick: knee | best:<metric> | trial:<n>, enabled: true}`` as SweepConfig fields."""
    if not isinstance(raw, Mapping):
        return {"refit": raw}
    unknown = sorted(set(raw) - {"pick", "enabled"})
    if unknown:
        raise SweepConfigError(f"{where}: unknown key(s) {unknown}; known: enabled, pick")
    return {"refit": raw.get("enabled", True), "refit_pick": str(raw.get("pick", "knee"))}


def build_base_config(base: Mapping[str, Any], source_file: str = "", base_dir: str | Path | None = None) -> Config:
    """The trials' base ``Config`` from a YAML ``base:`` section: preset (+ file), overrides, synthetic data.

    With ``synthetic`` the built-in benchmark is generated (``ssvp.data.make_synthetic``)
    into ``root`` when missing, here in the driver before any trial starts, and the config
    points at ``domain_a`` (source) and ``domain_b`` (target).
    """
    base = dict(base)
    explicit_dir = base_dir is not None
    base_dir = Path(base_dir or Path.cwd()).resolve()
    overrides = copy.deepcopy(base.get("overrides") or {})
    try:
        cfg = _preset_config(base.get("preset", "tiny"), source_file, base_dir)
        synthetic = base.get("synthetic")
        if synthetic:
            if not isinstance(synthetic, Mapping):
                raise SweepConfigError(f"{source_file}: base.synthetic must be a mapping {{root, seed}}")
            root = Path(str(synthetic.get("root", "data/synthetic")))
            if not root.is_absolute():  # data/... under the data root (SSVP_DATA_ROOT), ssvp/paths.py
                from ssvp.paths import resolve_data_path

                root = base_dir / root if explicit_dir else resolve_data_path(root)
            options = {k: v for k, v in synthetic.items() if k not in ("root", "seed")}
            _check_synthetic_options(options, source_file)
            ensure_synthetic(root, int(synthetic.get("seed", 0)), options)
            overrides.setdefault("source", f"synthetic:{root / 'domain_a'}")
            overrides.setdefault("targets", [f"synthetic:{root / 'domain_b'}"])
        return cfg.override(overrides)
    except ConfigError as exc:
        raise SweepConfigError(f"{source_file or 'sweep config'}: base: {exc}") from None


def _check_synthetic_options(options: Mapping[str, Any], source_file: str) -> None:
    """``base.synthetic`` options are ``make_synthetic``'s: a misspelt one is refused, data there or not."""
    import inspect

    from ssvp.data import make_synthetic

    known = [k for k in inspect.signature(make_synthetic).parameters if k not in ("out_dir", "seed", "verbose")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise SweepConfigError(f"{source_file or 'sweep config'}: base.synthetic: unknown option(s) {unknown}; "
                               f"known: root, seed, {', '.join(known)}")


def _preset_config(preset: Any, source_file: str, base_dir: Path) -> Config:
    if preset == "tiny":
        return Config.tiny()
    if preset in ("full", "paper", None):
        return Config()
    file = Path(str(preset))
    if not file.is_absolute():
        cand = [base_dir / file] + ([Path(source_file).parent / file] if source_file else [])
        file = next((c for c in cand if c.is_file()), cand[0])
    return load_config(file)


def ensure_synthetic(root: Path, seed: int = 0, options: Mapping[str, Any] | None = None) -> Path:
    """Generate the synthetic two-domain benchmark into ``root`` unless it is already there."""
    done = root / "domain_a" / "meta.json"
    if not (done.is_file() and (root / "domain_b" / "meta.json").is_file()):
        from ssvp.data import make_synthetic

        make_synthetic(root, seed=seed, **dict(options or {}))
    return root
