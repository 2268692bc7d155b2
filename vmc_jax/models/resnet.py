"""Convolutional layers of the UNets: resnet blocks, up / down sampling, temporal convolutions.

Every layer takes a video ``(batch, frames, height, width, channels)``; the 2D layers act on
each frame on its own, so image models run them with one frame.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmc_jax.models.layers import Dtype, GroupNorm, activation


def upsample_nearest(x: jax.Array) -> jax.Array:
    """Doubles height and width by repeating pixels (``F.interpolate(scale_factor=2, mode="nearest")``)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)


def downsample_average(x: jax.Array) -> jax.Array:
    """Halves height and width by 2x2 average pooling."""
    *lead, h, w, c = x.shape
    return x.reshape(*lead, h // 2, 2, w // 2, 2, c).mean(axis=(-4, -2))


def conv2d(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1, padding: int | None = None,
           use_bias: bool = True) -> nn.Conv:
    """A square 2D convolution with PyTorch's explicit symmetric padding."""
    pad = (kernel - 1) // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                   use_bias=use_bias, dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D, optionally resampling (``up`` / ``down``) like the resnet samplers."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    act_fn: str = "silu"
    time_embedding_norm: str = "default"
    skip_time_act: bool = False
    output_scale_factor: float = 1.0
    up: bool = False
    down: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None) -> jax.Array:
        if self.time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"unsupported resnet_time_scale_shift {self.time_embedding_norm!r}")
        act = activation(self.act_fn)
        h = act(GroupNorm(self.groups, self.eps, per_frame=True, dtype=self.dtype, name="norm1")(x))
        if self.up:
            x, h = upsample_nearest(x), upsample_nearest(h)
        elif self.down:
            x, h = downsample_average(x), downsample_average(h)
        h = conv2d(self.out_channels, 3, self.dtype, "conv1")(h)
        scale_shift = None
        if temb is not None:
            t = temb if self.skip_time_act else act(temb)
            width = self.out_channels * (2 if self.time_embedding_norm == "scale_shift" else 1)
            t = nn.Dense(width, dtype=self.dtype, name="time_emb_proj")(t)[:, None, None, None, :]
            if self.time_embedding_norm == "default":
                h = h + t
            else:
                scale_shift = jnp.split(t, 2, axis=-1)
        h = GroupNorm(self.groups, self.eps, per_frame=True, dtype=self.dtype, name="norm2")(h)
        if scale_shift is not None:
            h = h * (1 + scale_shift[0]) + scale_shift[1]
        h = conv2d(self.out_channels, 3, self.dtype, "conv2")(act(h))
        if x.shape[-1] != self.out_channels:
            x = conv2d(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Strided 3x3 convolution (``padding`` 0 pads right / bottom by one, as the reference does)."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [(0, 1), (0, 1), (0, 0)])
        return conv2d(self.out_channels, 3, self.dtype, "conv", stride=2, padding=self.padding)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour doubling followed by a 3x3 convolution."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv2d(self.out_channels, 3, self.dtype, "conv")(upsample_nearest(x))


class TemporalConv(nn.Module):
    """A (3, 1, 1) convolution along frames, run as a 2D convolution over (frames, pixels).

    The kernel keeps ``nn.Conv``'s 3D layout ``(3, 1, 1, in, out)``, so checkpoints and their
    conversion are unchanged; XLA:CPU runs the 2D form up to ~3x faster than the 3D one.
    """

    features: int
    zero_init: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, f, h, w, c = x.shape
        kernel_init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
        kernel = self.param("kernel", kernel_init, (3, 1, 1, c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.conv_general_dilated(x.reshape(b, f, h * w, c), kernel[:, :, 0], (1, 1), ((1, 1), (0, 0)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return (y + bias).reshape(b, f, h, w, self.features)


class TemporalConvLayer(nn.Module):
    """Four (GroupNorm -> SiLU [-> dropout] -> Conv3d (3, 1, 1)) stages along frames, plus the input.

    Names follow the reference's Sequentials: ``conv1_0`` / ``conv1_2`` for the first stage (no
    dropout), ``convK_0`` / ``convK_3`` for the others. The last convolution starts at zero, so a
    fresh layer is the identity.
    """

    groups: int = 32
    dropout: float = 0.1
    deterministic: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        h = x
        for stage in range(1, 5):
            conv_index = 2 if stage == 1 else 3
            h = nn.silu(GroupNorm(self.groups, 1e-5, dtype=self.dtype, name=f"conv{stage}_0")(h))
            if stage > 1:
                h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
            h = TemporalConv(channels, zero_init=stage == 4, dtype=self.dtype, name=f"conv{stage}_{conv_index}")(h)
        return x + h
