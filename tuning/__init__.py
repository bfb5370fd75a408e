"""The platform layer: Ray Tune/Train sweeps of SSVP with Optuna, recorded in MLflow.

The only package that imports Ray and MLflow (``ssvp/`` never does).

- :mod:`tuning.space`    search spaces from YAML, validated against ``ssvp.config`` (no Ray)
- :mod:`tuning.trial`    the Tune function trainable building a Ray Train ``TorchTrainer``
- :mod:`tuning.runner`   :func:`run_trials` (the reusable entry point) and :class:`ResultSummary`
- :mod:`tuning.tracking` MLflow parent/child runs from a Tune callback
- :mod:`tuning.settings` sweep YAML files (``tuning/configs``)
- ``tuning/sweep.py``    the command line (``--local``, cluster via ``ray job submit``, ``--resume``)
"""
from __future__ import annotations

from typing import Any

__all__ = ["run_trials", "ResultSummary", "TrialSummary", "parse_space", "SearchSpace", "SpaceError"]


def __getattr__(name: str) -> Any:  # lazy: importing tuning does not start Ray imports
    if name in ("run_trials", "ResultSummary", "TrialSummary"):
        from . import runner

        return getattr(runner, name)
    if name in ("parse_space", "SearchSpace", "SpaceError"):
        from . import space

        return getattr(space, name)
    raise AttributeError(f"module 'tuning' has no attribute {name!r}")
