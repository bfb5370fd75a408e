"""Records, samples, the torch Dataset and image/mask decoding shared by every reader.

A reader turns a dataset folder into a list of :class:`Record` (paths, label, class,
defect type). :class:`AnomalyDataset` wraps those records: it checks at construction
that every listed file exists (cheap), decodes images and masks lazily with PIL, and
returns :class:`Sample` items (image ``[3,S,S]`` in [0,1], mask ``[S,S]`` in {0,1}).

Per-backbone resolution (paper §4.2: CLIP at 518 px, DINO at 592 px): a dataset with
``dino_image_size`` set (``ds.with_dino_size(S_d)``) also returns ``image_dino`` ``[3,S_d,S_d]``,
resized from the same decoded original as ``image`` (never from the resized ``image``).

Mask binarisation: lossless masks (PNG, BMP, TIFF) count every non-zero pixel as
anomalous (MVTec stores 0/255, VisA 0/k); JPEG masks (RSDD) use ``>= 128`` so the
compression ringing around edges does not leak into the mask.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = [
    "DatasetError",
    "Record",
    "Sample",
    "AnomalyDataset",
    "collate",
    "load_image",
    "load_image_sizes",
    "load_mask",
    "IMAGE_EXTS",
]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
JPEG_EXTS = (".jpg", ".jpeg")


class DatasetError(ValueError):
    """A dataset folder, file or index entry is missing or bad; the message names it."""


@dataclass(frozen=True)
class Record:
    """One listed image: where it is, where its mask is (None for normal images) and its labels."""

    image_path: str
    mask_path: str | None
    label: int  # 0 normal, 1 anomalous
    cls_name: str
    defect: str  # "good" for normal images


@dataclass
class Sample:
    """One item (or, after :func:`collate`, one batch) of an :class:`AnomalyDataset`.

    Attribute and key access both work: ``s.image`` and ``s["image"]``.
    """

    image: torch.Tensor  # [3, S, S] float in [0, 1]
    mask: torch.Tensor  # [S, S] float in {0, 1}
    label: int
    cls_name: str
    defect: str
    path: str
    image_dino: torch.Tensor | None = None  # [3, S_d, S_d] for the DINO branch, from the original

    def __getitem__(self, key: str) -> Any:
        if key not in _SAMPLE_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> tuple[str, ...]:
        return _SAMPLE_KEYS


_SAMPLE_KEYS = tuple(f.name for f in dataclasses.fields(Sample))


def collate(items: Sequence[Sample | dict]) -> dict[str, Any]:
    """DataLoader ``collate_fn``: stack tensors, keep strings as lists.

    Returns ``{"image": [B,3,S,S], "mask": [B,S,S], "label": LongTensor[B],
    "cls_name": [str], "defect": [str], "path": [str]}``, plus ``"image_dino"``
    ``[B,3,S_d,S_d]`` when the items carry one.
    """
    if not items:
        raise ValueError("collate got an empty batch")
    shapes = {tuple(it["image"].shape) for it in items}
    if len(shapes) > 1:
        raise DatasetError(
            f"images in one batch have different sizes {sorted(shapes)}; open the dataset with "
            "image_size=S (or ds.transform(S)) so every image is resized to S x S"
        )
    out = {
        "image": torch.stack([it["image"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "label": torch.tensor([int(it["label"]) for it in items], dtype=torch.long),
        "cls_name": [it["cls_name"] for it in items],
        "defect": [it["defect"] for it in items],
        "path": [it["path"] for it in items],
    }
    dino = [_get(it, "image_dino") for it in items]
    if all(d is not None for d in dino):
        out["image_dino"] = torch.stack(dino)
    return out


def _get(item: Sample | dict, key: str) -> Any:
    return item.get(key) if isinstance(item, dict) else getattr(item, key, None)


# --------------------------------------------------------------------------- decoding
def _open(path: str | os.PathLike, what: str) -> Image.Image:
    path = str(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{what} {path} does not exist")
    try:
        img = Image.open(path)
        _check_pixels(img, path, what)
        img.load()
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"cannot read {what} {path}: {type(exc).__name__}: {exc}") from exc
    return img


# what a bad file raises while PIL opens or decodes it (a decompression bomb beyond twice
# PIL's MAX_IMAGE_PIXELS is DecompressionBombError, not an OSError)
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _check_pixels(img: Image.Image, path: str, what: str) -> None:
    """Refuses a decompression bomb: more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL only
    warns up to twice that and would decode it; raise the limit there for genuine huge images)."""
    limit = Image.MAX_IMAGE_PIXELS
    w, h = img.size
    if limit and w * h > limit:
        raise DatasetError(
            f"cannot read {what} {path}: {w} x {h} = {w * h} pixels exceeds the decompression-bomb limit "
            f"PIL.Image.MAX_IMAGE_PIXELS = {limit} (raise it if the image is genuine)"
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0.0
        arr = arr / hi * 255.0 if hi > 0 else arr
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def _to_tensor(img: Image.Image, image_size: int | None) -> torch.Tensor:
    if image_size:
        img = img.resize((image_size, image_size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def load_image(path: str | os.PathLike, image_size: int | None = None) -> torch.Tensor:
    """Decode an image file to ``[3, S, S]`` float in [0, 1] (bilinear resize when ``image_size``)."""
    return _to_tensor(_to_rgb(_open(path, "image")), image_size)


def load_image_sizes(path: str | os.PathLike, sizes: Sequence[int | None]) -> list[torch.Tensor]:
    """One decode of an image file, resized from the original to each of ``sizes`` (CLIP, DINO, ...)."""
    img = _to_rgb(_open(path, "image"))
    return [_to_tensor(img, s) for s in sizes]


def mask_to_bool(img: Image.Image, path: str) -> np.ndarray:
    """Binarise a decoded mask (see the module docstring for the thresholds)."""
    if img.mode == "1":
        return np.asarray(img, dtype=bool)
    if img.mode not in ("L", "I;16", "I;16B", "I;16L", "I", "F", "P"):
        img = img.convert("L")
    arr = np.asarray(img)
    if str(path).lower().endswith(JPEG_EXTS):
        return arr >= 128
    return arr > 0


def load_mask(
    path: str | os.PathLike | None,
    size: tuple[int, int],
    image_size: int | None = None,
    image_path: str | None = None,
) -> torch.Tensor:
    """Decode a mask to ``[S, S]`` float in {0, 1}; zeros when ``path`` is None.

    ``size`` is the (width, height) of the image the mask belongs to; a mask of
    another size is an error naming both files.
    """
    if path is None:
        w, h = (image_size, image_size) if image_size else size
        return torch.zeros((h, w), dtype=torch.float32)
    img = _open(path, "mask")
    if img.size != tuple(size):
        raise DatasetError(
            f"mask {path} is {img.size[0]}x{img.size[1]} (WxH) but its image "
            f"{image_path or '?'} is {size[0]}x{size[1]}"
        )
    arr = mask_to_bool(img, str(path))
    if image_size:
        m = Image.fromarray(arr.astype(np.uint8) * 255, mode="L").resize((image_size, image_size), Image.NEAREST)
        arr = np.asarray(m) > 127
    return torch.from_numpy(arr.astype(np.float32))


def header(path: str, what: str, full: bool = True) -> tuple[int, int]:
    """(width, height) from the file header; ``full`` also checks the whole file (PIL verify)."""
    if not os.path.isfile(path):
        raise DatasetError(f"{what} {path} does not exist")
    try:
        with Image.open(path) as img:
            size = img.size
            _check_pixels(img, path, what)
            if full:
                img.verify()
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"cannot read {what} {path}: {type(exc).__name__}: {exc}") from exc
    return size


def mask_is_empty(path: str) -> bool:
    """True when a mask file holds no anomalous pixel (decodes it; used by KSDD2 and RSDD)."""
    img = _open(path, "mask")
    return not mask_to_bool(img, path).any()


# --------------------------------------------------------------------------- the dataset
class AnomalyDataset(Dataset):
    """A list of :class:`Record` served as :class:`Sample` items.

    Items keep each image's own size (then masks must match it); ``ds.transform(S)``
    returns a view that resizes to ``S x S``, ``ds.with_dino_size(S_d)`` one that also
    carries ``image_dino``.
    With ``skip_bad_files`` the construction also reads every header (image and
    mask sizes must agree); files that fail are dropped and listed in ``.skipped``
    as ``(path, reason)`` with a warning. A file that only fails when decoded during
    iteration is then replaced by the next readable item and appended to
    ``.skipped`` (in the main process; DataLoader workers keep their own copy).
    """

    def __init__(
        self,
        records: Iterable[Record],
        name: str = "",
        root: str = "",
        split: str = "test",
        skip_bad_files: bool = False,
        skipped: list[tuple[str, str]] | None = None,
    ):
        self.name = name
        self.root = root
        self.split = split
        self.image_size: int | None = None  # native size; views: transform(S), with_dino_size(S_d)
        self.dino_image_size: int | None = None
        self.skip_bad_files = bool(skip_bad_files)
        self.skipped: list[tuple[str, str]] = list(skipped or [])
        self.records: list[Record] = self._check(list(records))
        if self.skipped:
            shown = "; ".join(f"{p}: {r}" for p, r in self.skipped[:5])
            more = f" (and {len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
            warnings.warn(
                f"{name or 'dataset'} ({split}): skipped {len(self.skipped)} bad file(s): {shown}{more}",
                stacklevel=3,
            )

    # ----- construction-time checks
    def _check(self, records: list[Record]) -> list[Record]:
        kept = []
        for rec in records:
            try:
                if self.skip_bad_files:
                    size = header(rec.image_path, "image")
                    if rec.mask_path is not None:
                        msize = header(rec.mask_path, "mask")
                        if msize != size:
                            raise DatasetError(
                                f"mask {rec.mask_path} is {msize[0]}x{msize[1]} (WxH) but its image "
                                f"{rec.image_path} is {size[0]}x{size[1]}"
                            )
                else:
                    if not os.path.isfile(rec.image_path):
                        raise DatasetError(
                            f"image {rec.image_path} does not exist (listed for class {rec.cls_name!r} in {self.name})"
                        )
                    if rec.mask_path is not None and not os.path.isfile(rec.mask_path):
                        raise DatasetError(
                            f"mask {rec.mask_path} of image {rec.image_path} does not exist"
                        )
            except DatasetError as exc:
                if not self.skip_bad_files:
                    raise
                self.skipped.append((_bad_path(rec, str(exc)), str(exc)))
                continue
            kept.append(rec)
        return kept

    # ----- torch Dataset
    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> Sample:
        """Decode item ``index``; raises DatasetError naming the file when it is bad."""
        rec = self.records[index]
        img = _to_rgb(_open(rec.image_path, "image"))
        size = img.size
        mask = load_mask(rec.mask_path, size, self.image_size, rec.image_path)
        image = _to_tensor(img, self.image_size)
        dino_size = getattr(self, "dino_image_size", None)
        image_dino = _to_tensor(img, dino_size) if dino_size and dino_size != self.image_size else None
        return Sample(
            image=image,
            mask=mask,
            label=int(rec.label),
            cls_name=rec.cls_name,
            defect=rec.defect,
            path=rec.image_path,
            image_dino=image_dino,
        )

    def __getitem__(self, index: int) -> Sample:
        if not self.skip_bad_files:
            return self.load(index)
        n = len(self.records)
        for step in range(n):
            i = (index + step) % n
            try:
                return self.load(i)
            except DatasetError as exc:
                rec = self.records[i]
                entry = (_bad_path(rec, str(exc)), str(exc))
                if entry not in self.skipped:
                    self.skipped.append(entry)
                    warnings.warn(f"skipping bad file: {entry[1]}", stacklevel=2)
        raise DatasetError(f"{self.name}: no readable item left (every file failed; see .skipped)")

    # ----- views
    def _replace(self, records: list[Record] | None = None, **changes: Any) -> "AnomalyDataset":
        new = copy.copy(self)
        new.records = list(self.records if records is None else records)
        new.skipped = list(self.skipped)
        for k, v in changes.items():
            setattr(new, k, v)
        return new

    def transform(self, image_size: int | None) -> "AnomalyDataset":
        """The same records resized to ``image_size x image_size`` (None: native size)."""
        return self._replace(image_size=int(image_size) if image_size else None)

    def with_dino_size(self, dino_image_size: int | None) -> "AnomalyDataset":
        """The same records, each item also carrying ``image_dino`` at ``dino_image_size`` px resized
        from the original (None, or the same size as ``image_size``: no second image)."""
        return self._replace(dino_image_size=int(dino_image_size) if dino_image_size else None)

    def select_classes(self, classes: Iterable[str]) -> "AnomalyDataset":
        """Only the records of ``classes`` (unknown names are an error listing the known ones)."""
        classes = list(classes)
        known = set(self.classes)
        unknown = [c for c in classes if c not in known]
        if unknown:
            raise DatasetError(
                f"{self.name}: unknown class(es) {unknown}; this split has: {', '.join(sorted(known))}"
            )
        keep = set(classes)
        return self._replace([r for r in self.records if r.cls_name in keep])

    def cap_per_class(self, max_per_class: int) -> "AnomalyDataset":
        """At most ``max_per_class`` records per class, deterministic, normals and anomalies both kept."""
        if not max_per_class:
            return self
        out: list[Record] = []
        for cls in self.classes:
            recs = [r for r in self.records if r.cls_name == cls]
            out.extend(cap_records(recs, max_per_class))
        return self._replace(out)

    # ----- summaries
    @property
    def classes(self) -> list[str]:
        return sorted({r.cls_name for r in self.records})

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([r.label for r in self.records], dtype=np.int64)

    def counts(self) -> dict[str, dict[str, int]]:
        """``{cls: {"normal": n, "anomalous": n, defect: n, ...}}``."""
        out: dict[str, dict[str, int]] = {}
        for r in self.records:
            c = out.setdefault(r.cls_name, {"normal": 0, "anomalous": 0})
            c["anomalous" if r.label else "normal"] += 1
            c[r.defect] = c.get(r.defect, 0) + 1
        return out

    def verify(self) -> list[tuple[str, str]]:
        """Decode every item; returns ``[(path, reason)]`` of the bad ones (nothing is dropped)."""
        bad = []
        for i, rec in enumerate(self.records):
            try:
                self.load(i)
            except DatasetError as exc:
                bad.append((_bad_path(rec, str(exc)), str(exc)))
        return bad

    def __repr__(self) -> str:
        n_anom = int(self.labels.sum()) if self.records else 0
        return (
            f"AnomalyDataset({self.name!r}, split={self.split!r}, {len(self)} images "
            f"({n_anom} anomalous), {len(self.classes)} classes, image_size={self.image_size})"
        )


def _bad_path(rec: Record, message: str) -> str:
    """The file an error message is about: the mask when the message starts with it."""
    if rec.mask_path and message.startswith(("mask ", "cannot read mask ")):
        return rec.mask_path
    return rec.image_path


def _spread(items: list[Record], k: int) -> list[Record]:
    """``k`` items evenly spaced over ``items`` (deterministic, spans defect types)."""
    if k >= len(items):
        return list(items)
    if k <= 0:
        return []
    idx = np.unique(np.round(np.linspace(0, len(items) - 1, k)).astype(int))
    return [items[i] for i in idx]


def cap_records(records: list[Record], cap: int) -> list[Record]:
    """At most ``cap`` of ``records``: normal/anomalous in proportion, at least one of each if present."""
    if len(records) <= cap:
        return list(records)
    recs = sorted(records, key=lambda r: (r.defect, r.image_path))
    normal = [r for r in recs if not r.label]
    anom = [r for r in recs if r.label]
    if not normal or not anom:
        return sorted(_spread(normal or anom, cap), key=lambda r: r.image_path)
    k_anom = int(round(cap * len(anom) / len(recs)))
    k_anom = min(max(k_anom, 1), len(anom), cap - 1) if cap >= 2 else 1
    k_norm = min(cap - k_anom, len(normal))
    k_anom = min(cap - k_norm, len(anom))
    return sorted(_spread(normal, k_norm) + _spread(anom, k_anom), key=lambda r: r.image_path)
