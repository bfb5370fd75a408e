"""Readers for the seven benchmarks in their released folder layouts, and ``open_dataset``.

A dataset is named ``FORMAT:ROOT``. Layouts (ROOT is the folder the archive unpacks to):

- ``mvtec``  MVTec-AD: ``<cls>/train/good/*.png``, ``<cls>/test/<defect>/*.png``,
  ``<cls>/ground_truth/<defect>/<stem>_mask.png``.
- ``dtd``    DTD-Synthetic: the same layout (``<cls>/test/bad`` + ``ground_truth/bad``).
- ``synthetic`` the output of ``make_synthetic`` (one domain folder, MVTec layout).
- ``btad``   BTAD: ``01/train/ok``, ``01/test/ok``, ``01/test/ko``, ``01/ground_truth/ko/<stem>.png``
  (images .bmp or .png).
- ``visa``   VisA: ``split_csv/1cls.csv`` with columns object,split,label,image,mask
  (paths relative to ROOT; label normal|anomaly). Defect names come from the per-object
  ``<object>/image_anno.csv`` when it is there, else ``anomaly``.
- ``ksdd2``  KolektorSDD2: ``train/<id>.png`` + ``train/<id>_GT.png``, same for ``test``;
  an image is anomalous when its GT mask has a non-zero pixel (one class, ``ksdd2``).
- ``rsdd``   RSDDs: ``Type-I RSDDs dataset/Rail surface images/*.jpg`` +
  ``Type-I RSDDs dataset/GroundTruth/*.jpg`` (and Type-II); no train/test split, every
  image is a test image; classes ``rail_type_i`` and ``rail_type_ii``.
- ``dagm``   DAGM 2007: ``ClassN/Train|Test/*.PNG``, ``ClassN/Train|Test/Label/Labels.txt``
  (rows: id, defect 0/1, image, 0, mask) and ``Label/<stem>_label.PNG``.
- ``meta``   a ``meta.json`` as AnomalyCLIP / AdaCLIP / Bayes-PFL write it (see ``ssvp.data.meta``);
  ROOT is the folder holding ``meta.json`` or the JSON file itself.

Folder names are matched case-insensitively (``Train`` / ``train``).
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .base import IMAGE_EXTS, AnomalyDataset, DatasetError, Record, mask_is_empty
from .formats import FORMATS, SPLITS, Problems, dataset_root, inside_root, parse_spec, read_records, register

__all__ = [
    "FORMATS",
    "SPLITS",
    "parse_spec",
    "dataset_root",
    "open_dataset",
    "read_records",
]


# --------------------------------------------------------------------------- helpers
def _child(folder: Path, name: str) -> Path | None:
    """``folder/name`` matched case-insensitively, or None."""
    exact = folder / name
    if exact.exists():
        return exact
    try:
        for entry in os.scandir(folder):
            if entry.name.lower() == name.lower():
                return folder / entry.name
    except (FileNotFoundError, NotADirectoryError):
        return None
    return None


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS) and not name.startswith(".")


def _images(folder: Path) -> list[Path]:
    try:
        return sorted(folder / e.name for e in os.scandir(folder) if e.is_file() and _is_image(e.name))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(folder / e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


class _MaskIndex:
    """Finds the mask of an image by stem in a ground-truth folder (``<stem>_mask.*`` or ``<stem>.*``)."""

    def __init__(self) -> None:
        self._cache: dict[Path, dict[str, Path]] = {}

    def find(self, folder: Path | None, stem: str, suffixes: Iterable[str] = ("_mask", "")) -> Path | None:
        if folder is None:
            return None
        if folder not in self._cache:
            self._cache[folder] = {p.stem.lower(): p for p in _images(folder)}
        index = self._cache[folder]
        for suffix in suffixes:
            hit = index.get((stem + suffix).lower())
            if hit is not None:
                return hit
        return None


# --------------------------------------------------------------------------- MVTec-like folders
def _per_category(cats: list[Path], sub: str, classes: set[str] | None, problems: Problems, what: str,
                  read_category: Callable[[Path, Path], Iterable[Record]],
                  name: Callable[[Path], str] = lambda d: d.name) -> list[Record]:
    """Records of the selected categories (class ``name(cat)``), ``read_category(cat, cat/sub)``
    each; a missing ``sub`` folder or a category without images is reported as an empty
    category."""
    records: list[Record] = []
    for cat in cats:
        cls = name(cat)
        if classes is not None and cls not in classes:
            continue
        split_dir = _child(cat, sub)
        if split_dir is None:
            problems.report(cat / sub, f"{what} {cls!r}: folder {cat / sub} does not exist (empty category)")
            continue
        found = list(read_category(cat, split_dir))
        if not found:
            problems.report(split_dir, f"{what} {cls!r} has no images under {split_dir} (empty category)")
        records += found
    return records


def _read_folders(
    root: Path,
    split: str,
    classes: set[str] | None,
    problems: Problems,
    fmt: str,
    good_names: tuple[str, ...] = ("good",),
    mask_suffixes: tuple[str, ...] = ("_mask", ""),
) -> tuple[list[Record], list[str]]:
    if _child(root, "test") is not None or _child(root, "train") is not None:
        cats = [root]  # ROOT is one category folder (e.g. mvtec:/data/mvtec/bottle)
    else:
        cats = [d for d in _subdirs(root) if any(_child(d, s) for s in ("train", "test", "ground_truth"))]
    if not cats:
        hint = ""
        if fmt == "synthetic" and any(_child(d, "train") is None and _subdirs(d) for d in _subdirs(root)):
            domains = [d.name for d in _subdirs(root)]
            hint = f"; this looks like the parent of the synthetic domains {domains}: name one, e.g. synthetic:{root / domains[0]}"
        raise DatasetError(
            f"no {fmt} categories under {root} (expected {root}/<class>/{split}/{good_names[0]}/*.png){hint}"
        )
    available = [d.name for d in cats]
    masks = _MaskIndex()

    def read_category(cat: Path, split_dir: Path) -> Iterator[Record]:
        gt_root = _child(cat, "ground_truth")
        for defect_dir in _subdirs(split_dir):
            is_good = defect_dir.name.lower() in good_names
            gt_dir = _child(gt_root, defect_dir.name) if gt_root is not None and not is_good else None
            for img in _images(defect_dir):
                if is_good:
                    yield Record(str(img), None, 0, cat.name, "good")
                    continue
                mask = masks.find(gt_dir, img.stem, mask_suffixes)
                if mask is None:
                    expected = (gt_root or cat / "ground_truth") / defect_dir.name / f"{img.stem}{mask_suffixes[0]}.png"
                    problems.report(img, f"mask missing for anomalous image {img}: expected {expected}")
                    continue
                yield Record(str(img), str(mask), 1, cat.name, defect_dir.name)

    return _per_category(cats, split, classes, problems, "category", read_category), available


@register("mvtec", "mvtec_ad", "mvtecad")
def read_mvtec(root: Path, split: str, classes: set[str] | None, problems: Problems):
    return _read_folders(root, split, classes, problems, "mvtec")


@register("dtd", "dtd_synthetic", "dtd-synthetic")
def read_dtd(root: Path, split: str, classes: set[str] | None, problems: Problems):
    return _read_folders(root, split, classes, problems, "dtd")


@register("synthetic")
def read_synthetic(root: Path, split: str, classes: set[str] | None, problems: Problems):
    return _read_folders(root, split, classes, problems, "synthetic")


@register("btad")
def read_btad(root: Path, split: str, classes: set[str] | None, problems: Problems):
    return _read_folders(root, split, classes, problems, "btad", good_names=("ok", "good"), mask_suffixes=("", "_mask"))


# --------------------------------------------------------------------------- VisA
def _slug(text: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", text.strip()).strip("_").lower() or "anomaly"


def _visa_defects(root: Path, obj: str, cache: dict[str, dict[str, str]]) -> dict[str, str]:
    if obj not in cache:
        table: dict[str, str] = {}
        anno = root / obj / "image_anno.csv"
        if anno.is_file():
            with open(anno, newline="", encoding="utf-8-sig") as fh:
                for row in csv.DictReader(fh):
                    image, label = (row.get("image") or "").strip(), (row.get("label") or "").strip()
                    if image and label and label.lower() != "normal":
                        table[os.path.normpath(image)] = _slug(label)
        cache[obj] = table
    return cache[obj]


@register("visa")
def read_visa(root: Path, split: str, classes: set[str] | None, problems: Problems):
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DatasetError(f"VisA split file {csv_path} does not exist (expected ROOT/split_csv/1cls.csv)")
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        missing = {"object", "split", "label", "image"} - set(fields)
        if missing:
            raise DatasetError(
                f"VisA split file {csv_path} lacks column(s) {sorted(missing)}; expected object,split,label,image,mask"
            )
        rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
    available = sorted({r["object"] for r in rows if r["object"]})
    if not available:
        raise DatasetError(f"VisA split file {csv_path} has no rows")
    defects: dict[str, dict[str, str]] = {}
    records: list[Record] = []
    for line, row in enumerate(rows, start=2):
        obj = row["object"]
        if row["split"].lower() != split or (classes is not None and obj not in classes):
            continue
        label = row["label"].lower()
        if label not in ("normal", "anomaly", "0", "1"):
            problems.report(csv_path, f"{csv_path} line {line}: label must be normal or anomaly, got {row['label']!r}")
            continue
        image = inside_root(root, row["image"], f"{csv_path} line {line}", "image", problems)
        if label in ("normal", "0"):
            records.append(Record(image, None, 0, obj, "good"))
            continue
        if not row.get("mask"):
            problems.report(image, f"{csv_path} line {line}: anomalous image {image} has no mask path")
            continue
        mask = inside_root(root, row["mask"], f"{csv_path} line {line}", "mask", problems)
        defect = _visa_defects(root, obj, defects).get(os.path.normpath(row["image"]), "anomaly")
        records.append(Record(image, mask, 1, obj, defect))
    for obj in sorted(classes or available):
        if obj in available and not any(r.cls_name == obj for r in records):
            problems.report(csv_path, f"VisA category {obj!r} has no {split} rows in {csv_path} (empty category)")
    return records, available


def _record_by_mask(img: Path, gt: Path, cls: str, problems: Problems) -> Record | None:
    """For datasets that give every image a mask: good when the mask is empty, else a
    defect; None (reported) when the mask cannot be read."""
    try:
        empty = mask_is_empty(str(gt))
    except DatasetError as exc:
        problems.report(gt, str(exc))
        return None
    return Record(str(img), None, 0, cls, "good") if empty else Record(str(img), str(gt), 1, cls, "defect")


# --------------------------------------------------------------------------- KSDD2
@register("ksdd2", "kolektorsdd2")
def read_ksdd2(root: Path, split: str, classes: set[str] | None, problems: Problems):
    split_dir = _child(root, split)
    if split_dir is None:
        raise DatasetError(f"KSDD2 folder {root / split} does not exist (expected ROOT/train and ROOT/test)")
    records: list[Record] = []
    if classes is None or "ksdd2" in classes:
        images = [p for p in _images(split_dir) if not p.stem.lower().endswith("_gt")]
        for img in images:
            gt = next((split_dir / f"{img.stem}_GT{ext}" for ext in (img.suffix, ".png", ".PNG", ".bmp")
                       if (split_dir / f"{img.stem}_GT{ext}").is_file()), None)
            if gt is None:
                problems.report(img, f"mask missing for KSDD2 image {img}: expected {split_dir / (img.stem + '_GT.png')}")
                continue
            rec = _record_by_mask(img, gt, "ksdd2", problems)
            if rec is not None:
                records.append(rec)
        if not records:
            problems.report(split_dir, f"KSDD2 folder {split_dir} has no images (empty category)")
    return records, ["ksdd2"]


# --------------------------------------------------------------------------- RSDD
def _rsdd_class(name: str) -> str:
    m = re.search(r"type[-_ ]?(i+)\b", name, re.IGNORECASE)
    return f"rail_type_{m.group(1).lower()}" if m else _slug(name)


@register("rsdd", "rsdds")
def read_rsdd(root: Path, split: str, classes: set[str] | None, problems: Problems):
    if split != "test":
        raise DatasetError(
            f"RSDD ({root}) has no {split!r} split: every image is a test image; use split='test'"
        )
    if _child(root, "Rail surface images") is not None:
        type_dirs = [root]
    else:
        type_dirs = [d for d in _subdirs(root) if _child(d, "Rail surface images") is not None]
    if not type_dirs:
        raise DatasetError(
            f"no RSDD subsets under {root} (expected '{root}/Type-I RSDDs dataset/Rail surface images' and 'GroundTruth')"
        )
    available = [_rsdd_class(d.name) for d in type_dirs]
    masks = _MaskIndex()

    def read_subset(tdir: Path, img_dir: Path) -> Iterator[Record]:
        cls, gt_dir = _rsdd_class(tdir.name), _child(tdir, "GroundTruth")
        for img in _images(img_dir):
            gt = masks.find(gt_dir, img.stem, ("", "_mask"))
            if gt is None:
                problems.report(img, f"mask missing for RSDD image {img}: expected {tdir / 'GroundTruth' / img.name}")
                continue
            rec = _record_by_mask(img, gt, cls, problems)
            if rec is not None:
                yield rec

    records = _per_category(type_dirs, "Rail surface images", classes, problems, "RSDD subset", read_subset,
                            name=lambda d: _rsdd_class(d.name))
    return records, available


# --------------------------------------------------------------------------- DAGM 2007
def _dagm_labels(label_file: Path) -> dict[str, tuple[int, str | None]]:
    """``{image file name: (defect flag, mask file name)}`` from a DAGM ``Labels.txt``."""
    table: dict[str, tuple[int, str | None]] = {}
    for line in label_file.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[1] not in ("0", "1") or not _is_image(parts[2]):
            continue  # the first line holds only a version number
        mask = next((p for p in parts[3:] if _is_image(p)), None)
        table[parts[2].lower()] = (int(parts[1]), mask)
    return table


@register("dagm", "dagm2007")
def read_dagm(root: Path, split: str, classes: set[str] | None, problems: Problems):
    cats = [d for d in _subdirs(root) if re.fullmatch(r"class\d+", d.name, re.IGNORECASE)]
    if not cats:
        raise DatasetError(f"no DAGM classes under {root} (expected {root}/Class1/Train, {root}/Class1/Test, ...)")
    cats.sort(key=lambda d: int(re.sub(r"\D", "", d.name)))
    available = [d.name for d in cats]
    sub = "Train" if split == "train" else "Test"
    masks = _MaskIndex()

    def read_class(cat: Path, split_dir: Path) -> Iterator[Record]:
        label_dir = _child(split_dir, "Label")
        label_file = _child(label_dir, "Labels.txt") if label_dir is not None else None
        table = _dagm_labels(label_file) if label_file is not None else {}
        for img in _images(split_dir):
            flag, mask_name = table.get(img.name.lower(), (None, None))
            mask = None
            if mask_name:
                mask = masks.find(label_dir, Path(mask_name).stem, ("",))
            if mask is None and flag != 0:
                mask = masks.find(label_dir, img.stem, ("_label",))
            if flag == 1 and mask is None:
                where = (label_dir or split_dir / "Label") / (mask_name or f"{img.stem}_label.PNG")
                problems.report(img, f"mask missing for defective DAGM image {img}: expected {where}")
                continue
            if mask is None:
                yield Record(str(img), None, 0, cat.name, "good")
            else:
                yield Record(str(img), str(mask), 1, cat.name, "defect")

    return _per_category(cats, sub, classes, problems, "DAGM class", read_class), available


# --------------------------------------------------------------------------- datasets
def open_dataset(
    spec: str,
    split: str = "test",
    classes: Iterable[str] | None = None,
    skip_bad_files: bool = False,
    image_size: int | None = None,
    max_per_class: int = 0,
    allow_outside_root: bool = False,
) -> AnomalyDataset:
    """A torch Dataset of one split of ``"FORMAT:ROOT"``.

    Items are :class:`~ssvp.data.base.Sample` (image ``[3,S,S]`` in [0,1], mask ``[S,S]``
    in {0,1}, label, cls_name, defect, path); use ``collate`` as the DataLoader's
    ``collate_fn``. Every listed file must exist (checked now); decoding is lazy.
    ``skip_bad_files`` drops bad files and lists them in ``ds.skipped`` instead of failing.
    ``max_per_class`` > 0 keeps at most that many images per class (normals and anomalies both).
    ``allow_outside_root`` lets a listing (``meta.json``) name files outside the dataset root.
    """
    records, skipped, _ = read_records(spec, split, classes, skip_bad_files, allow_outside_root)
    ds = AnomalyDataset(
        records,
        name=spec,
        root=str(Path(parse_spec(spec)[1]).expanduser().absolute()),
        split=split,
        skip_bad_files=skip_bad_files,
        skipped=skipped,
    )
    if len(ds) == 0:
        raise DatasetError(f"{spec}: the {split} split has no usable images" + (" (all skipped)" if ds.skipped else ""))
    return ds.transform(image_size).cap_per_class(max_per_class)
