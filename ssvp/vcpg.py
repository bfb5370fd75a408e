"""Vision-Conditioned Prompt Generator (VCPG, §3.2): decoupled prompts, VAE latent, gated text update.

Decoupled prompts (Eq. 6). For class word ``[cls]`` and state s in {normal, abnormal},
prompt k in 1..P (P = ``model.n_prompts``, 3 per state as in §4.2)::

    p_{s,k} = [SOS] [V]bg_1 .. [V]bg_m  [V]state_{s,k,1} .. [V]state_{s,k,n}  [cls] . [EOS]
    T_init[s, k] = T_clip(p_{s,k})                                            (Eq. 6)

``[V]bg`` (m = ``n_ctx_bg`` vectors) is one learnable context shared by every prompt;
``[V]state`` (n = ``n_ctx_state`` vectors) is learnable per state and prompt. The frozen
CLIP text tower maps the embeddings to the joint space (gradients reach the contexts).

VAE on the global synergistic feature V_global (Eq. 7-9)::

    mu = F_mu(V_global),  log sigma^2 = F_sigma(V_global)   two parallel MLPs (Eq. 7)
    z = mu + eps (.) exp(log sigma^2 / 2),  eps ~ N(0, I)                       (Eq. 8)
    V_hat = D_theta(z);  L_VAE = ||V_global - V_hat||^2 + beta KL             (Eq. 9, ssvp.losses)

§3.2.2 uses "the sampled z" at inference too. In eval mode eps is a function of the image
and ``z_seed`` only (``image_noise``): eps = R u, where u is the unit frozen CLIP global token
of the image and R a standard-normal matrix drawn from ``z_seed``. For any fixed image,
R u ~ N(0, I) exactly over the seeds (a sample, as Eq. 8 asks), while the same image gets
the same eps alone, in any batch, at any position and on any number of loader workers;
since eps depends smoothly on the feature, rounding noise of the backbone (batch size,
an fp16 feature cache) moves it by rounding noise only. ``z_infer="mu"`` uses z = mu
instead (an option). Training draws eps ~ N(0, I) afresh at every step.

Text-latent cross-attention and gate (Eq. 10-11)::

    Q_text = T_init W_Q,  K_z = Z W_K,  V_z = Z W_V
    delta_inj = Softmax(Q_text K_z^T / sqrt(d_k)) V_z                         (Eq. 10)
    T_final = LN(T_init + alpha * delta_inj),  alpha initialised to 0        (Eq. 11)

As written Z = z W_in is a single token (``n_latent_tokens=1``): the softmax over one key
is 1, so delta_inj = V_z and every prompt of an image gets the same visual bias (W_Q and
W_K then get no gradient). ``n_latent_tokens=n`` splits the projection into n tokens so
each prompt weighs them (an option). ``ln=False`` drops the LayerNorm of Eq. 11
(Algorithm 1 line 8 has none; ``model.ln_eq4_eq11``). With alpha = 0, T_final = LN(T_init)
and only alpha gets a gradient from delta_inj at the first step.

The margin loss (Eq. 12) keeps T_final near sg(T_init); see ``ssvp.losses``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .hsvs import CrossAttention

__all__ = ["PromptLearner", "VCPG", "image_noise"]

_LOGVAR_RANGE = (-10.0, 10.0)
_PROJECTIONS: dict[tuple, torch.Tensor] = {}


def image_noise(key: torch.Tensor, dim: int, seed: int, n: int = 1) -> torch.Tensor:
    """Standard-normal noise [B, n, dim] that is a function of each image and ``seed`` only.

    ``key`` [B, D]: a frozen feature of each image (the backbone's global token). eps = R u with
    u = key / |key| and R [n * dim, D] standard normal from ``seed``: for a fixed image eps ~ N(0, I)
    over seeds; it depends on no other image of the batch and on no position.
    """
    b, d = key.shape
    cache_key = (int(seed), n * dim, d, str(key.device))
    proj = _PROJECTIONS.get(cache_key)
    if proj is None:
        proj = torch.randn(n * dim, d, generator=torch.Generator().manual_seed(int(seed))).to(key.device)
        if len(_PROJECTIONS) >= 16:
            _PROJECTIONS.clear()
        _PROJECTIONS[cache_key] = proj
    u = torch.nn.functional.normalize(key.detach().float(), dim=-1)
    return (u @ proj.T).view(b, n, dim)


def _is_causal(text_encoder: Any) -> bool:
    """True when the text tower's attention mask is the causal one (-inf exactly above the diagonal).

    Only then is the output at position t independent of tokens after t, so padding after
    the EOS token may be cut. Unknown encoders keep the full context.
    """
    clip = getattr(text_encoder, "_clip", None)
    mask = getattr(clip, "attn_mask", None)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    hit = _CAUSAL_CACHE.get(id(mask))  # checked once per mask (no device sync every step)
    if hit is not None and hit[0] is mask and hit[1] == mask._version:
        return hit[2]
    upper = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    causal = bool(torch.isneginf(mask[upper]).all()) and bool((mask[~upper] == 0).all())
    if len(_CAUSAL_CACHE) >= _TOKEN_CACHE_SIZE:
        _CAUSAL_CACHE.clear()
    _CAUSAL_CACHE[id(mask)] = (mask, mask._version, causal)
    return causal


_TOKEN_CACHE: dict[tuple, tuple[Any, torch.Tensor, torch.Tensor, int]] = {}
_CAUSAL_CACHE: dict[int, tuple[torch.Tensor, int, bool]] = {}
_TOKEN_CACHE_SIZE = 256


class PromptLearner(nn.Module):
    """Learnable ``[V]bg`` (shared) and ``[V]state`` (normal / abnormal x P) contexts (Eq. 6)."""

    def __init__(self, n_ctx_bg: int, n_ctx_state: int, n_prompts: int, width: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.n_ctx_bg = n_ctx_bg
        self.n_ctx_state = n_ctx_state
        self.n_prompts = n_prompts
        self.ctx_bg = nn.Parameter(torch.randn(n_ctx_bg, width) * init_std)
        self.ctx_state = nn.Parameter(torch.randn(2, n_prompts, n_ctx_state, width) * init_std)

    @property
    def n_ctx(self) -> int:
        return self.n_ctx_bg + self.n_ctx_state

    def _token_ids(self, text_encoder: Any, class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Token ids [C, T] of the placeholder prompts, their EOS positions [C] and the length
        up to the last EOS (max EOS position + 1), checked.

        The ids depend only on the tokenizer, the class names and n_ctx, so they are kept in a
        small cache keyed by the tokenizer object (held, so its id stays unique) instead of
        running the BPE tokenizer every step (performance only; no tensor with a graph).
        """
        device = self.ctx_bg.device
        tokenizer = getattr(text_encoder, "_tokenizer", None)
        key = (id(tokenizer), tuple(class_names), self.n_ctx, str(device))
        hit = _TOKEN_CACHE.get(key) if tokenizer is not None else None
        if hit is not None and hit[0] is tokenizer:
            return hit[1], hit[2], hit[3]
        n_cls = len(class_names)
        placeholder = " ".join(["X"] * self.n_ctx)
        texts = [f"{placeholder} {name.replace('_', ' ')}." for name in class_names]
        ids = text_encoder.tokenize(texts).to(device)  # [C, T]
        if ids.shape[1] < self.n_ctx + 3:
            raise ValueError(f"text context length {ids.shape[1]} is too short for {self.n_ctx} prompt tokens")
        eot = text_encoder.eot_index(ids)
        # every prompt ends with '.' right before EOS; a truncated prompt does not
        dot = text_encoder.tokenize(["."]).to(ids.device)[0, 1]
        fits = (eot > self.n_ctx + 1) & (ids[torch.arange(n_cls, device=ids.device), (eot - 1).clamp(min=0)] == dot)
        if not bool(fits.all()):
            bad = [class_names[i] for i in torch.nonzero(~fits).flatten().tolist()]
            raise ValueError(
                f"class names {bad} do not fit the text encoder's context of {ids.shape[1]} tokens "
                f"after {self.n_ctx} prompt tokens (model.n_ctx_bg + model.n_ctx_state)"
            )
        t_used = int(eot.max()) + 1
        if tokenizer is not None:
            if len(_TOKEN_CACHE) >= _TOKEN_CACHE_SIZE:
                _TOKEN_CACHE.clear()
            _TOKEN_CACHE[key] = (tokenizer, ids, eot, t_used)
        return ids, eot, t_used

    def forward(self, text_encoder: Any, class_names: list[str]) -> torch.Tensor:
        """Unique class names -> T_init [C, 2, P, D] (normal = index 0, abnormal = 1)."""
        n_cls, p, w = len(class_names), self.n_prompts, self.ctx_bg.shape[-1]
        ids, eot, t_used = self._token_ids(text_encoder, class_names)
        with torch.no_grad():
            emb = text_encoder.token_embedding(ids).to(self.ctx_bg.dtype)  # [C, T, W]
        prefix = emb[:, :1]  # SOS
        suffix = emb[:, 1 + self.n_ctx :]  # class word, '.', EOS, padding
        t_len = emb.shape[1]
        ctx = torch.cat([self.ctx_bg.expand(2, p, -1, -1), self.ctx_state], dim=2)  # [2, P, n_ctx, W]
        x = torch.cat(
            [
                prefix[:, None, None].expand(n_cls, 2, p, 1, w),
                ctx[None].expand(n_cls, -1, -1, -1, -1),
                suffix[:, None, None].expand(n_cls, 2, p, t_len - 1 - self.n_ctx, w),
            ],
            dim=3,
        ).reshape(n_cls * 2 * p, t_len, w)
        eot = eot.repeat_interleave(2 * p)
        if _is_causal(text_encoder):
            # CLIP's text tower is causal and pools at EOS: tokens after the last EOS (padding)
            # cannot change any pooled feature, so they are dropped (same output, ~T/eot less work)
            x = x[:, :t_used]
        t_init = text_encoder.encode_embeddings(x, eot)  # Eq. 6
        return t_init.float().view(n_cls, 2, p, -1)


class VCPG(nn.Module):
    """VAE over V_global + text-latent cross-attention + gate alpha + LayerNorm (Eq. 7-11)."""

    def __init__(
        self,
        dim: int,
        latent_dim: int,
        heads: int,
        alpha_init: float = 0.0,
        n_latent_tokens: int = 1,
        ln: bool = True,
        z_infer: str = "sample",
        z_seed: int = 0,
    ) -> None:
        """Wide on purpose: each argument is a named hyperparameter of Eq. 7-11 (``dim``
        D_c of V_global and T_init, ``latent_dim`` of z in Eq. 7-8, ``heads`` of Eq. 10's attention,
        ``alpha_init`` Eq. 11's gate, ``n_latent_tokens`` the tokens of Z in Eq. 10, ``ln`` Eq. 11's
        LayerNorm, ``z_infer``/``z_seed`` Eq. 8's z at inference), passed one by one so the module can
        be built without a ``Config`` (``ssvp.model``, ``ssvp.pfl_vcpg`` and the tests call it so)."""
        super().__init__()
        if z_infer not in ("sample", "mu"):
            raise ValueError(f"model.z_infer must be sample or mu; got {z_infer!r}")
        hidden = dim
        self.n_latent_tokens = n_latent_tokens
        self.z_infer = z_infer
        self.z_seed = int(z_seed)
        # E_phi: two parallel MLPs F_mu and F_sigma (Eq. 7; hidden width D_c)
        self.f_mu = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, latent_dim))
        self.f_sigma = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))  # D_theta, Eq. 9
        self.latent_tokens = nn.Linear(latent_dim, n_latent_tokens * dim)  # Z = tokens(z)
        self.cross = CrossAttention(dim, dim, dim, heads)  # W_Q, W_K, W_V of Eq. 10
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))  # Eq. 11 gate
        self.norm = nn.LayerNorm(dim) if ln else nn.Identity()  # Eq. 11

    def encode(self, v_global: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.f_mu(v_global)  # Eq. 7
        logvar = self.f_sigma(v_global).clamp(*_LOGVAR_RANGE)  # Eq. 7 (clamped for stability)
        return mu, logvar

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor, key: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 8. Training: eps ~ N(0, I). Eval: eps = ``image_noise(key, ., z_seed)`` (``key`` [B, D]: a
        frozen feature of each image; default ``mu``), or z = mu with ``z_infer="mu"``."""
        if self.training:
            eps = torch.randn_like(mu)
        elif self.z_infer == "mu":
            return mu
        else:
            eps = image_noise(mu if key is None else key, mu.shape[-1], self.z_seed)[:, 0].to(mu.dtype)
        return mu + eps * torch.exp(0.5 * logvar)  # Eq. 8

    def update_text(self, t_init: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """t_init [B, ..., D], z [B, latent] -> T_final, same shape as t_init (Eq. 10-11)."""
        b, d = t_init.shape[0], t_init.shape[-1]
        q = t_init.reshape(b, -1, d)
        mem = self.latent_tokens(z).view(b, self.n_latent_tokens, d)
        delta = self.cross(q, mem)  # delta_inj, Eq. 10
        return self.norm(q + self.alpha * delta).view_as(t_init)  # Eq. 11

    def forward(self, v_global: torch.Tensor, t_init: torch.Tensor, image_key: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``image_key`` [B, D]: a frozen feature of each image for the inference-time eps (default V_global)."""
        mu, logvar = self.encode(v_global)
        z = self.reparameterize(mu, logvar, v_global if image_key is None else image_key)
        recon = self.decoder(z)  # D_theta(z) of Eq. 9
        t_final = self.update_text(t_init, z)
        return {"mu": mu, "logvar": logvar, "z": z, "recon": recon, "t_final": t_final}
