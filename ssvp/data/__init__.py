"""Datasets for zero-shot anomaly detection: benchmark readers, meta.json interop,
a synthetic two-domain benchmark and the zero-shot train/val/target splits.

```python
ds = open_dataset("mvtec:/data/mvtec_anomaly_detection", split="test", image_size=518)
loader = DataLoader(ds, batch_size=8, collate_fn=collate)
train_ds, val_ds, targets = zero_shot_splits(cfg.data, image_size=518)
write_meta("btad:/data/BTAD", "/data/BTAD/meta.json")
make_synthetic("/data/synth", seed=0)   # domain_a/ and domain_b/ in MVTec layout
```

Layering: ``formats`` holds the registry of ``FORMAT:ROOT`` readers and ``read_records``;
``readers`` (the benchmark layouts) and ``meta`` (meta.json) register into it and
import only ``formats`` and ``base``, never each other.
"""
from .base import AnomalyDataset, DatasetError, Record, Sample, collate, load_image, load_mask
from .formats import FORMATS, SPLITS, dataset_root, parse_spec, read_records, register
from .meta import read_meta_records, write_meta  # registers the "meta" format
from .readers import open_dataset  # registers the benchmark formats
from .splits import pick_val_classes, zero_shot_splits
from .synthetic import CATEGORIES, DOMAINS, make_synthetic, render_item

__all__ = [
    "AnomalyDataset",
    "DatasetError",
    "Record",
    "Sample",
    "collate",
    "load_image",
    "load_mask",
    "FORMATS",
    "SPLITS",
    "dataset_root",
    "open_dataset",
    "parse_spec",
    "read_records",
    "register",
    "read_meta_records",
    "write_meta",
    "zero_shot_splits",
    "pick_val_classes",
    "make_synthetic",
    "render_item",
    "DOMAINS",
    "CATEGORIES",
]
