"""The cascade's UNets in Flax: Show-1's pixel video UNets (keyframes, interpolation,
super-resolution), diffusers' UNet3DConditionModel (ModelScope / zeroscope) and the
UNet2DConditionModel of DeepFloyd IF-II, one module built from the checkpoint's config.

Video input and output are channels last: ``(batch, frames, height, width, channels)``; image
models take ``(batch, height, width, channels)``. The timestep and text embeddings are per video
and shared by its frames; the 2D layers run on every frame, the temporal layers across frames.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmc_jax.models.attention import TemporalTransformer
from vmc_jax.models.layers import Dtype, GroupNorm, TextTimeEmbedding, TimestepEmbedding, activation, timestep_embedding
from vmc_jax.models.resnet import conv2d
from vmc_jax.models.unet_blocks import BLOCK_KINDS, BlockKind, BlockOptions, DownBlock, MidBlock, UpBlock
from vmc_jax.models.unet_config import UNetConfig


def _block_options(config: UNetConfig, kind: BlockKind, i: int, out_channels: int, num_layers: int,
                   head_setting: int, attention_impl: str, mid: bool = False) -> BlockOptions:
    """The options of block ``i``; ``head_setting`` is its ``attention_head_dim`` config entry.

    Show-1 and IF transformer blocks use it as their head count, ModelScope's as their head size;
    SimpleCrossAttn blocks as their head size, and their temporal attention (built with the two
    arguments swapped) as its head count.
    """
    if kind.attention == "transformer":
        spatial = (head_setting, out_channels // head_setting)
        if config.transformer_head_size_from_config:
            spatial = spatial[::-1]
        temporal = spatial
    else:
        spatial = (out_channels // head_setting, head_setting)
        temporal = (head_setting, out_channels // head_setting)
    tuned = kind.tuned_resnets or (mid and kind.attention == "added_kv")
    if mid:
        # Show-1's UNetMidBlock3DCrossAttn takes no only_cross_attention: its transformer always
        # self-attends first, whatever mid_block_only_cross_attention says.
        only_cross = config.mid_block_only_cross_attention if kind.attention == "added_kv" else False
    else:
        only_cross = config.only_cross_attention[i]
    return BlockOptions(
        out_channels=out_channels,
        num_layers=num_layers,
        groups=config.norm_num_groups,
        eps=config.norm_eps,
        act_fn=config.act_fn,
        time_embedding_norm=config.resnet_time_scale_shift,
        skip_time_act=config.resnet_skip_time_act if tuned else False,
        output_scale_factor=config.mid_block_scale_factor if mid else (
            config.resnet_out_scale_factor if tuned else 1.0),
        spatial_heads=spatial[0],
        spatial_head_dim=spatial[1],
        temporal_heads=temporal[0],
        temporal_head_dim=temporal[1],
        transformer_layers=config.transformer_layers_per_block[i],
        use_linear_projection=config.use_linear_projection,
        only_cross_attention=bool(only_cross),
        cross_attention_norm=config.cross_attention_norm,
        downsample_padding=config.downsample_padding,
        temporal_conv_groups=config.temporal_conv_groups,
        attention_impl=attention_impl,
    )


class UNet(nn.Module):
    """A diffusers-style conditional UNet (the family is ``config.family``).

    Attributes:
      config: the validated ``config.json``.
      dtype: compute dtype (parameters keep their own dtype and are cast where used).
      remat: recompute each block in the backward pass (``jax.checkpoint``) to save memory.
      attention_impl: the attention core, one of ``attention_core.IMPLEMENTATIONS``.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    remat: bool = False
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 class_labels: jax.Array | None = None, train: bool = False) -> jax.Array:
        """Predicts the model output for ``sample`` (``(b, f, h, w, c)``, or ``(b, h, w, c)`` for an
        image model); ``train`` enables the temporal-conv dropout."""
        c = self.config
        if sample.ndim != (5 if c.is_video else 4):
            layout = "(batch, frames, height, width, channels)" if c.is_video else "(batch, height, width, channels)"
            raise ValueError(f"sample has shape {sample.shape}; this model takes {layout}")
        if not c.is_video:
            sample = sample[:, None]
        b, _, h, w, _ = sample.shape
        factor = 2 ** c.num_downsamplers
        if h % factor or w % factor:
            raise ValueError(f"spatial size {h}x{w} is not divisible by {factor} "
                             f"(the UNet downsamples {c.num_downsamplers} times)")
        if sample.shape[-1] != c.in_channels:
            raise ValueError(f"sample has {sample.shape[-1]} channels, the model expects {c.in_channels} "
                             "(channels last: (batch, frames, height, width, channels))")
        emb = self.embed_time(timesteps, class_labels, encoder_hidden_states, b)
        context = encoder_hidden_states
        if c.encoder_hid_dim_type == "text_proj":
            context = nn.Dense(c.cross_attention_dim[0], dtype=self.dtype, name="encoder_hid_proj")(context)
        context = context.astype(self.dtype)

        if c.center_input_sample:
            sample = 2 * sample - 1.0
        x = conv2d(c.block_out_channels[0], c.conv_in_kernel, self.dtype, "conv_in")(sample.astype(self.dtype))
        if c.transformer_in:
            x = TemporalTransformer(8, c.attention_head_dim[0], c.norm_num_groups,
                                    attention_impl=self.attention_impl, dtype=self.dtype, name="transformer_in")(x)
        skips = [x]
        wrap = nn.remat if self.remat else (lambda m: m)
        deterministic = not train
        for i, name in enumerate(c.down_block_types):
            kind = BLOCK_KINDS[name]
            options = _block_options(c, kind, i, c.block_out_channels[i], c.layers_per_block[i],
                                     c.attention_head_dim[i], self.attention_impl)
            x, block_skips = wrap(DownBlock)(kind, options, i < c.num_downsamplers, deterministic, self.dtype,
                                             name=f"down_blocks_{i}")(x, emb, context)
            skips += block_skips

        if c.mid_block_type is not None:
            kind = BLOCK_KINDS[c.mid_block_type]
            options = _block_options(c, kind, -1, c.block_out_channels[-1], 1, c.attention_head_dim[-1],
                                     self.attention_impl, mid=True)
            x = wrap(MidBlock)(kind, options, False, deterministic, self.dtype, name="mid_block")(x, emb, context)

        reversed_channels = c.block_out_channels[::-1]
        for i, name in enumerate(c.up_block_types):
            kind = BLOCK_KINDS[name]
            num_layers = c.layers_per_block[::-1][i] + 1
            mirror = len(reversed_channels) - 1 - i
            # Show-1 gives SimpleCrossAttn up block i the head size of down block i, not of its mirror.
            heads = c.attention_head_dim[i if kind.attention == "added_kv" else mirror]
            options = _block_options(c, kind, mirror, reversed_channels[i], num_layers, heads, self.attention_impl)
            block_skips, skips = tuple(skips[-num_layers:]), skips[:-num_layers]
            x = wrap(UpBlock)(kind, options, i < c.num_downsamplers, deterministic, self.dtype,
                              name=f"up_blocks_{i}")(x, emb, context, block_skips)

        if c.norm_num_groups is not None:
            x = GroupNorm(c.norm_num_groups, c.norm_eps, per_frame=True, dtype=self.dtype, name="conv_norm_out")(x)
            x = activation(c.output_act_fn)(x)
        out = conv2d(c.out_channels, c.conv_out_kernel, self.dtype, "conv_out")(x)
        return out if c.is_video else out[:, 0]

    def embed_time(self, timesteps: jax.Array, class_labels: jax.Array | None, text: jax.Array,
                   batch: int) -> jax.Array:
        """The per-video embedding of the timestep, noise level (class label) and pooled text."""
        c = self.config
        base = c.block_out_channels[0]
        width = c.time_embedding_dim or base * 4

        def sinusoid(t):
            t = jnp.broadcast_to(jnp.asarray(t), (batch,))
            return timestep_embedding(t, base, c.flip_sin_to_cos, c.freq_shift).astype(self.dtype)

        emb = TimestepEmbedding(width, c.act_fn, c.timestep_post_act, dtype=self.dtype,
                                name="time_embedding")(sinusoid(timesteps))
        if c.class_embed_type == "timestep" or c.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError("this model needs class_labels (the noise level of the low-resolution input)")
            if c.class_embed_type == "timestep":
                class_emb = TimestepEmbedding(width, c.act_fn, dtype=self.dtype,
                                              name="class_embedding")(sinusoid(class_labels))
            else:
                class_emb = nn.Embed(c.num_class_embeds, width, dtype=self.dtype, name="class_embedding")(class_labels)
            emb = jnp.concatenate([emb, class_emb], -1) if c.class_embeddings_concat else emb + class_emb
        if c.addition_embed_type == "text":
            emb = emb + TextTimeEmbedding(width, c.addition_embed_type_num_heads, dtype=self.dtype,
                                          name="add_embedding")(text.astype(self.dtype))
        if c.time_embedding_act_fn is not None:
            emb = activation(c.time_embedding_act_fn)(emb)
        return emb

    def dummy_inputs(self) -> tuple[jax.Array, ...]:
        """The smallest inputs the model accepts, for ``init`` and shape inference."""
        c = self.config
        size = 2 ** c.num_downsamplers
        text_dim = c.encoder_hid_dim or c.cross_attention_dim[0]
        needs_labels = c.class_embed_type is not None or c.num_class_embeds is not None
        shape = (1, 1, size, size, c.in_channels) if c.is_video else (1, size, size, c.in_channels)
        return (jnp.zeros(shape), jnp.zeros((1,), jnp.int32),
                jnp.zeros((1, 1, text_dim)), jnp.zeros((1,), jnp.int32) if needs_labels else None)
