"""diffusers' AutoencoderKL (the VAE of the latent models) in Flax, built from its ``config.json``.

Images are channels last, ``(batch, height, width, channels)``; every layer also takes videos
``(batch, frames, height, width, channels)`` and treats each frame as an image, so videos need
no reshaping. Parameter names follow the PyTorch module (see ``vmc_jax.hub.conversion.layout``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmc_jax.models.attention import attend
from vmc_jax.models.layers import Dtype, GroupNorm, activation
from vmc_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv2d

EPS = 1e-6  # every norm of the VAE (resnets, mid-block attention, output norms)
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance to this


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """A validated AutoencoderKL config; fields and defaults are those of diffusers' constructor."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: None = None
    latents_mean: None = None
    latents_std: None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        problems = [f"config key {key!r} has unsupported value {getattr(self, key)!r} (expected {expected})"
                    for key, expected in self._unsupported()]
        if problems:
            raise ValueError("; ".join(problems))

    def _unsupported(self) -> Iterator[tuple[str, str]]:
        """(key, what it should be) for every value this implementation cannot build or does not support."""
        for key in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            if not _positive_int(getattr(self, key)):
                yield key, "a positive integer"
        channels = self.block_out_channels
        groups = self.norm_num_groups if _positive_int(self.norm_num_groups) else 1
        channels_ok = isinstance(channels, tuple) and len(channels) > 0 and all(map(_positive_int, channels))
        if not (channels_ok and all(c % groups == 0 for c in channels)):
            yield "block_out_channels", f"a non-empty list of positive integers divisible by norm_num_groups={groups}"
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = getattr(self, key)
            if not (isinstance(types, tuple) and all(t == kind for t in types)
                    and (not channels_ok or len(types) == len(channels))):
                yield key, f"{kind!r} once per entry of block_out_channels"
        if not _is_activation(self.act_fn):
            yield "act_fn", "silu, swish, gelu or mish"
        sizes = self.sample_size if isinstance(self.sample_size, tuple) else (self.sample_size,)
        if not all(map(_positive_int, sizes)):
            yield "sample_size", "a positive integer or a list of them"
        if isinstance(self.scaling_factor, bool) or not isinstance(self.scaling_factor, (int, float)) \
                or self.scaling_factor <= 0:
            yield "scaling_factor", "a positive number"
        for key in ("shift_factor", "latents_mean", "latents_std"):
            if getattr(self, key) is not None:
                yield key, "null"
        for key in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            if not isinstance(getattr(self, key), bool):
                yield key, "true or false"

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "VAEConfig":
        """Validates a diffusers ``config.json`` dict (``_``-prefixed keys ignored); ``source`` names it in errors."""
        class_name = raw.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise ValueError(f"{source}: unsupported VAE class {class_name!r} (expected 'AutoencoderKL')")
        known = {field.name for field in dataclasses.fields(cls)}
        values = {}
        for key, value in raw.items():
            if key.startswith("_"):
                continue
            if key not in known:
                raise ValueError(f"{source}: unknown config key {key!r} (value {value!r})")
            values[key] = tuple(value) if isinstance(value, list) else value
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The config as diffusers writes it to ``config.json``."""
        return {"_class_name": "AutoencoderKL", **dataclasses.asdict(self)}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_activation(name: Any) -> bool:
    try:
        activation(name)
    except (ValueError, TypeError):
        return False
    return True


def _resnet(out_channels: int, groups: int, act_fn: str, dtype: Dtype, index: int) -> ResnetBlock2D:
    return ResnetBlock2D(out_channels, groups=groups, eps=EPS, act_fn=act_fn, dtype=dtype, name=f"resnets_{index}")


def _output_layers(x: jax.Array, features: int, groups: int, dtype: Dtype) -> jax.Array:
    """conv_norm_out -> SiLU (always SiLU, whatever ``act_fn``, as in diffusers) -> conv_out."""
    x = nn.silu(GroupNorm(groups, EPS, per_frame=True, dtype=dtype, name="conv_norm_out")(x))
    return conv2d(features, 3, dtype, "conv_out")(x)


class MidBlockAttention(nn.Module):
    """The VAE mid-block attention: group-norm, single-head self-attention over all pixels, residual."""

    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        *lead, height, width, channels = x.shape
        tokens = GroupNorm(self.groups, EPS, per_frame=True, dtype=self.dtype, name="group_norm")(x)
        tokens = tokens.reshape(*lead, height * width, channels)
        q, k, v = (nn.Dense(channels, dtype=self.dtype, name=name)(tokens) for name in ("to_q", "to_k", "to_v"))
        out = nn.Dense(channels, dtype=self.dtype, name="to_out_0")(attend(q, k, v, heads=1))
        return out.reshape(x.shape) + x


class MidBlock(nn.Module):
    """UNetMidBlock2D without time embedding: resnet, [attention], resnet."""

    groups: int
    act_fn: str
    add_attention: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        x = _resnet(channels, self.groups, self.act_fn, self.dtype, 0)(x, None)
        if self.add_attention:
            x = MidBlockAttention(self.groups, dtype=self.dtype, name="attentions_0")(x)
        return _resnet(channels, self.groups, self.act_fn, self.dtype, 1)(x, None)


class CoderBlock(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets, then the block's resampler, if any.

    ``resample`` "down": a strided convolution padded right / bottom (padding 0); "up":
    nearest-neighbour doubling and a convolution; None: the last block, no resampling.
    """

    out_channels: int
    num_layers: int
    resample: str | None
    groups: int
    act_fn: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = _resnet(self.out_channels, self.groups, self.act_fn, self.dtype, i)(x, None)
        if self.resample == "down":
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Images to the (mean, log-variance) moments, 2 * latent_channels, before quant_conv."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = conv2d(c.block_out_channels[0], 3, self.dtype, "conv_in")(x)
        for i, channels in enumerate(c.block_out_channels):
            resample = "down" if i < len(c.block_out_channels) - 1 else None
            x = CoderBlock(channels, c.layers_per_block, resample, c.norm_num_groups, c.act_fn, dtype=self.dtype,
                           name=f"down_blocks_{i}")(x)
        x = MidBlock(c.norm_num_groups, c.act_fn, c.mid_block_add_attention, dtype=self.dtype, name="mid_block")(x)
        return _output_layers(x, 2 * c.latent_channels, c.norm_num_groups, self.dtype)


class Decoder(nn.Module):
    """Latents (after post_quant_conv) to images."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        channels = c.block_out_channels[::-1]
        x = conv2d(channels[0], 3, self.dtype, "conv_in")(x)
        x = MidBlock(c.norm_num_groups, c.act_fn, c.mid_block_add_attention, dtype=self.dtype, name="mid_block")(x)
        for i, out_channels in enumerate(channels):
            resample = "up" if i < len(channels) - 1 else None
            x = CoderBlock(out_channels, c.layers_per_block + 1, resample, c.norm_num_groups, c.act_fn,
                           dtype=self.dtype, name=f"up_blocks_{i}")(x)
        return _output_layers(x, c.out_channels, c.norm_num_groups, self.dtype)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL: ``encode`` images to (mean, logvar), ``decode`` latents to images.

    Inputs are ``(b, h, w, c)`` images or ``(b, f, h, w, c)`` videos. ``scaling_factor`` is not
    applied here (see ``vmc_jax.hub.vae_loading``). ``dtype`` is the compute dtype; the default float32 is
    what ``force_upcast`` asks for, even with fp16 params.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        c = self.config
        self.encoder = Encoder(c, dtype=self.dtype)
        self.decoder = Decoder(c, dtype=self.dtype)
        moments, latents = 2 * c.latent_channels, c.latent_channels
        self.quant_conv = nn.Conv(moments, (1, 1), dtype=self.dtype) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv(latents, (1, 1), dtype=self.dtype) if c.use_post_quant_conv else None

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The posterior's mean and log-variance (clipped to [-30, 20]), each with latent_channels."""
        _check_input(images, self.config.in_channels, "images")
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Images (out_channels) from unscaled latents."""
        _check_input(latents, self.config.latent_channels, "latents")
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction from the posterior mean (used by ``init`` to create every parameter)."""
        return self.decode(self.encode(images)[0])

    def dummy_inputs(self) -> tuple[jax.Array]:
        """The smallest images the model accepts, for ``init`` and shape inference."""
        size = 2 ** (len(self.config.block_out_channels) - 1)
        return (jnp.zeros((1, size, size, self.config.in_channels)),)


def _check_input(x: jax.Array, channels: int, what: str) -> None:
    if x.ndim not in (4, 5) or x.shape[-1] != channels:
        raise ValueError(f"{what} must be (b, h, w, {channels}) or (b, f, h, w, {channels}), got shape {x.shape}")
