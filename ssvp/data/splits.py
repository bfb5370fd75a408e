"""The zero-shot protocol: train on the source, select on held-out source classes, test on targets.

- train: the source dataset's mask-bearing split (``test`` for every supported
  format: MVTec-AD, VisA, ...) restricted to ``source_classes`` (empty = all),
  minus the validation classes;
- val: whole held-out source classes (``val_classes``, or if empty the last
  ``ceil(val_fraction * n)`` sorted classes, at least one when there are two or
  more classes; none when ``val_fraction`` is 0 or there is a single class);
- targets: each target's ``test`` split.

Hyper-parameters are selected on ``val`` only, never on a target. Training on a
target (same resolved root, or any shared image file) is refused unless
``force_target_training``.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from .base import AnomalyDataset, DatasetError
from .readers import dataset_root, open_dataset

if TYPE_CHECKING:  # pragma: no cover
    from ..config import DataConfig

__all__ = ["zero_shot_splits", "pick_val_classes", "TRAIN_SPLIT"]

TRAIN_SPLIT = "test"  # the split that has masks (zero-shot training uses the auxiliary dataset's test split)


def pick_val_classes(classes: list[str], val_classes: list[str], val_fraction: float) -> list[str]:
    """The held-out validation classes (see the module docstring)."""
    classes = sorted(classes)
    if val_classes:
        unknown = [c for c in val_classes if c not in classes]
        if unknown:
            raise DatasetError(f"data.val_classes {unknown} are not source classes; the source has: {', '.join(classes)}")
        if len(set(val_classes)) >= len(classes):
            raise DatasetError(f"data.val_classes {val_classes} hold out every source class; nothing is left to train on")
        return sorted(set(val_classes))
    if len(classes) < 2 or val_fraction <= 0:
        return []
    n_val = min(max(1, math.ceil(val_fraction * len(classes))), len(classes) - 1)
    return classes[-n_val:]


def zero_shot_splits(
    data_cfg: "DataConfig", image_size: int | None = None
) -> tuple[AnomalyDataset, AnomalyDataset, dict[str, AnomalyDataset]]:
    """``(train_ds, val_ds, {target_spec: test_ds})`` for ``data_cfg`` (a ``DataConfig``).

    ``image_size`` (default ``data_cfg.image_size``; 0/None keeps native sizes) is the
    S of every item's ``[3,S,S]`` image. ``val_ds`` may be empty (``len(val_ds) == 0``).
    """
    size = image_size or data_cfg.image_size or None
    common = dict(skip_bad_files=data_cfg.skip_bad_files, image_size=size,
                  allow_outside_root=data_cfg.allow_paths_outside_root)
    source = open_dataset(
        data_cfg.source,
        split=TRAIN_SPLIT,
        classes=data_cfg.source_classes or None,
        **common,
    )
    val_names = pick_val_classes(source.classes, list(data_cfg.val_classes), data_cfg.val_fraction)
    train_names = [c for c in source.classes if c not in set(val_names)]
    train_ds = source.select_classes(train_names).cap_per_class(data_cfg.max_per_class)
    val_ds = source.select_classes(val_names).cap_per_class(data_cfg.max_per_class)

    src_root = dataset_root(data_cfg.source)
    src_files = {os.path.realpath(r.image_path) for r in source.records}
    targets: dict[str, AnomalyDataset] = {}
    for spec in data_cfg.targets:
        tgt = open_dataset(spec, split="test", max_per_class=data_cfg.max_per_class, **common)
        if not data_cfg.force_target_training:
            if dataset_root(spec) == src_root:
                raise DatasetError(
                    f"refusing to train on target {spec!r}: the source {data_cfg.source!r} has the same root "
                    f"{src_root}; zero-shot needs a different training dataset (set data.force_target_training=true "
                    "to do it anyway)"
                )
            shared = [r.image_path for r in tgt.records if os.path.realpath(r.image_path) in src_files]
            if shared:
                raise DatasetError(
                    f"refusing to train on target {spec!r}: {len(shared)} of its test images are also source "
                    f"training images (e.g. {shared[0]}); set data.force_target_training=true to do it anyway"
                )
        targets[spec] = tgt
    return train_ds, val_ds, targets
