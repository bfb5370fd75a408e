"""Frozen-feature cache: compute the tapped CLIP and DINO tokens of an image once, read them after.

Both backbones are frozen, so every trial and epoch of a sweep sees the same features for
the same image. ``FeatureCache`` stores them on disk, content-addressed:

    root/<spec_hash>/spec.json                 what the features depend on (readable)
    root/<spec_hash>/<key[:2]>/<key>.npy       one flat array per image (fp16 by default)

* ``spec_hash`` = sha256 of a canonical JSON of ``Backbones.spec()`` (backbone names, weights
  identity and a fingerprint of the weights, image sizes, grid, taps, DINO norm, bf16) plus the
  storage format and library versions. Any change gives a new folder: stale features are
  never served.
* ``key`` = sha256 of ``spec_hash``, the image shape and the image's float32 bytes after
  preprocessing (the ``[3, S, S]`` tensor in [0, 1] the model would receive).
* Files are written to a temporary name in the same folder and renamed atomically
  (``os.replace``), so concurrent writers on one node are safe: a reader sees a complete file
  or none. A file that cannot be read is recomputed and replaced.
* Reads are memory-mapped (``np.load(mmap_mode="r")``).

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
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .backbones import BackboneFeatures, Backbones

__all__ = ["FeatureCache", "FeatureCacheError", "PathIndex", "spec_hash_of", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_NAMES = BackboneFeatures.names()
_FP16_MAX = 65504.0


class FeatureCacheError(ValueError):
    """The cache folder is unusable (not writable, spec clash); the message names the path."""


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

    def __init__(self, content_dir: str | os.PathLike):
        self.content_dir = Path(content_dir)
        self.dir = self.content_dir / "paths"

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
        return (self.content_dir / key[:2] / f"{key}.npy").is_file()


class FeatureCache:
    """Disk-backed, content-addressed cache of ``Backbones`` outputs (see the module docstring).

    Args:
        root: cache folder (created). Several specs can share one root.
        backbones: the frozen ``Backbones`` whose features are cached.
        model_cfg: optional; only used to check it matches ``backbones`` (grid, taps).
        dtype: storage dtype, ``"float16"`` (default) or ``"float32"`` (bit-exact). Images whose
            features overflow fp16 are stored in fp32.
    """

    def __init__(self, root: str | os.PathLike, backbones: Backbones, model_cfg: Any = None, dtype: str = "float16"):
        if dtype not in ("float16", "float32"):
            raise FeatureCacheError(f"FeatureCache dtype must be float16 or float32, got {dtype!r}")
        if model_cfg is not None:
            for key in ("grid", "clip_model", "clip_pretrained", "clip_layers", "dino_model", "dino_weights", "dino_layers", "fusion"):
                if getattr(model_cfg, key) != getattr(backbones.model_cfg, key):
                    raise FeatureCacheError(
                        f"FeatureCache: model.{key}={getattr(model_cfg, key)!r} differs from the backbones' "
                        f"{getattr(backbones.model_cfg, key)!r}"
                    )
        self.backbones = backbones
        self.dtype = np.dtype(dtype)
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
        sizes = [int(np.prod(s)) for s in self.shapes.values()]
        self._offsets = np.cumsum([0, *sizes]).tolist()
        self.hits = 0
        self.misses = 0
        self.paths = PathIndex(self.dir)

    # ----- spec and its alias -----
    def _full_spec(self) -> dict[str, Any]:
        return {"backbones": self.backbones.spec(), "format": FORMAT_VERSION, "dtype": str(self.dtype), "versions": _versions()}

    def _alias_path(self, backbones: Backbones, dtype: str) -> Path | None:
        """``root/aliases/<sha256 of the cheap identity>``: holds the full spec hash (None: no identity)."""
        from .lazy_backbones import spec_token

        token = spec_token(backbones)
        if token is None:
            return None
        key = spec_hash_of({"token": token, "format": FORMAT_VERSION, "dtype": dtype, "versions": _versions()})
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
                if json.loads(path.read_text()).get("spec_hash") == self.spec_hash:
                    return
            except (OSError, ValueError):
                pass
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
        return self.dir / key[:2] / f"{key}.npy"

    def __contains__(self, key: str) -> bool:
        return self.path_for(key).is_file()

    # ----- read / write one image -----
    def _pack(self, feats: BackboneFeatures, i: int) -> np.ndarray:
        parts = [getattr(feats, name)[i].detach().float().cpu().reshape(-1).numpy() for name in _NAMES]
        flat = np.concatenate(parts)
        if self.dtype == np.float16 and np.isfinite(flat).all() and np.abs(flat).max(initial=0.0) <= _FP16_MAX:
            return flat.astype(np.float16)
        return flat.astype(np.float32)

    def _store(self, key: str, flat: np.ndarray) -> None:
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save_npy(path, flat)

    def _load(self, key: str) -> list[np.ndarray] | None:
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            flat = np.load(path, mmap_mode="r", allow_pickle=False)
            if flat.ndim != 1 or flat.shape[0] != self._offsets[-1]:
                return None
        except (OSError, ValueError):
            return None  # truncated or foreign file: recompute and replace
        o = self._offsets
        return [flat[o[j] : o[j + 1]].reshape(self.shapes[name]) for j, name in enumerate(_NAMES)]

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

    def get_keyed(self, keys: Sequence[str], images_for) -> BackboneFeatures:
        """Features for content ``keys``; a batch of hits needs no image at all.

        ``images_for(indices)`` is called once, for the misses only, and returns
        ``(images [len(indices), 3, S, S], their content keys)``; the keys it returns are
        the ones stored (a caller that decodes a file again may find a different content).
        """
        keys = list(keys)
        loaded = [self._load(k) for k in keys]
        miss = [i for i, item in enumerate(loaded) if item is None]
        self.hits += len(keys) - len(miss)
        self.misses += len(miss)
        if miss:
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
                flat = self._pack(fresh, j)
                self._store(keys[i], flat)
                o = self._offsets
                loaded[i] = [flat[o[t] : o[t + 1]].reshape(self.shapes[n]) for t, n in enumerate(_NAMES)]
        device = self.backbones.device
        out = []
        for t, name in enumerate(_NAMES):
            stacked = np.stack([np.asarray(item[t]) for item in loaded])
            # copy in the stored dtype (half the bytes for fp16), widen on the device
            out.append(torch.from_numpy(stacked).to(device).to(torch.float32))
        return BackboneFeatures(*out)

    def warm(self, batches: Iterable[torch.Tensor]) -> int:
        """Fill the cache from an iterable of image batches; returns the number of images computed."""
        before = self.misses
        for images in batches:
            self.get_batch(images)
        return self.misses - before

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob("*/*.npy"))

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.dir)!r}, hits={self.hits}, misses={self.misses})"
