"""Where a sweep or grid records: the tracking store, its artifacts and Ray's storage, and where the code came from.

The rule (flag > environment > config > default; relative paths against the launch
directory; nothing inside a Ray temporary folder) is :mod:`ssvp.paths`; this module
applies it to what a launcher (``tuning/sweep.py``, ``ablations/grid.py``) needs and adds
the provenance tags of the MLflow record (commit, dirty flag, the config file as the
user named it and a hash of its content).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ssvp.paths import (
    ENV_STORAGE,
    ENV_TRACKING_URI,
    REPO_ROOT,
    Choice,
    PathError,
    choose,
    git_state,
    is_uri,
    launch_dir,
    ray_temp_reason,
    resolve_local,
    resolve_location,
    resolve_tracking_uri,
)

__all__ = ["Locations", "resolve_locations", "source_tags", "PathError"]


@dataclass(frozen=True)
class Locations:
    """Resolved record locations of one launch, each with where it came from."""

    tracking_uri: str
    tracking_origin: str
    storage_path: str  # absolute local path or a URI (s3://...)
    storage_origin: str
    artifact_location: str | None  # a new experiment's artifact root; None = the server's default

    @property
    def remote_storage(self) -> bool:
        return is_uri(self.storage_path)

    def describe(self) -> str:
        return (f"MLflow {self.tracking_uri} ({self.tracking_origin}); "
                f"Ray storage {self.storage_path} ({self.storage_origin})")


def resolve_locations(*, tracking_uri: str | None = None, storage_path: str | None = None,
                      artifact_location: str | None = None, config_tracking_uri: str | None = None,
                      config_storage_path: str | None = None, config_artifact_location: str | None = None,
                      environ: Mapping[str, str] | None = None) -> Locations:
    """Flags (first three) > ``MLFLOW_TRACKING_URI`` / ``SSVP_STORAGE_PATH`` > config > defaults.

    The artifact root of a new experiment on a SQLite store defaults to ``mlartifacts/`` beside
    the ``.db``; on a tracking server it is the server's (``--serve-artifacts``) default.
    """
    track = resolve_tracking_uri(tracking_uri, config_tracking_uri, environ)
    store = choose(storage_path, "--storage-path", ENV_STORAGE, config_storage_path, "storage_path", "runs/ray", environ)
    storage = resolve_location(store.value, what="Ray storage path", origin=store.origin, flag="--storage-path",
                               env=ENV_STORAGE, environ=environ)
    art = choose(artifact_location, "--artifact-location", None, config_artifact_location,
                 "mlflow.artifact_location", None, environ)
    if art.value is None and track.value.startswith("sqlite:///"):
        art = Choice(str(Path(track.value[len("sqlite:///"):]).parent / "mlartifacts"), track.origin)
    artifacts = None
    if art.value is not None:
        artifacts = resolve_location(art.value, what="MLflow artifact location", origin=art.origin,
                                     flag="--artifact-location", env=None, environ=environ)
    return Locations(track.value, track.origin, storage, store.origin, artifacts)


def config_name(path: str | os.PathLike, environ: Mapping[str, str] | None = None) -> str:
    """A config file as the user named it (``launch.json``, ``grid.json``; :func:`_config_name`)."""
    return _config_name(Path(path), environ)


def _config_name(path: Path, environ: Mapping[str, str] | None) -> str:
    """The config file as the user named it: relative to the repository when it is in it
    (also inside a job's working-directory copy), its absolute path elsewhere."""
    p = path.resolve()
    for root in (REPO_ROOT, launch_dir(environ)):
        try:
            return str(p.relative_to(root.resolve()))
        except ValueError:
            continue
    return p.name if ray_temp_reason(p, environ) else str(p)


def source_tags(config_file: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """MLflow tags of where a run came from: ``git_commit`` (also ``mlflow.source.git.commit``),
    ``git_dirty``, and the config file's name and content hash (its content is an artifact)."""
    commit, dirty = git_state(environ=environ)
    tags = {"git_commit": commit, "git_dirty": "unknown" if dirty is None else str(dirty).lower()}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    if config_file:
        p = Path(config_file)
        tags["config_file"] = _config_name(p, environ)
        if p.is_file():
            tags["config_sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return tags

