"""One configuration object for a run: model (with the paper's symbols), training, data.

Keys use the paper's symbols (gamma, xi, beta, lambda1, lambda2, focal_lambda, tau,
alpha_init) so a reader can match them to the equations. Every key is unique across
sections, so a flat override such as ``{"gamma": 0.3, "lr_prompt": 1e-3}`` (what a
Ray Tune trial or ``ssvp train --set gamma=0.3`` hands over) finds its section; the
dotted form ``"model.gamma"`` works too.

A ``Config`` is validated on construction (and on every override): values out of
range, wrong types and unknown keys raise ``ConfigError`` naming the key.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "ConfigError",
    "ModelConfig",
    "TrainConfig",
    "DataConfig",
    "Config",
    "load_config",
    "did_you_mean",
    "close_match",
    "unknown_keys_message",
]


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key."""


FUSIONS = ("atf", "concat", "none")
S_LOCAL_MODES = ("max", "mean_maxpool")
OPTIMIZERS = ("adamw", "adam")
PROMPTINGS = ("static", "vcpg", "bayes_pfl", "bayes_pfl_vcpg")
VCPG_PROMPTINGS = ("vcpg", "bayes_pfl_vcpg")  # the promptings whose generator is VCPG (model.vcpg = true)
PFL_PROMPTINGS = ("bayes_pfl", "bayes_pfl_vcpg")  # Bayes-PFL's head (ssvp.bayes_pfl): scores with its own maps
DINO_TAPS = ("as_written", "spread")
S_GLOBAL_MODES = ("prob", "logit", "inner", "cosine")  # ssvp.vtam.S_GLOBAL_MODES
L_SEG_ON = ("p_anom", "p_map")
VAE_REDUCTIONS = ("sum", "mean")
Z_INFER = ("sample", "mu")
PROTOCOLS = ("paper", "select")


@dataclass
class ModelConfig:
    """Backbones, SSVP heads and loss weights (paper §4.2 defaults).

    Backbone names select entries of the registries in ``ssvp.backbones``:
    ``clip_model`` is an open_clip model name (``ViT-L-14``) or ``tiny``;
    ``dino_model`` is one of ``dinov3_vitl16`` (default), ``dinov3_vitb16``,
    ``dinov3_vits16``, ``dinov3_vits16plus`` (Table 5's 29M ViT-S), ``dinov2_vitl14``, ``mae_vitl16`` or
    ``dinov3_tiny``.
    Weights: ``clip_pretrained`` is an open_clip pretrained tag (``openai``), an
    ``hf-hub:`` id or a local checkpoint path; ``dino_weights`` a Hugging Face id
    or a local directory. An empty string means random initialisation.
    """

    # --- backbones (Eq. 1) ---
    clip_model: str = "ViT-L-14"
    clip_pretrained: str = "openai"
    clip_layers: list[int] = field(default_factory=lambda: [6, 12, 18, 24])  # 1-based block outputs
    dino_model: str = "dinov3_vitl16"
    dino_weights: str = "facebook/dinov3-vitl16-pretrain-lvd1689m"
    # Paper §4.2: {3, 6, 9, 11} (on the 24-block ViT-L/16 they all sit in the first half).
    dino_layers: list[int] = field(default_factory=lambda: [3, 6, 9, 11])
    # as_written: tap dino_layers as listed; spread: k * depth / L (k = 1..L) over the DINO depth,
    # e.g. {6, 12, 18, 24} on ViT-L (dino_layers then only sets L).
    dino_taps: str = "as_written"
    grid: int = 37  # shared g x g patch grid: CLIP at 14g px, DINO at patch*g px
    bf16: bool = True  # autocast the frozen backbones to bf16 on GPU
    # --- ablation switches (Table 3) ---
    fusion: str = "atf"  # atf (C), concat (B), none (CLIP only, A)
    vcpg: bool = True  # off: static learnable prompts, T = T_init
    vtam: bool = True  # off: plain mean of layer maps and the global score
    # static | vcpg | bayes_pfl | bayes_pfl_vcpg: the prompt learner (kept in step with `vcpg`, true
    # exactly for vcpg and bayes_pfl_vcpg); bayes_pfl = the Bayes-PFL baseline of Table 3 row A
    # (ssvp.bayes_pfl, no VCPG/VTAM); bayes_pfl_vcpg = Bayes-PFL's head with VCPG in place of its
    # prompt flows, Table 3 row D (ssvp.pfl_vcpg)
    prompting: str = "vcpg"
    # --- the paper's contradictions (main text default; docs/PAPER_MAP.md) ---
    s_local: str = "max"  # Eq. 18 max_{h,w} P_map; Alg. 1 line 10 "mean_maxpool" = Mean(SpatialMaxPool(P_map))
    s_local_kernel: int = 3  # window of SpatialMaxPool for s_local=mean_maxpool (stride 1, same padding)
    # Eq. 19's global term (docs/PAPER_MAP.md, Eq. 19): prob = sigma((cos_a - cos_n) / tau), Eq. 14 on the
    # global token, in [0, 1] like S_local; logit = (cos_a - cos_n) / tau and S_local as a logit (both
    # log-odds); inner = <V, t_a> - <V, t_n> on raw vectors (unbounded); cosine = cos_a - cos_n
    s_global: str = "prob"
    l_seg_on: str = "p_anom"  # Eq. 20 focal on every layer's P_anom^(l); Alg. 3 line 8 "p_map"
    ln_eq4_eq11: bool = True  # LN in Eq. 4 (Z_joint) and Eq. 11 (T_final); false = Alg. 1 lines 5, 8 (none)
    # Eq. 21 BCE(sigma(S_final), y); false = Alg. 3 line 8 BCE(S_final, y), which needs S_final in [0, 1]
    # (s_global=prob): with the other readings the score would saturate at 0 / 1 and the clamp stop the gradient
    l_class_sigma: bool = True
    vae_reduction: str = "sum"  # Eq. 9 ||.||^2 and KL summed over dimensions (as written); "mean" per element
    z_infer: str = "sample"  # Eq. 8 at inference: sampled z (seeded, z_seed) as §3.2.2 says; "mu" = z = mu
    z_seed: int = 0  # seed of the inference-time eps: eps = R(z_seed) u(image), a function of the image (ssvp.vcpg.image_noise)
    # --- head sizes ---
    n_ctx_bg: int = 4  # learnable [V]bg tokens shared by all prompts
    n_ctx_state: int = 4  # learnable [V]state tokens per prompt
    n_prompts: int = 3  # prompts per state (normal / abnormal)
    latent_dim: int = 128  # VAE latent z (Eq. 7-8)
    # Eq. 10 maps z to K_z, V_z: one key (as written; the softmax over it is 1, so delta_inj = z W_V);
    # n > 1 splits z into n tokens so each prompt weighs them (an option, not the paper).
    n_latent_tokens: int = 1
    attn_heads: int = 8  # heads of the ATF and text-latent cross-attention
    # --- Bayes-PFL (prompting=bayes_pfl; Qu et al. 2025, their repository's defaults) ---
    pfl_flows: int = 10  # K planar flows per prompt flow (0 = Gaussian prompt distributions)
    pfl_samples: int = 5  # prompt samples averaged into score and map at inference
    pfl_n_ctx: int = 5  # P context vectors per prompt of the bank (n_prompts = bank size B)
    pfl_n_state: int = 5  # Q state vectors per prompt and state
    pfl_kl_weight: float = 0.01  # weight of each prompt flow's KL term
    pfl_orth_weight: float = 1.0  # weight of the prompt bank's orthogonality loss
    # --- paper symbols ---
    tau: float = 0.07  # temperature of the normal/abnormal softmax (Eq. 14)
    alpha_init: float = 0.0  # gate alpha of Eq. 11, zero-initialised
    gamma: float = 0.5  # S_final = (1 - gamma) S_global + gamma S_local (Eq. 19)
    xi: float = 0.85  # margin of Eq. 12
    beta: float = 0.1  # weight of the KL term in the VAE loss (Eq. 9, §4.2)
    lambda1: float = 1.0  # weight of the VAE loss in Eq. 22 (§4.2)
    lambda2: float = 0.5  # weight of the margin loss in Eq. 22 (§4.2)
    focal_lambda: float = 2.0  # focusing parameter of the focal loss (Eq. 20)

    def validate(self) -> None:
        _check_choice(self, "fusion", FUSIONS)
        _check_choice(self, "s_local", S_LOCAL_MODES)
        _check_choice(self, "prompting", PROMPTINGS)
        if self.vcpg != (self.prompting in VCPG_PROMPTINGS):
            raise ConfigError(
                f"model.vcpg={self.vcpg} contradicts model.prompting={self.prompting!r}: vcpg is true "
                "exactly when prompting is vcpg or bayes_pfl_vcpg (set one of them)"
            )
        if self.prompting in PFL_PROMPTINGS and self.vtam:
            raise ConfigError(f"model.vtam must be false with model.prompting={self.prompting} "
                              "(Bayes-PFL's head scores with its own maps)")
        for key in ("pfl_samples", "pfl_n_ctx", "pfl_n_state"):
            _check_int(self, key, minimum=1)
        _check_int(self, "pfl_flows", minimum=0)
        for key in ("pfl_kl_weight", "pfl_orth_weight"):
            _check_range(self, key, 0.0, None)
        for key in ("clip_pretrained", "dino_weights"):
            _check_weights_source(self, key)
        _check_choice(self, "dino_taps", DINO_TAPS)
        _check_choice(self, "s_global", S_GLOBAL_MODES)
        if not self.l_class_sigma and self.s_global != "prob" and self.prompting not in PFL_PROMPTINGS:
            raise ConfigError(
                f"model.l_class_sigma=false (BCE on S_final itself, Alg. 3 line 8) needs S_final in [0, 1], "
                f"i.e. model.s_global=prob; with model.s_global={self.s_global!r} S_final leaves [0, 1], the "
                "score saturates at 0 / 1 and the clamp stops the gradient (set model.s_global=prob or "
                "model.l_class_sigma=true)"
            )
        _check_choice(self, "l_seg_on", L_SEG_ON)
        _check_choice(self, "vae_reduction", VAE_REDUCTIONS)
        _check_choice(self, "z_infer", Z_INFER)
        _check_int(self, "z_seed", minimum=0)
        for key in ("clip_layers", "dino_layers"):
            layers = getattr(self, key)
            if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in layers):
                raise ConfigError(f"model.{key} must be a non-empty list of 1-based block indices, got {layers!r}")
            if sorted(set(layers)) != list(layers):
                raise ConfigError(f"model.{key} must be strictly increasing, got {layers!r}")
        if self.fusion != "none" and len(self.clip_layers) != len(self.dino_layers):
            raise ConfigError(
                f"model.clip_layers ({len(self.clip_layers)} taps) and model.dino_layers "
                f"({len(self.dino_layers)} taps) must pair up one to one when fusion={self.fusion!r}"
            )
        for key in ("grid", "n_ctx_bg", "n_ctx_state", "n_prompts", "latent_dim", "attn_heads", "n_latent_tokens",
                    "s_local_kernel"):
            _check_int(self, key, minimum=1)
        _check_range(self, "gamma", 0.0, 1.0)
        _check_range(self, "xi", -1.0, 1.0)
        _check_range(self, "tau", 0.0, None, low_open=True)
        for key in ("beta", "lambda1", "lambda2", "focal_lambda"):
            _check_range(self, key, 0.0, None)
        _check_range(self, "alpha_init", None, None)


@dataclass
class TrainConfig:
    """Optimisation (Algorithm 3, §4.2): 15 epochs, batch 8, LR 5e-4 prompts / 1e-4 VAE and
    projections, cosine decay; ``protocol`` paper (default) or select (see the field)."""

    epochs: int = 15
    batch_size: int = 8
    lr_prompt: float = 5e-4  # prompt embeddings
    lr_head: float = 1e-4  # VAE, attention and projections
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping (the paper clips nothing, §4.2)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 0  # DataLoader workers
    eval_batch_size: int = 16
    feature_cache: str = ""  # directory of the frozen-feature cache; "" computes features from images
    feature_cache_dtype: str = ""  # int8 | float16 | float32; "" = SSVP_FEATURE_CACHE_DTYPE, else the default (ssvp.features)
    max_steps_per_epoch: int = 0  # 0 = a full pass; >0 caps steps (quick configs)
    progress: bool = True  # tqdm progress bars
    # paper (§4.1-4.2): train on all source classes for `epochs`, the model is the last epoch (no
    # selection); select: hold out source classes (data.val_classes / val_fraction), report val_*
    # metrics each epoch and keep the best epoch (what hyperparameter sweeps optimise)
    protocol: str = "paper"

    def validate(self) -> None:
        _check_int(self, "epochs", minimum=1)
        _check_int(self, "batch_size", minimum=1)
        _check_int(self, "eval_batch_size", minimum=1)
        _check_int(self, "num_workers", minimum=0)
        _check_int(self, "max_steps_per_epoch", minimum=0)
        _check_int(self, "seed", minimum=0)
        for key in ("lr_prompt", "lr_head"):
            _check_range(self, key, 0.0, None, low_open=True)
        for key in ("weight_decay", "grad_clip"):
            _check_range(self, key, 0.0, None)
        _check_choice(self, "optimizer", OPTIMIZERS)
        _check_choice(self, "protocol", PROTOCOLS)
        _check_choice(self, "feature_cache_dtype", ("", "int8", "float16", "float32"))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class DataConfig:
    """Zero-shot protocol: train on ``source``, test on ``targets`` (with ``train.protocol=select``
    also select on held-out source classes; the paper protocol trains on all source classes).

    A dataset is named ``FORMAT:ROOT``: FORMAT is one of the readers in
    ``ssvp.data`` (mvtec, visa, btad, ksdd2, rsdd, dagm, dtd, meta, synthetic) and ROOT
    its folder. ``val_classes`` are source categories held out for model selection under
    ``protocol=select`` (empty: the last ``val_fraction`` of the sorted categories). Training on a target
    is refused unless ``force_target_training`` is set.
    """

    source: str = "visa:data/VisA"
    targets: list[str] = field(default_factory=lambda: ["mvtec:data/mvtec_anomaly_detection"])
    image_size: int = 0  # input size fed to the model; 0 = 14 * grid (CLIP's resolution)
    source_classes: list[str] = field(default_factory=list)  # empty = all
    val_classes: list[str] = field(default_factory=list)
    val_fraction: float = 0.25
    force_target_training: bool = False
    skip_bad_files: bool = False  # skip-and-report unreadable images / masks instead of failing
    allow_paths_outside_root: bool = False  # meta.json may name absolute / '../' paths outside its folder
    max_per_class: int = 0  # 0 = all images; >0 caps images per class and split (quick runs)
    smoothing_sigma: float = 4.0  # Gaussian smoothing of maps before pixel metrics (peers use 4)

    def validate(self) -> None:
        for spec in [self.source, *self.targets]:
            if not isinstance(spec, str) or ":" not in spec:
                raise ConfigError(f"data: dataset {spec!r} must be written FORMAT:ROOT, e.g. 'mvtec:/data/mvtec'")
        if not isinstance(self.targets, list):
            raise ConfigError("data.targets must be a list of FORMAT:ROOT strings")
        _check_int(self, "image_size", minimum=0)
        _check_int(self, "max_per_class", minimum=0)
        _check_range(self, "val_fraction", 0.0, 1.0, high_open=True)
        _check_range(self, "smoothing_sigma", 0.0, None)


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in SECTIONS:
            getattr(self, name).validate()
        if self.data.image_size and self.data.image_size % self.model.grid:
            raise ConfigError(
                f"data.image_size={self.data.image_size} is not a multiple of model.grid={self.model.grid}"
            )

    # ----- conversion -----
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def flat(self) -> dict[str, Any]:
        """All keys without section prefixes (what MLflow logs as params)."""
        out: dict[str, Any] = {}
        for section in self.to_dict().values():
            out.update(section)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "Config":
        """Build from a nested ``{"model": {...}, ...}`` dict, flat keys or a mix."""
        cfg = cls.__new__(cls)
        for name, section_cls in SECTIONS.items():
            setattr(cfg, name, section_cls())
        cfg._apply(dict(data or {}))
        cfg.validate()
        return cfg

    def override(self, updates: Mapping[str, Any]) -> "Config":
        """A validated copy with ``updates`` applied (flat, dotted or nested keys)."""
        new = copy.deepcopy(self)
        new._apply(dict(updates))
        new.validate()
        return new

    def _apply(self, updates: dict[str, Any]) -> None:
        for key, value in updates.items():
            if key in SECTIONS and isinstance(value, Mapping):
                for sub_key, sub_value in value.items():
                    self._set(key, sub_key, sub_value)
            else:
                section, _, name = key.rpartition(".")
                self._set(section or section_of(name), name, value)
        self._sync_prompting(updates)

    def _sync_prompting(self, updates: dict[str, Any]) -> None:
        """Keep ``prompting`` and the older ``vcpg`` switch in step: the key given wins (both
        given must agree); prompting=bayes_pfl also turns VTAM off unless ``vtam`` is given."""
        given = {k.rpartition(".")[2] for k in updates if k not in SECTIONS}
        given |= {k for sec in SECTIONS if isinstance(updates.get(sec), Mapping) for k in updates[sec]}
        m = self.model
        if "prompting" in given:
            if "vcpg" in given and m.vcpg != (m.prompting in VCPG_PROMPTINGS):
                raise ConfigError(f"model.vcpg={m.vcpg} contradicts model.prompting={m.prompting!r} in the same update")
            m.vcpg = m.prompting in VCPG_PROMPTINGS
            if m.prompting in PFL_PROMPTINGS and "vtam" not in given:
                m.vtam = False
        elif "vcpg" in given:
            if m.prompting in PFL_PROMPTINGS:  # Bayes-PFL's head: VCPG or its prompt flows
                m.prompting = "bayes_pfl_vcpg" if m.vcpg else "bayes_pfl"
            else:
                m.prompting = "vcpg" if m.vcpg else ("static" if m.prompting == "vcpg" else m.prompting)

    def _set(self, section: str, name: str, value: Any) -> None:
        if section not in SECTIONS:
            hint = did_you_mean(section, SECTIONS)
            raise ConfigError(f"unknown config section {section!r} (in key {section}.{name}); "
                              + (hint or f"sections: {', '.join(SECTIONS)}"))
        target = getattr(self, section)
        if name not in {f.name for f in fields(target)}:
            raise ConfigError(_unknown_in_section(section, name))
        setattr(target, name, _coerce(f"{section}.{name}", getattr(target, name), value))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def tiny(cls, **overrides: Any) -> "Config":
        """Tiny random-weight backbones of the real classes on an 8 x 8 grid: seconds on a CPU."""
        base = {
            "model": {
                "clip_model": "tiny",
                "clip_pretrained": "",
                "clip_layers": [1, 2, 3, 4],
                "dino_model": "dinov3_tiny",
                "dino_weights": "",
                "dino_layers": [1, 2, 3, 4],
                "grid": 8,
                "latent_dim": 16,
                "attn_heads": 2,
                "n_ctx_bg": 2,
                "n_ctx_state": 2,
            },
            "train": {"epochs": 3, "batch_size": 8, "progress": False},
        }
        return cls.from_dict(base).override(overrides)


def section_of(key: str) -> str:
    """The section that owns a flat key; ConfigError when no section has it."""
    for name, section_cls in SECTIONS.items():
        if key in {f.name for f in fields(section_cls)}:
            return name
    hint = did_you_mean(key, all_keys())
    raise ConfigError(f"unknown config key {key!r}; " + (hint or KEY_LIST_HINT))


KEY_LIST_HINT = "ssvp train --print-config lists every key"


def _unknown_in_section(section: str, name: str) -> str:
    """``unknown config key train.gama; did you mean model.gamma?`` for a dotted key: the key of that
    name in another section, else the closest key of the section, else the closest key anywhere."""
    owner = next((sec for sec, cls in SECTIONS.items() if name in {f.name for f in fields(cls)}), None)
    if owner is not None:
        return f"unknown config key {section}.{name}: {name!r} is in section {owner!r} ({owner}.{name})"
    close = close_match(name, [f.name for f in fields(SECTIONS[section])]) or close_match(name, all_keys())
    where = f"{section_of(close)}.{close}" if close else ""
    return f"unknown config key {section}.{name}; " + (f"did you mean {where}?" if close else KEY_LIST_HINT)


def close_match(word: str, choices, lower: bool = False) -> str | None:
    """The choice closest to a mistyped ``word`` (difflib, ratio >= 0.6), or None;
    ``lower`` compares case-insensitively (the choice keeps its case)."""
    import difflib

    by_form: dict[str, str] = {}
    for c in map(str, choices):
        by_form.setdefault(c.lower() if lower else c, c)
    close = difflib.get_close_matches(str(word).lower() if lower else str(word), list(by_form), n=1, cutoff=0.6)
    return by_form[close[0]] if close else None


def did_you_mean(word: str, choices, lower: bool = False) -> str:
    """``did you mean gamma?`` naming the choice closest to a mistyped ``word``, or "" when none is close."""
    close = close_match(word, choices, lower)
    return f"did you mean {close}?" if close else ""


def unknown_keys_message(unknown, known, what: str = "key(s)") -> str:
    """``unknown key(s) overides; did you mean overrides?`` (several: ``... X for a, Y for b?``);
    the known names when none is close."""
    unknown, known = sorted(map(str, unknown)), sorted(map(str, known))
    close = {u: close_match(u, known) for u in unknown}
    found = [(u, c) for u, c in close.items() if c]
    if len(unknown) == 1 and found:
        hint = f"did you mean {found[0][1]}?"
    elif found:
        hint = "did you mean " + ", ".join(f"{c} for {u}" for u, c in found) + "?"
    else:
        hint = f"known: {', '.join(known)}"
    return f"unknown {what} {', '.join(unknown)}; {hint}"


def all_keys() -> list[str]:
    return [f.name for section_cls in SECTIONS.values() for f in fields(section_cls)]


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read a YAML or JSON config (nested or flat keys) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - report the parser's message with the file
            raise ConfigError(f"cannot parse config file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at top level")
        if data.pop("preset", None) == "tiny":
            return Config.tiny().override({**data, **(overrides or {})})
    return Config.from_dict(data).override(overrides or {})


# ----- validation helpers -----
def _check_choice(obj: Any, key: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, key)
    if value not in choices:
        raise ConfigError(f"{_section_name(obj)}.{key} must be one of {', '.join(choices)}; got {value!r}")


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")  # scheme://, not C:/ nor hf-hub:
_URL_PASSWORD = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*:/+[^/:@]*:)[^@]*(?=@)")


def _check_weights_source(obj: Any, key: str) -> None:
    """Weights come from a tag, an ``hf-hub:`` / Hugging Face id or a local path, never from a URL:
    none would load, and a URL's password would be written into every checkpoint's config.json.
    The message quotes the value with its password masked."""
    value = getattr(obj, key)
    if isinstance(value, str) and _URL.match(value):
        shown = _URL_PASSWORD.sub(lambda m: m["head"] + "***", value)
        raise ConfigError(
            f"model.{key} must be an open_clip tag, an hf-hub: or Hugging Face id, or a local path; got the URL "
            f"{shown!r}: download the file first and give its path (a private Hugging Face repo reads its token "
            "from HF_TOKEN, never from the value)"
        )


def _check_int(obj: Any, key: str, minimum: int) -> None:
    value = getattr(obj, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{_section_name(obj)}.{key} must be an integer >= {minimum}; got {value!r}")


def _check_range(
    obj: Any,
    key: str,
    low: float | None,
    high: float | None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    value = getattr(obj, key)
    name = f"{_section_name(obj)}.{key}"
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number; got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{name} must be {'>' if low_open else '>='} {low}; got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ConfigError(f"{name} must be {'<' if high_open else '<='} {high}; got {value!r}")


def _section_name(obj: Any) -> str:
    for name, section_cls in SECTIONS.items():
        if isinstance(obj, section_cls):
            return name
    return type(obj).__name__


def _example(name: str, current: Any) -> str:
    """A valid ``KEY=VALUE`` for the key ``name`` (``section.key``), from its current value."""
    key = name.rpartition(".")[2]
    if isinstance(current, bool):
        return f"{key}=true or {key}=false"
    if isinstance(current, list):
        items = [str(v) for v in current[:4]] or (["1", "2"] if name.endswith("_layers") else ["a", "b"])
        return f"{key}={','.join(items)} or {key}=[{', '.join(items)}]"
    return f"{key}={current}"


def _parse_list(name: str, current: list, text: str) -> list:
    """A list from command-line text: ``a,b``, ``[a, b]`` (bare words, as YAML's flow style) or JSON."""
    t = text.strip()
    if t.startswith("[") != t.endswith("]"):
        raise ConfigError(f"{name}: unbalanced brackets in {text!r}; write it as {_example(name, current)}")
    if t.startswith("["):
        try:
            parsed = json.loads(t)
        except ValueError:  # [meta:/data/loco]: bare words, not JSON
            t = t[1:-1]
        else:
            if isinstance(parsed, list):
                return parsed
    return [v.strip().strip("'\"").strip() for v in t.split(",") if v.strip()]


def _coerce(name: str, current: Any, value: Any) -> Any:
    """Convert ``value`` to the type of the field's current value (CLI strings, YAML ints); a value
    that does not convert raises ``ConfigError`` naming the key and a valid form."""
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{name} must be true or false ({_example(name, current)}); got {value!r}")
    if isinstance(current, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, e.g. {_example(name, current)}; got {value!r}") from None
    if isinstance(current, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{name} must be an integer, e.g. {_example(name, current)}; got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, e.g. {_example(name, current)}; got {value!r}")
        return value
    if isinstance(current, list):
        return _coerce_list(name, current, value)
    if isinstance(current, str):
        if not isinstance(value, str):
            if value is None:
                return ""
            raise ConfigError(f"{name} must be a string, e.g. {_example(name, current)}; got {value!r}")
        return value
    return value


def _coerce_list(name: str, current: list, value: Any) -> list:
    if isinstance(value, str):
        value = _parse_list(name, current, value)
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise ConfigError(f"{name} must be a list, e.g. {_example(name, current)}; got {value!r}")
    if current and isinstance(current[0], int) or name.endswith("_layers"):
        try:
            return [int(v) for v in value]
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a list of integers, e.g. {_example(name, current)}; "
                              f"got {value!r}") from None
    return [str(v) for v in value]
