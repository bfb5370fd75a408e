"""The platform layer: Ray Tune/Train sweeps of SSVP with Optuna, recorded in MLflow.

The only package that imports Ray and MLflow (``ssvp/`` never does). A sweep is one
:class:`tuning.settings.SweepConfig` run by :func:`tuning.runner.run_trials` in phases:

- :mod:`tuning.settings` the objects (SweepConfig, SearchSettings, ResourceSettings, MlflowSettings),
                         ``load_sweep`` (YAML in ``tuning/configs``), validation, ``to_yaml``
- :mod:`tuning.plan`     phase plan: space, search algorithm, scheduler, resources, paths, resume state
- :mod:`tuning.runner`   :func:`run_trials` (the phases in order) and the run phase (``run_tuner``)
- :mod:`tuning.record`   phase record: MLflow parent run, trial callback, trials reconciled
- :mod:`tuning.finish`   phase finish: best trial, target evaluation, parent report, hook
- :mod:`tuning.results`  :class:`ResultSummary` / :class:`TrialSummary`
- :mod:`tuning.space`    search spaces from YAML, validated against ``ssvp.config`` (no Ray)
- :mod:`tuning.trial`    the Tune function trainable building a Ray Train ``TorchTrainer``
- :mod:`tuning.tracking` MLflow parent/child runs (SweepTracker) and the Tune callback
- ``tuning/sweep.py``    the command line (``--local``, cluster via ``ray job submit``, ``--resume``,
                         ``--print-config``)
"""
from __future__ import annotations

import os
from typing import Any

# MLflow prints "View run … at: <URL>" for every run it ends on a tracking server (some twenty lines a
# sweep, a password in the URL included): the project's processes print their own link instead
# (ResultSummary.format: the parent run in the model-training view)
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

__all__ = [
    "run_trials", "ResultSummary", "TrialSummary", "SweepConfig", "load_sweep", "parse_space", "SearchSpace", "SpaceError",
]


def __getattr__(name: str) -> Any:  # lazy: importing tuning does not start Ray imports
    if name in ("run_trials", "ResultSummary", "TrialSummary"):
        from . import runner

        return getattr(runner, name)
    if name in ("SweepConfig", "load_sweep"):
        from . import settings

        return getattr(settings, name)
    if name in ("parse_space", "SearchSpace", "SpaceError"):
        from . import space

        return getattr(space, name)
    raise AttributeError(f"module 'tuning' has no attribute {name!r}")
