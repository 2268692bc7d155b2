"""VMC fine-tuning: the tuned parameter subset, the motion-distillation loss, the train step."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

# Every to_q / to_k / to_v of both attentions of every temporal transformer (the set VMC tunes).
TEMPORAL_ATTENTION_QKV = r"(^|/)temp_attentions_\d+/transformer_blocks_\d+/attn[12]/to_[qkv]/(kernel|bias)$"


def split_params(params: Any, pattern: str = TEMPORAL_ATTENTION_QKV) -> tuple[dict, dict]:
    """Splits params into (tuned, frozen) nested dicts: tuned are the leaves whose path matches.

    Paths are the '/'-joined Flax names, e.g. ``up_blocks_1/temp_attentions_0/.../attn1/to_q/kernel``.
    Taking gradients with respect to ``tuned`` alone keeps the frozen weights out of autodiff.
    """
    regex = re.compile(pattern)
    flat = traverse_util.flatten_dict(params)
    tuned = {k: v for k, v in flat.items() if regex.search("/".join(k))}
    if not tuned:
        raise ValueError(f"no parameter path matches {pattern!r}")
    frozen = {k: v for k, v in flat.items() if k not in tuned}
    return traverse_util.unflatten_dict(tuned), traverse_util.unflatten_dict(frozen)


def merge_params(tuned: Any, frozen: Any) -> dict:
    """The inverse of :func:`split_params`."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(tuned)})


LOSS_KINDS = ("paper", "official", "l2")


def _cosine(a: jax.Array, b: jax.Array, axis: int, eps: float = 1e-8) -> jax.Array:
    """Cosine similarity along ``axis``, each norm clamped at ``eps`` (as torch's cosine_similarity)."""
    norms = jnp.maximum(jnp.linalg.norm(a, axis=axis), eps) * jnp.maximum(jnp.linalg.norm(b, axis=axis), eps)
    return jnp.sum(a * b, axis=axis) / norms


def motion_distillation_loss(eps_pred: jax.Array, eps_true: jax.Array, kind: str = "paper") -> jax.Array:
    """VMC's loss on frame-to-frame residuals of predicted and true noise, ``(b, f, h, w, c)`` each.

    "paper": 1 - cosine between the residual vectors of consecutive frames (each flattened over
    h, w, c), averaged over frame pairs and batch; "official": the released code's form, 1 -
    cosine along the frame axis of the absolute residuals, averaged over b, h, w, c; "l2": mean
    squared difference of the residuals.
    """
    if eps_pred.shape != eps_true.shape:
        raise ValueError(f"eps_pred {eps_pred.shape} and eps_true {eps_true.shape} differ in shape")
    pred = (eps_pred[:, 1:] - eps_pred[:, :-1]).astype(jnp.float32)
    true = (eps_true[:, 1:] - eps_true[:, :-1]).astype(jnp.float32)
    if kind == "paper":
        b, f = pred.shape[:2]
        return jnp.mean(1 - _cosine(pred.reshape(b, f, -1), true.reshape(b, f, -1), axis=-1))
    if kind == "official":
        return jnp.mean(1 - _cosine(jnp.abs(pred), jnp.abs(true), axis=1))
    if kind == "l2":
        return jnp.mean(jnp.square(pred - true))
    raise ValueError(f"unknown motion distillation loss {kind!r}; expected one of {LOSS_KINDS}")
