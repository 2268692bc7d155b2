"""The CLIP text model (transformers' ``CLIPTextModel``) in Flax linen, the text encoder of zeroscope.

Parameters are named like the hub checkpoints (``text_model/encoder/layers_0/self_attn/q_proj/kernel``
is ``text_model.encoder.layers.0.self_attn.q_proj.weight``); transformers >= 5 saves the same
tensors without the ``text_model.`` prefix, which ``adapt_state_dict`` adds back. The residual
stream, the layer-norm statistics and the softmax run in float32, the matmuls in ``dtype``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmc_jax.kernels.attention_core import dot_product_attention
from vmc_jax.models.layers import Dtype, layer_norm
from vmc_jax.models.t5 import checked, hf_activation

_PREFIX = "text_model."


@dataclasses.dataclass(frozen=True)
class CLIPTextEncoderConfig:
    """The fields of a transformers ``CLIPTextConfig`` that the text model uses (transformers' defaults)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> "CLIPTextEncoderConfig":
        """Reads a transformers ``config.json`` dict (from ``source``, for errors); missing fields take
        transformers' defaults, other keys are transformers' own and ignored."""
        return read_transformer_config(cls, raw, source)


def read_transformer_config(cls: type, raw: Mapping[str, Any], source: str) -> Any:
    """The ``cls`` dataclass of a transformers config dict: its fields found in ``raw`` (the rest take
    their defaults), with the activation and the head split checked at load time, not at the first call."""
    result = cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})
    checked(source, hf_activation, result.hidden_act)
    if result.hidden_size % result.num_attention_heads:
        raise ValueError(f"{source}: hidden_size {result.hidden_size} is not divisible by "
                         f"num_attention_heads {result.num_attention_heads}")
    return result


class CLIPAttention(nn.Module):
    """Multi-head self-attention (causal for text), biased projections, scores scaled by head_dim ** -0.5."""

    config: CLIPTextEncoderConfig
    dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x (batch, seq, hidden), mask (batch, 1, 1, seq) bool or None -> (batch, seq, hidden)."""
        cfg = self.config
        batch, length, _ = x.shape
        head_dim = cfg.hidden_size // cfg.num_attention_heads

        def heads(name: str) -> jax.Array:
            projected = nn.Dense(cfg.hidden_size, dtype=self.dtype, name=name)(x)
            return projected.reshape(batch, length, cfg.num_attention_heads, head_dim)

        out = dot_product_attention(
            heads("q_proj"), heads("k_proj"), heads("v_proj"), scale=head_dim**-0.5, mask=mask, causal=self.causal
        )
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, name="out_proj")(out.reshape(batch, length, -1))


class CLIPMLP(nn.Module):
    """``fc2(act(fc1 x))`` with the config's ``hidden_act``."""

    config: CLIPTextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., hidden) -> (..., hidden)."""
        hidden = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
        hidden = hf_activation(self.config.hidden_act)(hidden)
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(hidden)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer (``encoder.layers.i``)."""

    config: CLIPTextEncoderConfig
    dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x float32 residual stream -> updated stream."""
        eps = self.config.layer_norm_eps
        attended = CLIPAttention(self.config, dtype=self.dtype, causal=self.causal, name="self_attn")(
            layer_norm(eps, self.dtype, "layer_norm1")(x), mask
        )
        x = x + attended.astype(jnp.float32)
        mlp = CLIPMLP(self.config, dtype=self.dtype, name="mlp")
        return x + mlp(layer_norm(eps, self.dtype, "layer_norm2")(x)).astype(jnp.float32)


class CLIPTextEmbeddings(nn.Module):
    """Token plus learned absolute position embeddings (``embeddings.*``)."""

    config: CLIPTextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids (batch, seq) -> (batch, seq, hidden) float32."""
        cfg = self.config
        length = input_ids.shape[-1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        positions = nn.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, name="position_embedding"
        )(jnp.arange(length))
        return tokens.astype(jnp.float32) + positions.astype(jnp.float32)


class CLIPEncoder(nn.Module):
    """The stack of layers (``encoder.layers``); ``causal`` False for the vision tower."""

    config: CLIPTextEncoderConfig
    dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x float32 residual stream -> stream after every layer."""
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, dtype=self.dtype, causal=self.causal, name=f"layers_{i}")(x, mask)
        return x


class CLIPTextTransformer(nn.Module):
    """Embeddings, layers and the final layer norm (``text_model.*``)."""

    config: CLIPTextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, mask: jax.Array | None) -> jax.Array:
        """input_ids (batch, seq), mask (batch, 1, 1, seq) bool or None -> (batch, seq, hidden) in ``dtype``."""
        x = CLIPTextEmbeddings(self.config, dtype=self.dtype, name="embeddings")(input_ids)
        x = CLIPEncoder(self.config, dtype=self.dtype, name="encoder")(x, mask)
        return layer_norm(self.config.layer_norm_eps, self.dtype, "final_layer_norm")(x)


class CLIPTextEncoder(nn.Module):
    """transformers' ``CLIPTextModel``: ``apply(params, input_ids, attention_mask=None)`` -> last hidden state."""

    config: CLIPTextEncoderConfig
    dtype: Dtype = jnp.float32

    CONFIG_CLASS: ClassVar[type] = CLIPTextEncoderConfig  # reads this module's config.json: CONFIG_CLASS.from_dict

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids (batch, seq) int; attention_mask (batch, seq) 1 = token / 0 = padding, or None.

        The causal mask always applies; the padding mask, when given, also hides padded keys.
        """
        mask = None if attention_mask is None else jnp.asarray(attention_mask)[:, None, None, :].astype(bool)
        return CLIPTextTransformer(self.config, dtype=self.dtype, name="text_model")(input_ids, mask)

    def dummy_inputs(self) -> tuple[jax.Array]:
        """The smallest inputs the model accepts, for ``init`` and shape inference."""
        return (jnp.zeros((1, 1), jnp.int32),)

    @classmethod
    def adapt_state_dict(cls, state_dict: Mapping[str, Any], source: str) -> dict[str, Any]:
        """Maps a checkpoint's names to this module's: adds ``text_model.`` where transformers >= 5 left it out.

        ``source`` is unused here; it is part of the interface shared with ``T5Encoder``.
        """
        if any(name.startswith(_PREFIX) for name in state_dict):
            return dict(state_dict)
        return {_PREFIX + name: value for name, value in state_dict.items()}
