"""The T5 encoder (transformers' ``T5EncoderModel``) in Flax linen, the text encoder of Show-1 and IF.

Submodules are named like the PyTorch attributes, so ``vmc_jax.hub.conversion.layout`` maps every
parameter to its state-dict name (``encoder/block_0/layer_0/SelfAttention/q/kernel`` is
``encoder.block.0.layer.0.SelfAttention.q.weight``). The residual stream, the RMS norms, the
softmax and the output projection ``wo`` of each feed-forward layer run in float32 whatever the
compute ``dtype`` (transformers likewise keeps ``wo`` in float32, because T5 v1.1 overflows fp16
there); the other matmuls run in ``dtype``. Dropout is left out: the encoder is only ever frozen.
The attention core and the activation table here are shared with the CLIP text model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vmc_jax.kernels.attention_core import dot_product_attention
from vmc_jax.models.layers import Dtype

# transformers' activation names (``ACT2FN`` keys) used by T5 and CLIP text configs.
HF_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
}


def hf_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The JAX function for a transformers activation name, so configs pick it by name."""
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(HF_ACTIVATIONS))}")
    return HF_ACTIVATIONS[name]


def checked(source: str, check: Callable[..., Any], *args: Any) -> Any:
    """``check(*args)``, its ValueError prefixed with the config's ``source`` (a file or "config")."""
    try:
        return check(*args)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """The fields of a transformers ``T5Config`` that the encoder uses (defaults are transformers')."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> "T5EncoderConfig":
        """Reads a transformers ``config.json`` dict (from ``source``, for errors); missing fields take
        transformers' defaults, other keys are transformers' own and ignored."""
        result = cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})
        checked(source, hf_activation, result.activation)  # fail at load time, not at the first call
        return result

    @property
    def gated(self) -> bool:
        """Whether the feed-forward layer is gated (``wi_0`` / ``wi_1``), as in T5 v1.1."""
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """The activation name, resolved as transformers does ("gated-gelu" means the tanh gelu)."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]


def relative_position_buckets(
    query_length: int, key_length: int, num_buckets: int, max_distance: int
) -> np.ndarray:
    """The bidirectional T5 bucket of each (query, key) offset, (query_length, key_length) int32.

    Half of the buckets are for keys after the query; in each half, small distances get one bucket
    each and larger ones logarithmically wider buckets up to ``max_distance``. Computed in numpy
    float32 like the reference, at trace time, since the sequence lengths are static.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    exact = half // 2
    distance = np.abs(relative)
    # distances below `exact` take the exact branch; clamping keeps log() finite for them
    log_ratio = np.log(np.maximum(distance, exact).astype(np.float32) / np.float32(exact))
    scaled = log_ratio / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
    logarithmic = np.minimum(exact + scaled.astype(np.int64), half - 1)
    buckets = np.where(relative > 0, half, 0) + np.where(distance < exact, distance, logarithmic)
    return buckets.astype(np.int32)


class T5Attention(nn.Module):
    """T5 self-attention: no bias, no 1/sqrt(d) scaling, a relative position bias added to the scores."""

    config: T5EncoderConfig
    has_relative_attention_bias: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None, position_bias: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """x (batch, seq, d_model), mask (batch, 1, 1, seq) bool or None; returns output and the bias used.

        The first layer computes the (1, heads, seq, seq) position bias, later layers reuse it.
        """
        cfg = self.config
        batch, length, _ = x.shape

        def heads(name: str) -> jax.Array:
            projected = nn.Dense(cfg.num_heads * cfg.d_kv, use_bias=False, dtype=self.dtype, name=name)(x)
            return projected.reshape(batch, length, cfg.num_heads, cfg.d_kv)

        if self.has_relative_attention_bias:
            table = nn.Embed(
                cfg.relative_attention_num_buckets, cfg.num_heads, dtype=jnp.float32,
                name="relative_attention_bias",
            )
            buckets = relative_position_buckets(
                length, length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
            )
            position_bias = jnp.transpose(table(buckets), (2, 0, 1))[None]
        out = dot_product_attention(heads("q"), heads("k"), heads("v"), scale=1.0, bias=position_bias, mask=mask)
        out = out.reshape(batch, length, cfg.num_heads * cfg.d_kv)
        return nn.Dense(x.shape[-1], use_bias=False, dtype=self.dtype, name="o")(out), position_bias


class T5FeedForward(nn.Module):
    """T5's feed-forward: ``wo(act(wi x))`` or, gated, ``wo(act(wi_0 x) * wi_1 x)``; ``wo`` in float32."""

    config: T5EncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., d_model) -> (..., d_model) float32."""
        cfg = self.config
        act = hf_activation(cfg.activation)

        def dense(name: str) -> jax.Array:
            return nn.Dense(cfg.d_ff, use_bias=False, dtype=self.dtype, name=name)(x)

        hidden = act(dense("wi_0")) * dense("wi_1") if cfg.gated else act(dense("wi"))
        return nn.Dense(cfg.d_model, use_bias=False, dtype=jnp.float32, name="wo")(hidden)


class T5LayerSelfAttention(nn.Module):
    """Pre-norm self-attention sublayer with its residual (``block.i.layer.0``)."""

    config: T5EncoderConfig
    has_relative_attention_bias: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None, position_bias: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """x float32 residual stream; returns the updated stream and the position bias."""
        normed = nn.RMSNorm(epsilon=self.config.layer_norm_epsilon, dtype=self.dtype, name="layer_norm")(x)
        attention = T5Attention(
            self.config, self.has_relative_attention_bias, dtype=self.dtype, name="SelfAttention"
        )
        out, position_bias = attention(normed, mask, position_bias)
        return x + out.astype(jnp.float32), position_bias


class T5LayerFF(nn.Module):
    """Pre-norm feed-forward sublayer with its residual (``block.i.layer.1``)."""

    config: T5EncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x float32 residual stream -> updated stream."""
        normed = nn.RMSNorm(epsilon=self.config.layer_norm_epsilon, dtype=self.dtype, name="layer_norm")(x)
        return x + T5FeedForward(self.config, dtype=self.dtype, name="DenseReluDense")(normed)


class T5Block(nn.Module):
    """One encoder block (``encoder.block.i``): self-attention then feed-forward."""

    config: T5EncoderConfig
    has_relative_attention_bias: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None, position_bias: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """x float32 residual stream; returns the updated stream and the position bias to share."""
        x, position_bias = T5LayerSelfAttention(
            self.config, self.has_relative_attention_bias, dtype=self.dtype, name="layer_0"
        )(x, mask, position_bias)
        return T5LayerFF(self.config, dtype=self.dtype, name="layer_1")(x), position_bias


class T5Stack(nn.Module):
    """The encoder blocks and the final norm (``encoder.*``); the relative bias lives in block 0 only."""

    config: T5EncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x (batch, seq, d_model) float32 embeddings -> final hidden states in ``dtype``."""
        position_bias = None
        for i in range(self.config.num_layers):
            block = T5Block(self.config, has_relative_attention_bias=i == 0, dtype=self.dtype, name=f"block_{i}")
            x, position_bias = block(x, mask, position_bias)
        return nn.RMSNorm(epsilon=self.config.layer_norm_epsilon, dtype=self.dtype, name="final_layer_norm")(x)


class T5Encoder(nn.Module):
    """transformers' ``T5EncoderModel``: ``apply(params, input_ids, attention_mask)`` -> last hidden state."""

    config: T5EncoderConfig
    dtype: Dtype = jnp.float32

    CONFIG_CLASS: ClassVar[type] = T5EncoderConfig  # reads this module's config.json: CONFIG_CLASS.from_dict
    # The checkpoint's ``encoder.embed_tokens.weight`` is the same tensor as ``shared.weight``
    # (alias -> target); the Flax tree keeps only the target.
    TIED_WEIGHTS: ClassVar[dict[str, str]] = {"encoder.embed_tokens.weight": "shared.weight"}
    # A full T5 (``T5ForConditionalGeneration``) checkpoint also holds these; the encoder ignores them.
    IGNORED_PREFIXES: ClassVar[tuple[str, ...]] = ("decoder.", "lm_head.")

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids (batch, seq) int, attention_mask (batch, seq) 1 = token / 0 = padding, or None.

        Returns (batch, seq, d_model) in ``dtype``, every position included (padded ones too).
        """
        x = nn.Embed(self.config.vocab_size, self.config.d_model, dtype=self.dtype, name="shared")(input_ids)
        mask = None if attention_mask is None else jnp.asarray(attention_mask)[:, None, None, :].astype(bool)
        return T5Stack(self.config, dtype=self.dtype, name="encoder")(x.astype(jnp.float32), mask)

    def dummy_inputs(self) -> tuple[jax.Array]:
        """The smallest inputs the model accepts, for ``init`` and shape inference."""
        return (jnp.zeros((1, 1), jnp.int32),)

    @classmethod
    def adapt_state_dict(cls, state_dict: Mapping[str, Any], source: str) -> dict[str, Any]:
        """Maps a checkpoint's names to this module's: drops the decoder and the tied embedding alias.

        The alias is verified to hold the same values as ``shared.weight`` (or taken as it when the
        checkpoint saved only the alias), so a checkpoint with untied embeddings is rejected, not
        silently half-loaded. Values may be arrays or zero-argument loaders.
        """
        adapted = {k: v for k, v in state_dict.items() if not k.startswith(cls.IGNORED_PREFIXES)}
        for alias, target in cls.TIED_WEIGHTS.items():
            if alias not in adapted:
                continue
            alias_value = adapted.pop(alias)
            if target not in adapted:
                adapted[target] = alias_value
            elif not np.array_equal(_load(alias_value), _load(adapted[target])):
                raise ValueError(
                    f"{source}: {alias} should be tied to {target} but holds different values "
                    "(an encoder embedding untied from the shared one is not supported)"
                )
        return adapted


def _load(value: Any) -> np.ndarray:
    return np.asarray(value() if callable(value) else value)
