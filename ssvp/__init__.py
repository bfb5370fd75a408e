"""SSVP: Synergistic Semantic-Visual Prompting for zero-shot industrial anomaly detection.

The model library: pure PyTorch + numpy (no Ray, no MLflow). Heavy submodules load lazily.
"""
from .config import Config, ConfigError, load_config

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "load_config", "SSVP", "fit", "evaluate", "__version__"]

_LAZY = {"SSVP": "ssvp.model", "fit": "ssvp.engine", "evaluate": "ssvp.engine"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ssvp' has no attribute {name!r}")
