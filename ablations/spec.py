"""Grid files: named ablation grids in YAML, expanded into variants x seeds.

A grid file looks like this (every key but ``name`` and one of ``variants`` /
``sweeps`` is optional)::

    name: components
    description: one line shown in the table header
    caption: text under the table (what the rows mean, caveats)
    base:                      # the config every variant starts from
      preset: tiny             # optional: start from Config.tiny() instead of Config()
      config: path/to/cfg.yaml # optional: a config file (relative to the grid file)
      gamma: 0.5               # any other key: a flat, dotted or nested ssvp.config override
    columns: [I-AUROC, P-AUROC]  # metric columns of results.md / results.tex (default: all six)
    seeds: 3                   # default number of seeds (CLI --seeds overrides)
    seed_base: 0               # seeds are seed_base, seed_base + 1, ...
    reference: full            # the variant the paired comparison is made against
    resources: {cpu: 4, gpu: 1}  # per trial (one Ray Train worker)
    max_concurrent: 0          # 0 = as many trials at once as resources allow
    variants:
      - name: full             # descriptive name (unique)
        letter: E              # optional Table-3 letter
        description: full SSVP
        overrides: {fusion: atf, vcpg: true, vtam: true}
    sweeps:                    # one-at-a-time sensitivity sweeps around the base values
      - param: gamma
        values: [0.1, 0.3, 0.5, 0.7, 0.9]

Each sweep value becomes a variant ``gamma=0.3`` overriding only that key. The
point where every swept key sits at its base value is a single shared variant
named ``default`` (it lies on every sensitivity curve) and is the reference
unless ``reference`` says otherwise.

Nothing here imports Ray or MLflow: a grid can be loaded, checked and expanded
anywhere (``python ablations/grid.py --grid FILE --dry-run``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ssvp.config import Config, ConfigError, did_you_mean, load_config, section_of, unknown_keys_message

__all__ = ["GridError", "Variant", "TrialSpec", "Grid", "load_grid", "parse_grid", "trial_id"]

GRID_KEYS = {
    "name", "description", "caption", "base", "seeds", "seed_base", "reference",
    "resources", "max_concurrent", "variants", "sweeps", "columns",
}
VARIANT_KEYS = {"name", "letter", "description", "overrides"}
SWEEP_KEYS = {"param", "values"}
RESOURCE_KEYS = {"cpu", "gpu"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.=+\-]+$")


class GridError(ValueError):
    """A grid file is invalid; the message names the file and the field."""


@dataclass(frozen=True)
class Variant:
    """One row of an ablation table: a named set of config overrides."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    letter: str = ""
    description: str = ""
    # Sensitivity-sweep coordinates this variant represents, e.g. {"gamma": 0.3};
    # the shared default point carries every swept key at its base value.
    coords: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``E: full`` for lettered variants (Table 3), else the name."""
        return f"{self.letter}: {self.name}" if self.letter else self.name

    @property
    def short(self) -> str:
        return self.letter or self.name


@dataclass(frozen=True)
class TrialSpec:
    """One variant-seed pair: what a single Ray Tune trial trains and evaluates."""

    variant: str
    seed: int
    overrides: dict[str, Any]

    @property
    def trial_id(self) -> str:
        return trial_id(self.variant, self.seed)


def trial_id(variant: str, seed: int) -> str:
    return f"{variant}__seed{seed}"


@dataclass
class Grid:
    name: str
    variants: list[Variant]
    base: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    caption: str = ""
    seeds: int = 1
    seed_base: int = 0
    reference: str = ""
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    max_concurrent: int = 0
    columns: list[str] = field(default_factory=list)  # metric columns of the tables (titles); empty = all
    path: str = ""
    _base_config: Config | None = field(default=None, repr=False, compare=False)

    # ----- lookup -----
    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name or (v.letter and v.letter == name):
                return v
        names = self.variant_names + [v.letter for v in self.variants if v.letter]
        hint = did_you_mean(name, names)
        raise GridError(f"{self._where()}: no variant named {name!r}; "
                        + (hint or f"variants: {', '.join(self.variant_names)}"))

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]

    @property
    def swept_params(self) -> list[str]:
        seen: list[str] = []
        for v in self.variants:
            for key in v.coords:
                if key not in seen:
                    seen.append(key)
        return seen

    # ----- configs -----
    def base_config(self, extra: Mapping[str, Any] | None = None) -> Config:
        """The validated base config, with ``extra`` (CLI ``--set``) applied on top."""
        if self._base_config is None:
            self._base_config = _build_base(self.base, Path(self.path).parent if self.path else Path("."), self._where())
        if not extra:
            return self._base_config
        try:
            return self._base_config.override(dict(extra))
        except ConfigError as exc:
            raise GridError(f"{self._where()}: --set: {exc}") from None

    def variant_config(self, name: str, seed: int | None = None, extra: Mapping[str, Any] | None = None) -> Config:
        variant = self.variant(name)
        updates = dict(variant.overrides)
        if seed is not None:
            updates["seed"] = seed
        try:
            return self.base_config(extra).override(updates)
        except ConfigError as exc:
            raise GridError(f"{self._where()}: variant {variant.name!r}: {exc}") from None

    def seed_values(self, seeds: int | None = None) -> list[int]:
        k = self.seeds if seeds is None else seeds
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise GridError(f"{self._where()}: seeds must be an integer >= 1; got {k!r}")
        return [self.seed_base + i for i in range(k)]

    def trials(self, seeds: int | None = None, variants: list[str] | None = None) -> list[TrialSpec]:
        """Every variant x seed, variants in file order, seeds inner."""
        chosen = [self.variant(n) for n in variants] if variants else self.variants
        out = []
        for v in chosen:
            for s in self.seed_values(seeds):
                out.append(TrialSpec(variant=v.name, seed=s, overrides={**v.overrides, "seed": s}))
        return out

    def row_changes(self) -> dict[str, list[tuple[str, Any, Any]]]:
        """Per variant after the first, the config keys it changes from the variant above it:
        ``{"D": [("prompting", "bayes_pfl", "bayes_pfl_vcpg"), ("vcpg", False, True)]}`` (by name);
        empty for sensitivity grids (their rows are points of a curve, not a build-up)."""
        if self.swept_params or len(self.variants) < 2:
            return {}
        flats = [self.variant_config(v.name, seed=self.seed_base).flat() for v in self.variants]
        out: dict[str, list[tuple[str, Any, Any]]] = {}
        for v, before, after in zip(self.variants[1:], flats, flats[1:]):
            out[v.name] = [(k, before[k], after[k]) for k in after if k != "seed" and before.get(k) != after[k]]
        return out

    def validate(self) -> None:
        """Build every variant's config so a bad key fails before any trial starts."""
        for v in self.variants:
            self.variant_config(v.name, seed=self.seed_base)

    def _where(self) -> str:
        return f"grid {self.path or self.name}"


# ----- parsing -----
def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid YAML file; ``GridError`` names the file and field."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise GridError(f"cannot parse grid file {path}: {exc}") from None
    return parse_grid(data, path=str(path))


def parse_grid(data: Any, path: str = "<grid>") -> Grid:
    where = f"grid {path}"
    if not isinstance(data, dict):
        raise GridError(f"{where}: must hold a mapping at top level")
    _reject_unknown(data, GRID_KEYS, where)
    name = _check_name(data.get("name"), where)
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise GridError(f"{where}: 'base' must be a mapping of config keys")

    grid = Grid(
        name=name,
        variants=[],
        base=base,
        description=_str(data, "description", where),
        caption=_str(data, "caption", where),
        seeds=_int(data, "seeds", 1, where, minimum=1),
        seed_base=_int(data, "seed_base", 0, where, minimum=0),
        resources=_resources(data.get("resources"), where),
        max_concurrent=_int(data, "max_concurrent", 0, where, minimum=0),
        columns=_columns(data.get("columns"), where),
        path=path,
    )
    variants = _variants(data.get("variants") or [], where)
    sweeps = data.get("sweeps") or []
    if sweeps:
        variants += _sweep_variants(sweeps, grid.base_config(), {v.name for v in variants}, where)
    if not variants:
        raise GridError(f"{where}: needs at least one entry under 'variants' or 'sweeps'")
    names = [v.name for v in variants]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise GridError(f"{where}: duplicate variant name(s) {', '.join(dupes)}")
    letters = [v.letter for v in variants if v.letter]
    if len(set(letters)) != len(letters):
        raise GridError(f"{where}: duplicate variant letters {letters}")
    grid.variants = variants

    reference = data.get("reference")
    if reference is None:
        reference = "default" if "default" in names else ("full" if "full" in names else names[-1])
    if not isinstance(reference, str):
        raise GridError(f"{where}: 'reference' must be a variant name; got {reference!r}")
    grid.reference = grid.variant(reference).name
    grid.validate()
    return grid


def _reject_unknown(mapping: dict, allowed: Any, here: str) -> None:
    unknown = set(mapping) - set(allowed)
    if unknown:
        raise GridError(f"{here}: {unknown_keys_message(unknown, allowed)}")


def _check_name(name: Any, here: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise GridError(f"{here}: 'name' must be a word of letters, digits, _ . = + -; got {name!r}")
    return name


def _variants(items: Any, where: str) -> list[Variant]:
    if not isinstance(items, list):
        raise GridError(f"{where}: 'variants' must be a list of mappings")
    out = []
    for i, item in enumerate(items):
        here = f"{where}: variants[{i}]"
        if not isinstance(item, dict):
            raise GridError(f"{here} must be a mapping with name and overrides")
        _reject_unknown(item, VARIANT_KEYS, here)
        name = _check_name(item.get("name"), here)
        overrides = item.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise GridError(f"{here} ({name}): 'overrides' must be a mapping of config keys")
        for key in overrides:
            _check_key(key, f"{here} ({name})")
        if "seed" in overrides:
            raise GridError(f"{here} ({name}): 'seed' is set per trial from seeds/seed_base; remove it from overrides")
        letter = item.get("letter", "")
        if not isinstance(letter, str):
            raise GridError(f"{here} ({name}): 'letter' must be a string; got {letter!r}")
        out.append(Variant(name=name, overrides=dict(overrides), letter=letter,
                           description=str(item.get("description", "") or "")))
    return out


def _sweep_variants(sweeps: Any, base: Config, taken: set[str], where: str) -> list[Variant]:
    if not isinstance(sweeps, list):
        raise GridError(f"{where}: 'sweeps' must be a list of {{param, values}} mappings")
    flat = base.flat()
    centers: dict[str, float] = {}
    parsed: list[tuple[str, list[float]]] = []
    for i, sweep in enumerate(sweeps):
        here = f"{where}: sweeps[{i}]"
        if not isinstance(sweep, dict) or set(sweep) != SWEEP_KEYS:
            raise GridError(f"{here} must be a mapping with exactly 'param' and 'values'")
        param = sweep["param"]
        _check_key(param, here)
        param = param.rpartition(".")[2]
        center = flat[param]
        if not isinstance(center, (int, float)) or isinstance(center, bool):
            raise GridError(f"{here}: param {param!r} is not numeric (base value {center!r})")
        values = sweep["values"]
        if not isinstance(values, list) or not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        ):
            raise GridError(f"{here} ({param}): 'values' must be a non-empty list of numbers")
        if len(set(values)) != len(values):
            raise GridError(f"{here} ({param}): 'values' has duplicates: {values}")
        if param in centers:
            raise GridError(f"{here}: param {param!r} is swept twice")
        centers[param] = float(center)
        parsed.append((param, [float(v) for v in values]))

    if "default" in taken:
        raise GridError(f"{where}: the name 'default' is reserved for the sweeps' center point")
    # The center point (every swept key at its base value) is one shared variant, 'default',
    # placed where its value falls in the first sweep that lists it.
    center_desc = ", ".join(f"{p} = {c:g}" for p, c in centers.items())
    default = Variant(name="default", overrides={}, description=f"base values ({center_desc})",
                      coords=dict(centers))
    out: list[Variant] = []
    for param, values in parsed:
        for value in values:
            if math.isclose(value, centers[param], rel_tol=0, abs_tol=1e-12):
                if default not in out:
                    out.append(default)
                continue
            name = f"{param}={value:g}"
            if name in taken:
                raise GridError(f"{where}: sweep variant {name!r} clashes with a listed variant")
            out.append(Variant(name=name, overrides={param: value}, description=f"{param} = {value:g}",
                               coords={param: value}))
    if default not in out:
        out.append(default)
    return out


def _build_base(base: Mapping[str, Any], root: Path, where: str) -> Config:
    base = dict(base)
    preset = base.pop("preset", None)
    cfg_path = base.pop("config", None)
    try:
        if cfg_path is not None:
            p = Path(cfg_path)
            if not p.is_absolute():
                p = (root / p) if (root / p).exists() else p
            cfg = load_config(p)
        elif preset == "tiny":
            cfg = Config.tiny()
        elif preset in (None, "paper", "default"):
            cfg = Config()
        else:
            raise GridError(f"{where}: base.preset must be tiny or paper; got {preset!r}")
        return cfg.override(base)
    except ConfigError as exc:
        raise GridError(f"{where}: base: {exc}") from None


def _check_key(key: Any, where: str) -> None:
    if not isinstance(key, str):
        raise GridError(f"{where}: config key {key!r} must be a string")
    section, _, name = key.rpartition(".")
    try:
        owner = section_of(name)
    except ConfigError as exc:
        raise GridError(f"{where}: {exc}") from None
    if section and section != owner:
        raise GridError(f"{where}: key {key!r}: {name!r} belongs to section {owner!r}")


def _columns(value: Any, where: str) -> list[str]:
    """The table columns a grid file names (``[I-AUROC, P-AUROC]`` or ``"I-AUROC,P-AUROC"``), as titles."""
    if value is None:
        return []
    if not isinstance(value, (list, str)) or (isinstance(value, list) and not all(isinstance(v, str) for v in value)):
        raise GridError(f"{where}: 'columns' must be a list of metric names like [I-AUROC, P-AUROC]; got {value!r}")
    from ablations.aggregate import metric_columns

    try:
        return [title for _, title in metric_columns(value)]
    except ValueError as exc:
        raise GridError(f"{where}: columns: {exc}") from None


def _str(data: Mapping[str, Any], key: str, where: str) -> str:
    value = data.get(key, "") or ""
    if not isinstance(value, str):
        raise GridError(f"{where}: '{key}' must be a string; got {value!r}")
    return value.strip()


def _int(data: Mapping[str, Any], key: str, default: int, where: str, minimum: int) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise GridError(f"{where}: '{key}' must be an integer >= {minimum}; got {value!r}")
    return value


def _resources(value: Any, where: str) -> dict[str, float]:
    out = {"cpu": 1.0, "gpu": 0.0}
    if value is None:
        return out
    if not isinstance(value, dict):
        raise GridError(f"{where}: 'resources' must be a mapping like {{cpu: 4, gpu: 1}}")
    _reject_unknown(value, RESOURCE_KEYS, f"{where}: resources")
    for key, v in value.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise GridError(f"{where}: resources.{key} must be a number >= 0; got {v!r}")
        out[key] = float(v)
    return out
