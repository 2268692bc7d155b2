"""A UNet's ``config.json``, read strictly: every key known, every value supported or an error."""

from __future__ import annotations

import dataclasses
from typing import Any

from vmc_jax.models.unet_blocks import BLOCK_KINDS

# Show-1's UNet3DConditionModel signature; configs saved by diffusers list every argument anyway.
_SHOW1_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
    mid_block_type="UNetMidBlock3DCrossAttn",
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1.0, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=1280, transformer_layers_per_block=1, encoder_hid_dim=None, encoder_hid_dim_type=None,
    attention_head_dim=8, num_attention_heads=None, dual_cross_attention=False, use_linear_projection=False,
    class_embed_type=None, addition_embed_type=None, addition_time_embed_dim=None, num_class_embeds=None,
    upcast_attention=False, resnet_time_scale_shift="default", resnet_skip_time_act=False,
    resnet_out_scale_factor=1.0, time_embedding_type="positional", time_embedding_dim=None,
    time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3,
    conv_out_kernel=3, projection_class_embeddings_input_dim=None, class_embeddings_concat=False,
    mid_block_only_cross_attention=None, cross_attention_norm=None, addition_embed_type_num_heads=64,
    transfromer_in_opt=False,
)

# diffusers' UNet3DConditionModel (ModelScope / zeroscope): only these keys, at these defaults.
_MODELSCOPE_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1.0,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1024, attention_head_dim=64,
    num_attention_heads=None, time_cond_proj_dim=None,
)

# diffusers' UNet2DConditionModel (DeepFloyd IF-II): the Show-1 keys (Show-1 derived from it) and these.
_UNET2D_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in _SHOW1_DEFAULTS.items() if k != "transfromer_in_opt"},
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 1280, "dropout": 0.0, "reverse_transformer_layers_per_block": None,
    "attention_type": "default",
}

# (class name, family) -> the keys a config may have, with their defaults. A Show-1 config is
# told from a ModelScope one by Show-1's own `transfromer_in_opt` key.
_FAMILIES = {
    "show1": ("UNet3DConditionModel", _SHOW1_DEFAULTS, "3D"),
    "modelscope": ("UNet3DConditionModel", _MODELSCOPE_DEFAULTS, "3D"),
    "unet2d": ("UNet2DConditionModel", _UNET2D_DEFAULTS, "2D"),
}

# Values this implementation does not have; each maps the key to the only values it accepts.
_SUPPORTED: dict[str, tuple] = dict(
    dual_cross_attention=(False,),
    class_embed_type=(None, "timestep"),
    addition_embed_type=(None, "text"),
    encoder_hid_dim_type=(None, "text_proj"),
    time_embedding_type=("positional",),
    time_cond_proj_dim=(None,),
    projection_class_embeddings_input_dim=(None,),
    addition_time_embed_dim=(None,),
    resnet_time_scale_shift=("default", "scale_shift"),
    cross_attention_norm=(None, "layer_norm", "group_norm"),
    transfromer_in_opt=(False,),
    dropout=(0.0,),
    reverse_transformer_layers_per_block=(None,),
    attention_type=("default",),
    act_fn=("silu", "swish", "gelu", "mish"),
    time_embedding_act_fn=(None, "silu", "swish", "gelu", "mish"),
    timestep_post_act=(None, "silu", "swish", "gelu", "mish"),
)

_PER_BLOCK = ("only_cross_attention", "layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
              "attention_head_dim", "num_attention_heads")


PerBlock = tuple  # one entry per down block (a single config value is repeated)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """A validated UNet ``config.json``; defaults are Show-1's, per-block settings one per down block.

    The fields mirror the diffusers config keys; the last four are the family differences,
    resolved once in ``from_dict`` so that the modules need no ``family == ...`` branches.
    """

    class_name: str = "UNet3DConditionModel"
    family: str = "show1"  # "show1", "modelscope" (diffusers UNet3DConditionModel) or "unet2d"
    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False  # maps the input from [0, 1] to [-1, 1] first
    flip_sin_to_cos: bool = True  # timestep embedding order: cos then sin
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = _SHOW1_DEFAULTS["down_block_types"]
    mid_block_type: str | None = "UNetMidBlock3DCrossAttn"
    up_block_types: tuple[str, ...] = _SHOW1_DEFAULTS["up_block_types"]
    only_cross_attention: PerBlock = (False,) * 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: PerBlock = (2,) * 4
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: PerBlock = (1280,) * 4
    transformer_layers_per_block: PerBlock = (1,) * 4
    encoder_hid_dim: int | None = None  # text states are projected from this width when set
    encoder_hid_dim_type: str | None = None
    attention_head_dim: PerBlock = (8,) * 4  # head count or head size: see transformer_head_size_from_config
    num_attention_heads: PerBlock = (None,) * 4
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False  # no effect: the softmax always runs in float32
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool = False
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64
    transfromer_in_opt: bool = False
    dropout: float = 0.0
    reverse_transformer_layers_per_block: tuple | None = None
    attention_type: str = "default"
    # Family differences, resolved by from_dict:
    transformer_head_size_from_config: bool = False  # ModelScope: attention_head_dim is the head size
    temporal_conv_groups: int = 32  # ModelScope: norm_num_groups; Show-1 and IF: 32
    transformer_in: bool = False  # ModelScope: a temporal transformer after conv_in
    output_act_fn: str = "silu"  # before conv_out: ModelScope always SiLU, the others act_fn

    @property
    def is_video(self) -> bool:
        return self.family != "unet2d"

    @property
    def num_downsamplers(self) -> int:
        return len(self.block_out_channels) - 1

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "UNetConfig":
        """Validates ``raw`` (a diffusers config dict); ``source`` names it in errors."""
        class_name = raw.get("_class_name", "UNet3DConditionModel")
        if class_name == "UNet2DConditionModel":
            family = "unet2d"
        elif class_name == "UNet3DConditionModel":
            family = "show1" if "transfromer_in_opt" in raw or "addition_embed_type" in raw else "modelscope"
        else:
            raise ValueError(f"{source}: unsupported UNet class {class_name!r} "
                             "(expected 'UNet3DConditionModel' or 'UNet2DConditionModel')")
        _, defaults, dims = _FAMILIES[family]
        unknown = sorted(k for k in raw if not k.startswith("_") and k not in defaults)
        if unknown:
            raise ValueError(f"{source}: unknown config keys {unknown} for a {class_name} ({family})")
        values = {**_SHOW1_DEFAULTS, **defaults, **{k: v for k, v in raw.items() if not k.startswith("_")}}
        for key, allowed in _SUPPORTED.items():
            if key in values and values[key] not in allowed:
                raise ValueError(f"{source}: {key}={values[key]!r} is not supported (supported: {list(allowed)})")
        if values["num_attention_heads"] is not None:
            raise ValueError(f"{source}: num_attention_heads must be null in a Show-1 config "
                             "(heads come from attention_head_dim)")
        if values["encoder_hid_dim"] is not None and values["encoder_hid_dim_type"] is None:
            values["encoder_hid_dim_type"] = "text_proj"  # as the reference defaults it
        num_blocks = len(values["down_block_types"])
        for key in ("up_block_types", "block_out_channels"):
            if len(values[key]) != num_blocks:
                raise ValueError(f"{source}: {key} has {len(values[key])} entries, down_block_types {num_blocks}")
        for key in ("down_block_types", "up_block_types"):
            for name in values[key]:
                if name not in BLOCK_KINDS or "Mid" in name or dims not in name:
                    raise ValueError(f"{source}: unknown block type {name!r} in {key} for a {class_name}")
        if family == "modelscope":  # fixed in that class: its mid block, and linear transformer projections
            values.update(mid_block_type="UNetMidBlock3DCrossAttn", use_linear_projection=True)
        mid = values["mid_block_type"]
        if mid is not None and (mid not in BLOCK_KINDS or dims not in mid):
            raise ValueError(f"{source}: unknown mid_block_type {mid!r} for a {class_name}")
        if values["mid_block_only_cross_attention"] is None:  # the reference's rule, before expanding per block
            only = values["only_cross_attention"]
            values["mid_block_only_cross_attention"] = only if isinstance(only, bool) else False
        for key in _PER_BLOCK:
            value = values[key]
            if isinstance(value, (list, tuple)):
                if len(value) != num_blocks:
                    raise ValueError(f"{source}: {key} has {len(value)} entries, expected {num_blocks}")
                values[key] = tuple(value)
            else:
                values[key] = (value,) * num_blocks
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        modelscope = family == "modelscope"
        return cls(
            class_name=class_name, family=family, **values,
            transformer_head_size_from_config=modelscope,
            temporal_conv_groups=values["norm_num_groups"] if modelscope else 32,
            transformer_in=modelscope,
            output_act_fn="silu" if modelscope else values["act_fn"],
        )
