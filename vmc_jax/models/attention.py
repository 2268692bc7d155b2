"""Attention layers: multi-head attention, added-KV attention, and the spatial / temporal transformers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmc_jax.kernels.attention_core import dot_product_attention
from vmc_jax.models.layers import Dtype, GroupNorm, layer_norm


def attend(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, implementation: str = "auto",
           over_frames: bool = False) -> jax.Array:
    """Scaled softmax attention of tokens ``(..., T, heads*d)`` over axis -2, or with
    ``over_frames`` of ``(b, frames, pixels, heads*d)`` over the frames at each pixel.

    Over frames, the pixels ride along as extra heads, so the temporal layers need no transposes.
    """
    if over_frames:
        def split(x):
            return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1] // heads)
    else:
        def split(x):
            return x.reshape(-1, x.shape[-2], heads, x.shape[-1] // heads)

    out = dot_product_attention(split(q), split(k), split(v), scale=(q.shape[-1] // heads) ** -0.5,
                                implementation=implementation)
    return out.reshape(q.shape)


class Attention(nn.Module):
    """Multi-head attention with to_q / to_k / to_v / to_out projections (diffusers ``Attention``)."""

    heads: int
    dim_head: int
    bias: bool = False
    attention_impl: str = "auto"
    over_frames: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        inner = self.heads * self.dim_head
        q = nn.Dense(inner, use_bias=self.bias, dtype=self.dtype, name="to_q")(x)
        k = nn.Dense(inner, use_bias=self.bias, dtype=self.dtype, name="to_k")(context)
        v = nn.Dense(inner, use_bias=self.bias, dtype=self.dtype, name="to_v")(context)
        out = attend(q, k, v, self.heads, self.attention_impl, self.over_frames)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


class AddedKVAttention(nn.Module):
    """Spatial attention of the SimpleCrossAttn blocks: image queries over [text, image] keys.

    Input ``(b, f, h, w, c)``; ``context`` ``(b, L, d)`` are the (projected) text states, shared
    by all frames. Group-norm on the image tokens, a residual around the whole layer.
    """

    heads: int
    dim_head: int
    norm_num_groups: int
    only_cross_attention: bool = False
    cross_attention_norm: str | None = None
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, f, h, w, c = x.shape
        inner = self.heads * self.dim_head
        if self.cross_attention_norm == "layer_norm":
            context = layer_norm(dtype=self.dtype, name="norm_cross")(context)
        elif self.cross_attention_norm == "group_norm":
            context = GroupNorm(32, 1e-5, dtype=self.dtype, name="norm_cross")(context)
        elif self.cross_attention_norm is not None:
            raise ValueError(f"unsupported cross_attention_norm {self.cross_attention_norm!r}")

        tokens = GroupNorm(self.norm_num_groups, 1e-5, per_frame=True, dtype=self.dtype, name="group_norm")(x)
        tokens = tokens.reshape(b, f, h * w, c)
        q = nn.Dense(inner, dtype=self.dtype, name="to_q")(tokens)

        def per_frame(y):  # (b, L, inner) -> (b, f, L, inner): the text is the same for every frame
            return jnp.broadcast_to(y[:, None], (b, f, *y.shape[1:]))

        k = per_frame(nn.Dense(inner, dtype=self.dtype, name="add_k_proj")(context))
        v = per_frame(nn.Dense(inner, dtype=self.dtype, name="add_v_proj")(context))
        if not self.only_cross_attention:
            k = jnp.concatenate([k, nn.Dense(inner, dtype=self.dtype, name="to_k")(tokens)], axis=2)
            v = jnp.concatenate([v, nn.Dense(inner, dtype=self.dtype, name="to_v")(tokens)], axis=2)
        out = nn.Dense(c, dtype=self.dtype, name="to_out_0")(attend(q, k, v, self.heads, self.attention_impl))
        return out.reshape(x.shape) + x


class GatedProjection(nn.Module):
    """A dense layer of ``2 * features`` outputs (nn.Dense's parameters) returned as its two halves.

    Each half is its own product with half the kernel: XLA:CPU otherwise writes the whole output
    and copies the halves out (GEGLU's projection ran ~3x slower that way).
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 2 * self.features))
        bias = self.param("bias", nn.initializers.zeros, (2 * self.features,))
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        return tuple(jnp.dot(x, kernel[:, half]) + bias[half]
                     for half in (slice(None, self.features), slice(self.features, None)))


class ProjectedGELU(nn.Module):
    """A projection followed by GELU, gated (GEGLU) or not: the ``proj`` of diffusers' GEGLU / GELU."""

    features: int
    kind: str = "geglu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "geglu":
            hidden, gate = GatedProjection(self.features, dtype=self.dtype, name="proj")(x)
            return hidden * nn.gelu(gate, approximate=False)
        if self.kind in ("gelu", "gelu-approximate"):
            x = nn.Dense(self.features, dtype=self.dtype, name="proj")(x)
            return nn.gelu(x, approximate=self.kind == "gelu-approximate")
        raise ValueError(f"unsupported feed-forward activation {self.kind!r}")


class FeedForward(nn.Module):
    """Transformer MLP: net_0 (GEGLU or GELU projection) -> net_2 (output projection)."""

    activation_fn: str = "geglu"
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        x = ProjectedGELU(dim * self.mult, self.activation_fn, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(dim, dtype=self.dtype, name="net_2")(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention, then cross-attention (or a second self-attention), then MLP."""

    heads: int
    dim_head: int
    double_self_attention: bool = False
    only_cross_attention: bool = False
    activation_fn: str = "geglu"
    attention_impl: str = "auto"
    over_frames: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        def attention(name, y, ctx):
            return Attention(self.heads, self.dim_head, attention_impl=self.attention_impl,
                             over_frames=self.over_frames, dtype=self.dtype, name=name)(y, ctx)

        x = attention("attn1", layer_norm(dtype=self.dtype, name="norm1")(x),
                      context if self.only_cross_attention else None) + x
        if self.double_self_attention or context is not None:
            x = attention("attn2", layer_norm(dtype=self.dtype, name="norm2")(x),
                          None if self.double_self_attention else context) + x
        ff = FeedForward(self.activation_fn, dtype=self.dtype, name="ff")
        return ff(layer_norm(dtype=self.dtype, name="norm3")(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer2DModel on every frame: group-norm, proj_in, blocks over h*w tokens, proj_out."""

    heads: int
    dim_head: int
    norm_num_groups: int = 32
    num_layers: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, f, h, w, c = x.shape
        inner = self.heads * self.dim_head
        y = GroupNorm(self.norm_num_groups, 1e-6, per_frame=True, dtype=self.dtype, name="norm")(x)
        if self.use_linear_projection:
            y = nn.Dense(inner, dtype=self.dtype, name="proj_in")(y.reshape(b * f, h * w, c))
        else:
            y = nn.Conv(inner, (1, 1), dtype=self.dtype, name="proj_in")(y).reshape(b * f, h * w, inner)
        context = jnp.repeat(context, f, axis=0)
        for i in range(self.num_layers):
            y = BasicTransformerBlock(
                self.heads, self.dim_head, only_cross_attention=self.only_cross_attention,
                attention_impl=self.attention_impl, dtype=self.dtype, name=f"transformer_blocks_{i}",
            )(y, context)
        if self.use_linear_projection:
            y = nn.Dense(c, dtype=self.dtype, name="proj_out")(y).reshape(x.shape)
        else:
            y = nn.Conv(c, (1, 1), dtype=self.dtype, name="proj_out")(y.reshape(b, f, h, w, inner))
        return y + x


class TemporalTransformer(nn.Module):
    """TransformerTemporalModel: self-attention along frames at every pixel, with a residual.

    The group-norm pools its statistics over all frames; both attentions of each block attend
    over frames (``double_self_attention``), with no positional encoding, as in the reference.
    The tokens stay in the video layout ``(b, f, h*w, c)`` (no transposes; measured faster).
    """

    heads: int
    dim_head: int
    norm_num_groups: int = 32
    num_layers: int = 1
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, f, h, w, c = x.shape
        y = GroupNorm(self.norm_num_groups, 1e-6, dtype=self.dtype, name="norm")(x)
        y = nn.Dense(self.heads * self.dim_head, dtype=self.dtype, name="proj_in")(y.reshape(b, f, h * w, c))
        for i in range(self.num_layers):
            y = BasicTransformerBlock(
                self.heads, self.dim_head, double_self_attention=True, attention_impl=self.attention_impl,
                over_frames=True, dtype=self.dtype, name=f"transformer_blocks_{i}",
            )(y)
        return nn.Dense(c, dtype=self.dtype, name="proj_out")(y).reshape(x.shape) + x
