"""Table 3 row D: Bayes-PFL's head with VCPG as its prompt generator (``model.prompting = bayes_pfl_vcpg``).

The paper's Table 3 (arXiv 2601.09147 §4.5) builds SSVP up from Bayes-PFL: A is the baseline, B
and C add HSVS (Concat, ATF), D adds VCPG, E adds VTAM. For row D to differ from row C by the
prompt generator alone, this head keeps everything row C has (``ssvp.bayes_pfl.BayesPFLHead`` on
the HSVS-fused features):

* the prompt bank (B prompts of P context and Q state vectors, its orthogonality loss),
* the residual cross-modal attention (RCA) that adapts the text to each layer's patches,
* the class mapping of the image score, the learnable logit scales,
* the loss: cross-entropy + (balanced focal + Dice) summed over layers + the bank's orthogonality,

and replaces the prompt flows (image-specific and image-agnostic planar flows, their KL terms and
the Monte Carlo average over ``pfl_samples`` draws) by VCPG (§3.2, Eq. 7-12): the bank's encoded
prompts are T_init [B, 2, B_p, D]; the VAE encodes V_global (Eq. 7-8), the text-latent
cross-attention and the gate alpha give T_final = LN(T_init + alpha delta_inj) (Eq. 10-11); VCPG's
own terms join the loss as in Eq. 22 (lambda1 L_VAE of Eq. 9, lambda2 L_reg of Eq. 12). One z per
image (VCPG draws one sample, ``z_infer`` / ``z_seed`` as in SSVP), so the flows' KL is zero.

What changes from row C, all of it the prompt generator: the flows and their KL go, VCPG and its
VAE / margin terms come, one z instead of ``pfl_samples`` flow samples at inference, and VCPG's
parameters learn at ``lr_head`` as in SSVP (the flows were in the prompt group).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .bayes_pfl import BayesPFLHead
from .vcpg import VCPG

__all__ = ["PFLVCPGHead"]


class PFLVCPGHead(BayesPFLHead):
    """``BayesPFLHead`` whose prompt flows are replaced by VCPG (see the module docstring)."""

    def __init__(self, model_cfg: Any, clip_dim: int, dino_dim: int, text_encoder: Any) -> None:
        super().__init__(model_cfg, clip_dim, dino_dim, text_encoder)
        del self.flow_ctx, self.flow_normal, self.flow_abnormal  # what VCPG replaces
        cfg = model_cfg
        self.n_samples = 1  # one z per image
        self.vcpg = VCPG(
            clip_dim, cfg.latent_dim, cfg.attn_heads, cfg.alpha_init,
            n_latent_tokens=getattr(cfg, "n_latent_tokens", 1), ln=bool(getattr(cfg, "ln_eq4_eq11", True)),
            z_infer=getattr(cfg, "z_infer", "sample"), z_seed=getattr(cfg, "z_seed", 0),
        )

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """{"prompt": the prompt bank, "head": VCPG, RCA, mappings, scales, fusion} (SSVP's two groups)."""
        prompt = list(self.prompts.parameters())
        ids = {id(p) for p in prompt}
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return {"prompt": prompt, "head": head}

    def sample_text(self, v_global: torch.Tensor, class_names: list[str], key: torch.Tensor | None = None) -> dict[str, Any]:
        """T_init of the bank's prompts, T_final from VCPG (Eq. 7-11): one "sample" per image; ``key``:
        the frozen image feature VCPG's inference eps is a function of (``ssvp.vcpg.image_noise``)."""
        unique = list(dict.fromkeys(class_names))
        index = torch.tensor([unique.index(c) for c in class_names], device=v_global.device)
        cls_index = torch.arange(len(unique), device=v_global.device)
        t_init = self.prompts.encode(self.text_encoder, unique, cls_index, None, None)[0][index]  # [B, 2, Bp, D]
        vc = self.vcpg(v_global.float(), t_init.float(), image_key=key)  # Eq. 7-11
        zero = v_global.new_zeros(())
        return {
            "text": vc["t_final"][:, None],  # [B, 1, 2, Bp, D]
            "t_init": t_init,
            "kl_ctx": zero, "kl_normal": zero, "kl_abnormal": zero,  # no flows
            "aux": {"mu": vc["mu"], "logvar": vc["logvar"], "z": vc["z"], "recon": vc["recon"], "alpha": self.vcpg.alpha},
        }
