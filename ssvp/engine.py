"""Training and evaluation loops (paper Algorithm 3), plain functions.

``fit`` trains the SSVP heads on the source domain and reports per-epoch
validation metrics (held-out *source* categories, never the target test set)
through a callback; the Ray layer wraps exactly this function. ``evaluate``
measures a checkpoint on the target datasets; ``predict_paths`` scores a folder of
images. Nothing here imports Ray or MLflow.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .config import Config

log = logging.getLogger("ssvp.engine")

EpochCallback = Callable[[int, dict, "str | None"], None]
CHECKPOINT_FILE = "head.pt"
CONFIG_FILE = "config.json"
CHECKSUM_FILE = "checksums.json"  # SHA-256 of head.pt and config.json, written with them
OBJECTIVE_KEYS = ("image_auroc", "pixel_auroc")  # val_objective = their mean on source-val classes


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message says at which epoch and step."""


class CheckpointError(ValueError):
    """A checkpoint directory is missing, unreadable, corrupt or from an incompatible config."""


class NonFiniteOutputError(ValueError):
    """The model scored an image NaN or infinite: no label is given for such a score."""


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # one metrics dict per epoch
    best_epoch: int = -1
    best_metrics: dict = field(default_factory=dict)
    checkpoint_dir: str | None = None  # directory holding last/ and best/


# --------------------------------------------------------------------------- setup
def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks this process's GPU (LOCAL_RANK under DDP) when CUDA is visible, else the CPU."""
    if spec == "auto":
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
        return torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={spec!r} but CUDA is not available on this machine")
    return torch.device(spec)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def image_size_of(cfg: Config) -> int:
    return cfg.data.image_size or 14 * cfg.model.grid


def with_backbone_sizes(ds, model):
    """``ds`` whose items also carry the DINO input resized from the original image (paper §4.2:
    CLIP 518 px, DINO 592 px), when the model has a DINO branch at another size than ``ds``'s."""
    size = int(getattr(model.backbones, "dino_image_size", 0) or 0)
    if not size or not hasattr(ds, "with_dino_size") or size == getattr(ds, "image_size", None):
        return ds
    return ds.with_dino_size(size)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


LAZY_BACKBONES_ENV = "SSVP_LAZY_BACKBONES"


def build_model(cfg: Config, device: torch.device, lazy: bool | None = None):
    """SSVP on ``device``. ``lazy`` (default: on when ``train.feature_cache`` is set, unless
    ``SSVP_LAZY_BACKBONES=0``) defers the vision towers to the first cache miss."""
    from .model import SSVP

    if lazy is None:
        lazy = bool(cfg.train.feature_cache) and os.environ.get(LAZY_BACKBONES_ENV, "1").strip() != "0"
    return SSVP(cfg.model, lazy=lazy).to(device)


FEATURE_CACHE_DTYPE_ENV = "SSVP_FEATURE_CACHE_DTYPE"


def feature_cache_dtype(cfg: Config) -> str:
    """Storage format of the feature cache: ``train.feature_cache_dtype`` when set, else the
    ``SSVP_FEATURE_CACHE_DTYPE`` environment variable, else ``ssvp.features.DEFAULT_DTYPE``.
    ``float32`` makes cached training bit-identical to training from images."""
    from .features import DEFAULT_DTYPE, DTYPES

    value = getattr(cfg.train, "feature_cache_dtype", "") or os.environ.get(FEATURE_CACHE_DTYPE_ENV, "") or DEFAULT_DTYPE
    if value not in DTYPES:
        raise ValueError(f"feature cache dtype must be one of {', '.join(DTYPES)} (from {FEATURE_CACHE_DTYPE_ENV}?), got {value!r}")
    return value


class FeatureSource:
    """Frozen backbone features for a batch: from the images, or from the on-disk cache."""

    def __init__(self, cfg: Config, model, device: torch.device):
        self.model = model
        self.cache = None
        if cfg.train.feature_cache:
            from .features import FeatureCache

            self.cache = FeatureCache(
                cfg.train.feature_cache, model.backbones, cfg.model, dtype=feature_cache_dtype(cfg)
            )

        self.device = device

    @classmethod
    def of_cache(cls, cache, device: torch.device) -> "FeatureSource":
        """A source that reads ``cache`` (a ``FeatureCache``) only (benchmarks, tools)."""
        self = cls.__new__(cls)
        self.model, self.cache, self.device = None, cache, device
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, images_dino: torch.Tensor | None = None):
        """Features of ``images`` (CLIP input) and ``images_dino`` (DINO input from the original, §4.2)."""
        if self.cache is not None:
            return self.cache.get_batch(images, images_dino=images_dino)
        return self.model.backbones(images, images_dino)

    def dataset(self, ds: Dataset) -> Dataset:
        """``ds`` as the loader should read it: with a cache, items whose features are cached
        skip decoding their image (see ``_SkipDecode``); otherwise ``ds`` itself."""
        if self.cache is None:
            return ds
        from .data import AnomalyDataset

        if not isinstance(ds, AnomalyDataset) or not ds.image_size:
            return ds
        decode_id = _decode_identity(ds)
        return ds if decode_id is None else _SkipDecode(ds, self.cache.paths, decode_id)

    def batches(self, loader: Iterable, limit: int | None = None, reuse: bool = False) -> Iterator[tuple[Any, Any]]:
        """``(batch, features)`` for the first ``limit`` batches of ``loader`` (from ``dataset(ds)``).

        With a cache, a background thread reads the next batch's feature files (``readinto`` the
        batch buffer: the read releases the GIL) while the caller trains on the current one, so
        file reads overlap the head's compute; misses are computed here, in order. ``reuse``: the
        caller is done with a batch's features when it asks for the next one, so the next batch's
        features are written into the same tensors (no allocation per batch)."""
        if self.cache is None:
            for step, batch in enumerate(loader):
                if limit is not None and step >= limit:
                    return
                yield batch, self.batch(batch)
            return
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssvp-feature-read")
        pending, last = None, None
        try:
            for step, batch in enumerate(loader):
                if limit is not None and step >= limit:
                    break
                keys = self._keys(batch) if "feature_key" in batch else None
                job = pool.submit(self.cache.read, keys) if keys is not None else None
                if pending is not None:
                    last = self.batch(*pending, out=last if reuse else None)
                    yield pending[0], last
                pending = (batch, keys, job)
            if pending is not None:
                yield pending[0], self.batch(*pending, out=last if reuse else None)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _keys(self, batch: Mapping[str, Any]) -> list[str]:
        """Content keys of a ``_SkipDecode`` batch: looked up by the loader, or hashed here for the
        items decoded this time (and then recorded in the path index for their file)."""
        cache = self.cache
        images, images_dino = batch["image"], batch.get("image_dino")
        pos = {b: j for j, b in enumerate(batch["image_pos"])}
        keys = list(batch["feature_key"])
        for b, key in enumerate(keys):
            if key is None:  # decoded this time: hash the content, remember it for the file
                keys[b] = cache.key_for(images[pos[b]], None if images_dino is None else images_dino[pos[b]])
                if batch["feature_token"][b]:
                    cache.paths.put(batch["feature_token"][b], keys[b])
        return keys

    @torch.no_grad()
    def batch(self, batch: Mapping[str, Any], keys: list[str] | None = None, job=None, out=None):
        """Features of a loader batch (from ``dataset(ds)``): cached keys need no image.
        ``keys``/``job``: the batch's keys and the future of their ``cache.read`` (``batches``);
        ``out``: features to overwrite (``FeatureCache.get_keyed``)."""
        if "feature_key" not in batch:
            dino = batch.get("image_dino")
            return self(batch["image"].to(self.device, non_blocking=True),
                        None if dino is None else dino.to(self.device, non_blocking=True))
        cache = self.cache
        images = batch["image"]
        images_dino = batch.get("image_dino")
        pos = {b: j for j, b in enumerate(batch["image_pos"])}
        keys = list(keys) if keys is not None else self._keys(batch)
        size = int(batch["mask"].shape[-1])
        dino_size = batch.get("dino_size")

        def images_for(idx: list[int]):
            from .data.base import load_image_sizes

            out, out_dino, out_keys = [], [], []
            for b in idx:
                if b in pos:
                    img, key = images[pos[b]], keys[b]
                    dimg = None if images_dino is None else images_dino[pos[b]]
                else:  # the features vanished since the index lookup: decode again, key by content
                    img, dimg = (load_image_sizes(batch["path"][b], [size, dino_size]) if dino_size
                                 else (load_image_sizes(batch["path"][b], [size])[0], None))
                    key = cache.key_for(img, dimg)
                out.append(img)
                out_dino.append(dimg)
                out_keys.append(key)
            imgs = torch.stack(out).to(self.device, non_blocking=True)
            if any(d is None for d in out_dino):
                return imgs, out_keys
            return imgs, torch.stack(out_dino).to(self.device, non_blocking=True), out_keys

        return cache.get_keyed(keys, images_for, prefetched=None if job is None else job.result(), out=out)


def _decode_identity(ds: Dataset) -> str | None:
    """A fingerprint of the code that decodes an item's image (part of every path-index token),
    so a change of the decoding or resizing code invalidates the index; None when unknown."""
    import hashlib
    import inspect

    import PIL

    from .data import base

    try:
        src = "".join(inspect.getsource(f) for f in (type(ds).load, base._open, base._to_rgb, base._to_tensor))
    except (OSError, TypeError, AttributeError):
        return None
    return hashlib.sha256(f"{src}|PIL {PIL.__version__}|numpy {np.__version__}".encode()).hexdigest()[:16]


class _SkipDecode(Dataset):
    """An ``AnomalyDataset`` whose items skip decoding the image when its features are cached.

    A file's token = (real path, size, mtime_ns, ctime_ns, inode, device, target size, decoding
    code identity). When the path index maps it to a content key whose features exist, the item
    carries that key and no image (mask, label and names are still read). Otherwise the item is
    decoded as usual and carries the token, so the main process can record token -> content key.
    Items are plain dicts for ``_collate_keyed``. Picklable (DataLoader workers).
    """

    def __init__(self, ds, paths, decode_id: str):
        self.ds = ds
        self.paths = paths
        self.decode_id = decode_id
        self.image_size = int(ds.image_size)
        self.dino_size = int(getattr(ds, "dino_image_size", None) or 0)

    def __len__(self) -> int:
        return len(self.ds)

    def token(self, path: str) -> str | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        ident = [os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
        return json.dumps([*ident, self.image_size, self.dino_size, self.decode_id])

    def __getitem__(self, index: int) -> dict:
        from .data import DatasetError

        rec = self.ds.records[index]
        token = self.token(rec.image_path)
        key = self.paths.get(token) if token else None
        if key is not None and self.paths.has_features(key):
            try:
                return self._light(rec, key)
            except DatasetError:
                if not self.ds.skip_bad_files:
                    raise
        item = self.ds[index]  # decodes (and, with skip_bad_files, may substitute another item)
        token = token if item.path == rec.image_path else self.token(item.path)
        return {
            "image": item.image, "mask": item.mask, "label": int(item.label), "cls_name": item.cls_name,
            "defect": item.defect, "path": item.path, "feature_key": None, "feature_token": token,
            "image_dino": getattr(item, "image_dino", None), "dino_size": self.dino_size,
        }

    def _light(self, rec, key: str) -> dict:
        from .data import load_mask
        from .data.base import header

        S = self.image_size
        if rec.mask_path is None:
            mask = torch.zeros((S, S), dtype=torch.float32)
        else:  # the mask must match the image's size: read it from the header only
            mask = load_mask(rec.mask_path, header(rec.image_path, "image", full=False), S, rec.image_path)
        return {
            "image": None, "mask": mask, "label": int(rec.label), "cls_name": rec.cls_name,
            "defect": rec.defect, "path": rec.image_path, "feature_key": key, "feature_token": None,
            "image_dino": None, "dino_size": self.dino_size,
        }


def _collate_keyed(items: list[dict]) -> dict[str, Any]:
    """Collate ``_SkipDecode`` items: ``image`` stacks the decoded ones (at ``image_pos``) or is None."""
    pos = [i for i, it in enumerate(items) if it["image"] is not None]
    dino = [items[i].get("image_dino") for i in pos]
    return {
        "image_dino": torch.stack(dino) if pos and all(d is not None for d in dino) else None,
        "dino_size": int(items[0].get("dino_size") or 0),
        "image": torch.stack([items[i]["image"] for i in pos]) if pos else None,
        "image_pos": pos,
        "mask": torch.stack([it["mask"] for it in items]),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "cls_name": [it["cls_name"] for it in items],
        "defect": [it["defect"] for it in items],
        "path": [it["path"] for it in items],
        "feature_key": [it["feature_key"] for it in items],
        "feature_token": [it["feature_token"] for it in items],
    }


def _loader(ds: Dataset, batch_size: int, shuffle: bool, cfg: Config, seed: int, sampler=None) -> DataLoader:
    from .data import collate

    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=cfg.train.num_workers,
        collate_fn=_collate_keyed if isinstance(ds, _SkipDecode) else collate,
        generator=gen,
        drop_last=False,
        persistent_workers=False,
    )


def _progress(iterable: Iterable, enabled: bool, **kwargs: Any) -> Iterable:
    """``iterable`` with a progress bar when ``enabled``; the bar never touches the iterable.

    (``tqdm.auto(loader)`` is tqdm's asyncio class, which calls ``iter(loader)`` when it
    is built: a second DataLoader iterator that drew from the loader's generator and
    changed the shuffle, so ``progress=true`` trained on another order than ``false``.)
    """
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    total = kwargs.pop("total", None)
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return _Bar(iterable, tqdm(total=total, leave=False, dynamic_ncols=True, **kwargs))


class _Bar:
    """Iterates ``iterable`` itself and advances ``bar`` after each item."""

    def __init__(self, iterable: Iterable, bar):
        self.iterable, self.bar = iterable, bar

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.bar.update(1)
        finally:
            self.bar.close()

    def set_postfix(self, **kwargs: Any) -> None:
        self.bar.set_postfix(**kwargs)


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def make_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    """Two learning-rate groups (Alg. 3): prompt embeddings vs VAE, attention and projections."""
    groups = model.trainable_parameters()
    param_groups = [
        {"params": list(groups["prompt"]), "lr": cfg.train.lr_prompt, "name": "prompt"},
        {"params": list(groups["head"]), "lr": cfg.train.lr_head, "name": "head"},
    ]
    param_groups = [g for g in param_groups if g["params"]]
    opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    try:  # the fused kernel: same update rule, one kernel for all tensors (CPU and CUDA)
        return opt_cls(param_groups, weight_decay=cfg.train.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return opt_cls(param_groups, weight_decay=cfg.train.weight_decay)


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | Path, cfg: Config, model, optimizer, scheduler, epoch: int, extra: dict) -> Path:
    """Write ``head.pt`` + ``config.json`` atomically into ``path`` (heads only, never backbones).

    ``head.pt`` holds tensors and plain data only (it loads with ``weights_only=True``);
    the config travels as JSON.
    """
    state = {
        "head": model.head.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "rng": _rng_state(),
        **extra,
    }

    def write(tmp: Path) -> None:
        torch.save(state, tmp / CHECKPOINT_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
        sums = {name: _sha256(tmp / name) for name in (CHECKPOINT_FILE, CONFIG_FILE)}
        (tmp / CHECKSUM_FILE).write_text(json.dumps({"sha256": sums}, indent=2))

    return _write_dir_atomic(Path(path), write)


def _write_dir_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Fill a fresh hidden sibling folder with ``write(tmp)``, then swap it in for ``path``.

    An interrupted write (error, Ctrl-C) removes its folder and leaves ``path`` as it was;
    folders a killed process left behind (``.NAME.*``) go at the next write of ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    old = None
    try:
        write(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _rng_state() -> dict:
    """The global RNG states as tensors and plain data (numpy's key as an int64 tensor)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(pos),
            int(has_gauss), float(cached)), "python": random.getstate()}


def _set_rng_state(rng: Mapping[str, Any]) -> None:
    if "torch" not in rng:
        return
    torch.set_rng_state(rng["torch"])
    name, key, *rest = rng["numpy"]
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    np.random.set_state((name, key.astype(np.uint32), *rest))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))


def _numpy_array_globals() -> list:
    """What unpickling a numpy array needs (checkpoints before the tensor RNG state kept
    numpy's as an array): array reconstruction only, no callable of the file's choice."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _sha256(file: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_checksum(file: Path) -> None:
    """``file`` (``head.pt`` / ``config.json``) against the SHA-256 ``save_checkpoint`` recorded beside it
    (torch does not check its zip's CRCs: flipped bytes would load as other weights). Checkpoints
    written before checksums were kept have no ``checksums.json`` and are not checked."""
    sums_file = file.parent / CHECKSUM_FILE
    if not sums_file.is_file():
        return
    try:
        want = json.loads(sums_file.read_text())["sha256"][file.name]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {sums_file} is unreadable or lists no checksum of {file.name}") from None
    if _sha256(file) != want:
        raise CheckpointError(f"checkpoint file {file} is corrupt: its SHA-256 differs from the one recorded in "
                              f"{sums_file} when it was written")


def _unreadable(file: Path, exc: BaseException) -> CheckpointError:
    """A file torch cannot load: what it is and what was expected, never torch's advice to load unsafely."""
    with open(file, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30):
        what = "a safetensors file"
    elif head.startswith(b"PK"):
        what = f"a damaged torch zip ({_first_line(exc)})" if "weights_only" not in str(exc) else "a damaged torch zip"
    else:
        what = "not a torch file"
    return CheckpointError(f"cannot read checkpoint {file}: {what}; expected {CHECKPOINT_FILE} as ssvp writes it "
                           "(torch.save of a dict of tensors with a 'head' state dict)")


def _check_head_state(file: Path, state: Any) -> None:
    """``state['head']`` is a state dict of finite tensors (a list or NaN weights give a clear error)."""
    head = state.get("head")
    if not isinstance(head, Mapping) or not all(isinstance(v, torch.Tensor) for v in head.values()):
        kind = type(head).__name__ if not isinstance(head, Mapping) else "a mapping with non-tensor values"
        raise CheckpointError(f"checkpoint {file}: 'head' is {kind}; expected a state dict (parameter name -> tensor)")
    for name, value in head.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"checkpoint {file}: head weight {name!r} holds {bad} NaN/infinite value(s)")


def load_checkpoint(path: str | Path) -> dict:
    """The state ``save_checkpoint`` wrote, loaded with ``weights_only=True``: a file that
    asks for anything beyond tensors and plain data is refused, and nothing in it runs; its
    checksum is checked first, and its head must be a state dict of finite tensors."""
    import pickle

    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no checkpoint at {file} (expected a directory holding {CHECKPOINT_FILE})")
    check_checksum(file)
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "global" in ln), "")
        if detail:
            raise CheckpointError(
                f"refusing to load checkpoint {file}: it asks to run or build Python objects beyond tensors and "
                f"plain data ({detail.split('. ')[0]}); nothing in it was run. Checkpoints written by ssvp never "
                "do: check where this file came from"
            ) from None
        raise _unreadable(file, exc) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {file}: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001  (truncated zip, not a torch file)
        raise _unreadable(file, exc) from None
    if not isinstance(state, dict) or "head" not in state:
        raise CheckpointError(f"checkpoint {file} holds no SSVP head state (expected a dict with 'head')")
    _check_head_state(file, state)
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def config_from_checkpoint(path: str | Path) -> Config:
    path = Path(path)
    file = (path if path.is_dir() else path.parent) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {CONFIG_FILE}")
    check_checksum(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from None
    return Config.from_dict(data)


def load_head(model, path: str | Path) -> dict:
    state = load_checkpoint(path)
    try:
        model.head.load_state_dict(state["head"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not match this model config: {exc}") from exc
    return state


# --------------------------------------------------------------------------- training
def training_splits(cfg: Config, image_size: int | None = None):
    """(train_ds, val_ds) of the source under ``train.protocol``: ``paper`` trains on every source
    class (val empty); ``select`` holds out ``data.val_classes`` / ``val_fraction`` for selection."""
    from .data import zero_shot_splits

    data_cfg = cfg.data
    if cfg.train.protocol == "paper":  # every source class trains; nothing is held out
        data_cfg = dataclasses.replace(cfg.data, val_classes=[], val_fraction=0.0)
    train_ds, val_ds, _ = zero_shot_splits(data_cfg, image_size or image_size_of(cfg))
    return train_ds, val_ds


@dataclass
class _Training:
    """What one ``fit`` trains with, built once by ``_setup_training``."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    model: Any
    head: Any  # model.head, wrapped in DistributedDataParallel under DDP
    features: "FeatureSource"
    train_source: Dataset  # the training split as the feature source serves it
    val_ds: Dataset | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: Any  # DistributedSampler under DDP, else None
    steps_per_epoch: int


def _setup_training(cfg: Config, splits: tuple | None) -> _Training:
    """Seed, datasets, model, feature source, optimizer, sampler and cosine schedule, in this order
    (the order fixes what the seeded random streams give each part)."""
    rank, world = _dist()
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    image_size = image_size_of(cfg)
    if splits is None:
        train_ds, val_ds = training_splits(cfg, image_size)
    else:
        train_ds, val_ds = splits[:2]
    if len(train_ds) == 0:
        raise ValueError(f"the source training split of {cfg.data.source} is empty")

    model = build_model(cfg, device)
    train_ds = with_backbone_sizes(train_ds, model)
    if val_ds is not None:
        val_ds = with_backbone_sizes(val_ds, model)
    features = FeatureSource(cfg, model, device)
    train_source = features.dataset(train_ds)
    head = model.head
    if world > 1:
        head = torch.nn.parallel.DistributedDataParallel(
            model.head, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    optimizer = make_optimizer(cfg, model)

    sampler = None
    if world > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_source, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed)
    steps_per_epoch = math.ceil(len(train_ds) / world / cfg.train.batch_size)
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.train.epochs * steps_per_epoch))
    return _Training(cfg, rank, world, device, model, head, features, train_source, val_ds, optimizer, scheduler,
                     sampler, steps_per_epoch)


def _resume(t: _Training, resume_from: str | Path, result: FitResult) -> int:
    """Heads, optimizer, schedule, history, best epoch and random state from a checkpoint
    directory; returns the epoch (0-based) to continue from."""
    state = load_head(t.model, resume_from)
    if state.get("optimizer"):
        t.optimizer.load_state_dict(state["optimizer"])
    if state.get("scheduler"):
        t.scheduler.load_state_dict(state["scheduler"])
    result.history = list(state.get("history", []))
    result.best_epoch = int(state.get("best_epoch", -1))
    result.best_metrics = dict(state.get("best_metrics", {}))
    _set_rng_state(state.get("rng") or {})
    start_epoch = int(state["epoch"]) + 1
    log.info("resumed from %s at epoch %d", resume_from, start_epoch)
    return start_epoch


def _train_epoch(t: _Training, epoch: int, show: bool) -> dict:
    """One pass over the training split (at most ``steps_per_epoch`` steps); returns the mean
    of the loss and of each of its parts as ``train_*`` metrics."""
    from .losses import total_loss

    cfg = t.cfg
    if t.sampler is not None:
        t.sampler.set_epoch(epoch)
    loader = _loader(t.train_source, cfg.train.batch_size, True, cfg, cfg.train.seed + epoch, t.sampler)
    t.model.head.train()
    sums: dict[str, float] = {}
    n_steps = 0
    bar = _progress(loader, show, total=t.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}")
    # features: backbones, or the cache (cached images are not even decoded; files read ahead)
    for step, (batch, feats) in enumerate(t.features.batches(bar, t.steps_per_epoch, reuse=True)):
        masks = batch["mask"].to(t.device, non_blocking=True)
        labels = batch["label"].to(t.device, non_blocking=True)
        with _autocast(t.device, cfg.model.bf16):
            out = t.head(feats, list(batch["cls_name"]), masks.shape[-1])
        loss, parts = total_loss(out, masks, labels, cfg.model)
        if not torch.isfinite(loss):
            detail = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
            raise NonFiniteLossError(
                f"loss is {float(loss.detach())} at epoch {epoch + 1}, step {step + 1} ({detail}); "
                "lower the learning rates or check the data"
            )
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(t.model.head.parameters(), cfg.train.grad_clip)
        t.optimizer.step()
        t.scheduler.step()
        n_steps += 1
        sums["train_loss"] = sums.get("train_loss", 0.0) + float(loss.detach())
        for k, v in parts.items():
            sums[f"train_{k}"] = sums.get(f"train_{k}", 0.0) + float(v)
        if show and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    return {k: v / max(1, n_steps) for k, v in sums.items()}


def _validate(t: _Training, metrics: dict) -> dict:
    """``val_*`` metrics and ``val_objective`` (mean of OBJECTIVE_KEYS) on the held-out source
    classes, added to ``metrics``; returns the validation thresholds (empty without validation)."""
    val_thresholds: dict = {}
    if t.val_ds is not None and len(t.val_ds):
        report = evaluate_dataset(t.cfg, t.model, t.val_ds, t.device, t.features, thresholds=val_thresholds)
        for k, v in report["mean"].items():
            if isinstance(v, (int, float)):
                metrics[f"val_{k}"] = float(v)
        vals = [metrics.get(f"val_{k}") for k in OBJECTIVE_KEYS]
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        metrics["val_objective"] = float(np.mean(vals)) if vals else float("nan")
    return val_thresholds


def _save_epoch(t: _Training, checkpoint_dir: str | Path, epoch: int, result: FitResult, improved: bool,
                thresholds: dict) -> str:
    """``last/`` (heads, optimizer, schedule, history), copied to ``best/`` when ``improved``;
    returns the ``last/`` path."""
    extra = {"history": result.history, "best_epoch": result.best_epoch, "best_metrics": result.best_metrics,
             "protocol": t.cfg.train.protocol,
             "thresholds": dict(thresholds, epoch=epoch + 1)}  # for `ssvp predict`
    ckpt_path = save_checkpoint(Path(checkpoint_dir) / "last", t.cfg, t.model, t.optimizer, t.scheduler, epoch, extra)
    if improved:
        _write_dir_atomic(Path(checkpoint_dir) / "best", lambda tmp: shutil.copytree(ckpt_path, tmp, dirs_exist_ok=True))
    return str(ckpt_path)


def fit(
    cfg: Config,
    on_epoch: EpochCallback | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    splits: tuple | None = None,
) -> FitResult:
    """Train the SSVP heads (Algorithm 3).

    ``train.protocol``: ``paper`` (default, §4.1-4.2) trains on all source classes and the model
    is the last epoch (``best/`` = ``last/``, no selection); ``select`` holds out source classes
    (``data.val_classes`` / ``val_fraction``), reports ``val_*`` metrics every epoch and keeps the
    best epoch in ``best/`` (what sweeps optimise; targets are never seen either way).
    ``on_epoch(epoch, metrics, checkpoint_path)`` is called after every epoch (on every
    rank under DDP; ``checkpoint_path`` is the epoch's checkpoint directory, written by
    rank 0 only, else None). ``resume_from`` continues from a checkpoint directory.
    ``splits`` = (train_ds, val_ds) overrides the datasets built from ``cfg.data``.
    """
    t = _setup_training(cfg, splits)
    result = FitResult(checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None)
    start_epoch = _resume(t, resume_from, result) if resume_from else 0
    show = cfg.train.progress and t.rank == 0
    for epoch in range(start_epoch, cfg.train.epochs):
        metrics = _train_epoch(t, epoch, show)
        metrics["epoch"] = epoch + 1
        metrics["lr_prompt"] = t.optimizer.param_groups[0]["lr"]
        val_thresholds = _validate(t, metrics)
        result.history.append(metrics)
        # paper protocol: no model selection, the reported model is the last epoch
        improved = cfg.train.protocol == "paper" or result.best_epoch < 0 or _better(metrics, result.best_metrics)
        if improved:
            result.best_epoch, result.best_metrics = epoch + 1, dict(metrics)
        ckpt_path = None
        if checkpoint_dir is not None and t.rank == 0:
            ckpt_path = _save_epoch(t, checkpoint_dir, epoch, result, improved, val_thresholds)
        if show:
            shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
            log.info("epoch %d: %s", epoch + 1, shown)
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics, ckpt_path)
    return result


def _better(new: Mapping[str, float], old: Mapping[str, float]) -> bool:
    key = "val_objective" if "val_objective" in new else "train_loss"
    a, b = new.get(key, float("nan")), old.get(key, float("nan"))
    if not math.isfinite(b):
        return math.isfinite(a)
    if not math.isfinite(a):
        return False
    return a > b if key == "val_objective" else a < b


# --------------------------------------------------------------------------- evaluation
def _alignment_batch(head, out, names: list[str], masks: torch.Tensor, static: dict) -> dict | None:
    """Per-image parts of TIR-FG and SCD (Eq. 23-24, ``ssvp.metrics.alignment``); None when the
    head's output has no fused patches / state embeddings (e.g. another head)."""
    from .metrics.alignment import cell_fraction, scd_per_image, static_text, tir_fg_sums

    aux = out.aux
    patches, text = aux.get("patches"), aux.get("text")
    if patches is None or text is None or not hasattr(head, "text_encoder"):
        return None
    g = math.isqrt(patches.shape[2])
    num, den = tir_fg_sums(patches.float(), text[:, 1].float(), cell_fraction(masks, g).to(patches.device))
    missing = [c for c in dict.fromkeys(names) if c not in static]
    if missing:
        for c, t in zip(missing, static_text(head.text_encoder, missing)):
            static[c] = t.to(text.device)
    t_static = torch.stack([static[c] for c in names])
    d = scd_per_image(text.float(), t_static)
    return {"tir_num": num.cpu().numpy(), "tir_den": den.cpu().numpy(),
            "scd_normal": d[:, 0].cpu().numpy(), "scd_abnormal": d[:, 1].cpu().numpy()}


def alignment_report(parts: Mapping[str, Mapping[str, list]]) -> dict[str, dict[str, float]]:
    """Per class: tir_fg (one sum over the class's anomalous pixels, Eq. 23), scd_normal and
    scd_abnormal (means over images, Eq. 24); a "mean" entry averages the classes (NaN skipped)."""
    out: dict[str, dict[str, float]] = {}
    for cls, p in parts.items():
        den = float(np.sum(p["tir_den"]))
        out[cls] = {
            "tir_fg": float(np.sum(p["tir_num"]) / den) if den > 0 else float("nan"),
            "scd_normal": float(np.mean(p["scd_normal"])),
            "scd_abnormal": float(np.mean(p["scd_abnormal"])),
        }
    mean = {}
    for key in ("tir_fg", "scd_normal", "scd_abnormal"):
        vals = [r[key] for r in out.values() if math.isfinite(r[key])]
        mean[key] = float(np.mean(vals)) if vals else float("nan")
    out["mean"] = mean
    return out


@torch.no_grad()
def predict_dataset(
    cfg: Config, model, ds: Dataset, device: torch.device, features: FeatureSource, alignment: dict | None = None
) -> dict:
    """Scores and maps per class: ``{cls: {labels, scores, masks, maps, paths}}`` as numpy arrays.

    ``alignment``, when given, receives per class the per-image parts of TIR-FG and SCD
    (``alignment_report`` turns them into Table 4's numbers)."""
    model.head.eval()
    static: dict = {}
    loader = _loader(features.dataset(ds), cfg.train.eval_batch_size, False, cfg, 0)
    per_class: dict[str, dict[str, list]] = {}
    for batch, feats in features.batches(_progress(loader, cfg.train.progress and _dist()[0] == 0, desc="eval"), reuse=True):
        with _autocast(device, cfg.model.bf16):
            out = model.head(feats, list(batch["cls_name"]), batch["mask"].shape[-1])
        scores = out.score.float().cpu().numpy()
        maps = out.anomaly_map.float().cpu().numpy()
        parts = None
        if alignment is not None:
            parts = _alignment_batch(model.head, out, list(batch["cls_name"]), batch["mask"], static)
        if parts is not None:
            for i, cls in enumerate(batch["cls_name"]):
                rec = alignment.setdefault(cls, {k: [] for k in parts})
                for k, v in parts.items():
                    rec[k].append(float(v[i]))
        for i, cls in enumerate(batch["cls_name"]):
            rec = per_class.setdefault(cls, {"labels": [], "scores": [], "masks": [], "maps": [], "paths": []})
            rec["labels"].append(int(batch["label"][i]))
            rec["scores"].append(float(scores[i]))
            rec["masks"].append(batch["mask"][i].numpy().astype(np.uint8))
            rec["maps"].append(maps[i].astype(np.float32))
            rec["paths"].append(batch["path"][i])
    return {
        cls: {
            "labels": np.asarray(r["labels"]),
            "scores": np.asarray(r["scores"], dtype=np.float32),
            "masks": np.stack(r["masks"]),
            "maps": np.stack(r["maps"]),
            "paths": r["paths"],
        }
        for cls, r in per_class.items()
    }


def evaluate_dataset(cfg: Config, model, ds: Dataset, device: torch.device, features: FeatureSource,
                     thresholds: dict | None = None) -> dict:
    """Metrics report of ``ds``; ``thresholds``, when given, receives the F1-max decision thresholds
    (``ssvp.thresholds.validation_thresholds``) that ``ssvp predict`` labels images with."""
    from .metrics import evaluate_predictions

    parts: dict = {}
    preds = predict_dataset(cfg, model, ds, device, features, alignment=parts)
    if thresholds is not None:
        from .thresholds import validation_thresholds

        thresholds.update(validation_thresholds(preds, cfg.data.smoothing_sigma))
    report = evaluate_predictions(
        {c: {k: v for k, v in p.items() if k != "paths"} for c, p in preds.items()},
        smoothing_sigma=cfg.data.smoothing_sigma,
    )
    if parts:  # Table 4: TIR-FG and SCD per state, beside the Table 1-2 metrics
        align = alignment_report(parts)
        report["alignment"] = align
        report["mean"].update(align["mean"])
        for cls, vals in align.items():
            if cls in report["per_class"]:
                report["per_class"][cls].update(vals)
    return report


def evaluate(
    cfg: Config | None,
    checkpoint: str | Path | None,
    datasets: list[str] | None = None,
    model=None,
) -> dict:
    """Evaluate on the target datasets: ``{target_spec: {"per_class": {...}, "mean": {...}}}``.

    ``cfg`` may be None to take the config stored with ``checkpoint``; ``datasets``
    overrides ``cfg.data.targets``.
    """
    from .data import open_dataset

    if cfg is None:
        if checkpoint is None:
            raise ValueError("evaluate needs a config or a checkpoint")
        cfg = config_from_checkpoint(checkpoint)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    if model is None:
        model = build_model(cfg, device)
        if checkpoint is not None:
            load_head(model, checkpoint)
    features = FeatureSource(cfg, model, device)
    out = {}
    for spec in datasets or cfg.data.targets:
        ds = open_dataset(
            spec,
            split="test",
            image_size=image_size_of(cfg),
            skip_bad_files=cfg.data.skip_bad_files,
            max_per_class=cfg.data.max_per_class,
            allow_outside_root=cfg.data.allow_paths_outside_root,
        )
        out[spec] = evaluate_dataset(cfg, model, with_backbone_sizes(ds, model), device, features)
    return out


def _check_finite_output(out, paths: list[Path], checkpoint) -> None:
    """NaN / infinite scores or maps are an error (``nan >= t`` is False: it would read as 'normal')."""
    score = out.score.float().reshape(len(paths), -1)
    amap = out.anomaly_map.float().reshape(len(paths), -1)
    bad = ~(torch.isfinite(score).all(1) & torch.isfinite(amap).all(1))
    if bool(bad.any()):
        first = paths[int(bad.nonzero()[0])]
        raise NonFiniteOutputError(f"non-finite anomaly score or map for {first} ({int(bad.sum())} of {len(paths)} "
                                   f"image(s) in this batch) with checkpoint {checkpoint}: no label is given")


@torch.no_grad()
def predict_paths(cfg: Config, checkpoint: str | Path | None, paths: list[Path], class_name: str, model=None) -> list[dict]:
    """Score image files: ``[{path, score, map (HxW numpy at the model's input size)}]``."""
    from .data.base import load_image_sizes

    device = resolve_device(cfg.train.device)
    if model is None:
        model = build_model(cfg, device)
        if checkpoint is not None:
            load_head(model, checkpoint)
    model.head.eval()
    features = FeatureSource(cfg, model, device)
    size = image_size_of(cfg)
    results = []
    bs = cfg.train.eval_batch_size
    for start in range(0, len(paths), bs):
        chunk = paths[start : start + bs]
        dino_size = int(getattr(model.backbones, "dino_image_size", 0) or 0)
        sizes = [size, dino_size] if dino_size and dino_size != size else [size]
        loaded = [load_image_sizes(p, sizes) for p in chunk]  # one decode, each size from the original
        images = torch.stack([x[0] for x in loaded]).to(device)
        images_dino = torch.stack([x[1] for x in loaded]).to(device) if len(sizes) == 2 else None
        feats = features(images, images_dino)
        with _autocast(device, cfg.model.bf16):
            out = model.head(feats, [class_name] * len(chunk), size)
        _check_finite_output(out, chunk, checkpoint)
        for i, p in enumerate(chunk):
            results.append(
                {
                    "path": str(p),
                    "score": float(out.score[i].float()),
                    "map": out.anomaly_map[i].float().cpu().numpy(),
                    "image": images[i].cpu(),
                }
            )
    return results
