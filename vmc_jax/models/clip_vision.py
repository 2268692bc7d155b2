"""CLIP's two towers with their projections into the shared space, in Flax linen, for the CLIP metrics.

``CLIPVisionEncoder`` is transformers' ``CLIPVisionModelWithProjection`` (image -> image embedding),
``CLIPTextProjectionEncoder`` its ``CLIPTextModelWithProjection`` (prompt -> text embedding); both
reuse the encoder layers of :mod:`vmc_jax.models.clip` and keep the hub's parameter names
(``vision_model/embeddings/patch_embedding/kernel`` is ``vision_model.embeddings.patch_embedding.weight``).
Either loads from its own checkpoint or from a whole ``CLIPModel`` checkpoint (``openai/clip-vit-*``),
whose config nests ``vision_config`` / ``text_config`` and whose weights hold both towers.
Images are channels last, ``(batch, height, width, channels)``, already normalised.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vmc_jax.models.clip import CLIPEncoder, CLIPTextEncoderConfig, CLIPTextTransformer, read_transformer_config
from vmc_jax.models.layers import Dtype, layer_norm


def _tower_config(config: Mapping[str, Any], nested: str) -> dict[str, Any]:
    """A tower's config dict, from its own config or from a whole ``CLIPModel`` config (``nested`` inside)."""
    if config.get("model_type") == "clip" or nested in config:
        return {"projection_dim": config.get("projection_dim", 512), **config.get(nested, {})}
    return dict(config)


def _tower_state_dict(state_dict: Mapping[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """The tensors of one tower (names starting with ``prefixes``): a ``CLIPModel`` checkpoint holds both."""
    return {name: value for name, value in state_dict.items() if name.startswith(prefixes)}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of a transformers ``CLIPVisionConfig`` the vision tower uses (transformers' defaults)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> "CLIPVisionConfig":
        """Reads a ``clip_vision_model`` (or whole ``clip``) ``config.json`` dict (from ``source``, for
        errors); checks what would fail later."""
        raw = _tower_config(raw, "vision_config")
        result = read_transformer_config(cls, raw, source)
        if result.image_size % result.patch_size:
            raise ValueError(f"{source}: image_size {result.image_size} is not divisible by "
                             f"patch_size {result.patch_size}")
        return result


class CLIPVisionEmbeddings(nn.Module):
    """Patches (a strided conv without bias), a learned class token first, learned positions (``embeddings.*``)."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values (batch, size, size, channels) -> (batch, 1 + patches, hidden) float32."""
        cfg = self.config
        if pixel_values.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(f"images of shape {pixel_values.shape[1:]} given; the model takes "
                             f"{(cfg.image_size, cfg.image_size, cfg.num_channels)} (height, width, channels)")
        patch = (cfg.patch_size, cfg.patch_size)
        patches = nn.Conv(cfg.hidden_size, patch, strides=patch, padding="VALID", use_bias=False, dtype=self.dtype,
                          name="patch_embedding")(pixel_values)
        patches = patches.reshape(patches.shape[0], -1, cfg.hidden_size).astype(jnp.float32)
        class_embedding = self.param("class_embedding", nn.initializers.normal(0.02), (cfg.hidden_size,))
        tokens = jnp.concatenate(
            [jnp.broadcast_to(class_embedding.astype(jnp.float32), (patches.shape[0], 1, cfg.hidden_size)), patches], 1)
        positions = nn.Embed(tokens.shape[1], cfg.hidden_size, dtype=self.dtype, name="position_embedding")(
            jnp.arange(tokens.shape[1]))
        return tokens + positions.astype(jnp.float32)


class CLIPVisionTransformer(nn.Module):
    """Embeddings, ``pre_layrnorm`` (the hub's spelling), the layers, ``post_layernorm`` on the class token."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values (batch, size, size, channels) -> pooled (batch, hidden)."""
        eps = self.config.layer_norm_eps
        x = CLIPVisionEmbeddings(self.config, dtype=self.dtype, name="embeddings")(pixel_values)
        x = layer_norm(eps, self.dtype, "pre_layrnorm")(x).astype(jnp.float32)
        x = CLIPEncoder(self.config, dtype=self.dtype, causal=False, name="encoder")(x, None)
        return layer_norm(eps, self.dtype, "post_layernorm")(x[:, 0])


class CLIPVisionEncoder(nn.Module):
    """transformers' ``CLIPVisionModelWithProjection``: ``apply(params, pixel_values)`` -> image embeddings."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    CONFIG_CLASS: ClassVar[type] = CLIPVisionConfig  # reads this module's config.json: CONFIG_CLASS.from_dict

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values (batch, size, size, channels), normalised -> (batch, projection_dim), unnormalised."""
        pooled = CLIPVisionTransformer(self.config, dtype=self.dtype, name="vision_model")(pixel_values)
        return nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype, name="visual_projection")(pooled)

    def dummy_inputs(self) -> tuple[jax.Array]:
        cfg = self.config
        return (jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32),)

    @classmethod
    def adapt_state_dict(cls, state_dict: Mapping[str, Any], source: str) -> dict[str, Any]:
        """Keeps the vision tower's tensors (a whole ``CLIPModel`` checkpoint also holds the text tower's)."""
        return _tower_state_dict(state_dict, ("vision_model.", "visual_projection."))


@dataclasses.dataclass(frozen=True)
class CLIPTextProjectionConfig(CLIPTextEncoderConfig):
    """A ``CLIPTextConfig`` with the projection's size and the end-of-text id that marks the pooled token."""

    projection_dim: int = 512
    eos_token_id: int = 2

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> "CLIPTextProjectionConfig":
        return super().from_dict(_tower_config(raw, "text_config"), source)


class CLIPTextProjectionEncoder(nn.Module):
    """transformers' ``CLIPTextModelWithProjection``: ``apply(params, input_ids, attention_mask=None)`` -> embeddings."""

    config: CLIPTextProjectionConfig
    dtype: Dtype = jnp.float32

    CONFIG_CLASS: ClassVar[type] = CLIPTextProjectionConfig  # reads this module's config.json: CONFIG_CLASS.from_dict

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids (batch, seq) -> (batch, projection_dim), unnormalised: the end-of-text token's state, projected.

        The end of text is the first ``eos_token_id``; configs from before transformers fixed that id
        (``eos_token_id`` 2) take the largest id instead, as transformers does.
        """
        mask = None if attention_mask is None else jnp.asarray(attention_mask)[:, None, None, :].astype(bool)
        states = CLIPTextTransformer(self.config, dtype=self.dtype, name="text_model")(input_ids, mask)
        if self.config.eos_token_id == 2:
            end = jnp.argmax(input_ids, axis=-1)
        else:
            end = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(states, end[:, None, None], axis=1)[:, 0]
        return nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")(pooled)

    def dummy_inputs(self) -> tuple[jax.Array]:
        return (jnp.zeros((1, 1), jnp.int32),)

    @classmethod
    def adapt_state_dict(cls, state_dict: Mapping[str, Any], source: str) -> dict[str, Any]:
        """Keeps the text tower's tensors (a whole ``CLIPModel`` checkpoint also holds the vision tower's)."""
        return _tower_state_dict(state_dict, ("text_model.", "text_projection."))
