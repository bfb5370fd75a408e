"""Frozen-feature cache: compute the tapped CLIP and DINO tokens of an image once, read them after.

Both backbones are frozen, so every trial and epoch of a sweep sees the same features for
the same image. ``FeatureCache`` stores them on disk, content-addressed:

    root/<spec_hash>/spec.json                 what the features depend on (readable)
    root/<spec_hash>/<key[:2]>/<key>.npy       one flat array per image (float16 / float32)
    root/<spec_hash>/<key[:2]>/<key>.q8        int8: header, float32 scales, int8 values

* ``spec_hash`` = sha256 of a canonical JSON of ``Backbones.spec()`` (backbone names, weights
  identity and a fingerprint of the weights, image sizes, grid, taps, DINO norm, bf16) plus the
  storage format and library versions. Any change gives a new folder: stale features are
  never served.
* ``key`` = sha256 of ``spec_hash``, the image shape and the image's float32 bytes after
  preprocessing (the ``[3, S, S]`` tensor in [0, 1] the model would receive).
* Files are written to a temporary name in the same folder and renamed atomically
  (``os.replace``), so concurrent writers on one node are safe: a reader sees a complete file
  or none. A file that cannot be read is recomputed and replaced.
* Storage formats (``DTYPES``): ``float16``, ``float32`` (bit-exact) and ``int8``: each token's
  values (a row of the last axis: one patch token of one tapped layer, or a global token) are
  stored as ``round(x / s)`` in [-127, 127] with ``s = absmax / 127`` kept as float32 in the same
  file (error <= s / 2 per value). The ``.q8`` file is a 64-byte header (magic, counts, crc32 of
  the counts and scales), the scales, then the values; its exact size is checked, so a truncated
  file, a file without its scales, wrong scales or another format's file are refused by name.
  The format (and for int8 the scale rule) is part of ``spec_hash``: formats never share a folder.
* Reads: one file per image is read with ``readinto`` straight into a batch buffer (pinned when
  the device is CUDA), copied to the device in the stored dtype and widened (int8: scaled)
  there. A file that exists but is unreadable is recomputed and replaced, with a warning naming
  it; without an image to recompute from, ``FeatureCacheError`` names it. A ``spec.json`` of
  another cache found under this cache's folder name raises ``FeatureCacheError``.

``get_batch(images)`` returns ``BackboneFeatures`` like ``Backbones(images)``: hits are read,
misses are computed in one backbone call and stored. ``get_keyed(keys, images_for)`` does the
same from content keys alone and asks for images only for misses.

Path index (``root/<spec_hash>/paths/``): lets a reader skip decoding an image file whose
content key is already known. The caller builds a token from everything the preprocessed
image depends on (real path, size, mtime_ns, ctime_ns, inode, target size and an identity of
the decoding code); ``PathIndex`` maps sha256(token) to the content key. A rewritten file
changes its mtime/ctime/size, so its token misses and the image is decoded and hashed again:
the content key, not the path, stays the authority, and stale features are never served.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .backbones import BackboneFeatures, Backbones

__all__ = ["FeatureCache", "FeatureCacheError", "PathIndex", "spec_hash_of", "FORMAT_VERSION", "DTYPES",
           "DEFAULT_DTYPE", "quantize_rows", "dequantize_rows"]

log = logging.getLogger("ssvp.features")

FORMAT_VERSION = 1
DTYPES = ("int8", "float16", "float32")  # storage formats (FeatureCache's dtype)
# threads that read one batch's files at once (each copy out of the page cache releases the GIL);
# SSVP_CACHE_READ_THREADS=1 reads them one after another
READ_THREADS = max(1, int(os.environ.get("SSVP_CACHE_READ_THREADS", min(4, os.cpu_count() or 1))))
DEFAULT_DTYPE = "float16"  # what a trial uses unless train.feature_cache_dtype / SSVP_FEATURE_CACHE_DTYPE say otherwise
SUFFIXES = {"int8": ".q8", "float16": ".npy", "float32": ".npy"}
INT8_SCALE = "absmax per token (per row of the last axis), float32, symmetric [-127, 127]"
_NAMES = BackboneFeatures.names()
_FP16_MAX = 65504.0
_TORCH_DTYPES = {"int8": torch.int8, "float16": torch.float16, "float32": torch.float32}
_Q8_MAGIC = b"SSVP-Q8\x01"
_Q8_HEAD = struct.Struct("<8sQQI")  # magic, number of scales, number of values, crc32 of (counts, scales)
_Q8_HEADER_BYTES = 64


class FeatureCacheError(ValueError):
    """The cache folder or a feature file is unusable (not writable, spec clash, unreadable file
    with no image to recompute it from); the message names the path."""


class _BadFile(Exception):
    """A feature file that exists but cannot be what this cache stores (the message says why)."""


@dataclass
class _Layout:
    """Where each part of ``BackboneFeatures`` lies in one image's flat values and scales."""

    shapes: dict[str, tuple[int, ...]]
    value_offsets: list[int] = field(init=False)
    scale_offsets: list[int] = field(init=False)

    def __post_init__(self):
        shapes = [self.shapes[n] for n in _NAMES]
        self.value_offsets = np.cumsum([0, *(int(np.prod(s)) for s in shapes)]).tolist()
        self.scale_offsets = np.cumsum([0, *(int(np.prod(s[:-1])) for s in shapes)]).tolist()

    @property
    def n_values(self) -> int:
        return self.value_offsets[-1]

    @property
    def n_scales(self) -> int:
        return self.scale_offsets[-1]


@dataclass
class _Batch:
    """One batch as stored: ``values`` [B, V] in the storage dtype (int8: plus ``scales`` [B, S]);
    ``odd``: rows kept apart as float32 flats (fp32 images of an fp16 cache); ``missing``: rows
    with no readable file (``bad``: row -> why the file was refused, naming it)."""

    values: torch.Tensor
    scales: torch.Tensor | None
    odd: dict[int, np.ndarray] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)
    bad: dict[int, str] = field(default_factory=dict)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x`` [R, C] float -> (``q`` int8 [R, C], ``scale`` float32 [R]) with ``scale = absmax / 127``
    per row, so that ``|x - q * scale| <= scale / 2`` (round to nearest, never clipped)."""
    x = np.asarray(x, dtype=np.float32)
    amax = np.abs(x).max(axis=1, initial=0.0)
    scale = (amax / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of ``quantize_rows`` (float32), as the reader computes it."""
    return q.astype(np.float32) * scale[:, None]


def quantize_parts(parts: list[np.ndarray], layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """The flat float32 parts of one image -> (scales float32 [S], values int8 [V])."""
    scales, values = [], []
    for flat, name in zip(parts, _NAMES):
        shape = layout.shapes[name]
        q, s = quantize_rows(flat.reshape(-1, shape[-1]) if shape[-1] else np.zeros((int(np.prod(shape[:-1])), 0)))
        scales.append(s)
        values.append(q.reshape(-1))
    return np.concatenate(scales).astype(np.float32), np.concatenate(values).astype(np.int8)


def _q8_header(scales: np.ndarray, n_values: int) -> bytes:
    crc = zlib.crc32(struct.pack("<QQ", scales.size, n_values) + scales.tobytes())
    return _Q8_HEAD.pack(_Q8_MAGIC, scales.size, n_values, crc).ljust(_Q8_HEADER_BYTES, b"\0")


def _check_q8_header(head: bytes, scales: np.ndarray, layout: _Layout, size: int) -> None:
    magic, n_scales, n_values, crc = _Q8_HEAD.unpack_from(head)
    if magic != _Q8_MAGIC:
        raise _BadFile(f"not an int8 feature file (magic {magic!r})")
    if (n_scales, n_values) != (layout.n_scales, layout.n_values):
        raise _BadFile(f"{n_scales} scales / {n_values} values, this cache stores {layout.n_scales} / {layout.n_values}")
    expected = _Q8_HEADER_BYTES + 4 * n_scales + n_values
    if size != expected:
        raise _BadFile(f"{size} bytes, expected {expected} (truncated or extended)")
    if zlib.crc32(struct.pack("<QQ", n_scales, n_values) + scales.tobytes()) != crc:
        raise _BadFile("its scales do not match their checksum (corrupt)")


def _npy_header(fh, n_values: int) -> tuple[np.dtype, int]:
    """Dtype and data offset of a ``.npy`` file holding a flat array of ``n_values``."""
    try:
        version = np.lib.format.read_magic(fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(fh)
    except (ValueError, OSError, EOFError) as exc:
        raise _BadFile(f"not a .npy file ({exc})") from exc
    if shape != (n_values,) or fortran:
        raise _BadFile(f"holds an array of shape {shape}, this cache stores ({n_values},)")
    return np.dtype(dtype), fh.tell()


def _open_ahead(path: Path):
    """``path`` opened unbuffered with its whole content requested from the disk
    (``POSIX_FADV_WILLNEED``: asynchronous readahead, so a batch's files are read concurrently);
    None when it does not exist, the ``OSError`` when it cannot be opened."""
    try:
        fh = open(path, "rb", buffering=0)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return exc
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # a hint only
    return fh


def _read_exact(fh, n: int) -> bytes:
    data = fh.read(n)
    if data is None or len(data) != n:
        raise _BadFile(f"ends after {0 if not data else len(data)} of {n} header bytes (truncated)")
    return data


def _read_exact_into(fh, array: np.ndarray, what: str) -> None:
    """``readinto`` straight into ``array``'s memory (no intermediate copy)."""
    view = memoryview(array).cast("B")
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            raise _BadFile(f"ends after {got} of {len(view)} bytes of {what} (truncated)")
        got += n


def _versions() -> dict[str, str]:
    import open_clip
    import transformers

    return {"torch": torch.__version__.split("+")[0], "open_clip": open_clip.__version__, "transformers": transformers.__version__}


def spec_hash_of(spec: dict[str, Any]) -> str:
    """sha256 of a canonical JSON (sorted keys, no whitespace) of ``spec``."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _atomic_write(path: Path, write: Callable[[Any], None], suffix: str = ".tmp") -> None:
    """Write through ``write(fh)`` into a temp file beside ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda fh: fh.write(data))


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False), suffix=".npy.tmp")


class PathIndex:
    """token (file identity + transform) -> content key; small files, atomic writes, picklable.

    Lives next to the features of one spec (``content_dir``), so ``has_features(key)`` can
    check that the features a token points to are still there.
    """

    def __init__(self, content_dir: str | os.PathLike, suffix: str = ".npy"):
        self.content_dir = Path(content_dir)
        self.dir = self.content_dir / "paths"
        self.suffix = suffix

    def _file(self, token: str) -> Path:
        h = hashlib.sha256(token.encode()).hexdigest()
        return self.dir / h[:2] / h

    def get(self, token: str) -> str | None:
        """The content key recorded for ``token``, or None."""
        try:
            key = self._file(token).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return key if len(key) == 64 and all(c in "0123456789abcdef" for c in key) else None

    def put(self, token: str, key: str) -> None:
        path = self._file(token)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(path, key.encode())

    def has_features(self, key: str) -> bool:
        return (self.content_dir / key[:2] / f"{key}{self.suffix}").is_file()


class FeatureCache:
    """Disk-backed, content-addressed cache of ``Backbones`` outputs (see the module docstring).

    Args:
        root: cache folder (created). Several specs can share one root.
        backbones: the frozen ``Backbones`` whose features are cached.
        model_cfg: optional; only used to check it matches ``backbones`` (grid, taps).
        dtype: storage format (``DTYPES``): ``"float16"`` (default), ``"float32"`` (bit-exact) or
            ``"int8"`` (values with a float32 absmax scale per token, one ``.q8`` file per image:
            a 64-byte header with a checksum of the scales, the scales, the values). Images whose
            features overflow fp16 are stored in fp32.
    """

    def __init__(self, root: str | os.PathLike, backbones: Backbones, model_cfg: Any = None, dtype: str = DEFAULT_DTYPE):
        if dtype not in DTYPES:
            raise FeatureCacheError(f"FeatureCache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if model_cfg is not None:
            for key in ("grid", "clip_model", "clip_pretrained", "clip_layers", "dino_model", "dino_weights", "dino_layers", "fusion"):
                if getattr(model_cfg, key) != getattr(backbones.model_cfg, key):
                    raise FeatureCacheError(
                        f"FeatureCache: model.{key}={getattr(model_cfg, key)!r} differs from the backbones' "
                        f"{getattr(backbones.model_cfg, key)!r}"
                    )
        self.backbones = backbones
        self.dtype = np.dtype(dtype)
        self.suffix = SUFFIXES[dtype]
        self.root = Path(root).expanduser()
        # A lazily built model (ssvp.lazy_backbones) has no vision towers yet: open the folder
        # that its cheap identity (spec_token) was mapped to when the towers were last built.
        self._alias = self._alias_path(backbones, dtype)
        known = self._read_alias() if self._alias is not None and not getattr(backbones, "built", True) else None
        self.verified = known is None  # an alias is checked against the full spec at the first miss
        if known is not None:
            self.spec_hash, self.spec = known
        else:
            self.spec = self._full_spec()
            self.spec_hash = spec_hash_of(self.spec)
        self.dir = self.root / self.spec_hash[:24]
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FeatureCacheError(f"feature cache folder {self.dir} cannot be created: {exc}") from exc
        if not os.access(self.dir, os.W_OK):
            raise FeatureCacheError(f"feature cache folder {self.dir} is not writable")
        self._write_spec()
        if self._alias is not None and known is None:
            self._alias.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write_bytes(self._alias, self.spec_hash.encode())
        bb = backbones
        n = bb.grid * bb.grid
        if hasattr(bb, "tap_counts"):
            n_clip, n_dino = bb.tap_counts()
        else:
            n_clip, n_dino = len(bb.clip.taps), (len(bb.dino.taps) if bb.dino is not None else 0)
        self.shapes = {
            "clip_patch": (n_clip, n, bb.clip_dim),
            "clip_global": (bb.clip_dim,),
            "dino_patch": (n_dino, n, bb.dino_dim) if n_dino else (0, n, 0),
            "dino_global": (bb.dino_dim,),
        }
        self.layout = _Layout(self.shapes)
        self._free: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # batch buffers to reuse
        self._pool = None  # reader threads (``READ_THREADS``), made on the first batch read
        self.hits = 0
        self.misses = 0
        self.paths = PathIndex(self.dir, self.suffix)

    # ----- spec and its alias -----
    def _full_spec(self) -> dict[str, Any]:
        return {"backbones": self.backbones.spec(), **self._format_spec(), "versions": _versions()}

    def _format_spec(self) -> dict[str, Any]:
        """The storage format's part of the spec (fp16/fp32 as before, so their folders keep their names)."""
        spec: dict[str, Any] = {"format": FORMAT_VERSION, "dtype": str(self.dtype)}
        if self.dtype == np.int8:
            spec["int8_scale"] = INT8_SCALE
        return spec

    def _alias_path(self, backbones: Backbones, dtype: str) -> Path | None:
        """``root/aliases/<sha256 of the cheap identity>``: holds the full spec hash (None: no identity)."""
        from .lazy_backbones import spec_token

        token = spec_token(backbones)
        if token is None:
            return None
        fmt = {"format": FORMAT_VERSION, "dtype": dtype, **({"int8_scale": INT8_SCALE} if dtype == "int8" else {})}
        key = spec_hash_of({"token": token, **fmt, "versions": _versions()})
        return self.root / "aliases" / key

    def _read_alias(self) -> tuple[str, dict] | None:
        try:
            spec_hash = self._alias.read_text().strip()
            stored = json.loads((self.root / spec_hash[:24] / "spec.json").read_text())
        except (OSError, ValueError):
            return None
        if stored.pop("spec_hash", None) != spec_hash:
            return None
        return spec_hash, stored

    def _verify(self) -> None:
        """Before the first backbone call of an alias-opened cache: the full spec must hash the same."""
        full = spec_hash_of(self._full_spec())
        if full != self.spec_hash:
            try:
                self._alias.unlink()
            except OSError:
                pass
            raise FeatureCacheError(
                f"feature cache {self.dir}: the backbones' weights no longer match the ones this folder "
                f"was opened for (spec {full[:24]} vs {self.spec_hash[:24]}); the alias {self._alias} was removed, run again"
            )
        self.verified = True

    # ----- keys and paths -----
    def _write_spec(self) -> None:
        path = self.dir / "spec.json"
        text = json.dumps({"spec_hash": self.spec_hash, **self.spec}, indent=2, sort_keys=True, default=str)
        if path.is_file():
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError):
                stored = None  # unreadable: rewritten below
            if isinstance(stored, dict) and stored.get("spec_hash") == self.spec_hash:
                return
            if isinstance(stored, dict) and "spec_hash" in stored:
                raise FeatureCacheError(
                    f"feature cache {path} describes another cache (spec {str(stored['spec_hash'])[:24]}, dtype "
                    f"{stored.get('dtype')!r}) than the {self.dtype} cache this folder name stands for "
                    f"({self.spec_hash[:24]}): the folder was copied or renamed; move it back or delete it"
                )
        _atomic_write_bytes(path, text.encode())

    def key_for(self, image: torch.Tensor, image_dino: torch.Tensor | None = None) -> str:
        """Content key of one preprocessed image ``[3, S, S]`` (float in [0, 1]) under this spec,
        and of its DINO-size input ``image_dino`` (paper §4.2: resized from the original). Without
        ``image_dino`` the DINO branch upsamples ``image``: keyed apart ("dino:from-image")."""
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"FeatureCache.key_for expects one image [3, S, S], got {tuple(image.shape)}")
        arr = image.detach().to("cpu", torch.float32).contiguous().numpy()
        h = hashlib.sha256()
        h.update(self.spec_hash.encode())
        h.update(repr(tuple(arr.shape)).encode())
        h.update(arr.tobytes())
        if image_dino is None:
            h.update(b"dino:from-image")
        else:
            dino = image_dino.detach().to("cpu", torch.float32).contiguous().numpy()
            h.update(b"dino:" + repr(tuple(dino.shape)).encode())
            h.update(dino.tobytes())
        return h.hexdigest()

    def path_for(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}{self.suffix}"

    def __contains__(self, key: str) -> bool:
        return self.path_for(key).is_file()

    # ----- read / write one image -----
    def _flat_parts(self, feats: BackboneFeatures, i: int) -> list[np.ndarray]:
        return [getattr(feats, name)[i].detach().float().cpu().reshape(-1).numpy() for name in _NAMES]

    def _store(self, key: str, feats: BackboneFeatures, i: int, batch: "_Batch", row: int) -> None:
        """Write image ``i`` of ``feats`` under ``key`` and put what a reader would get into ``batch[row]``."""
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        parts = self._flat_parts(feats, i)
        if self.dtype == np.int8:
            flat = np.concatenate(parts)
            if not np.isfinite(flat).all():
                raise FeatureCacheError(f"feature cache: the features of {path.name} are not finite; int8 cannot store them")
            scales, values = quantize_parts(parts, self.layout)
            _atomic_write(path, lambda fh: (fh.write(_q8_header(scales, values.size)), fh.write(scales.tobytes()), fh.write(values.tobytes())),
                          suffix=".q8.tmp")
            batch.scales[row] = torch.from_numpy(scales)
            batch.values[row] = torch.from_numpy(values)
            return
        flat = np.concatenate(parts)
        if self.dtype == np.float16 and not (np.isfinite(flat).all() and np.abs(flat).max(initial=0.0) <= _FP16_MAX):
            flat = flat.astype(np.float32)  # overflows fp16: this image is stored in fp32
        else:
            flat = flat.astype(self.dtype)
        _atomic_save_npy(path, flat)
        if flat.dtype == self.dtype:
            batch.values[row] = torch.from_numpy(flat)
        else:
            batch.odd[row] = flat

    def _read_into(self, fh, batch: "_Batch", row: int) -> bool:
        """Read one open file into ``batch[row]``; ``_BadFile`` when it cannot be what this cache
        stores (truncated, another format or shape, bad header)."""
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if self.dtype == np.int8:
                head = _read_exact(fh, _Q8_HEADER_BYTES)
                scales = batch.scales[row].numpy()
                _read_exact_into(fh, scales, "scales")
                _check_q8_header(head, scales, self.layout, size)
                _read_exact_into(fh, batch.values[row].numpy(), "values")
                return True
            dtype, offset = _npy_header(fh, self.layout.n_values)
            if offset + dtype.itemsize * self.layout.n_values != size:
                raise _BadFile(f"{size} bytes, expected {offset + dtype.itemsize * self.layout.n_values}")
            if dtype == self.dtype:
                _read_exact_into(fh, batch.values[row].numpy(), "values")
            elif dtype == np.float32 and self.dtype == np.float16:
                flat = np.empty(self.layout.n_values, np.float32)
                _read_exact_into(fh, flat, "values")
                batch.odd[row] = flat
            else:
                raise _BadFile(f"holds {dtype}, this cache stores {self.dtype}")
        return True

    # ----- batches -----
    def get_batch(
        self, images: torch.Tensor, keys: Sequence[str] | None = None, images_dino: torch.Tensor | None = None
    ) -> BackboneFeatures:
        """Features of ``images`` [B, 3, S, S] (and their DINO-size inputs ``images_dino``): read hits,
        compute and store misses (one backbone call)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"FeatureCache.get_batch expects images [B, 3, S, S], got {tuple(images.shape)}")
        if keys is None:
            dino = [None] * images.shape[0] if images_dino is None else list(images_dino)
            keys = [self.key_for(img, d) for img, d in zip(images, dino)]
        keys = list(keys)
        if len(keys) != images.shape[0]:
            raise ValueError(f"FeatureCache.get_batch: {len(keys)} keys for {images.shape[0]} images")
        if images_dino is None:
            return self.get_keyed(keys, lambda idx: (images[idx], [keys[i] for i in idx]))
        return self.get_keyed(keys, lambda idx: (images[idx], images_dino[idx], [keys[i] for i in idx]))

    def read(self, keys: Sequence[str]) -> "_Batch":
        """Read the stored features of ``keys`` into one batch buffer (file I/O only: safe in a
        background thread). Files that are absent or unreadable are listed in ``missing`` / ``bad``."""
        batch = self._new_batch(len(keys))
        paths = [self.path_for(key) for key in keys]
        files = [_open_ahead(path) for path in paths]  # every file's read queued before the first is copied

        def read_row(row: int) -> None:
            path, fh = paths[row], files[row]
            try:
                if isinstance(fh, OSError):
                    raise _BadFile(str(fh))
                if fh is None:
                    batch.missing.append(row)
                else:
                    self._read_into(fh, batch, row)
            except _BadFile as exc:
                batch.bad[row] = f"{path}: {exc}"
                batch.missing.append(row)

        if len(keys) > 1 and READ_THREADS > 1:  # the copies out of the page cache release the GIL
            list(self._readers().map(read_row, range(len(keys))))
            batch.missing.sort()
        else:
            for row in range(len(keys)):
                read_row(row)
        return batch

    def _readers(self):
        """The threads that copy a batch's files into its buffer, one row each (made on first use)."""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="ssvp-cache-read")
        return self._pool

    def put(self, keys: Sequence[str], feats: BackboneFeatures) -> None:
        """Store ``feats`` (computed elsewhere by the same backbones) under content ``keys``."""
        batch = self._new_batch(len(keys))
        for i, key in enumerate(keys):
            self._store(key, feats, i, batch, i)

    def _new_batch(self, n: int) -> "_Batch":
        """A batch buffer: a free one of this size when there is one (its pages are mapped already:
        reading into fresh memory pays a page fault per 4 KiB), else a new one (pinned for CUDA)."""
        for i, (values, scales) in enumerate(list(self._free)):
            if values.shape[0] == n:
                del self._free[i]
                return _Batch(values, scales)
        pin = self.backbones.device.type == "cuda" and torch.cuda.is_available()
        values = torch.empty((n, self.layout.n_values), dtype=_TORCH_DTYPES[str(self.dtype)], pin_memory=pin)
        scales = torch.empty((n, self.layout.n_scales), dtype=torch.float32, pin_memory=pin) if self.dtype == np.int8 else None
        return _Batch(values, scales)

    def get_keyed(self, keys: Sequence[str], images_for, prefetched: "_Batch | None" = None,
                  out: BackboneFeatures | None = None) -> BackboneFeatures:
        """Features for content ``keys``; a batch of hits needs no image at all.

        ``images_for(indices)`` is called once, for the misses only, and returns
        ``(images [len(indices), 3, S, S], their content keys)``; the keys it returns are
        the ones stored (a caller that decodes a file again may find a different content).
        A file that is unreadable (truncated, another format) is recomputed and replaced, with a
        warning naming it; with ``images_for=None`` a miss raises ``FeatureCacheError`` instead.
        ``prefetched``: ``read(keys)`` done beforehand (e.g. by a background thread). ``out``: the
        features of an earlier batch that the caller no longer uses: overwritten (when their shapes
        and device fit) instead of allocating (a fresh tensor costs a page fault per 4 KiB on the CPU).
        """
        keys = list(keys)
        batch = prefetched if prefetched is not None else self.read(keys)
        if batch.values.shape[0] != len(keys):
            raise ValueError(f"FeatureCache.get_keyed: a prefetched batch of {batch.values.shape[0]} for {len(keys)} keys")
        miss = batch.missing
        self.hits += len(keys) - len(miss)
        self.misses += len(miss)
        if miss:
            self._fill_misses(keys, miss, batch, images_for)
        features = self._to_features(batch, out)
        self.release(batch)
        return features

    def release(self, batch: "_Batch") -> None:
        """Hand ``batch``'s buffers back for the next :meth:`read` of that size (once its values are
        copied out): a reused buffer's pages are mapped already, so a read costs no page faults."""
        if len(self._free) < 3:  # a batch in use, one read ahead, one spare
            self._free.append((batch.values, batch.scales))

    def _fill_misses(self, keys: list[str], miss: list[int], batch: "_Batch", images_for) -> None:
        if images_for is None:
            what = [batch.bad.get(i) or f"{self.path_for(keys[i])}: missing" for i in miss]
            raise FeatureCacheError("feature cache: no features and no image to compute them for " + "; ".join(what))
        for reason in batch.bad.values():
            log.warning("feature cache: %s; recomputing it", reason)
        got = images_for(miss)  # (images, keys) or (images, images_dino, keys)
        images, miss_keys = got[0], got[-1]
        images_dino = got[1] if len(got) == 3 else None
        if len(miss_keys) != len(miss) or images.shape[0] != len(miss):
            raise ValueError(f"FeatureCache.get_keyed: images_for returned {images.shape[0]} images / {len(miss_keys)} keys for {len(miss)} misses")
        for i, k in zip(miss, miss_keys):
            keys[i] = k
        if not self.verified:
            self._verify()
        fresh = self.backbones(images) if images_dino is None else self.backbones(images, images_dino)
        for j, i in enumerate(miss):
            self._store(keys[i], fresh, j, batch, i)

    def _to_features(self, batch: "_Batch", out: BackboneFeatures | None = None) -> BackboneFeatures:
        """Copy the batch to the device in the stored dtype (int8: a quarter of the bytes) and widen
        there, into new float32 tensors or into ``out``'s. The result never shares the batch buffer."""
        device = self.backbones.device
        values = batch.values.to(device)
        scales = batch.scales.to(device) if batch.scales is not None else None
        n, lay, parts = values.shape[0], self.layout, []
        for j, name in enumerate(_NAMES):
            shape = self.shapes[name]
            dst = getattr(out, name) if out is not None else None
            if dst is None or dst.shape != (n, *shape) or dst.device != device or dst.dtype != torch.float32:
                dst = torch.empty((n, *shape), dtype=torch.float32, device=device)
            dst.copy_(values[:, lay.value_offsets[j] : lay.value_offsets[j + 1]].reshape(n, *shape))
            if scales is not None:
                dst.mul_(scales[:, lay.scale_offsets[j] : lay.scale_offsets[j + 1]].reshape(n, *shape[:-1], 1))
            for row, flat in batch.odd.items():
                dst[row] = torch.from_numpy(flat[lay.value_offsets[j] : lay.value_offsets[j + 1]].reshape(shape)).to(device)
            parts.append(dst)
        return BackboneFeatures(*parts)

    def warm(self, batches: Iterable[torch.Tensor]) -> int:
        """Fill the cache from an iterable of image batches; returns the number of images computed."""
        before = self.misses
        for images in batches:
            self.get_batch(images)
        return self.misses - before

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob(f"*/*{self.suffix}"))

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.dir)!r}, hits={self.hits}, misses={self.misses})"
