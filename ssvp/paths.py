"""Where a run's files live: one resolution rule for every path and URI.

Every location is chosen by the same precedence::

    command-line flag  >  environment variable  >  config file  >  embedded default

===================  ===========================  =======================  ======================  ==================================
location             flag                         environment              config                  default
===================  ===========================  =======================  ======================  ==================================
MLflow tracking      ``--tracking-uri``           ``MLFLOW_TRACKING_URI``  ``mlflow.tracking_uri``  ``sqlite:///<launch>/runs/mlflow.db``
Ray storage          ``--storage-path``           ``SSVP_STORAGE_PATH``    ``storage_path``        ``<launch>/runs/ray``
feature cache        ``--feature-cache``          ``SSVP_FEATURE_CACHE``   ``train.feature_cache`` none (features from the images)
data root            ``--data-root``              ``SSVP_DATA_ROOT``       --                      ``<launch>/data``
===================  ===========================  =======================  ======================  ==================================

``<launch>`` is the directory the user launched from: ``SSVP_LAUNCH_DIR`` when the
submitting side recorded it in the job's runtime environment (``python -m ssvp.paths
runtime-env``), else the working directory. Relative paths resolve against it. Dataset
roots written ``data/NAME`` (as every config in this repository writes them) resolve
under the data root, so ``visa:data/VisA`` with ``SSVP_DATA_ROOT=/data`` is ``/data/VisA``.
URIs with a scheme (``s3://``, ``gs://``, ``http://``) are kept as written.

A location that would land inside a Ray temporary folder (a session folder, the
``runtime_resources/working_dir_files/_ray_pkg_...`` copy that ``ray job submit
--working-dir`` runs in, Ray's temp dir) is refused with a :class:`PathError` that names
the flag and the variable to set: those folders disappear with the Ray session.

The submitting side also records the git commit (``SSVP_GIT_COMMIT``) and whether the
tree had uncommitted changes (``SSVP_GIT_DIRTY``), since ``.git`` is not uploaded with a
job's working directory. This module is pure: no Ray, no MLflow.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "ENV_TRACKING_URI", "ENV_STORAGE", "ENV_FEATURE_CACHE", "ENV_DATA_ROOT", "ENV_LAUNCH_DIR",
    "ENV_GIT_COMMIT", "ENV_GIT_DIRTY", "PathError", "Choice", "choose", "is_uri", "launch_dir",
    "ray_temp_reason", "resolve_local", "resolve_location", "resolve_tracking_uri", "data_root",
    "resolve_data_path", "apply_flags", "resolve_dataset", "resolve_config_paths", "git_state", "runtime_env",
]

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_STORAGE = "SSVP_STORAGE_PATH"
ENV_FEATURE_CACHE = "SSVP_FEATURE_CACHE"
ENV_DATA_ROOT = "SSVP_DATA_ROOT"
ENV_LAUNCH_DIR = "SSVP_LAUNCH_DIR"
ENV_GIT_COMMIT = "SSVP_GIT_COMMIT"
ENV_GIT_DIRTY = "SSVP_GIT_DIRTY"

REPO_ROOT = Path(__file__).resolve().parents[1]
_SESSION = re.compile(r"^session_(\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+_\d+|latest)$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


class PathError(ValueError):
    """A location cannot be used; the message names the value, where it came from and what to set."""


@dataclass(frozen=True)
class Choice:
    """A chosen value and where it came from (``--storage-path``, ``SSVP_STORAGE_PATH``, ``config storage_path``, ``default``)."""

    value: Any
    origin: str


def choose(flag_value: Any, flag: str, env: str | None, config_value: Any, config_key: str | None,
           default: Any, environ: Mapping[str, str] | None = None) -> Choice:
    """The first set one of flag > environment > config > default."""
    environ = os.environ if environ is None else environ
    if flag_value not in (None, ""):
        return Choice(flag_value, flag)
    if env and environ.get(env):
        return Choice(environ[env], env)
    if config_value not in (None, ""):
        return Choice(config_value, f"config {config_key}")
    return Choice(default, "default")


def _remedy(flag: str | None, env: str | None) -> str:
    ways = [f"pass {flag}" if flag else "", f"set {env}" if env else ""]
    return " or ".join(w for w in ways if w)


def is_uri(text: str) -> bool:
    """``s3://...``, ``http://...``, ``file:///...``: anything with a scheme of two letters or more."""
    return bool(_URI.match(str(text)))


def ray_temp_reason(path: str | os.PathLike, environ: Mapping[str, str] | None = None) -> str | None:
    """Why ``path`` is inside a Ray temporary folder (``None`` when it is not)."""
    environ = os.environ if environ is None else environ
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    if any(part.startswith("_ray_pkg_") or part == "runtime_resources" for part in p.parts):
        return "a Ray working-directory copy (runtime_resources/working_dir_files/_ray_pkg_...), deleted with the job"
    for part in p.parts:
        if _SESSION.match(part):
            return f"a Ray session folder ({part}), deleted with the Ray session"
    for tmp in {environ.get("RAY_TMPDIR", ""), os.path.join(os.environ.get("TMPDIR", "/tmp"), "ray"), "/tmp/ray"}:
        if tmp and (p == Path(tmp) or Path(tmp) in p.parents):
            return f"Ray's temporary folder {tmp}"
    return None


def launch_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The directory relative paths resolve against (``SSVP_LAUNCH_DIR`` or the working directory)."""
    environ = os.environ if environ is None else environ
    given = environ.get(ENV_LAUNCH_DIR)
    if given:
        p = Path(given).expanduser()
        if not p.is_absolute():
            raise PathError(f"{ENV_LAUNCH_DIR}={given!r} must be an absolute directory")
        return p
    return Path.cwd()


def resolve_local(value: str | os.PathLike, *, what: str, origin: str, flag: str | None, env: str | None,
                  base: Path | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """``value`` as an absolute local path (relative ones against ``base`` or the launch directory),
    refused when it lands inside a Ray temporary folder."""
    environ = os.environ if environ is None else environ
    raw = str(value)
    if raw.startswith("file://"):
        raw = raw[len("file://"):]
    p = Path(raw).expanduser()
    if not p.is_absolute():
        root = base if base is not None else launch_dir(environ)
        if environ.get(ENV_LAUNCH_DIR) and base is None and not root.is_dir():
            raise PathError(
                f"{what} {str(value)!r} ({origin}) is relative and the launch directory {root} "
                f"({ENV_LAUNCH_DIR}) does not exist on this node; give an absolute or shared location: "
                f"{_remedy(flag, env)}")
        p = root / p
    p = Path(os.path.normpath(p))
    reason = ray_temp_reason(p, environ)
    if reason:
        raise PathError(
            f"{what} {str(value)!r} ({origin}) resolves to {p}, inside {reason}; "
            f"{_remedy(flag, env)} with a location that outlives the job (a shared volume or s3://BUCKET/...)")
    return p


def resolve_location(value: str | os.PathLike, *, what: str, origin: str, flag: str | None, env: str | None,
                     environ: Mapping[str, str] | None = None) -> str:
    """A storage location: URIs (``s3://bucket/x?endpoint_override=...``) as written, local paths absolute."""
    if is_uri(str(value)) and not str(value).startswith("file://"):
        return str(value)
    return str(resolve_local(value, what=what, origin=origin, flag=flag, env=env, environ=environ))


def resolve_tracking_uri(flag_value: str | None = None, config_value: str | None = None,
                         environ: Mapping[str, str] | None = None, flag: str = "--tracking-uri") -> Choice:
    """The MLflow tracking URI: a server (``http(s)://``), ``databricks``, or a SQLite file made absolute.

    A bare path ending in ``.db``/``.sqlite`` means that SQLite file; MLflow's ``file:`` store is
    refused (MLflow 3 needs ``MLFLOW_ALLOW_FILE_STORE``; use SQLite or a server).
    """
    c = choose(flag_value, flag, ENV_TRACKING_URI, config_value, "mlflow.tracking_uri", "runs/mlflow.db", environ)
    uri = str(c.value)
    kw = dict(what="MLflow tracking store", origin=c.origin, flag=flag, env=ENV_TRACKING_URI, environ=environ)
    if uri.startswith("file:") or ("://" not in uri and uri != "databricks"
                                   and Path(uri).suffix not in (".db", ".sqlite")):
        raise PathError(
            f"tracking URI {uri!r} ({c.origin}): use a SQLite file (sqlite:////abs/path/mlflow.db or a path "
            "ending in .db) or a tracking server (http://host:5000); MLflow's file store is not supported")
    if uri.startswith("sqlite:///"):
        return Choice(f"sqlite:///{resolve_local(uri[len('sqlite:///'):], **kw)}", c.origin)
    if "://" not in uri and uri != "databricks":
        return Choice(f"sqlite:///{resolve_local(uri, **kw)}", c.origin)
    return Choice(uri, c.origin)


def data_root(flag_value: str | None = None, environ: Mapping[str, str] | None = None,
              flag: str = "--data-root") -> Path:
    """The folder that ``data/`` in dataset roots stands for."""
    c = choose(flag_value, flag, ENV_DATA_ROOT, None, None, "data", environ)
    return resolve_local(c.value, what="data root", origin=c.origin, flag=flag, env=ENV_DATA_ROOT, environ=environ)


def _under_data_root(value: str, root: Path | None, what: str, environ) -> str:
    """A local path of a dataset or weights: ``data/X`` under the data root, other relative ones
    against the launch directory, absolute ones and URIs unchanged."""
    if not value or is_uri(value) or Path(value).expanduser().is_absolute():
        return value
    parts = Path(value).parts
    if root is not None and parts and parts[0] == "data":
        return str(Path(root, *parts[1:]))
    return str(resolve_local(value, what=what, origin="config", flag="--data-root", env=ENV_DATA_ROOT,
                             environ=environ))


def resolve_data_path(value: str | os.PathLike, environ: Mapping[str, str] | None = None) -> Path:
    """A local data folder (e.g. the synthetic benchmark's ``data/synthetic``) by the same rule as
    dataset roots: ``data/X`` under the data root, other relative paths against the launch directory."""
    return Path(_under_data_root(str(value), data_root(None, environ), f"data folder {str(value)!r}", environ))


def apply_flags(data_root_flag: str | None = None, feature_cache_flag: str | None = None) -> None:
    """Put ``--data-root`` / ``--feature-cache`` (made absolute against the launch directory) into
    this process's ``SSVP_DATA_ROOT`` / ``SSVP_FEATURE_CACHE``, where every later resolution finds them:
    a flag wins over the environment it replaces, and the environment over the config."""
    for value, flag, env in ((data_root_flag, "--data-root", ENV_DATA_ROOT),
                             (feature_cache_flag, "--feature-cache", ENV_FEATURE_CACHE)):
        if value:
            os.environ[env] = str(resolve_local(value, what=flag.lstrip("-").replace("-", " "), origin=flag,
                                                flag=flag, env=env))


def resolve_dataset(spec: str, root: Path | None, environ: Mapping[str, str] | None = None) -> str:
    """``FORMAT:ROOT`` with ROOT resolved (see :func:`_under_data_root`)."""
    fmt, sep, where = spec.partition(":")
    if not sep or not where:
        return spec
    return f"{fmt}:{_under_data_root(where, root, f'dataset {spec!r}', environ)}"


def resolve_config_paths(cfg, *, data_root_flag: str | None = None, feature_cache_flag: str | None = None,
                         environ: Mapping[str, str] | None = None):
    """A copy of ``cfg`` (``ssvp.config.Config``) whose dataset roots, feature cache and local
    weight paths are absolute, chosen by the module's rule. Trials run in their own working
    directories, on other machines of a cluster too, so relative paths would point nowhere there."""
    try:  # the data root matters only for data/... paths; a refused default must not fail the others
        root, root_error = data_root(data_root_flag, environ), None
    except PathError as exc:
        root, root_error = None, exc

    def needs_root(value: str) -> bool:
        return bool(value) and not is_uri(value) and Path(value).parts[:1] == ("data",)

    for value in [cfg.data.source, *cfg.data.targets]:
        if root_error is not None and needs_root(value.partition(":")[2]):
            raise root_error
    if root_error is not None and any(needs_root(v) for v in (cfg.model.clip_pretrained, cfg.model.dino_weights)):
        raise root_error
    updates: dict[str, Any] = {
        "source": resolve_dataset(cfg.data.source, root, environ),
        "targets": [resolve_dataset(t, root, environ) for t in cfg.data.targets],
    }
    c = choose(feature_cache_flag, "--feature-cache", ENV_FEATURE_CACHE, cfg.train.feature_cache,
               "train.feature_cache", "", environ)
    if c.value:
        updates["feature_cache"] = str(resolve_local(c.value, what="feature cache", origin=c.origin,
                                                     flag="--feature-cache", env=ENV_FEATURE_CACHE, environ=environ))
    for key, value in (("clip_pretrained", cfg.model.clip_pretrained), ("dino_weights", cfg.model.dino_weights)):
        if not value or Path(value).expanduser().is_absolute():
            continue
        parts = Path(value).parts
        if parts and parts[0] == "data":
            updates[key] = str(Path(root, *parts[1:]))
        else:
            local = launch_dir(environ) / value
            if local.exists():  # a hub id or pretrained tag otherwise
                updates[key] = str(local)
    return cfg.override(updates)


# --------------------------------------------------------------------------- provenance
def git_state(repo: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> tuple[str, bool | None]:
    """``(commit, dirty)`` of the code: ``SSVP_GIT_COMMIT`` / ``SSVP_GIT_DIRTY`` when the submitting
    side recorded them, else asked of git; ``("unknown", None)`` outside a checkout."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_GIT_COMMIT):
        flag = environ.get(ENV_GIT_DIRTY, "")
        return environ[ENV_GIT_COMMIT], (flag.lower() in ("1", "true", "yes") if flag else None)
    repo = str(repo or REPO_ROOT)

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = (git("rev-parse", "HEAD") or "").strip()
    if not commit:
        return "unknown", None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status.strip()) if status is not None else None)


def runtime_env(repo: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None,
                cwd: str | os.PathLike | None = None, env_vars: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``--runtime-env-json`` of a ``ray job submit``, captured on the submitting side: the
    commit, the dirty flag, the launch directory, and ``env_vars`` (e.g. ``SSVP_STORAGE_PATH``;
    relative local paths among them made absolute against the launch directory)."""
    environ = os.environ if environ is None else environ
    here = Path(cwd or os.getcwd()).resolve()
    commit, dirty = git_state(repo or here, {k: v for k, v in environ.items() if k not in (ENV_GIT_COMMIT, ENV_GIT_DIRTY)})
    env = {ENV_GIT_COMMIT: commit, ENV_LAUNCH_DIR: str(here)}
    if dirty is not None:
        env[ENV_GIT_DIRTY] = "1" if dirty else "0"
    for name, value in (env_vars or {}).items():
        if name == ENV_TRACKING_URI:
            value = resolve_tracking_uri(value, None, {ENV_LAUNCH_DIR: str(here)}).value
        elif name in (ENV_STORAGE, ENV_FEATURE_CACHE, ENV_DATA_ROOT) and not is_uri(value):
            value = str(Path(here, value).expanduser())
        env[name] = value
    return {"env_vars": env}


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m ssvp.paths", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    rt = sub.add_parser("runtime-env", help="print the --runtime-env-json of `ray job submit`: commit, dirty flag, "
                        "launch directory and the NAME=VALUE variables given")
    rt.add_argument("env", nargs="*", metavar="NAME=VALUE", help="e.g. SSVP_STORAGE_PATH=/mnt/ray-results")
    args = p.parse_args(argv)
    if args.cmd == "runtime-env":
        pairs = [e.partition("=") for e in args.env]
        bad = [e for e, (k, sep, _) in zip(args.env, pairs) if not k or not sep]
        if bad:
            p.error(f"expected NAME=VALUE, got {bad[0]!r}")
        print(json.dumps(runtime_env(env_vars={k: v for k, _, v in pairs})))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
