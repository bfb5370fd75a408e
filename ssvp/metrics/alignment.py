"""Alignment metrics of the vision-conditioned prompts: TIR-FG and SCD (Eq. 23-24)."""
from __future__ import annotations

from typing import Any

import numpy as np

from .common import MetricInputError, _labels_scores, _to_numpy


# ---------------------------------------------------------- TIR-FG and SCD (Eq. 23-24)
def _unit(x: np.ndarray, name: str) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    if (n == 0).any():
        raise MetricInputError(f"{name}: contains a zero vector (cosine similarity undefined)")
    return x / n


def _text_pairs(t: Any, name: str, b: int | None, d: int | None) -> np.ndarray:
    a = _to_numpy(t, name).astype(np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[1] != 2:
        raise MetricInputError(f"{name}: expected [2, D] or [B, 2, D] (normal, abnormal), got shape {a.shape}")
    if d is not None and a.shape[2] != d:
        raise MetricInputError(f"{name}: feature size {a.shape[2]} differs from the visual features' {d}")
    if b is not None and a.shape[0] not in (1, b):
        raise MetricInputError(f"{name}: batch {a.shape[0]} differs from {b}")
    return _unit(a, name)


def tir_fg(t_init: Any, t_final: Any, v_global: Any, labels: Any) -> float:
    """TIR-FG (Eq. 23): text-image relevance gain of the vision-conditioned prompts.

    Inputs (what ``SSVPOutput.aux`` holds): ``t_init`` [2, D] or [B, 2, D], the static
    prompts' text features (normal, abnormal) before VCPG; ``t_final`` [B, 2, D], after
    VCPG (Eq. 12); ``v_global`` [B, D], the image's global visual feature in the joint
    space; ``labels`` [B] (1 = anomalous).

    Definition used here: relevance R(T) = mean_i sign_i * (cos(v_i, t_i^abn) -
    cos(v_i, t_i^norm)) with sign_i = +1 for anomalous and -1 for normal images (how much
    closer an image is to the text of its true state), and TIR-FG = R(T_final) - R(T_init).
    Positive = VCPG made text and image more relevant to each other.

    Caveat: the paper's Eq. 23 text could not be read from this project's stored copy of
    arXiv 2601.09147 (only its opening is indexed); this is a reconstruction from the
    metric's name and the quantities VCPG produces. Check it against the paper before
    quoting numbers next to the paper's.
    """
    v = _to_numpy(v_global, "v_global").astype(np.float64)
    if v.ndim != 2:
        raise MetricInputError(f"v_global: expected [B, D], got shape {v.shape}")
    b, d = v.shape
    y, _ = _labels_scores(labels, np.zeros(len(_to_numpy(labels, "labels").reshape(-1))))
    if y.size != b:
        raise MetricInputError(f"labels ({y.size}) and v_global ({b}) differ in batch size")
    v = _unit(v, "v_global")
    sign = np.where(y, 1.0, -1.0)

    def relevance(t):
        cos = np.einsum("bd,bcd->bc", v, np.broadcast_to(t, (b, 2, d)))
        return float(np.mean(sign * (cos[:, 1] - cos[:, 0])))

    return relevance(_text_pairs(t_final, "t_final", b, d)) - relevance(_text_pairs(t_init, "t_init", b, d))


def scd(t_init: Any, t_final: Any) -> float:
    """SCD (Eq. 24): semantic consistency of the vision-conditioned prompts.

    Inputs: ``t_init`` [2, D] or [B, 2, D] and ``t_final`` [B, 2, D] text features
    (normal, abnormal). SCD = mean over images and both states of cos(t_final, t_init):
    1 means VCPG kept the prompts' initial semantics (gate alpha = 0 at initialisation,
    Eq. 12), lower values mean the image-conditioned prompts drifted from them. Read with
    TIR-FG: a useful VCPG raises relevance (TIR-FG > 0) while staying consistent.

    Caveat: as for ``tir_fg``, a reconstruction; the paper's Eq. 24 text was not readable
    from this project's stored copy of the paper.
    """
    tf = _to_numpy(t_final, "t_final")
    b = tf.shape[0] if tf.ndim == 3 else 1
    d = tf.shape[-1]
    f = _text_pairs(t_final, "t_final", None, d)
    i = _text_pairs(t_init, "t_init", b, d)
    return float(np.mean(np.sum(np.broadcast_to(i, f.shape) * f, axis=-1)))
