"""The down, mid and up blocks of the UNets, one parameterised implementation for every family.

A block is a stack of layers, each ``resnet [-> temporal conv] [-> spatial attention
[-> temporal attention]]``, followed by a down- or upsampler. Which pieces a block type has is a
``BlockKind``; the numbers it is built with (channels, heads, norms) are a ``BlockOptions``.
"""

from __future__ import annotations

import dataclasses
import flax.linen as nn
import jax
import jax.numpy as jnp

from vmc_jax.models.attention import AddedKVAttention, SpatialTransformer, TemporalTransformer
from vmc_jax.models.layers import Dtype
from vmc_jax.models.resnet import Downsample2D, ResnetBlock2D, TemporalConvLayer, Upsample2D


@dataclasses.dataclass(frozen=True)
class BlockKind:
    """What a block type is made of."""

    attention: str | None  # None, "transformer" (Transformer2DModel) or "added_kv" (SimpleCrossAttn)
    sampler: str  # "conv" (Downsample2D / Upsample2D) or "resnet" (a resampling ResnetBlock2D)
    temporal: bool  # temporal convs (and temporal attentions with attention) after each layer
    tuned_resnets: bool  # resnets take skip_time_act and the output scale factor from the config


def _kinds() -> dict[str, BlockKind]:
    kinds = {}
    for dim, temporal in (("3D", True), ("2D", False)):
        kinds.update({
            f"DownBlock{dim}": BlockKind(None, "conv", temporal, False),
            f"CrossAttnDownBlock{dim}": BlockKind("transformer", "conv", temporal, False),
            f"SimpleCrossAttnDownBlock{dim}": BlockKind("added_kv", "resnet", temporal, True),
            f"ResnetDownsampleBlock{dim}": BlockKind(None, "resnet", temporal, True),
            f"UpBlock{dim}": BlockKind(None, "conv", temporal, False),
            f"CrossAttnUpBlock{dim}": BlockKind("transformer", "conv", temporal, False),
            f"SimpleCrossAttnUpBlock{dim}": BlockKind("added_kv", "resnet", temporal, True),
            f"ResnetUpsampleBlock{dim}": BlockKind(None, "resnet", temporal, True),
            f"UNetMidBlock{dim}CrossAttn": BlockKind("transformer", "conv", temporal, False),
            f"UNetMidBlock{dim}SimpleCrossAttn": BlockKind("added_kv", "conv", temporal, False),
        })
    return kinds


BLOCK_KINDS = _kinds()


@dataclasses.dataclass(frozen=True)
class BlockOptions:
    """Everything one block is built with besides its kind."""

    out_channels: int
    num_layers: int
    groups: int
    eps: float
    act_fn: str
    time_embedding_norm: str
    skip_time_act: bool
    output_scale_factor: float
    spatial_heads: int = 1
    spatial_head_dim: int = 1
    temporal_heads: int = 1
    temporal_head_dim: int = 1
    transformer_layers: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    cross_attention_norm: str | None = None
    downsample_padding: int = 1
    temporal_conv_groups: int = 32
    temporal_dropout: float = 0.1
    attention_impl: str = "auto"


class _Block(nn.Module):
    """Shared layer builders of the down, mid and up blocks."""

    kind: BlockKind
    options: BlockOptions
    resample: bool = False
    deterministic: bool = True
    dtype: Dtype = jnp.float32

    def resnet(self, i: int, x: jax.Array, temb: jax.Array, **resample) -> jax.Array:
        o = self.options
        name = "downsamplers_0" if resample.get("down") else "upsamplers_0" if resample.get("up") else f"resnets_{i}"
        x = ResnetBlock2D(
            o.out_channels, o.groups, o.eps, o.act_fn, o.time_embedding_norm, o.skip_time_act,
            o.output_scale_factor, dtype=self.dtype, name=name, **resample,
        )(x, temb)
        if self.kind.temporal and not resample:
            x = TemporalConvLayer(o.temporal_conv_groups, o.temporal_dropout, self.deterministic,
                                  dtype=self.dtype, name=f"temp_convs_{i}")(x)
        return x

    def attention(self, i: int, x: jax.Array, context: jax.Array) -> jax.Array:
        o = self.options
        if self.kind.attention == "transformer":
            x = SpatialTransformer(
                o.spatial_heads, o.spatial_head_dim, o.groups, o.transformer_layers, o.use_linear_projection,
                o.only_cross_attention, o.attention_impl, dtype=self.dtype, name=f"attentions_{i}",
            )(x, context)
        elif self.kind.attention == "added_kv":
            x = AddedKVAttention(
                o.spatial_heads, o.spatial_head_dim, o.groups, o.only_cross_attention, o.cross_attention_norm,
                o.attention_impl, dtype=self.dtype, name=f"attentions_{i}",
            )(x, context)
        if self.kind.temporal and self.kind.attention:
            x = TemporalTransformer(o.temporal_heads, o.temporal_head_dim, o.groups,
                                    attention_impl=o.attention_impl, dtype=self.dtype,
                                    name=f"temp_attentions_{i}")(x)
        return x


class DownBlock(_Block):
    """Layers at one resolution, then (``resample``) a downsampler; returns the skip states too."""

    @nn.compact
    def __call__(self, x, temb, context):
        skips = []
        for i in range(self.options.num_layers):
            x = self.attention(i, self.resnet(i, x, temb), context)
            skips.append(x)
        if self.resample:
            if self.kind.sampler == "resnet":
                x = self.resnet(0, x, temb, down=True)
            else:
                x = Downsample2D(self.options.out_channels, self.options.downsample_padding, dtype=self.dtype,
                                 name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class UpBlock(_Block):
    """Layers that each first take a skip state, then (``resample``) an upsampler."""

    @nn.compact
    def __call__(self, x, temb, context, skips):
        for i in range(self.options.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = self.attention(i, self.resnet(i, x, temb), context)
        if self.resample:
            if self.kind.sampler == "resnet":
                x = self.resnet(0, x, temb, up=True)
            else:
                x = Upsample2D(self.options.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class MidBlock(_Block):
    """A resnet, then ``num_layers`` times attention and another resnet."""

    @nn.compact
    def __call__(self, x, temb, context):
        x = self.resnet(0, x, temb)
        for i in range(self.options.num_layers):
            x = self.resnet(i + 1, self.attention(i, x, context), temb)
        return x
