"""Frozen backbones built on first need: the text tower now, the vision towers at a cache miss.

A trial that reads every feature from ``FeatureCache`` never runs the CLIP visual tower or
DINO; it only needs the CLIP text tower (the prompts go through it at every step). With
``LazyBackbones`` such a trial builds and reads the text tower alone:

* CLIP from a checkpoint file (an open_clip tag resolved to a file, a local ``.pt`` /
  ``.bin`` / ``.safetensors`` state dict, or ``clip_model="tiny"`` with a file): the CLIP
  model is constructed on the ``meta`` device (no memory, no init), only its text modules
  are materialised on the CPU, and only the non-``visual.*`` entries of the checkpoint are
  read (``torch.load(mmap=True)`` touches the pages it copies; safetensors reads the named
  tensors). They go through open_clip's text position-embedding resize, as in
  ``open_clip.load_checkpoint``, and are copied into fp32 parameters: the text tower holds
  the same values as the one ``Backbones`` builds, so the head's outputs are identical.
* Random weights (``clip_pretrained=""``), open_clip model folders / ``hf-hub:`` repos and
  any checkpoint this path cannot read: the whole CLIP is built as ``Backbones`` builds it
  (random init draws the text weights after the visual ones from one seeded stream, so the
  visual tower must be constructed for the text weights to match) and its visual tower is
  dropped. DINO is still deferred.
* DINO: only its config is read (registry or ``config.json``): width, depth, patch.

The real ``Backbones`` (built by the same code as an eager model, so its features are
identical) is constructed on the first forward, the first ``spec()`` or the first access
to a vision attribute (``clip``, ``dino``, ``clip_model``). ``built`` says whether it was.

``spec_token(backbones)`` is a cheap identity of everything the features depend on that
can be computed without building the vision towers (backbone config keys, the weights
files' identity: real path, size, mtime_ns, inode; the source of ``ssvp/backbones.py``;
the effective bf16). ``FeatureCache`` maps it to the full spec hash (with weight
fingerprints) the first time the towers are built, and later opens the same folder from
the token alone.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import backbones as _bb
from .backbones import Backbones, TextEncoder

__all__ = ["LazyBackbones", "spec_token", "HEAD_ONLY_KEYS", "KEEP_TEXT_ENV"]

# model config keys that only the trainable head reads: they never change the frozen features
HEAD_ONLY_KEYS = frozenset({
    "n_ctx_bg", "n_ctx_state", "n_prompts", "latent_dim", "n_latent_tokens", "attn_heads", "tau",
    "alpha_init", "gamma", "xi", "beta", "lambda1", "lambda2", "focal_lambda", "vcpg", "vtam",
    "s_local", "s_local_kernel", "s_global", "l_seg_on", "ln_eq4_eq11", "l_class_sigma",
    "vae_reduction", "z_infer", "z_seed",
})
_TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
_WEIGHT_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".txt", ".model")


class _TextTower(nn.Module):
    """The text parts of an open_clip ``CLIP`` under the same attribute names (what ``TextEncoder`` reads)."""


def _file_identity(path: str | os.PathLike) -> list:
    """[[real path, size, mtime_ns, inode, device]] of a file, or of the weight/config files of a folder."""
    p = Path(path)
    files = [f for f in sorted(p.iterdir()) if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES)] if p.is_dir() else [p]
    out = []
    for f in files:
        st = os.stat(f)  # follows the hub cache's symlinks to the blobs
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev])
    return out


def _clip_source(model_cfg: Any) -> tuple[str, str | None, bool, str]:
    """(open_clip spec, checkpoint file or None, quick_gelu, kind) without building anything."""
    name, pretrained = model_cfg.clip_model, model_cfg.clip_pretrained
    if not pretrained:
        return name, None, False, "random"
    if name == "tiny":
        return name, str(Path(os.path.expanduser(pretrained))), False, "file"
    spec, checkpoint, quick_gelu = _bb._resolve_clip_source(name, pretrained)
    if spec.startswith("local-dir:"):
        return spec, spec[len("local-dir:"):], False, "folder"
    return spec, checkpoint, quick_gelu, "file"


def _dino_source(model_cfg: Any) -> tuple[str, str]:
    """(weights id, local folder or "") for model.dino_model / dino_weights, as ``build_dino_model`` resolves them."""
    name, weights = model_cfg.dino_model, model_cfg.dino_weights
    if name not in _bb.DINO_REGISTRY:
        raise ValueError(f"model.dino_model={name!r} is unknown; choose one of {', '.join(_bb.DINO_REGISTRY)}")
    spec = _bb.DINO_REGISTRY[name]
    if weights in _bb._DEFAULT_IDS and weights != spec.default_weights:
        weights = spec.default_weights
    if not weights:
        return "", ""
    path = Path(os.path.expanduser(weights))
    if path.is_dir():
        return weights, str(path)
    if _bb._looks_like_path(weights):
        raise _bb._dino_weights_error(name, weights, f"local folder {path} does not exist")
    from huggingface_hub import snapshot_download

    try:  # the hub cache's snapshot folder (no download)
        return weights, snapshot_download(weights, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: no identity (the real build reports it)
        return weights, ""


def _backbone_cfg_items(model_cfg: Any) -> dict:
    if dataclasses.is_dataclass(model_cfg):
        items = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg)}
    else:
        items = dict(vars(model_cfg))
    return {k: v for k, v in sorted(items.items()) if k not in HEAD_ONLY_KEYS and not k.startswith("_")}


def _code_identity() -> str:
    return hashlib.sha256(Path(_bb.__file__).read_bytes()).hexdigest()[:16]


def spec_token(backbones: Any) -> dict | None:
    """Identity of the frozen features computable without the vision towers, or None when the
    weights cannot be located without building (then the cache falls back to the full spec)."""
    cfg = backbones.model_cfg
    try:
        files = getattr(backbones, "_weight_files", None) or _weight_files(cfg)
    except Exception:  # noqa: BLE001 - unresolvable weights: no token, the full build reports the error
        return None
    if files is None:
        return None
    device = backbones.device
    return {
        "config": _backbone_cfg_items(cfg),
        "files": files,
        "clip_image_size": int(backbones.clip_image_size),
        "dino_image_size": int(backbones.dino_image_size),
        "dino_norm": bool(backbones.dino_norm),
        "grid": int(backbones.grid),
        "bf16": bool(cfg.bf16 and device.type == "cuda"),
        "code": _code_identity(),
    }


def _weight_files(cfg: Any) -> dict | None:
    _spec, checkpoint, _qg, kind = _clip_source(cfg)
    clip = "random" if kind == "random" else _file_identity(checkpoint)
    dino: Any = "none"
    if cfg.fusion != "none":
        weights, folder = _dino_source(cfg)
        if weights and not folder:
            return None
        dino = _file_identity(folder) if folder else "random"
    return {"clip": clip, "dino": dino}


def _read_text_state(path: str) -> dict[str, torch.Tensor]:
    """The non-visual entries of an open_clip state dict file, reading little else."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        out = {}
        with safe_open(path, framework="pt", device="cpu") as fh:
            for key in fh.keys():
                k = key[7:] if key.startswith("module.") else key
                if not k.startswith("visual."):
                    out[k] = fh.get_tensor(key)
        return out
    if path.endswith((".npz", ".npy")):
        raise ValueError("big_vision checkpoints go through the full build")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{path} holds no state dict")
    if next(iter(sd)).startswith("module"):
        sd = {k[7:]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.startswith("visual.")}


def _meta_clip(model_cfg: Any, spec: str, quick_gelu: bool, grid: int):
    import open_clip
    from open_clip.model import CLIP

    with _bb._seeded_init(), torch.device("meta"):  # meta init draws nothing; the fork keeps the caller's RNG anyway
        if spec == "tiny":
            model = CLIP(**_bb.tiny_clip_config(grid))
            tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
            return model, tokenizer, 14
        patch = _bb._clip_patch_size(spec)
        model = open_clip.create_model(
            spec, pretrained=None, force_image_size=patch * grid, force_quick_gelu=quick_gelu, device=torch.device("meta")
        )
    if not isinstance(model, CLIP):
        raise ValueError(f"model.clip_model={spec!r} builds {type(model).__name__}; only open_clip CLIP models are supported")
    try:
        tokenizer = open_clip.get_tokenizer(spec)
    except Exception:  # noqa: BLE001 - same fallback as build_clip
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
    return model, tokenizer, patch


def _text_from_checkpoint(model_cfg: Any, spec: str, checkpoint: str, quick_gelu: bool, grid: int, timings: dict):
    """(text tower, tokenizer, meta visual) with only the text weights read; raises when unsupported."""
    from open_clip.factory import resize_text_pos_embed

    clip, tokenizer, _patch = _meta_clip(model_cfg, spec, quick_gelu, grid)
    if getattr(clip, "attn_mask", None) is None:
        raise ValueError("non-causal text tower")
    t = time.perf_counter()
    sd = _read_text_state(checkpoint)
    sd.pop("logit_scale", None)
    sd.pop("logit_bias", None)
    sd.pop("attn_mask", None)
    if "positional_embedding" not in sd:
        raise ValueError("not an open_clip-format text state dict")
    resize_text_pos_embed(sd, clip)
    tower = _TextTower()
    for name in _TEXT_PARTS:
        part = getattr(clip, name)
        if isinstance(part, nn.Parameter):
            setattr(tower, name, nn.Parameter(torch.empty(part.shape, dtype=part.dtype, device="cpu"), requires_grad=False))
        elif isinstance(part, nn.Module):
            setattr(tower, name, part.to_empty(device="cpu"))
        else:
            raise ValueError(f"unexpected CLIP text part {name}: {type(part).__name__}")
    # load_state_dict copies (and casts fp16 files to the fp32 parameters), as open_clip's loader does
    tower.load_state_dict(sd, strict=True)
    timings["weights_read_s"] = time.perf_counter() - t
    n = clip.positional_embedding.shape[0]
    tower.register_buffer("attn_mask", torch.empty(n, n).fill_(float("-inf")).triu_(1), persistent=False)
    return tower, tokenizer, clip.visual


def _text_from_full_build(model_cfg: Any, grid: int, timings: dict):
    """The whole CLIP as ``Backbones`` builds it; keep the text parts, return the visual for its metadata."""
    t = time.perf_counter()
    clip, tokenizer, _patch, _identity = _bb.build_clip(model_cfg.clip_model, model_cfg.clip_pretrained, grid)
    timings["weights_read_s"] = time.perf_counter() - t  # construction and read are one call here
    tower = _TextTower()
    for name in _TEXT_PARTS:
        setattr(tower, name, getattr(clip, name))
    tower.register_buffer("attn_mask", clip.attn_mask, persistent=False)
    return tower, tokenizer, clip.visual


def _build_text_parts(model_cfg: Any, g: int, timings: dict):
    """(frozen text tower on the CPU, tokenizer, visual metadata, how the text tower was obtained)."""
    spec, checkpoint, quick_gelu, kind = _clip_source(model_cfg)
    built = None
    if kind == "file":
        try:
            built = _text_from_checkpoint(model_cfg, spec, checkpoint, quick_gelu, g, timings)
            source = "checkpoint (text entries only)"
        except Exception as exc:  # noqa: BLE001 - anything unusual: the full build (reports real errors)
            source = f"full CLIP build ({type(exc).__name__}: {exc})"
    else:
        source = f"full CLIP build ({kind} weights)"
    if built is None:
        built = _text_from_full_build(model_cfg, g, timings)
    tower, tokenizer, visual = built
    _bb._freeze(tower)
    vmeta = {
        "depth": len(visual.transformer.resblocks),
        "dim": int(visual.proj.shape[1] if visual.proj is not None else visual.transformer.width),
        "image_size": int(visual.image_size[0]),
        "grid": int(visual.grid_size[0]),
    }
    return tower, tokenizer, vmeta, source


# KEEP_TEXT_ENV=1: a process that runs several trials (tuning's reused trial processes) keeps one
# CPU master copy of the last text tower it built and hands each new model a copy of it
KEEP_TEXT_ENV = "SSVP_KEEP_TEXT_TOWER"
_KEPT_TEXT: dict[str, tuple] = {}


def _text_parts(model_cfg: Any, g: int, timings: dict):
    """``_build_text_parts``, or a copy of the text tower this process already built (``KEEP_TEXT_ENV``).

    The key holds every backbone config key and the weight files' identity (path, size, mtime,
    inode), so a changed file or setting builds anew; the copy holds the same tensors bit for bit.
    """
    if os.environ.get(KEEP_TEXT_ENV, "0").strip() in ("", "0"):
        return _build_text_parts(model_cfg, g, timings)
    try:
        files = _weight_files(model_cfg)
    except Exception:  # noqa: BLE001 - unresolvable weights: build (which reports the error)
        files = None
    if files is None:
        return _build_text_parts(model_cfg, g, timings)
    key = json.dumps([_backbone_cfg_items(model_cfg), files["clip"], g], sort_keys=True, default=str)
    if key in _KEPT_TEXT:
        tower, tokenizer, vmeta, source = _KEPT_TEXT[key]
        timings["weights_read_s"] = 0.0
        source = f"{source}, kept in this process"
    else:
        _KEPT_TEXT.clear()  # one model at a time: the previous trial's master copy goes
        tower, tokenizer, vmeta, source = _KEPT_TEXT[key] = _build_text_parts(model_cfg, g, timings)
    t = time.perf_counter()
    tower = copy.deepcopy(tower)  # the trial may move its copy to a GPU; the master stays on the CPU
    timings["text_copy_s"] = time.perf_counter() - t
    return tower, tokenizer, dict(vmeta), source


class LazyBackbones(nn.Module):
    """``Backbones`` whose vision towers are built on first need (see the module docstring).

    Same attributes as ``Backbones`` for what the head and the feature cache read
    (``text``, ``clip_dim``, ``dino_dim``, ``grid``, image sizes, ``device``); a forward,
    ``spec()`` or any vision attribute builds the real ``Backbones`` once (``built``).
    """

    def __init__(self, model_cfg: Any, device: str | torch.device | None = None,
                 factory: Callable[[torch.device], Backbones] | None = None):
        super().__init__()
        t0 = time.perf_counter()
        self.model_cfg = model_cfg
        g = int(model_cfg.grid)
        self.grid = g
        self.bf16 = bool(model_cfg.bf16)
        self.dino_norm = True  # as Backbones(model_cfg) builds it
        self.timings: dict[str, float] = {}
        object.__setattr__(self, "_factory", factory or (lambda dev: Backbones(model_cfg, device=dev)))
        object.__setattr__(self, "_real", None)
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)

        tower, tokenizer, vmeta, self.text_source = _text_parts(model_cfg, g, self.timings)
        self.text_model = tower
        self.text = TextEncoder(tower, tokenizer, autocast=self._autocast)
        self.text_width = self.text.width

        # vision metadata from the (meta or dropped) visual tower and the DINO config
        self.clip_taps = _bb._check_taps("clip_layers", model_cfg.clip_layers, vmeta["depth"])
        self.clip_dim = vmeta["dim"]
        self.clip_image_size = vmeta["image_size"]
        if vmeta["grid"] != g:
            raise _bb.GridMismatchError(f"CLIP builds a {vmeta['grid']}x{vmeta['grid']} grid, model.grid is {g}")
        self.use_dino = model_cfg.fusion != "none"
        if self.use_dino:
            dspec = _bb.DINO_REGISTRY.get(model_cfg.dino_model)
            weights, folder = _dino_source(model_cfg)
            if folder:
                config_cls, _model_cls, _type = _bb._dino_classes(dspec.family)
                dcfg = config_cls.from_pretrained(folder)
                hidden, layers = int(dcfg.hidden_size), int(dcfg.num_hidden_layers)
            elif not weights:
                hidden, layers = int(dspec.arch["hidden_size"]), int(dspec.arch["num_hidden_layers"])
            else:  # hub id not in the local cache: build now, which raises the weights error
                self._ensure()
                hidden, layers = self._real.dino_dim, len(self._real.dino._layers())
            self.dino_taps = _bb._check_taps("dino_layers", _bb.dino_tap_indices(model_cfg, layers), layers)
            self.dino_dim = hidden
            self.dino_image_size = dspec.patch * g
        else:
            self.dino_taps = []
            self.dino_dim = 0
            self.dino_image_size = 0
        try:
            object.__setattr__(self, "_weight_files", _weight_files(model_cfg))
        except Exception:  # noqa: BLE001
            object.__setattr__(self, "_weight_files", None)
        _bb._freeze(self)
        if device is not None:
            self.to(device)
        self.timings["build_s"] = time.perf_counter() - t0

    # ----- state -----
    @property
    def built(self) -> bool:
        return self._real is not None

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    def train(self, mode: bool = True) -> "LazyBackbones":
        return super().train(False)

    def _autocast(self):
        if self.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def tap_counts(self) -> tuple[int, int]:
        return len(self.clip_taps), len(self.dino_taps)

    def _ensure(self) -> Backbones:
        if self._real is None:
            t = time.perf_counter()
            real = self._factory(self.device)
            real.train(False)
            self.real = real  # registered from now on: moves with .to()
            object.__setattr__(self, "_real", real)
            self.timings["vision_build_s"] = time.perf_counter() - t
        return self._real

    @property
    def forward_calls(self) -> int:
        return self._real.forward_calls if self._real is not None else 0

    def spec(self) -> dict[str, Any]:
        return self._ensure().spec()

    @torch.no_grad()
    def forward(self, images: torch.Tensor, images_dino: torch.Tensor | None = None):
        return self._ensure()(images, images_dino)

    def __getattr__(self, name: str):
        if name in ("clip", "dino", "clip_model", "clip_identity", "dino_identity"):
            return getattr(self._ensure(), name)
        return super().__getattr__(name)
