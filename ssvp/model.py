"""SSVP (Algorithm 1): frozen CLIP + DINO backbones and the trainable SSVP head.

    feats   = Backbones(images)                                   Eq. 1 (frozen; CLIP 518 px, DINO 592 px)
    F_l, V  = HSVS(F_c^l, F_d^l), HSVS(F_c^g, F_d^g)              Eq. 2-5, per tapped layer + global
    T_init  = T_clip([V]bg [V]state [cls])                        Eq. 6
    z       = VAE(V)                                              Eq. 7-9
    T_final = LN(T_init + alpha * Attn(T_init, z))                Eq. 10-11
    maps, S = VTAM(F_l, V, T_final)                               Eq. 13-19

State embeddings (interpretation: the paper has 3 prompts per state but one T_final per
state in Eq. 13-14 and 19): the maps use t_k = normalize(mean_p normalize(T_final[k, p]));
the inner product of Eq. 19 uses the raw mean mean_p T_final[k, p].

Ablation switches (Table 3): ``model.fusion`` atf | concat | none (CLIP only),
``model.vcpg`` (off: T = T_init, no VAE), ``model.vtam`` (off: plain mean of the layer
maps and S_final = S_global). Modules of a switched-off component are not built, so
they hold no parameters.

``SSVPHead`` holds every trainable parameter and works on ``BackboneFeatures``, so a
trainer can feed cached features. Text prompts are encoded once per forward for the
unique class names of the batch; nothing holding a graph is cached across steps.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .hsvs import HSVSFusion
from .outputs import SSVPOutput, head_inputs
from .vcpg import VCPG, PromptLearner
from .vtam import VTAM

__all__ = ["SSVPOutput", "SSVPHead", "SSVP"]


class SSVPHead(nn.Module):
    """All trainable parts of SSVP on top of frozen features (Algorithm 1 after Eq. 1)."""

    def __init__(self, model_cfg: Any, clip_dim: int, dino_dim: int, text_encoder: Any) -> None:
        super().__init__()
        cfg = model_cfg
        self.model_cfg = cfg
        self.n_layers = len(cfg.clip_layers)
        self.clip_dim = int(clip_dim)
        object.__setattr__(self, "_text_encoder", text_encoder)  # frozen, owned by Backbones: not registered
        width = int(getattr(text_encoder, "width", 0)) or int(
            text_encoder.token_embedding(text_encoder.tokenize(["x"])).shape[-1]
        )
        ln = bool(getattr(cfg, "ln_eq4_eq11", True))
        self.fusion = HSVSFusion(cfg.fusion, self.n_layers, clip_dim, dino_dim, cfg.attn_heads, ln=ln)
        self.prompts = PromptLearner(cfg.n_ctx_bg, cfg.n_ctx_state, cfg.n_prompts, width)
        self.vcpg = (
            VCPG(
                clip_dim, cfg.latent_dim, cfg.attn_heads, cfg.alpha_init,
                n_latent_tokens=getattr(cfg, "n_latent_tokens", 1), ln=ln,
                z_infer=getattr(cfg, "z_infer", "sample"), z_seed=getattr(cfg, "z_seed", 0),
            )
            if cfg.vcpg
            else None
        )
        self.vtam = VTAM(
            self.n_layers, clip_dim, cfg.tau, cfg.gamma, cfg.s_local, enabled=cfg.vtam,
            s_global=getattr(cfg, "s_global", "prob"), s_local_kernel=getattr(cfg, "s_local_kernel", 3),
        )
        self.l_class_sigma = bool(getattr(cfg, "l_class_sigma", True))

    @property
    def text_encoder(self) -> Any:
        return self._text_encoder

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """{"prompt": learnable prompt contexts, "head": everything else} (the two LR groups of Alg. 3)."""
        prompt = [p for p in self.prompts.parameters() if p.requires_grad]
        ids = {id(p) for p in prompt}
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return {"prompt": prompt, "head": head}

    def encode_prompts(self, class_names: list[str]) -> torch.Tensor:
        """T_init [B, 2, P, D] for a batch: each unique class name is encoded once (Eq. 6)."""
        unique = list(dict.fromkeys(class_names))
        t_cls = self.prompts(self.text_encoder, unique)  # [C, 2, P, D]
        index = torch.tensor([unique.index(c) for c in class_names], device=t_cls.device)
        return t_cls[index]

    def forward(self, feats: Any, class_names: list[str] | tuple[str, ...], out_size: int | tuple[int, int]) -> SSVPOutput:
        class_names, size = head_inputs(feats, class_names, out_size)
        device = next(self.prompts.parameters()).device
        clip_patch = feats.clip_patch.to(device).float()
        clip_global = feats.clip_global.to(device).float()
        dino_patch = feats.dino_patch.to(device).float() if self.fusion.mode != "none" else None
        dino_global = feats.dino_global.to(device).float() if self.fusion.mode != "none" else None

        patches, v_global = self.fusion(clip_patch, clip_global, dino_patch, dino_global)  # Eq. 2-5
        t_init = self.encode_prompts(class_names)  # Eq. 6, [B, 2, P, D]
        aux: dict[str, Any] = {"z": None, "mu": None, "logvar": None, "recon": None, "alpha": None}
        if self.vcpg is not None:
            vc = self.vcpg(v_global.float(), t_init, image_key=clip_global)  # Eq. 7-11; eps keyed by the frozen image token
            t_final = vc.pop("t_final")
            aux.update(vc)
            aux["alpha"] = self.vcpg.alpha
        else:
            t_final = t_init  # Table 3 C: static learnable prompts
        # state embeddings: mean of the unit prompt embeddings per state
        text = F.normalize(F.normalize(t_final.float(), dim=-1).mean(dim=2), dim=-1)  # [B, 2, D]
        t_state = t_final.float().mean(dim=2)  # raw state embeddings for the inner product of Eq. 19

        with torch.autocast(device.type, enabled=False):  # similarities / tau in float32
            v = self.vtam(patches.float(), v_global.float(), text.float(), t_state)  # Eq. 13-19
        g = v["map"].shape[-1]
        # One bilinear upsampling of the abnormal channels only (fused map + L layer maps).
        # Bilinear weights sum to 1, so upsample(1 - a) = 1 - upsample(a): the normal channel
        # of each layer map is 1 - abnormal, as it is on the grid (Eq. 14 softmax over 2 states).
        abnormal = torch.cat([v["map"][:, 1:2], v["layer_maps"][:, :, 1]], dim=1)  # [B, 1 + L, g, g]
        up = F.interpolate(abnormal, size=size, mode="bilinear", align_corners=False)
        anomaly_map = up[:, 0]
        layer_abnormal = up[:, 1:]
        layer_maps = torch.stack([1.0 - layer_abnormal, layer_abnormal], dim=2)  # [B, L, 2, H, W]
        s_final = v["s_final"]
        aux.update(
            {
                "layer_maps": layer_maps,
                "map_grid": v["map"],
                "patches": patches,
                "v_global": v_global,
                "t_init": t_init.mean(dim=2),
                "t_final": t_final.mean(dim=2),
                "t_init_prompts": t_init,
                "t_final_prompts": t_final,
                "text": text,
                "s_global": v["s_global"],
                "s_local": v["s_local"],
                "scale_weights": v["scale_weights"],
                "spatial_weights": v["spatial_weights"],
                "grid": g,
            }
        )
        # the image score: sigma(S_final) (Eq. 21), or S_final itself read as a probability (Alg. 3)
        score = torch.sigmoid(s_final) if self.l_class_sigma else s_final.clamp(0.0, 1.0)
        return SSVPOutput(anomaly_map=anomaly_map, score=score, score_logit=s_final, aux=aux)


def head_class(model_cfg: Any) -> type[nn.Module]:
    """The trainable head a config selects: ``BayesPFLHead`` for ``prompting=bayes_pfl``
    (Table 3 row A, ``ssvp.bayes_pfl``), ``PFLVCPGHead`` for ``bayes_pfl_vcpg`` (row D,
    ``ssvp.pfl_vcpg``), else ``SSVPHead``."""
    prompting = getattr(model_cfg, "prompting", "vcpg")
    if prompting == "bayes_pfl_vcpg":
        from .pfl_vcpg import PFLVCPGHead

        return PFLVCPGHead
    if prompting == "bayes_pfl":
        from .bayes_pfl import BayesPFLHead

        return BayesPFLHead
    return SSVPHead


class SSVP(nn.Module):
    """Frozen ``Backbones`` + the trainable head (``head_class``); ``model(images, class_names) -> SSVPOutput``."""

    def __init__(self, model_cfg: Any, device: str | torch.device | None = None, lazy: bool = False) -> None:
        super().__init__()
        from .backbones import Backbones

        self.model_cfg = model_cfg
        if lazy:  # text tower now, vision towers on first need (a feature-cache miss): ssvp.lazy_backbones
            from .lazy_backbones import LazyBackbones

            self.backbones = LazyBackbones(model_cfg, device=device)
        else:
            self.backbones = Backbones(model_cfg, device=device)
        bb = self.backbones
        self.head = head_class(model_cfg)(model_cfg, bb.clip_dim, bb.dino_dim, bb.text)
        if device is not None:
            self.head.to(device)

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        return self.head.trainable_parameters()

    def train(self, mode: bool = True) -> "SSVP":
        super().train(mode)
        self.backbones.train(False)  # frozen backbones stay in eval mode
        return self

    def forward(
        self,
        images: torch.Tensor,
        class_names: list[str] | tuple[str, ...],
        out_size: int | None = None,
        images_dino: torch.Tensor | None = None,
    ) -> SSVPOutput:
        """``images`` CLIP input; ``images_dino`` DINO input resized from the original (§4.2; optional)."""
        feats = self.backbones(images, images_dino)
        return self.head(feats, class_names, out_size or images.shape[-1])
