"""Bayes-PFL (Qu et al., CVPR 2025, "Bayesian Prompt Flow Learning for Zero-Shot Anomaly
Detection") on this project's frozen CLIP features: the paper's Table 3 row A baseline.

Selected by ``model.prompting = bayes_pfl``; ``SSVP`` then builds a ``BayesPFLHead``
instead of the ``SSVPHead`` (same ``BackboneFeatures`` in, same ``SSVPOutput`` out, so the
trainer, feature cache, metrics, checkpoints, ``ssvp eval`` and ``ssvp predict`` are shared).

Structure (per image with global feature v and tapped patch tokens F_l, in CLIP's joint space)::

    prompt bank, j = 1..B (B = model.n_prompts):
        p_{s,j} = [SOS] (C_j + z_c) (S_{s,j} + z_s) [cls] . [EOS]     s in {normal, abnormal}
        C_j: P context vectors (model.pfl_n_ctx), S_{s,j}: Q state vectors (model.pfl_n_state)
    image-specific prompt flow:  z_c = f_K o .. o f_1(z_0),  z_0 ~ N(mu(v), diag sigma^2(v)),
                                 flow parameters u_k, w_k, b_k amortised from v
    image-agnostic prompt flows: z_n, z_a = f_K o .. o f_1(z_0),  z_0 ~ N(mu, diag sigma^2),
                                 one learnable base and flow per state
    planar flow:  f(z) = z + u^ tanh(w.z + b),  log|det df/dz| = log|1 + tanh'(w.z + b) w.u^|
                  u^ = u + (m(w.u) - w.u) w / |w|^2,  m(x) = -1 + softplus(x)  (invertible)
    text:         T[s, j] = E_text(p_{s,j})   (frozen CLIP text tower), unit-normalised
    image score:  P_img = softmax_s(exp(t_img) cos(W_cls T[s, j], v))       per prompt and sample
    RCA, layer l: F'_l = norm(W_l F_l);  T'_l = norm(T + MHA(q = W_q T, k = v = F'_l))
                  M_l = softmax_s(exp(t_pix) F'_l . T'_l[s, j])             per patch, prompt, sample
    inference:    draw ``pfl_samples`` (S) samples of (z_c, z_n, z_a); score = mean over the S x B
                  prompt pairs of P_img[abnormal]; map = mean over layers, prompts and samples of
                  M_l[abnormal], bilinearly upsampled. Training draws one sample.

Loss (``bayes_pfl_loss``; parts logged as train_cls, train_focal, ...)::

    L = L_cls + sum_l (L_focal,l + L_dice,l) + pfl_kl_weight (KL_c + KL_n + KL_a) + pfl_orth_weight L_orth
    L_cls   = cross-entropy of the (normal, abnormal) image logits, mean over prompts and samples
    L_focal = fg-mean + bg-mean of -(1 - p_t)^gamma log p_t, gamma = model.focal_lambda (2)
    L_dice  = 1 - (2 sum p y + 1e-5) / (sum p + sum y + 1e-5) on the abnormal channel
    KL      = log q_0(z_0) - sum_k log|det J_k| - log N(z_K; 0, I), summed over dimensions,
              one-sample estimate of KL(q_K || N(0, I)), mean over images
    L_orth  = per state, mean over the B x B matrix of squared cosines between different prompts

What came from where:

* Paper (arXiv 2503.10080, abstract and overview as stored by the project's page index):
  prompt space as a learnable distribution; image-specific and image-agnostic distributions
  that jointly regularise the prompt space; sampling to generate diverse prompts; residual
  cross-modal attention (RCA) aligning dynamic text embeddings with fine-grained image
  features; normalising flows for expressiveness. The method section's equations were not
  readable from the stored copy, so details follow the authors' repository.
* Repository xiaozhen228/Bayes-PFL (models/VPB.py, models/PFL.py, models/flows.py, loss.py,
  train.py, train.sh): planar flows (K = ``num_flows`` = 10), amortised flow parameters from the
  CLIP global image feature for the image-specific flow and free parameters for the two
  image-agnostic (normal / abnormal) flows; the image-specific sample is added to the context
  vectors and the agnostic sample to the state vectors of a prompt bank of B = 3 prompts with
  P = 5 context and Q = 5 state vectors ("X [class]" template); state vectors initialised at
  +0.5 (normal) / -0.5 (abnormal), std 0.02; 5 Monte Carlo samples at inference, 1 in training;
  the learnable logit scales initialised at log(1 / 0.07); a linear class mapping of the text
  for the image score; RCA with a per-layer bias-free projection of the patch tokens, a shared
  query projection of the text, attention scaled by D^-1/2, residual and renormalisation;
  losses = cross-entropy + (focal with fg/bg balanced means + Dice) summed over layers +
  0.01 x (three flow KL terms) + orthogonality of the prompt bank; learning rates 1e-3 for
  prompts and flows, 1e-4 for the linear layers; layers 6, 12, 18, 24 of ViT-L/14.

Where this implementation differs (each a choice, not a claim about the paper):

* Features are this project's frozen CLIP features (``clip_patch`` after ln_post and the visual
  projection, i.e. already in the joint space; the repository projects the pre-projection
  tokens in RCA). With ``model.fusion`` = concat / atf the HSVS-fused tokens are used instead,
  which is the Table 3 rows B / C reading "Bayes-PFL + HSVS" (``ablations/configs/table3.yaml``).
* The planar flow uses the u^ reparameterisation of Rezende & Mohamed (2015) so every flow is
  invertible and the log-determinant is that of a bijection; the repository uses u as is.
  Free flow parameters start at N(0, 1 / Z) instead of N(0, 1) (Z = text width) so w.z is O(1).
* Image-agnostic flows: a learnable base mean / log-variance instead of an MLP encoder applied
  to a learnable vector (the same family of distributions).
* The classification loss averages over all prompts; the repository picks one random prompt
  pair per step. The repository's second stage (linear probe on the image score after early
  stopping) and its EMA are not implemented; two learning-rate groups (``lr_prompt`` for the
  bank and flows, ``lr_head`` for RCA, mappings and logit scales) replace its four.
* The map is the mean (not the sum) over layers, so it is a probability.
* Inference draws are a function of the image and ``model.z_seed`` only: the image-specific
  flow's standard-normal draws are ``ssvp.vcpg.image_noise`` of the image's frozen CLIP global
  token (standard normal over seeds for any fixed image), the image-agnostic flows' draws come
  from the seed. A prediction therefore does not depend on the batch it is in, its position,
  the number of loader workers or the global random state.

``aux`` of the output (TIR-FG / SCD apply with the Bayes-PFL prompts): ``t_init`` [B, 2, D]
(prompt bank without flow samples, mean over prompts), ``t_final`` = ``text`` [B, 2, D] (unit
state embeddings: mean over prompts and samples; ``ssvp eval``'s TIR-FG / SCD read ``text`` and
``patches``), ``v_global``, ``text_samples`` [B, S, 2, B_p, D] (unit), ``image_logits``
[B, S, 2, B_p], ``prompt_maps`` [B, L, S * B_p, H, W] (abnormal probability, training only),
``map_grid`` [B, 2, g, g], ``kl_ctx`` / ``kl_normal`` / ``kl_abnormal`` (scalars).
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .hsvs import HSVSFusion
from .outputs import SSVPOutput, head_inputs
from .vcpg import PromptLearner, _is_causal, image_noise
from .vtam import prob_logit

__all__ = [
    "planar_flow",
    "PromptFlow",
    "PromptBank",
    "ResidualCrossAttention",
    "BayesPFLHead",
    "balanced_focal_loss",
    "dice_loss",
    "orthogonal_loss",
    "bayes_pfl_loss",
    "average_samples",
]

INFERENCE_SEED = 20250611  # base seed of the inference-time prompt samples (+ 3 * model.z_seed)
_LOGVAR_RANGE = (-10.0, 10.0)
_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- flows
def planar_flow(z: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One planar flow step f(z) = z + u^ tanh(w.z + b) and log|det df/dz|.

    z [..., Z]; u, w broadcastable to z; b broadcastable to z[..., 0]. u^ makes f invertible
    (w.u^ >= -1), so 1 + tanh'(.) w.u^ > 0 up to rounding.
    """
    wu = (w * u).sum(-1, keepdim=True)
    u_hat = u + (F.softplus(wu) - 1.0 - wu) * w / (w * w).sum(-1, keepdim=True).clamp_min(1e-12)
    a = (w * z).sum(-1) + b
    h = torch.tanh(a)
    z_new = z + u_hat * h.unsqueeze(-1)
    det = 1.0 + (1.0 - h * h) * (w * u_hat).sum(-1)
    return z_new, torch.log(det.abs().clamp_min(1e-8))


def _log_normal(x: torch.Tensor, mean: torch.Tensor | float, logvar: torch.Tensor | float) -> torch.Tensor:
    """log N(x; mean, diag exp(logvar)) summed over the last dimension."""
    logvar_t = torch.as_tensor(logvar, dtype=x.dtype, device=x.device)
    return (-0.5 * (_LOG_2PI + logvar_t + (x - mean) ** 2 * torch.exp(-logvar_t))).expand_as(x).sum(-1)


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, d_hidden), nn.Softplus(), nn.Linear(d_hidden, d_hidden), nn.Softplus(), nn.Linear(d_hidden, d_out)
    )


class PromptFlow(nn.Module):
    """A Gaussian base pushed through ``n_flows`` planar flows: q_K(z | v) or q_K(z).

    ``cond_dim`` > 0: image-specific (base mean / log-variance from MLPs of v, flow parameters
    amortised from v by linear maps); ``cond_dim`` = 0: image-agnostic (free parameters).
    """

    def __init__(self, z_dim: int, n_flows: int, cond_dim: int = 0, hidden: int = 0) -> None:
        super().__init__()
        self.z_dim, self.n_flows, self.cond_dim = int(z_dim), int(n_flows), int(cond_dim)
        k, z = self.n_flows, self.z_dim
        if self.cond_dim:
            hidden = hidden or max(8, cond_dim // 2)
            self.enc_mu = _mlp(cond_dim, hidden, z)
            self.enc_logvar = _mlp(cond_dim, hidden, z)
            self.amor_u = nn.Linear(cond_dim, k * z)
            self.amor_w = nn.Linear(cond_dim, k * z)
            self.amor_b = nn.Linear(cond_dim, k)
        else:
            self.mu = nn.Parameter(torch.zeros(z))
            self.logvar = nn.Parameter(torch.zeros(z))
            self.u = nn.Parameter(torch.randn(k, z) / math.sqrt(z))
            self.w = nn.Parameter(torch.randn(k, z) / math.sqrt(z))
            self.b = nn.Parameter(torch.zeros(k))

    def base_and_flows(self, cond: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(mu, logvar [b, Z], u, w [b, K, Z], b [b, K]); b = batch (conditional) or 1."""
        k, z = self.n_flows, self.z_dim
        if self.cond_dim:
            if cond is None:
                raise ValueError("an image-specific prompt flow needs the image feature")
            n = cond.shape[0]
            mu, logvar = self.enc_mu(cond), self.enc_logvar(cond).clamp(*_LOGVAR_RANGE)
            u = self.amor_u(cond).view(n, k, z)
            w = self.amor_w(cond).view(n, k, z)
            b = self.amor_b(cond).view(n, k)
            return mu, logvar, u, w, b
        logvar = self.logvar.clamp(*_LOGVAR_RANGE)
        return self.mu[None], logvar[None], self.u[None], self.w[None], self.b[None]

    def flow(self, z0: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z0 [S, n, Z] through the K flows (parameters [n, K, ...]) -> (z_K, sum_k log|det J_k| [S, n])."""
        z, logdet = z0, z0.new_zeros(z0.shape[:-1])
        for i in range(self.n_flows):
            z, ld = planar_flow(z, u[:, i], w[:, i], b[:, i])
            logdet = logdet + ld
        return z, logdet

    def forward(
        self, cond: torch.Tensor | None, n_samples: int, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """S samples z_K [S, n, Z] and the one-sample KL estimate per row [n] (mean over samples).

        ``eps`` [S, n or 1, Z]: the standard-normal draws (inference, see module doc); None draws them.
        """
        mu, logvar, u, w, b = self.base_and_flows(cond)
        if eps is None:
            eps = torch.randn((n_samples, mu.shape[0], self.z_dim), device=mu.device, dtype=mu.dtype)
        eps = eps.to(device=mu.device, dtype=mu.dtype)
        z0 = mu + torch.exp(0.5 * logvar) * eps  # reparameterisation
        zk, logdet = self.flow(z0, u, w, b)
        kl = _log_normal(z0, mu, logvar) - logdet - _log_normal(zk, 0.0, 0.0)  # [S, n]
        return zk, kl.mean(0)


# --------------------------------------------------------------------------- prompts
class PromptBank(nn.Module):
    """B prompts of P shared-by-state context vectors and Q state vectors per state."""

    def __init__(self, n_prompts: int, n_ctx: int, n_state: int, width: int) -> None:
        super().__init__()
        self.n_prompts, self.n_ctx, self.n_state = int(n_prompts), int(n_ctx), int(n_state)
        self.ctx = nn.Parameter(torch.empty(n_prompts, n_ctx, width))
        self.state = nn.Parameter(torch.empty(2, n_prompts, n_state, width))
        nn.init.trunc_normal_(self.ctx, mean=0.0, std=0.02)
        with torch.no_grad():  # normal states start at +0.5, abnormal at -0.5 (std 0.02)
            nn.init.trunc_normal_(self.state[0], mean=0.5, std=0.02, a=0.46, b=0.54)
            nn.init.trunc_normal_(self.state[1], mean=-0.5, std=0.02, a=-0.54, b=-0.46)

    def token_ids(self, text_encoder: Any, class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Ids, EOS positions and used length of '[SOS] X..X class. [EOS]' (the SSVP prompt helper)."""
        shim = SimpleNamespace(ctx_bg=self.ctx, n_ctx=self.n_ctx + self.n_state)
        try:
            return PromptLearner._token_ids(shim, text_encoder, class_names)
        except ValueError as exc:
            raise ValueError(str(exc).replace("model.n_ctx_bg + model.n_ctx_state", "model.pfl_n_ctx + model.pfl_n_state")) from None

    def encode(
        self,
        text_encoder: Any,
        class_names: list[str],
        class_index: torch.Tensor,
        z_ctx: torch.Tensor | None,
        z_state: torch.Tensor | None,
    ) -> torch.Tensor:
        """Text features [S, n, 2, B, D] of the prompts of ``n`` rows.

        ``class_index`` [n] picks each row's class among ``class_names``; ``z_ctx`` [S, n, W] is
        added to the context vectors, ``z_state`` [S, 2, W] to the state vectors (None: no bias).
        """
        ids, eot, t_used = self.token_ids(text_encoder, class_names)
        with torch.no_grad():
            emb = text_encoder.token_embedding(ids).to(self.ctx.dtype)  # [C, T, W]
        emb = emb[class_index]  # [n, T, W]
        eot = eot[class_index]
        n, t_len, w = emb.shape
        n_tok = self.n_ctx + self.n_state
        s = 1 if z_ctx is None else z_ctx.shape[0]
        bp = self.n_prompts
        ctx = self.ctx[None, None, None].expand(s, n, 2, -1, -1, -1)  # [S, n, 2, B, P, W]
        if z_ctx is not None:
            ctx = ctx + z_ctx[:, :, None, None, None, :]
        state = self.state[None, None].expand(s, n, -1, -1, -1, -1)  # [S, n, 2, B, Q, W]
        if z_state is not None:
            state = state + z_state[:, None, :, None, None, :]
        x = torch.cat(
            [
                emb[None, :, None, None, :1].expand(s, n, 2, bp, 1, w),
                ctx,
                state,
                emb[None, :, None, None, 1 + n_tok :].expand(s, n, 2, bp, t_len - 1 - n_tok, w),
            ],
            dim=4,
        ).reshape(s * n * 2 * bp, t_len, w)
        if _is_causal(text_encoder):  # padding after the last EOS cannot change a causal tower's output
            x = x[:, :t_used]
        eot = eot[None, :, None, None].expand(s, n, 2, bp).reshape(-1)
        return text_encoder.encode_embeddings(x, eot).float().view(s, n, 2, bp, -1)


class ResidualCrossAttention(nn.Module):
    """RCA: text queries attend to (projected, unit) patch tokens of one layer; residual, renormalised."""

    def __init__(self, dim: int, n_layers: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"RCA: dimension {dim} is not divisible by {heads} heads (model.attn_heads)")
        self.heads, self.dim = heads, dim
        self.q = nn.Linear(dim, dim)
        self.proj = nn.ModuleList([nn.Linear(dim, dim, bias=False) for _ in range(n_layers)])

    def forward(self, text: torch.Tensor, patches: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """text [B, M, D] (unit), patches [B, N, D] -> (updated unit text [B, M, D], unit patches [B, N, D])."""
        b, m, d = text.shape
        n, h = patches.shape[1], self.heads
        fs = F.normalize(self.proj[layer](patches), dim=-1)
        q = self.q(text).view(b, m, h, d // h)
        kv = fs.view(b, n, h, d // h)
        attn = (torch.einsum("bmhc,bnhc->bhmn", q, kv) * d**-0.5).softmax(dim=-1)
        out = torch.einsum("bhmn,bnhc->bmhc", attn, kv).reshape(b, m, d)
        return F.normalize(out + text, dim=-1), fs


def average_samples(probs: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The Monte Carlo estimate: abnormal probabilities averaged over the sample / prompt ``dims``."""
    return probs.mean(dim=dims)


# --------------------------------------------------------------------------- head
class BayesPFLHead(nn.Module):
    """All trainable parts of Bayes-PFL on frozen (optionally HSVS-fused) CLIP features."""

    def __init__(self, model_cfg: Any, clip_dim: int, dino_dim: int, text_encoder: Any) -> None:
        super().__init__()
        cfg = self.model_cfg = model_cfg
        self.n_layers, self.clip_dim, self.n_samples = len(cfg.clip_layers), int(clip_dim), int(cfg.pfl_samples)
        object.__setattr__(self, "_text_encoder", text_encoder)  # the frozen text tower of Backbones: not a submodule
        width = int(text_encoder.width)  # token-embedding width: where the prompt samples are added
        self.fusion = HSVSFusion(cfg.fusion, self.n_layers, clip_dim, dino_dim, cfg.attn_heads)
        self.prompts = PromptBank(cfg.n_prompts, cfg.pfl_n_ctx, cfg.pfl_n_state, width)
        self.flow_ctx = PromptFlow(width, cfg.pfl_flows, cond_dim=clip_dim)  # image-specific
        self.flow_normal = PromptFlow(width, cfg.pfl_flows)  # image-agnostic, normal states
        self.flow_abnormal = PromptFlow(width, cfg.pfl_flows)  # image-agnostic, abnormal states
        self.class_mapping = nn.Linear(clip_dim, clip_dim)
        self.rca = ResidualCrossAttention(clip_dim, self.n_layers, cfg.attn_heads)
        for mod in (self.class_mapping, self.rca, self.flow_ctx):
            for sub in mod.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.normal_(sub.weight, std=0.02)
                    if sub.bias is not None:
                        nn.init.zeros_(sub.bias)
        self.log_scale_image = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.log_scale_pixel = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def text_encoder(self) -> Any:
        return self._text_encoder

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """{"prompt": prompt bank + the three prompt flows, "head": RCA, mappings, scales, fusion}."""
        prompt = [p for m in (self.prompts, self.flow_ctx, self.flow_normal, self.flow_abnormal) for p in m.parameters()]
        ids = {id(p) for p in prompt}
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return {"prompt": prompt, "head": head}

    def inference_eps(self, key: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inference draws of the three flows: the image-specific one from ``image_noise`` of the image's
        frozen global token ``key`` [B, D] ([S, B, W]), the image-agnostic ones from the seed ([S, 1, W])."""
        seed = INFERENCE_SEED + 3 * int(getattr(self.model_cfg, "z_seed", 0))
        width = self.flow_ctx.z_dim
        eps_ctx = image_noise(key, width, seed, n=s).transpose(0, 1)
        eps_n, eps_a = (torch.randn((s, 1, width), generator=torch.Generator().manual_seed(seed + k)) for k in (1, 2))
        return eps_ctx, eps_n, eps_a

    def sample_text(
        self, v_global: torch.Tensor, class_names: list[str], key: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Draw the prompt samples (1 in training, ``pfl_samples`` in eval) and encode them; ``key`` [B, D]:
        a frozen feature of each image the inference draws are a function of (default ``v_global``)."""
        unique = list(dict.fromkeys(class_names))
        index = torch.tensor([unique.index(c) for c in class_names], device=v_global.device)
        s = 1 if self.training else self.n_samples
        eps = (None, None, None) if self.training else self.inference_eps(v_global if key is None else key, s)
        with torch.autocast(v_global.device.type, enabled=False):  # densities and log-dets in float32
            z_ctx, kl_ctx = self.flow_ctx(v_global.float(), s, eps[0])  # [S, B, W]
            z_n, kl_n = self.flow_normal(None, s, eps[1])  # [S, 1, W]
            z_a, kl_a = self.flow_abnormal(None, s, eps[2])
        z_ctx = z_ctx.expand(s, v_global.shape[0], -1)
        z_state = torch.cat([z_n, z_a], dim=1)  # [S, 2, W]
        text = self.prompts.encode(self.text_encoder, unique, index, z_ctx, z_state)  # [S, B, 2, Bp, D]
        cls_index = torch.arange(len(unique), device=v_global.device)
        t_init = self.prompts.encode(self.text_encoder, unique, cls_index, None, None)[0][index]  # [B, 2, Bp, D]
        return {
            "text": text.permute(1, 0, 2, 3, 4),  # [B, S, 2, Bp, D]
            "t_init": t_init,
            "kl_ctx": kl_ctx.mean(),
            "kl_normal": kl_n.mean(),
            "kl_abnormal": kl_a.mean(),
        }

    def forward(self, feats: Any, class_names: list[str] | tuple[str, ...], out_size: int | tuple[int, int]) -> SSVPOutput:
        class_names, size = head_inputs(feats, class_names, out_size)
        b, device = len(class_names), self.prompts.ctx.device
        use_dino = self.fusion.mode != "none"
        patches, v_global = self.fusion(
            feats.clip_patch.to(device).float(),
            feats.clip_global.to(device).float(),
            feats.dino_patch.to(device).float() if use_dino else None,
            feats.dino_global.to(device).float() if use_dino else None,
        )
        sampled = self.sample_text(v_global.float(), class_names, key=feats.clip_global.to(device))
        with torch.autocast(device.type, enabled=False):  # similarities and scales in float32
            text = F.normalize(sampled["text"].float(), dim=-1)  # [B, S, 2, Bp, D]
            _, s, _, bp, d = text.shape
            mapped = F.normalize(self.class_mapping(text), dim=-1)
            v = F.normalize(v_global.float(), dim=-1)
            image_logits = self.log_scale_image.exp() * torch.einsum("bskjd,bd->bskj", mapped, v)
            score = average_samples(image_logits.softmax(dim=2)[:, :, 1], (1, 2))  # [B]

            flat = text.reshape(b, s * 2 * bp, d)
            layer_probs = []
            for layer in range(self.n_layers):
                t_upd, fs = self.rca(flat, patches[:, layer].float(), layer)
                logits = self.log_scale_pixel.exp() * torch.einsum("bnd,bmd->bnm", fs, t_upd)
                probs = logits.view(b, -1, s, 2, bp).softmax(dim=3)[:, :, :, 1]  # [B, N, S, Bp]
                layer_probs.append(probs)
            probs = torch.stack(layer_probs, dim=1)  # [B, L, N, S, Bp]
        n = probs.shape[2]
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"patch count N={n} is not a square grid")
        grid_map = average_samples(probs, (1, 3, 4)).view(b, 1, g, g)  # mean over layers, samples, prompts
        anomaly_map = F.interpolate(grid_map, size=size, mode="bilinear", align_corners=False)[:, 0]
        prompt_maps = None
        if self.training:  # per-layer, per-prompt maps at the mask size for the segmentation loss
            per = probs.permute(0, 1, 3, 4, 2).reshape(b, self.n_layers * s * bp, g, g)
            prompt_maps = F.interpolate(per, size=size, mode="bilinear", align_corners=False).view(
                b, self.n_layers, s * bp, *size
            )
        t_final = F.normalize(text.mean(dim=(1, 3)), dim=-1)  # [B, 2, D]: mean over samples and prompts
        aux: dict[str, Any] = {
            "text_samples": text,
            "image_logits": image_logits,
            "prompt_maps": prompt_maps,
            "map_grid": torch.cat([1.0 - grid_map, grid_map], dim=1),
            "patches": patches,
            "v_global": v_global,
            "t_init_prompts": sampled["t_init"],
            "t_init": F.normalize(F.normalize(sampled["t_init"], dim=-1).mean(dim=2), dim=-1),
            "t_final": t_final,
            "text": t_final,  # the state embeddings (TIR-FG / SCD read them as SSVP's)
            "kl_ctx": sampled["kl_ctx"],
            "kl_normal": sampled["kl_normal"],
            "kl_abnormal": sampled["kl_abnormal"],
            "samples": s,
            "grid": g,
        }
        aux.update(sampled.get("aux", {}))  # a subclass's prompt generator (ssvp.pfl_vcpg: VCPG's mu, z, ...)
        return SSVPOutput(anomaly_map=anomaly_map, score=score, score_logit=prob_logit(score), aux=aux)


# --------------------------------------------------------------------------- losses
def balanced_focal_loss(prob: torch.Tensor, target: torch.Tensor, gamma: float, eps: float = 1e-8) -> torch.Tensor:
    """Focal loss of abnormal probabilities [..., H, W] vs masks: mean over defect pixels + mean over
    normal pixels (a class with no pixel contributes 0)."""
    prob, target = prob.float(), target.to(prob.dtype).expand_as(prob)
    fg = target > 0.5
    p_t = torch.where(fg, prob, 1.0 - prob)
    loss = -((1.0 - p_t) ** gamma) * torch.log(p_t + eps)
    n_fg, n_bg = fg.sum(), (~fg).sum()
    return (loss * fg).sum() / (n_fg + eps) + (loss * ~fg).sum() / (n_bg + eps)


def dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - (2 sum p y + eps) / (sum p + sum y + eps) over the whole batch (abnormal channel)."""
    prob, target = prob.float(), target.to(prob.dtype).expand_as(prob)
    inter = (prob * target).sum()
    return 1.0 - (2.0 * inter + eps) / (prob.sum() + target.sum() + eps)


def orthogonal_loss(text: torch.Tensor) -> torch.Tensor:
    """text [..., 2, B, D]: sum over the two states of the mean over the B x B matrix of squared
    cosines between different prompts (diagonal counted as 0)."""
    t = F.normalize(text.float(), dim=-1)
    cos2 = torch.einsum("...kid,...kjd->...kij", t, t) ** 2
    bp = t.shape[-2]
    off = cos2 * (1.0 - torch.eye(bp, device=t.device, dtype=t.dtype))
    return off.mean(dim=(-1, -2)).reshape(-1, 2).mean(dim=0).sum()  # mean over rows, sum over states


def bayes_pfl_loss(out: SSVPOutput, masks: torch.Tensor, labels: torch.Tensor, model_cfg: Any) -> tuple[torch.Tensor, dict]:
    """The Bayes-PFL objective on a ``BayesPFLHead`` output (see the module docstring)."""
    aux = out.aux
    if aux.get("prompt_maps") is None:
        raise ValueError("bayes_pfl_loss needs a training-mode output (per-prompt maps); call head.train()")
    logits = aux["image_logits"].float()  # [B, S, 2, Bp]
    b, s, _, bp = logits.shape
    labels = labels.to(logits.device).long()
    cls = F.cross_entropy(logits.permute(0, 2, 1, 3), labels[:, None, None].expand(b, s, bp))
    masks = masks.to(logits.device)
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    maps = aux["prompt_maps"]  # [B, L, S*Bp, H, W]
    if maps.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"anomaly maps {tuple(maps.shape[-2:])} and masks {tuple(masks.shape[-2:])} differ in size")
    focal = logits.new_zeros(())
    dice = logits.new_zeros(())
    for layer in range(maps.shape[1]):
        for j in range(maps.shape[2]):
            focal = focal + balanced_focal_loss(maps[:, layer, j], masks, model_cfg.focal_lambda) / maps.shape[2]
            dice = dice + dice_loss(maps[:, layer, j], masks) / maps.shape[2]
    kl = aux["kl_ctx"] + aux["kl_normal"] + aux["kl_abnormal"]
    orth = orthogonal_loss(aux["text_samples"])
    loss = cls + focal + dice + model_cfg.pfl_kl_weight * kl + model_cfg.pfl_orth_weight * orth
    parts = {"cls": cls.detach(), "focal": focal.detach(), "dice": dice.detach(), "kl": kl.detach(), "orth": orth.detach()}
    parts["total"] = loss.detach()
    return loss, parts
