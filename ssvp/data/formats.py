"""The registry of dataset formats, shared by every reader (``readers``, ``meta``).

A dataset is named ``FORMAT:ROOT``. A reader is a function
``reader(root, split, classes, problems) -> (records, available classes)`` registered
under its format name with :func:`register`; ``read_records`` looks the format up here.
The readers register themselves when their module is imported; ``ssvp.data`` imports
all of them, so the registry is complete whenever anything in ``ssvp.data`` is used.
This module imports no reader: ``readers`` and ``meta`` both depend on it, never on each
other.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from .base import DatasetError, Record

__all__ = ["FORMATS", "ALIASES", "SPLITS", "Problems", "register", "parse_spec", "dataset_root", "read_records",
           "inside_root"]

SPLITS = ("train", "test")


class Problems:
    """The context of one read: collects bad files (raises at once, or with ``skip``
    records ``(path, reason)`` and goes on) and carries the read's options.

    ``allow_outside_root``: files a dataset names (a listing's entries, a folder's files) may lie
    outside the dataset root (absolute or ``../`` paths, symlinks leading out); off by default.
    """

    def __init__(self, skip: bool, allow_outside_root: bool = False):
        self.skip = skip
        self.allow_outside_root = bool(allow_outside_root)
        self.items: list[tuple[str, str]] = []

    def report(self, path: str | os.PathLike, message: str) -> None:
        if not self.skip:
            raise DatasetError(message)
        self.items.append((str(path), message))


def inside_root(root: Path, path: str | os.PathLike, at: str, key: str, problems: Problems) -> str:
    """``path`` (absolute, or relative to ``root``), normalised, when its *real* path (symlinks and ``..``
    resolved) lies under the real ``root``; else a ``DatasetError`` naming ``at`` and ``key`` (also with
    ``skip_bad_files``: a listing that leads out is not a bad file but a bad dataset). The one rule of every
    reader (listings and folders alike), unless the read allows paths outside the root
    (``data.allow_paths_outside_root``)."""
    full = os.path.normpath(os.path.join(root, path))
    if problems.allow_outside_root:
        return full
    real_root = os.path.realpath(root)
    real = os.path.realpath(full)
    if os.path.commonpath([real, real_root]) == real_root:
        return full
    via = "a symlink" if os.path.normpath(full).startswith(os.path.normpath(str(root)) + os.sep) else "an absolute or '..' path"
    raise DatasetError(f"{at}: {key} {str(path)!r} resolves to {real}, outside the dataset root {real_root} ({via}); "
                       "set data.allow_paths_outside_root=true to allow it")


def _check_inside(records: list[Record], root: Path, spec: str, problems: Problems) -> None:
    """Every record's image and mask lie under ``root`` (:func:`inside_root`), whatever the format."""
    for r in records:
        inside_root(root, r.image_path, spec, "image", problems)
        if r.mask_path:
            inside_root(root, r.mask_path, spec, "mask", problems)


Reader = Callable[[Path, str, "set[str] | None", Problems], "tuple[list[Record], list[str]]"]

FORMATS: dict[str, Reader] = {}
ALIASES: dict[str, str] = {}


def register(name: str, *aliases: str) -> Callable[[Reader], Reader]:
    """Decorator: register ``reader`` as format ``name`` (and its ``aliases``)."""

    def deco(reader: Reader) -> Reader:
        for key in (name, *aliases):
            owner = FORMATS.get(key) or FORMATS.get(ALIASES.get(key, ""))
            if owner is not None and owner is not reader:
                raise ValueError(f"dataset format {key!r} is already registered ({owner.__module__}.{owner.__name__})")
        FORMATS[name] = reader
        for alias in aliases:
            ALIASES[alias] = name
        return reader

    return deco


def parse_spec(spec: str) -> tuple[str, str]:
    """``"FORMAT:ROOT"`` -> ``(format, root)``; unknown formats are an error listing the known ones."""
    if not isinstance(spec, str) or ":" not in spec:
        raise DatasetError(
            f"dataset {spec!r} must be written FORMAT:ROOT (formats: {', '.join(FORMATS)}), e.g. 'mvtec:/data/mvtec'"
        )
    fmt, root = spec.split(":", 1)
    fmt = fmt.strip().lower()
    fmt = ALIASES.get(fmt, fmt)
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r} in {spec!r}; known formats: {', '.join(FORMATS)}")
    if not root.strip():
        raise DatasetError(f"dataset {spec!r} names no root folder after '{fmt}:'")
    return fmt, root.strip()


def dataset_root(spec: str) -> Path:
    """The resolved folder a dataset's relative paths start from (a meta.json's folder for ``meta``)."""
    fmt, root = parse_spec(spec)
    path = Path(root).expanduser()
    if fmt == "meta" and path.suffix.lower() == ".json":
        path = path.parent
    return path.resolve()


def read_records(
    spec: str, split: str = "test", classes: Iterable[str] | None = None, skip_bad_files: bool = False,
    allow_outside_root: bool = False,
) -> tuple[list[Record], list[tuple[str, str]], list[str]]:
    """``(records, skipped, available classes)`` of one split of a dataset (no file checks)."""
    fmt, root_str = parse_spec(spec)
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    root = Path(root_str).expanduser().absolute()
    if not root.exists():
        raise DatasetError(f"dataset root {root} (from {spec!r}) does not exist")
    if fmt != "meta" and not root.is_dir():
        raise DatasetError(f"dataset root {root} (from {spec!r}) is not a folder")
    wanted = None if classes is None else {str(c) for c in classes}
    problems = Problems(skip_bad_files, allow_outside_root)
    records, available = FORMATS[fmt](root, split, wanted, problems)
    _check_inside(records, root.parent if root.is_file() else root, spec, problems)
    if wanted is not None:
        unknown = sorted(wanted - set(available))
        if unknown:
            raise DatasetError(f"{spec}: unknown class(es) {unknown}; available: {', '.join(available)}")
    records = sorted(records, key=lambda r: (r.cls_name, r.image_path))
    return records, problems.items, available
