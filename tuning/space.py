"""Search spaces: parsed from YAML, validated against ``ssvp.config``, turned into Ray Tune domains.

A space maps config keys (flat, ``gamma``, or dotted, ``model.gamma``; any key of the
model / train / data sections) to a spec::

    gamma:        {type: uniform, low: 0.0, high: 1.0}
    beta:         {type: loguniform, low: 1.0e-3, high: 1.0e-1}
    n_prompts:    {type: int, low: 2, high: 4}          # inclusive bounds
    latent_dim:   {type: logint, low: 16, high: 256}    # inclusive, log scale
    fusion:       {type: choice, values: [atf, concat]}
    seed:         {type: grid, values: [0, 1, 2]}       # every value (search: grid only)
    epochs:       {type: fixed, value: 5}               # or just ``epochs: 5``

A plain value (scalar or list) is a fixed value. Bad spaces are rejected by
:func:`parse_space` before any trial starts, with a :class:`SpaceError` that names
the key: unknown keys, unknown types, ``low > high``, log scale over zero or negative
numbers, and bounds or choices that ``ssvp.config`` itself would refuse (every
endpoint and every choice is applied to the base config and validated).

This module imports Ray only inside :meth:`SearchSpace.to_tune`, so it can be used
(and tested) without a Ray session.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ssvp.config import KEY_LIST_HINT, Config, ConfigError, all_keys, did_you_mean, section_of

__all__ = ["SpaceError", "ParamSpec", "SearchSpace", "parse_space", "KINDS", "SEARCHED_KINDS"]

KINDS = ("uniform", "loguniform", "int", "logint", "choice", "grid", "fixed")
SEARCHED_KINDS = ("uniform", "loguniform", "int", "logint", "choice", "grid")
_ALIASES = {"log_uniform": "loguniform", "randint": "int", "categorical": "choice", "grid_search": "grid"}


class SpaceError(ValueError):
    """A search space is invalid; the message names the offending key."""


@dataclass
class ParamSpec:
    """One key of a search space (``key`` is the flat config key)."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    values: list[Any] = field(default_factory=list)
    value: Any = None

    @property
    def searched(self) -> bool:
        return self.kind in SEARCHED_KINDS

    @property
    def numeric(self) -> bool:
        return self.kind in ("uniform", "loguniform", "int", "logint")

    def to_tune(self):
        """The Ray Tune domain for this key (a plain value for ``fixed``)."""
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "int":
            return tune.randint(int(self.low), int(self.high) + 1)  # Tune's upper bound is exclusive
        if self.kind == "logint":
            return tune.lograndint(int(self.low), int(self.high) + 1)
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        return self.value

    def clip(self, value: Any) -> Any:
        """``value`` moved into this spec's domain (used for the paper-default first point)."""
        if self.numeric:
            value = min(max(value, self.low), self.high)
            return int(round(value)) if self.kind in ("int", "logint") else float(value)
        if self.kind in ("choice", "grid"):
            return value if value in self.values else self.values[0]
        return value

    def describe(self) -> str:
        if self.numeric:
            return f"{self.kind}[{self.low}, {self.high}]"
        if self.kind in ("choice", "grid"):
            return f"{self.kind}{list(self.values)}"
        return f"fixed={self.value!r}"

    def to_dict(self) -> dict[str, Any]:
        if self.numeric:
            return {"type": self.kind, "low": self.low, "high": self.high}
        if self.kind in ("choice", "grid"):
            return {"type": self.kind, "values": list(self.values)}
        return {"type": "fixed", "value": self.value}


@dataclass
class SearchSpace:
    """A validated search space: searched keys plus fixed overrides of the base config."""

    params: dict[str, ParamSpec]

    @property
    def searched(self) -> dict[str, ParamSpec]:
        return {k: p for k, p in self.params.items() if p.searched}

    @property
    def fixed(self) -> dict[str, Any]:
        return {k: p.value for k, p in self.params.items() if not p.searched}

    @property
    def has_grid(self) -> bool:
        return any(p.kind == "grid" for p in self.params.values())

    def to_tune(self) -> dict[str, Any]:
        """Tune ``param_space`` holding the searched keys only (fixed keys go into the base config)."""
        return {k: p.to_tune() for k, p in self.searched.items()}

    def to_dict(self) -> dict[str, Any]:
        return {k: p.to_dict() for k, p in self.params.items()}

    def default_point(self, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The paper's defaults (``ssvp.config`` defaults) for the searched keys, moved into range.

        Grid keys are left out (a grid enumerates its values anyway). ``defaults``
        overrides where the values come from (flat key -> value).
        """
        source = dict(defaults) if defaults is not None else paper_defaults()
        return {k: p.clip(source[k]) for k, p in self.searched.items() if p.kind != "grid" and k in source}

    def check_for(self, search: str) -> None:
        """Refuse combinations the search algorithm cannot handle (named by key)."""
        if search == "optuna":
            for key, p in self.searched.items():
                if p.kind == "grid":
                    raise SpaceError(
                        f"search space key {key!r}: type grid needs search algorithm 'grid' "
                        "(Optuna samples; use type choice instead)"
                    )
                if p.kind == "choice" and not all(v is None or isinstance(v, (bool, int, float, str)) for v in p.values):
                    raise SpaceError(
                        f"search space key {key!r}: Optuna choices must be numbers, strings, booleans or null; "
                        f"got {p.values!r}"
                    )

    def describe(self) -> str:
        return ", ".join(f"{k}: {p.describe()}" for k, p in self.params.items())


def paper_defaults() -> dict[str, Any]:
    """Default value of every config key: the paper's §4.2 settings held by ``ssvp.config``."""
    return Config.from_dict({}).flat()


def _flat_key(raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise SpaceError(f"search space key {raw!r} must be a non-empty string")
    section, _, name = raw.rpartition(".")
    try:
        owner = section_of(name)
    except ConfigError:
        hint = did_you_mean(name, all_keys())
        raise SpaceError(
            f"search space key {raw!r} is not a model/train/data config key; " + (hint or KEY_LIST_HINT)
        ) from None
    if section and section != owner:
        raise SpaceError(f"search space key {raw!r}: {name!r} belongs to section {owner!r}, not {section!r}")
    return name


def _number(key: str, spec: Mapping[str, Any], name: str) -> float | int:
    if name not in spec:
        raise SpaceError(f"search space key {key!r}: type {spec.get('type')!r} needs {name!r}")
    value = spec[name]
    if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise SpaceError(f"search space key {key!r}: {name} must be a number, got {spec[name]!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpaceError(f"search space key {key!r}: {name} must be a finite number, got {spec[name]!r}")
    return value


def _parse_one(key: str, raw: Any) -> ParamSpec:
    if not isinstance(raw, Mapping):
        return ParamSpec(key, "fixed", value=raw)
    unknown = set(raw) - {"type", "low", "high", "values", "value"}
    if unknown:
        raise SpaceError(f"search space key {key!r}: unknown field(s) {sorted(unknown)} (use type/low/high/values/value)")
    kind = str(raw.get("type", "")).lower()
    kind = _ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise SpaceError(f"search space key {key!r}: type must be one of {', '.join(KINDS)}; got {raw.get('type')!r}")
    if kind == "fixed":
        if "value" not in raw:
            raise SpaceError(f"search space key {key!r}: type fixed needs 'value'")
        return ParamSpec(key, kind, value=raw["value"])
    if kind in ("choice", "grid"):
        values = raw.get("values")
        if not isinstance(values, list) or not values:
            raise SpaceError(f"search space key {key!r}: type {kind} needs a non-empty list 'values'")
        return ParamSpec(key, kind, values=list(values))
    low, high = _number(key, raw, "low"), _number(key, raw, "high")
    if low > high:
        raise SpaceError(f"search space key {key!r}: low ({low}) > high ({high})")
    if kind in ("loguniform", "logint") and low <= 0:
        raise SpaceError(f"search space key {key!r}: a log scale needs low > 0, got low={low} (high={high})")
    if kind in ("int", "logint"):
        if float(low) != int(low) or float(high) != int(high):
            raise SpaceError(f"search space key {key!r}: type {kind} needs integer bounds, got [{low}, {high}]")
        low, high = int(low), int(high)
    else:
        low, high = float(low), float(high)
    return ParamSpec(key, kind, low=low, high=high)


def _check_against_config(spec: ParamSpec, base: Config) -> None:
    """Apply every endpoint / choice to the base config so ssvp.config's own bounds hold."""
    _check_kind(spec, base)
    if spec.numeric:
        candidates = [("low", spec.low), ("high", spec.high)]
    elif spec.kind in ("choice", "grid"):
        candidates = [(f"values[{i}]", v) for i, v in enumerate(spec.values)]
    else:
        candidates = [("value", spec.value)]
    for where, value in candidates:
        try:
            base.override({spec.key: value})
        except ConfigError as exc:
            raise SpaceError(
                f"search space key {spec.key!r}: {where}={value!r} is outside what ssvp.config accepts: {exc}"
            ) from None


def _check_kind(spec: ParamSpec, base: Config) -> None:
    if spec.numeric:
        current = getattr(getattr(base, section_of(spec.key)), spec.key)
        is_int = isinstance(current, int) and not isinstance(current, bool)
        if spec.kind in ("int", "logint") and not is_int:
            raise SpaceError(
                f"search space key {spec.key!r}: type {spec.kind} on a non-integer config key "
                f"(current value {current!r}); use uniform/loguniform"
            )
        if spec.kind in ("uniform", "loguniform") and is_int:
            raise SpaceError(
                f"search space key {spec.key!r}: type {spec.kind} on an integer config key "
                f"(current value {current!r}); use int/logint"
            )


def parse_space(raw: Mapping[str, Any] | SearchSpace | None, base: Config | None = None) -> SearchSpace:
    """Parse and validate a search space (see the module docstring for the format).

    ``base`` is the config the trials start from (default ``Config.tiny()``, whose
    bounds are those of every config): each endpoint and choice is validated by
    overriding it, so values ``ssvp.config`` would refuse are caught here.
    """
    if isinstance(raw, SearchSpace):
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise SpaceError(f"a search space must be a mapping of config keys to specs, got {type(raw).__name__}")
    base = base if base is not None else Config.tiny()
    params: dict[str, ParamSpec] = {}
    for raw_key, raw_spec in raw.items():
        key = _flat_key(raw_key)
        if key in params:
            raise SpaceError(f"search space key {raw_key!r} appears twice (as {key!r})")
        spec = _parse_one(key, raw_spec)
        _check_against_config(spec, base)
        params[key] = spec
    return SearchSpace(params)
