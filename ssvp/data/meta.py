"""``meta.json`` interop with AnomalyCLIP, AdaCLIP and Bayes-PFL.

Format (paths relative to the folder holding the file; ``mask_path`` is "" for normals)::

    {"train": {cls: [entry, ...]}, "test": {cls: [entry, ...]}}
    entry = {"img_path": "bottle/test/broken_large/000.png",
             "mask_path": "bottle/ground_truth/broken_large/000_mask.png",
             "cls_name": "bottle", "specie_name": "broken_large", "anomaly": 1}

Read it with the ``meta`` format (``open_dataset("meta:ROOT", ...)``, ROOT the folder
holding ``meta.json`` or the file itself); write it for any dataset with
:func:`write_meta` so users can move between this platform and those projects.

Every path in the file must stay inside the folder holding it: an absolute path, one that
climbs out with ``..`` or one through a symlink leading out (real paths are compared) is
refused (a ``DatasetError`` naming the file, the entry and the key), unless the read allows
it (``open_dataset(..., allow_outside_root=True)``, config ``data.allow_paths_outside_root:
true``). The same rule holds for every other format (``formats.inside_root``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from .base import DatasetError, Record
from .formats import Problems, dataset_root, inside_root, parse_spec, read_records, register

__all__ = ["read_meta_records", "write_meta", "META_FILE"]

META_FILE = "meta.json"
_REQUIRED = ("img_path", "anomaly")


def _meta_file(root: Path) -> Path:
    if root.is_dir():
        file = root / META_FILE
        if not file.is_file():
            raise DatasetError(f"meta file {file} does not exist (expected ROOT/{META_FILE} or a path to a .json file)")
        return file
    return root




@register("meta")
def read_meta_records(root: Path, split: str, classes: set[str] | None, problems: Problems) -> tuple[list[Record], list[str]]:
    """Records of ``split`` from a ``meta.json`` (``root``: its folder or the file)."""
    file = _meta_file(root)
    base = file.parent
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot parse meta file {file}: {exc}") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"meta file {file} must hold an object with 'train' / 'test' keys")
    if split not in data:
        raise DatasetError(f"meta file {file} has no {split!r} split (it has: {', '.join(map(str, data)) or 'nothing'})")
    table = data[split]
    if not isinstance(table, dict):
        raise DatasetError(f"meta file {file}: '{split}' must map class names to lists of entries")
    available = sorted(str(c) for c in table)
    records: list[Record] = []
    for cls, entries in table.items():
        if classes is not None and cls not in classes:
            continue
        where = f"meta file {file}, {split}/{cls}"
        if not isinstance(entries, list):
            raise DatasetError(f"{where}: expected a list of entries, got {type(entries).__name__}")
        if not entries:
            problems.report(file, f"{where}: class {cls!r} has no entries (empty category)")
            continue
        for i, entry in enumerate(entries):
            at = f"{where}[{i}]"
            if not isinstance(entry, dict) or any(k not in entry for k in _REQUIRED):
                problems.report(file, f"{at}: entry must be an object with keys img_path, mask_path, cls_name, specie_name, anomaly")
                continue
            try:
                label = int(entry["anomaly"])
            except (TypeError, ValueError, OverflowError):  # OverflowError: Infinity
                label = -1
            if label not in (0, 1):
                problems.report(file, f"{at}: 'anomaly' must be 0 or 1, got {entry['anomaly']!r}")
                continue
            image = inside_root(base, str(entry["img_path"]), at, "img_path", problems)
            if not os.path.isfile(image):
                problems.report(image, f"{at}: img_path points nowhere: {image} does not exist")
                continue
            mask_rel = str(entry.get("mask_path") or "")
            mask = None
            if label == 1:
                if not mask_rel:
                    problems.report(image, f"{at}: anomalous image {image} has an empty mask_path")
                    continue
                mask = inside_root(base, mask_rel, at, "mask_path", problems)
                if not os.path.isfile(mask):
                    problems.report(mask, f"{at}: mask_path points nowhere: {mask} does not exist")
                    continue
            name = str(entry.get("cls_name") or cls)
            defect = str(entry.get("specie_name") or ("good" if label == 0 else "anomaly"))
            records.append(Record(image, mask, label, name, defect))
    return records, available


def write_meta(
    dataset_spec: str,
    out_path: str | os.PathLike | None = None,
    classes: Iterable[str] | None = None,
    skip_bad_files: bool = False,
) -> Path:
    """Write ``meta.json`` for any readable dataset; returns the file written.

    ``out_path`` defaults to ``ROOT/meta.json``. Paths are written relative to the
    folder the file is in (so ``open_dataset("meta:" + out_path)`` reads the same
    samples back; with the default location they are relative to ROOT, as the
    other projects expect). Splits a dataset does not have (RSDD's train) are written empty.
    """
    fmt, root = parse_spec(dataset_spec)
    out = Path(out_path) if out_path is not None else dataset_root(dataset_spec) / META_FILE
    if out.suffix.lower() != ".json" and (out.is_dir() or not out.suffix):
        out = out / META_FILE
    out = out.absolute()
    base = out.parent
    data: dict[str, dict[str, list[dict[str, Any]]]] = {}
    any_records = False
    errors = []
    for split in ("train", "test"):
        try:
            records, _, _ = read_records(dataset_spec, split, classes, skip_bad_files)
        except DatasetError as exc:
            # only a split the dataset does not have is written empty; other errors stop
            if not (fmt == "rsdd" and split == "train") and f"has no {split!r} split" not in str(exc):
                raise
            errors.append(str(exc))
            data[split] = {}
            continue
        table: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            table.setdefault(r.cls_name, []).append(
                {
                    "img_path": _rel(r.image_path, base),
                    "mask_path": _rel(r.mask_path, base) if r.mask_path else "",
                    "cls_name": r.cls_name,
                    "specie_name": r.defect,
                    "anomaly": int(r.label),
                }
            )
        any_records = any_records or bool(records)
        data[split] = table
    if not any_records:
        raise DatasetError(f"cannot write {out}: {dataset_spec} has no readable split ({'; '.join(errors)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")
    return out


def _rel(path: str, base: Path) -> str:
    return Path(os.path.relpath(os.path.abspath(path), base)).as_posix()
