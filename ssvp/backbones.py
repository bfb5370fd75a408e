"""Frozen CLIP and DINO encoders on one shared g x g patch grid (Eq. 1, paper §4.2).

``Backbones(model_cfg)`` builds

* CLIP through open_clip (``ViT-L-14`` by default) at ``14 g`` px: the visual tower's
  positional embeddings are built for the g x g grid (pretrained ones are resampled
  bicubically by open_clip's loader). The tapped block outputs (``clip_layers``, 1-based)
  go through ``ln_post`` and the visual projection into the joint image-text space; the
  class token of the last tapped layer is the global token.
* the CLIP text tower as a ``TextEncoder`` (tokenize, token embedding, and
  ``encode_embeddings`` for learnable prompt embeddings; gradients flow to its input).
* DINO through transformers (DINOv3 ViT-L/16 by default, at ``16 g`` px; DINOv2 ViT-L/14 and
  MAE ViT-L/16 as alternatives). The forward stops after the last tapped block (unused
  blocks are dropped at construction). Patch tokens of each tapped block are returned with
  CLS and register tokens removed; the CLS token of the last tapped block is the global token.

Everything is frozen (``requires_grad=False``, always in eval mode). Inputs are
``[B, 3, S, S]`` floats in [0, 1]. Paper §4.2 feeds each backbone its own resolution of the
image (CLIP 518 px, DINO 592 px for g = 37): ``forward(images, images_dino)`` takes the DINO
input separately (the data pipeline resizes both from the original file, see
``AnomalyDataset.with_dino_size``); without ``images_dino`` the DINO branch resizes
``images`` (bilinear, antialiased), which upsamples 518 -> 592 and is only a fallback.
Each branch normalises with its own statistics.

DINO taps: ``model.dino_taps=as_written`` taps ``dino_layers`` (paper: {3, 6, 9, 11}, all in
the first half of the 24-block ViT-L); ``spread`` taps k * depth / L for k = 1..L
(``{6, 12, 18, 24}`` on ViT-L, ``{3, 6, 9, 12}`` on 12-block encoders).

Table 5's DINOv3 "ViT-Small, 29M" is ViT-S+/16 (``dinov3_vits16plus``: gated MLP, 28.7M
parameters); the plain ViT-S/16 (``dinov3_vits16``, 21.6M) is also registered.

Weights: ``clip_pretrained`` is an open_clip tag (``openai``), ``hf-hub:org/repo``, a local
checkpoint file or an open_clip model folder; ``dino_weights`` a Hugging Face id or a local
folder. An empty string means random initialisation (seeded, so every process builds the
same random backbone). Nothing is downloaded when ``HF_HUB_OFFLINE=1``; a missing checkpoint
raises ``BackboneWeightsError`` naming it and saying how to supply it.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BackboneFeatures",
    "Backbones",
    "BackboneWeightsError",
    "GridMismatchError",
    "TextEncoder",
    "ClipVisionEncoder",
    "DinoEncoder",
    "DINO_REGISTRY",
    "build_clip",
    "build_dino_model",
    "dino_tap_indices",
    "tiny_clip_config",
]

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT_SEED = 0  # random-weight backbones are built under this seed (same in every process)


class BackboneWeightsError(ValueError):
    """Backbone weights could not be found or read; the message names them and the remedy."""


class GridMismatchError(ValueError):
    """CLIP and DINO would not produce the same g x g patch grid."""


# --------------------------------------------------------------------------------------
# Output container
# --------------------------------------------------------------------------------------
@dataclass
class BackboneFeatures:
    """Tapped tokens of both backbones on one shared grid (N = grid * grid)."""

    clip_patch: torch.Tensor  # [B, Lc, N, Dc] ln_post + proj, joint space
    clip_global: torch.Tensor  # [B, Dc] class token of the last tapped layer, ln_post + proj
    dino_patch: torch.Tensor  # [B, Ld, N, Dd] (CLS and registers dropped); [B, 0, N, 0] without DINO
    dino_global: torch.Tensor  # [B, Dd] CLS token of the last tapped layer; [B, 0] without DINO

    @property
    def batch_size(self) -> int:
        return self.clip_patch.shape[0]

    @property
    def grid(self) -> int:
        n = self.clip_patch.shape[2]
        g = int(round(n**0.5))
        return g

    def to(self, *args: Any, **kwargs: Any) -> "BackboneFeatures":
        return BackboneFeatures(
            *(getattr(self, name).to(*args, **kwargs) for name in self.names())
        )

    def __getitem__(self, index: Any) -> "BackboneFeatures":
        """Select samples along the batch dimension (int, slice, index tensor)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return BackboneFeatures(*(getattr(self, name)[index] for name in self.names()))

    @staticmethod
    def names() -> tuple[str, str, str, str]:
        return ("clip_patch", "clip_global", "dino_patch", "dino_global")

    @staticmethod
    def cat(items: Sequence["BackboneFeatures"]) -> "BackboneFeatures":
        if not items:
            raise ValueError("BackboneFeatures.cat needs at least one item")
        return BackboneFeatures(
            *(torch.cat([getattr(it, name) for it in items], 0) for name in BackboneFeatures.names())
        )


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=4)
def _hub_reachable(endpoint: str) -> bool:
    """One quick TCP probe of the hub (3 s), so a machine without network fails fast."""
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=3):
            return True
    except OSError:
        return False


def _local_files_only() -> bool:
    """Read the local cache only: HF_HUB_OFFLINE=1, or the hub cannot be reached."""
    if _hub_offline():
        return True
    return not _hub_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


def _looks_like_path(value: str) -> bool:
    return (
        value.startswith(("/", "./", "../", "~", "\\"))
        or (len(value) > 1 and value[1] == ":")  # C:\...
        or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz"))
        or os.path.exists(os.path.expanduser(value))
    )


def _seeded_init(seed: int = RANDOM_INIT_SEED):
    """Random initialisation under a fixed seed without disturbing the caller's RNG."""

    class _Ctx:
        def __enter__(self):
            self._fork = torch.random.fork_rng(devices=[])
            self._fork.__enter__()
            torch.manual_seed(seed)

        def __exit__(self, *exc):
            return self._fork.__exit__(*exc)

    return _Ctx()


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


def _resize_normalise(
    images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    x = images.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def _check_taps(name: str, taps: Sequence[int], depth: int) -> list[int]:
    taps = [int(t) for t in taps]
    if not taps:
        raise ValueError(f"model.{name} is empty; give at least one 1-based block index")
    bad = [t for t in taps if t < 1 or t > depth]
    if bad:
        raise ValueError(f"model.{name}={taps}: block indices {bad} are outside 1..{depth} of this backbone")
    if sorted(taps) != taps or len(set(taps)) != len(taps):
        raise ValueError(f"model.{name}={taps} must be strictly increasing")
    return taps


def dino_tap_indices(model_cfg: Any, depth: int) -> list[int]:
    """The 1-based DINO blocks to tap: ``dino_layers`` as written, or spread over ``depth``."""
    layers = [int(t) for t in model_cfg.dino_layers]
    if getattr(model_cfg, "dino_taps", "as_written") == "spread":
        n = len(layers)
        return [max(1, round(k * depth / n)) for k in range(1, n + 1)]
    return layers


def weights_fingerprint(module: nn.Module) -> str:
    """A cheap content fingerprint of a module's weights (names, shapes, sums, leading values)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(module.state_dict().items()):
            if not torch.is_tensor(t) or not t.is_floating_point():
                continue
            flat = t.detach().reshape(-1)
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(repr(float(flat.double().sum())).encode())
            h.update(flat[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------
# CLIP (open_clip)
# --------------------------------------------------------------------------------------
def tiny_clip_config(grid: int) -> dict[str, Any]:
    """A small open_clip CLIP config of the real architecture (seconds on a CPU)."""
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 14 * grid, "patch_size": 14, "width": 64, "layers": 4, "head_width": 32},
        # vocab_size stays 49408 so open_clip's BPE tokenizer works unchanged.
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 4},
    }


def _clip_weights_error(model_name: str, pretrained: str, reason: str) -> BackboneWeightsError:
    return BackboneWeightsError(
        f"CLIP weights {pretrained!r} for model {model_name!r} could not be loaded: {reason}. "
        "Supply them by (a) downloading once with network access, e.g. "
        f"`python -c \"import open_clip; open_clip.create_model({model_name!r}, pretrained={pretrained!r})\"` "
        "(then HF_HUB_OFFLINE=1 reads the cache), or (b) setting model.clip_pretrained to a local "
        "checkpoint file or open_clip model folder, or (c) model.clip_pretrained='' for random weights."
    )


def _hf_download(repo_id: str, filenames: Sequence[str]) -> str:
    """The first of ``filenames`` found in ``repo_id`` (cache only when HF_HUB_OFFLINE)."""
    from huggingface_hub import hf_hub_download

    last: Exception | None = None
    for filename in filenames:
        try:
            return hf_hub_download(repo_id=repo_id, filename=filename, local_files_only=_local_files_only())
        except Exception as exc:  # noqa: BLE001 - try the next candidate, report the last
            last = exc
    raise FileNotFoundError(f"none of {list(filenames)} found in {repo_id!r}: {type(last).__name__}: {last}")


def _resolve_clip_source(model_name: str, pretrained: str) -> tuple[str, str | None, bool]:
    """(open_clip model name or local-dir: spec, checkpoint path or None, quick_gelu)."""
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    if model_name.startswith("hf-hub:") or pretrained.startswith("hf-hub:"):
        repo = (pretrained if pretrained.startswith("hf-hub:") else model_name)[len("hf-hub:"):].strip("/")
        try:
            cfg_path = _hf_download(repo, ["open_clip_config.json"])
            _hf_download(repo, ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
        except Exception as exc:  # noqa: BLE001
            raise _clip_weights_error(model_name, pretrained or model_name, str(exc)) from exc
        return "local-dir:" + str(Path(cfg_path).parent), None, False
    if not pretrained:
        return model_name, None, False
    path = Path(os.path.expanduser(pretrained))
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise _clip_weights_error(model_name, pretrained, f"folder {path} has no open_clip_config.json")
        return "local-dir:" + str(path), None, False
    if path.is_file():
        return model_name, str(path), "openai" in path.name.lower()  # OpenAI's own files: _read_clip_file
    if _looks_like_path(pretrained):
        raise _clip_weights_error(model_name, pretrained, f"checkpoint file {path} does not exist")
    pcfg = get_pretrained_cfg(model_name, pretrained)
    if not pcfg:
        tags = list_pretrained_tags_by_model(model_name)
        raise _clip_weights_error(
            model_name, pretrained, f"not a file and not a known open_clip tag (known tags: {', '.join(tags) or 'none'})"
        )
    quick_gelu = bool(pcfg.get("quick_gelu", False))
    try:
        if pcfg.get("hf_hub"):
            # open_clip's convention: 'org/repo/' (default file names) or 'org/repo/file.bin'
            repo, filename = os.path.split(pcfg["hf_hub"])
            names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            return model_name, _hf_download(repo, names), quick_gelu
        url = pcfg.get("url", "")
        target = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if target.is_file():
            return model_name, str(target), quick_gelu
        if _local_files_only():
            raise FileNotFoundError(f"{target} not cached and no network (or HF_HUB_OFFLINE=1)")
        from open_clip.pretrained import download_pretrained_from_url

        return model_name, download_pretrained_from_url(url), quick_gelu
    except Exception as exc:  # noqa: BLE001
        raise _clip_weights_error(model_name, pretrained, str(exc)) from exc


def build_clip(model_name: str, pretrained: str, grid: int) -> tuple[nn.Module, Callable, int, str]:
    """(open_clip CLIP at 14*grid px, tokenizer, patch size, weights identity)."""
    import open_clip
    from open_clip.model import CLIP

    if model_name == "tiny":
        if pretrained:
            model = _load_tiny_clip(pretrained, grid)
        else:
            with _seeded_init():
                model = CLIP(**tiny_clip_config(grid))
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
        patch = 14
    else:
        spec, checkpoint, quick_gelu = _resolve_clip_source(model_name, pretrained)
        patch = _clip_patch_size(spec)
        kwargs: dict[str, Any] = dict(force_image_size=patch * grid, force_quick_gelu=quick_gelu)
        # device: the default device, so `with torch.device("meta"):` builds without memory
        kwargs["device"] = torch.get_default_device()
        loads_weights = checkpoint is not None or spec.startswith("local-dir:")
        try:
            state = None
            if checkpoint is not None:
                state, released = _read_clip_file(checkpoint)
                kwargs["force_quick_gelu"] = quick_gelu or released
            with _seeded_init():
                model = open_clip.create_model(spec, pretrained=None, **kwargs)
            if state is not None:
                _load_clip_state(model, state)
        except Exception as exc:  # noqa: BLE001 - unreadable checkpoint, wrong keys, ...
            if not loads_weights:
                raise
            raise _clip_weights_error(model_name, pretrained, f"{type(exc).__name__}: {exc}") from exc
        try:
            tokenizer = open_clip.get_tokenizer(spec)
        except Exception:  # noqa: BLE001 - fall back to CLIP's BPE at the model's context length
            tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
    if not isinstance(model, CLIP):
        raise ValueError(
            f"model.clip_model={model_name!r} builds {type(model).__name__}; only open_clip CLIP models "
            "with the built-in text transformer are supported"
        )
    identity = f"{model_name}|{pretrained or 'random:seed%d' % RANDOM_INIT_SEED}"
    return model, tokenizer, patch, identity


_OPENAI_META = ("input_resolution", "context_length", "vocab_size")  # scalars in OpenAI's released state dicts


def _read_clip_file(path: str) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict, is OpenAI's own release) of a CLIP checkpoint file.

    OpenAI's released files (``ViT-L-14-336px.pt``, ...) are TorchScript archives in fp16 whose
    state dict holds three scalars beside the weights (``input_resolution``, ``context_length``,
    ``vocab_size``); their models use QuickGELU. A plain state dict (open_clip's ``.bin`` /
    ``.safetensors``, or OpenAI's converted) loads as well: the key layout is the same.
    """
    from open_clip.factory import load_state_dict

    if _is_torchscript(path):
        state = torch.jit.load(path, map_location="cpu").state_dict()
        released = True
    else:
        state = load_state_dict(path, device="cpu")
        released = any(k in state for k in _OPENAI_META)
    # the scalars, and causal masks a traced/scripted model keeps as attributes (open_clip rebuilds them)
    return {k: v for k, v in state.items() if k not in _OPENAI_META and not k.endswith("attn_mask")}, released


def _is_torchscript(path: str) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _load_clip_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """open_clip's loading steps on a state dict read here: third-party layouts converted, the visual
    positional embeddings resampled to this grid (bicubic, in float32; 24 x 24 -> 37 x 37 for the
    336-px model at 518 px), strict."""
    from open_clip.factory import convert_state_dict, resize_pos_embed, resize_text_pos_embed

    state = convert_state_dict(model, state)
    for key in ("visual.positional_embedding", "positional_embedding"):  # OpenAI's are fp16: no bicubic on CPU
        if key in state and state[key].is_floating_point():
            state[key] = state[key].float()
    if "logit_scale" in state and model.logit_scale.ndim != state["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    model.load_state_dict(state, strict=True)


def _clip_patch_size(spec: str) -> int:
    import json

    from open_clip.factory import get_model_config

    if spec.startswith("local-dir:"):
        cfg = json.loads((Path(spec[len("local-dir:"):]) / "open_clip_config.json").read_text())["model_cfg"]
    else:
        cfg = get_model_config(spec.replace("/", "-"))
        if cfg is None:
            raise ValueError(
                f"model.clip_model={spec!r} is not an open_clip model name; use e.g. 'ViT-L-14', 'hf-hub:org/repo' or 'tiny'"
            )
    vision = cfg.get("vision_cfg", {})
    if vision.get("timm_model_name"):
        raise ValueError(f"model.clip_model={spec!r} has a timm vision tower; only open_clip ViTs are supported")
    return int(vision.get("patch_size", 16))


def _load_tiny_clip(path: str, grid: int) -> nn.Module:
    from open_clip.model import CLIP

    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise _clip_weights_error("tiny", path, f"checkpoint file {p} does not exist")
    with _seeded_init():
        model = CLIP(**tiny_clip_config(grid))
    try:
        _load_clip_state(model, _read_clip_file(str(p))[0])  # resamples positional embeddings to this grid
    except Exception as exc:  # noqa: BLE001
        raise _clip_weights_error("tiny", path, f"{type(exc).__name__}: {exc}") from exc
    return model


class ClipVisionEncoder(nn.Module):
    """Tapped CLIP block outputs through ln_post + proj (Eq. 1, CLIP branch)."""

    def __init__(self, visual: nn.Module, taps: Sequence[int]):
        super().__init__()
        self.visual = visual
        depth = len(visual.transformer.resblocks)
        self.taps = _check_taps("clip_layers", taps, depth)
        # Drop blocks after the last tap: they would never run.
        visual.transformer.resblocks = visual.transformer.resblocks[: self.taps[-1]]
        self.grid = visual.grid_size[0]
        self.image_size = visual.image_size[0]
        self.dim = visual.proj.shape[1] if visual.proj is not None else visual.transformer.width

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.visual.ln_post(tokens)
        return tokens @ self.visual.proj if self.visual.proj is not None else tokens

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.visual.forward_intermediates(
            x,
            indices=[t - 1 for t in self.taps],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        patch = torch.stack([self.project(y) for y in out["image_intermediates"]], 1)  # [B, L, N, D]
        cls = self.project(out["image_intermediates_prefix"][-1][:, 0])  # [B, D]
        return patch, cls


class TextEncoder(nn.Module):
    """The frozen CLIP text tower; gradients flow to the prompt embeddings passed in.

    The CLIP modules are held by reference, not registered: a head that stores this
    encoder as a submodule gets no backbone weights in its ``parameters()`` or
    ``state_dict()``. Device moves follow the owning ``Backbones``.
    """

    def __init__(self, clip: nn.Module, tokenizer: Callable, autocast: Callable[[], Any] = nullcontext):
        super().__init__()
        object.__setattr__(self, "_clip", clip)
        object.__setattr__(self, "_tokenizer", tokenizer)
        object.__setattr__(self, "_autocast", autocast)
        self.context_length = int(clip.positional_embedding.shape[0])
        self.width = int(clip.token_embedding.weight.shape[1])
        proj = clip.text_projection
        self.dim = int(proj.shape[1] if isinstance(proj, torch.Tensor) else proj.out_features)
        self.eot_token_id = int(getattr(tokenizer, "eot_token_id", clip.token_embedding.weight.shape[0] - 1))

    @property
    def device(self) -> torch.device:
        return self._clip.token_embedding.weight.device

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """[P, T] token ids (T = context length) on the encoder's device."""
        return self._tokenizer(list(texts)).to(self.device)

    def eot_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Position of the end-of-text token (the largest id, as CLIP pools)."""
        return ids.argmax(dim=-1)

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """[P, T] ids -> [P, T, W] word embeddings (frozen)."""
        return self._clip.token_embedding(ids.to(self.device))

    def encode_embeddings(self, x: torch.Tensor, eot_idx: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings [P, T, W] -> text features [P, D] at the EOT position (not normalised)."""
        clip = self._clip
        if x.dim() != 3 or x.shape[-1] != self.width:
            raise ValueError(f"encode_embeddings: x must be [P, T, {self.width}], got {tuple(x.shape)}")
        T = x.shape[1]
        if T > self.context_length:
            raise ValueError(f"encode_embeddings: {T} tokens exceed the context length {self.context_length}")
        with self._autocast():
            h = x + clip.positional_embedding[:T].to(x.dtype)
            h = clip.transformer(h, attn_mask=clip.attn_mask[:T, :T])  # causal mask
            h = clip.ln_final(h)
            h = h[torch.arange(h.shape[0], device=h.device), eot_idx.to(h.device)]
            proj = clip.text_projection
            h = proj(h) if isinstance(proj, nn.Linear) else h @ proj
        return h.float()

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Convenience: plain prompts -> [P, D] (same as open_clip's encode_text)."""
        ids = self.tokenize(texts)
        return self.encode_embeddings(self.token_embedding(ids), self.eot_index(ids))

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(False)


# --------------------------------------------------------------------------------------
# DINO (transformers)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DinoSpec:
    family: str  # dinov3 | dinov2 | mae
    patch: int
    default_weights: str
    arch: dict = field(default_factory=dict)  # config kwargs for random init


DINO_REGISTRY: dict[str, DinoSpec] = {
    "dinov3_vitl16": DinoSpec(
        "dinov3", 16, "facebook/dinov3-vitl16-pretrain-lvd1689m",
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
             num_register_tokens=4, layerscale_value=1e-5),
    ),
    "dinov3_vitb16": DinoSpec(
        "dinov3", 16, "facebook/dinov3-vitb16-pretrain-lvd1689m",
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
             num_register_tokens=4, layerscale_value=1e-5),
    ),
    "dinov3_vits16": DinoSpec(
        "dinov3", 16, "facebook/dinov3-vits16-pretrain-lvd1689m",
        dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
             num_register_tokens=4, layerscale_value=1e-5),
    ),
    # Table 5 "DINOv3 ViT-Small, 29M": ViT-S+/16 (SwiGLU MLP), 28.7M parameters
    "dinov3_vits16plus": DinoSpec(
        "dinov3", 16, "facebook/dinov3-vits16plus-pretrain-lvd1689m",
        dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
             num_register_tokens=4, layerscale_value=1e-5, use_gated_mlp=True),
    ),
    "dinov3_tiny": DinoSpec(
        "dinov3", 16, "",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
             num_register_tokens=4, layerscale_value=1.0),
    ),
    "dinov2_vitl14": DinoSpec(
        "dinov2", 14, "facebook/dinov2-large",
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, layerscale_value=1e-5),
    ),
    "dinov2_tiny": DinoSpec(
        "dinov2", 14, "",
        dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2),
    ),
    "mae_vitl16": DinoSpec(
        "mae", 16, "facebook/vit-mae-large",
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    ),
    "mae_tiny": DinoSpec(
        "mae", 16, "",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2),
    ),
}
_DEFAULT_IDS = {spec.default_weights for spec in DINO_REGISTRY.values() if spec.default_weights}


def _dino_classes(family: str):
    if family == "dinov3":
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        return DINOv3ViTConfig, DINOv3ViTModel, "dinov3_vit"
    if family == "dinov2":
        from transformers import Dinov2Config, Dinov2Model

        return Dinov2Config, Dinov2Model, "dinov2"
    from transformers import ViTMAEConfig, ViTMAEModel

    return ViTMAEConfig, ViTMAEModel, "vit_mae"


def _dino_weights_error(name: str, weights: str, reason: str) -> BackboneWeightsError:
    return BackboneWeightsError(
        f"DINO weights {weights!r} for model.dino_model={name!r} could not be loaded: {reason}. "
        "Supply them by (a) downloading once with network access, e.g. "
        f"`huggingface-cli download {weights}` (gated models need `huggingface-cli login` first; then "
        "HF_HUB_OFFLINE=1 reads the cache), or (b) setting model.dino_weights to a local folder holding "
        "config.json and the model weights, or (c) model.dino_weights='' for random weights."
    )


def build_dino_model(name: str, weights: str, grid: int) -> tuple[nn.Module, DinoSpec, str]:
    """(transformers model, registry spec, weights identity); random init when ``weights`` is empty."""
    if name not in DINO_REGISTRY:
        raise ValueError(f"model.dino_model={name!r} is unknown; choose one of {', '.join(DINO_REGISTRY)}")
    spec = DINO_REGISTRY[name]
    config_cls, model_cls, model_type = _dino_classes(spec.family)
    if weights in _DEFAULT_IDS and weights != spec.default_weights:
        # The config default names DINOv3-L; switching dino_model alone selects that model's weights.
        log.warning("dino_weights %r belongs to another backbone; using %r for %s", weights, spec.default_weights, name)
        weights = spec.default_weights
    if not weights:
        kwargs = dict(spec.arch, patch_size=spec.patch, image_size=spec.patch * grid)
        if spec.family == "mae":
            kwargs["mask_ratio"] = 0.0
        config = config_cls(**kwargs)
        with _seeded_init():
            model = model_cls(config)
        return model, spec, f"{name}|random:seed{RANDOM_INIT_SEED}"
    path = Path(os.path.expanduser(weights))
    if _looks_like_path(weights) and not path.is_dir():
        raise _dino_weights_error(name, weights, f"local folder {path} does not exist")
    source = str(path) if path.is_dir() else weights
    try:
        model = model_cls.from_pretrained(
            source, local_files_only=path.is_dir() or _local_files_only(), dtype=torch.float32
        )
    except Exception as exc:  # noqa: BLE001 - missing, gated, offline, corrupt
        raise _dino_weights_error(name, weights, f"{type(exc).__name__}: {exc}") from exc
    if model.config.model_type != model_type:
        raise _dino_weights_error(
            name, weights, f"it holds a {model.config.model_type!r} model, but {name} needs {model_type!r}"
        )
    return model, spec, f"{name}|{weights}"


class DinoEncoder(nn.Module):
    """Tapped DINO block outputs; the forward stops after the last tapped block (Eq. 1, DINO branch).

    ``norm=True`` passes each tapped output through the model's final LayerNorm (as DINOv3's
    ``get_intermediate_layers(norm=True)`` does); ``norm=False`` returns raw block outputs.
    """

    def __init__(self, model: nn.Module, family: str, taps: Sequence[int], grid: int, patch: int, norm: bool = True):
        super().__init__()
        self.family = family
        self.model = model
        self.norm = norm
        self.grid = grid
        self.patch = patch
        self.image_size = patch * grid
        layers = self._layers()
        self.taps = _check_taps("dino_layers", taps, len(layers))
        self._set_layers(layers[: self.taps[-1]])  # blocks after the last tap are never built into the pass
        self.dim = int(model.config.hidden_size)
        self.num_prefix = 1 + (int(getattr(model.config, "num_register_tokens", 0)) if family == "dinov3" else 0)
        if family == "mae":
            model.config.mask_ratio = 0.0  # keep every patch (the pretraining config masks 75 %)

    def _layers(self) -> nn.ModuleList:
        if self.family == "dinov3":
            return self.model.model.layer
        if self.family == "dinov2":
            return self.model.encoder.layer
        return self.model.layers

    def _set_layers(self, layers: nn.ModuleList) -> None:
        if self.family == "dinov3":
            self.model.model.layer = layers
        elif self.family == "dinov2":
            self.model.encoder.layer = layers
        else:
            self.model.layers = layers

    def _final_norm(self) -> nn.Module:
        return self.model.norm if self.family == "dinov3" else self.model.layernorm

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        kwargs: dict[str, Any] = {}
        if self.family == "dinov3":
            x = x.to(m.embeddings.patch_embeddings.weight.dtype)
            h = m.embeddings(x)
            kwargs["position_embeddings"] = m.rope_embeddings(x)  # RoPE (cos, sin), shared by all blocks
        elif self.family == "dinov2":
            h = m.embeddings(x)
        else:
            B, n = x.shape[0], (x.shape[-2] // self.patch) * (x.shape[-1] // self.patch)
            noise = torch.arange(n, device=x.device, dtype=torch.float32).expand(B, n)  # identity order
            h, _, _ = m.embeddings(x, noise=noise, interpolate_pos_encoding=True)
        taken = []
        for i, layer in enumerate(self._layers(), start=1):
            if self.family == "dinov3":
                h = layer(h, **kwargs)
            else:
                h = layer(h, None)
            if isinstance(h, tuple):
                h = h[0]
            if i in self.taps:
                taken.append(self._final_norm()(h) if self.norm else h)
        patch = torch.stack([t[:, self.num_prefix :] for t in taken], 1)  # [B, L, N, D]
        cls = taken[-1][:, 0]
        return patch, cls


# --------------------------------------------------------------------------------------
# Both
# --------------------------------------------------------------------------------------
class Backbones(nn.Module):
    """Frozen CLIP (visual + text) and DINO on one g x g grid; see the module docstring."""

    def __init__(
        self,
        model_cfg: Any,
        device: str | torch.device | None = None,
        clip_image_size: int | None = None,
        dino_image_size: int | None = None,
        dino_norm: bool = True,
    ):
        super().__init__()
        self.model_cfg = model_cfg
        g = int(model_cfg.grid)
        self.grid = g
        self.bf16 = bool(model_cfg.bf16)
        self.dino_norm = bool(dino_norm)

        clip, tokenizer, patch, self.clip_identity = build_clip(model_cfg.clip_model, model_cfg.clip_pretrained, g)
        _freeze(clip)
        self.clip_model = clip
        self.clip = ClipVisionEncoder(clip.visual, model_cfg.clip_layers)
        self.clip_image_size = self.clip.image_size
        self.clip_dim = self.clip.dim
        if clip_image_size is not None and clip_image_size != self.clip_image_size:
            raise GridMismatchError(
                f"CLIP image size {clip_image_size} px does not give the shared {g}x{g} grid: "
                f"patch {patch} x grid {g} = {self.clip_image_size} px (set model.grid instead)"
            )
        if self.clip.grid != g:
            raise GridMismatchError(f"CLIP builds a {self.clip.grid}x{self.clip.grid} grid, model.grid is {g}")

        self.text = TextEncoder(clip, tokenizer, autocast=self._autocast)
        self.text_width = self.text.width

        self.use_dino = model_cfg.fusion != "none"
        if self.use_dino:
            model, spec, self.dino_identity = build_dino_model(model_cfg.dino_model, model_cfg.dino_weights, g)
            _freeze(model)
            taps = dino_tap_indices(model_cfg, int(model.config.num_hidden_layers))
            self.dino = DinoEncoder(model, spec.family, taps, g, spec.patch, norm=self.dino_norm)
            self.dino_image_size = self.dino.image_size
            self.dino_dim = self.dino.dim
            if dino_image_size is not None and dino_image_size != self.dino_image_size:
                raise GridMismatchError(
                    f"DINO image size {dino_image_size} px does not give the shared {g}x{g} grid: "
                    f"patch {spec.patch} x grid {g} = {self.dino_image_size} px, while CLIP runs at "
                    f"{self.clip_image_size} px (set model.grid instead)"
                )
        else:
            self.dino = None
            self.dino_identity = "none"
            self.dino_image_size = 0
            self.dino_dim = 0
        self.register_buffer("_clip_mean", torch.tensor(OPENAI_MEAN), persistent=False)
        self.register_buffer("_clip_std", torch.tensor(OPENAI_STD), persistent=False)
        self.register_buffer("_dino_mean", torch.tensor(IMAGENET_MEAN), persistent=False)
        self.register_buffer("_dino_std", torch.tensor(IMAGENET_STD), persistent=False)
        self.forward_calls = 0  # number of image batches run through the backbones
        _freeze(self)
        if device is not None:
            self.to(device)

    # ----- state -----
    def train(self, mode: bool = True) -> "Backbones":
        return super().train(False)  # frozen: always eval

    @property
    def device(self) -> torch.device:
        return self._clip_mean.device

    def _autocast(self):
        if self.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def spec(self) -> dict[str, Any]:
        """Everything that determines the features of an image (the feature-cache key)."""
        cfg = self.model_cfg
        return {
            "clip": self.clip_identity,
            "clip_weights": weights_fingerprint(self.clip_model.visual),
            "clip_layers": list(self.clip.taps),
            "clip_image_size": self.clip_image_size,
            "dino": self.dino_identity,
            "dino_weights": weights_fingerprint(self.dino.model) if self.dino is not None else "",
            "dino_layers": list(self.dino.taps) if self.dino is not None else [],
            "dino_image_size": self.dino_image_size,
            # DINO input: resized from the original image (paper §4.2); features computed from an
            # upsampled CLIP-size tensor (the fallback) are keyed by the content of both inputs
            "dino_input": "original",
            "dino_norm": self.dino_norm,
            "grid": self.grid,
            "bf16": bool(cfg.bf16 and self.device.type == "cuda"),
        }

    # ----- forward -----
    @torch.no_grad()
    def forward(self, images: torch.Tensor, images_dino: torch.Tensor | None = None) -> BackboneFeatures:
        """``images`` [B, 3, S, S] for CLIP; ``images_dino`` [B, 3, S_d, S_d] for DINO (default: ``images``)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Backbones expects images [B, 3, S, S] in [0, 1], got {tuple(images.shape)}")
        if images_dino is not None and (images_dino.dim() != 4 or images_dino.shape[:2] != images.shape[:2]):
            raise ValueError(
                f"images_dino {tuple(images_dino.shape)} must be [B, 3, S_d, S_d] with the B of images {tuple(images.shape)}"
            )
        self.forward_calls += 1
        images = images.to(self.device)
        B, N = images.shape[0], self.grid * self.grid
        x = _resize_normalise(images, self.clip_image_size, self._clip_mean, self._clip_std)
        with self._autocast():
            clip_patch, clip_global = self.clip(x)
        if self.dino is not None:
            src = images if images_dino is None else images_dino.to(self.device)
            x = _resize_normalise(src, self.dino_image_size, self._dino_mean, self._dino_std)
            with self._autocast():
                dino_patch, dino_global = self.dino(x)
            dino_patch, dino_global = dino_patch.float(), dino_global.float()
        else:
            dino_patch = images.new_zeros(B, 0, N, 0)
            dino_global = images.new_zeros(B, 0)
        return BackboneFeatures(clip_patch.float(), clip_global.float(), dino_patch, dino_global)
