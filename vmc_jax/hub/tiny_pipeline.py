"""A small Show-1 keyframe pipeline with random weights, in the hub (PyTorch) format, and a synthetic clip.

Both are made locally, with no download and no torch, so the README's demo, ``vmc-jax convert``
and the tests can run the whole path (hub folder -> convert -> train -> generate) in seconds.
The folder has the layout of Show-1's base pipeline: ``model_index.json``, ``unet/``,
``text_encoder/``, ``tokenizer/`` and ``scheduler/``.
"""

from __future__ import annotations

import json
import math
import os
import string
from typing import Any, Sequence

import flax.linen as nn
import numpy as np
from flax import traverse_util

from vmc_jax import files
from vmc_jax.hub.text_loading import text_encoder_from_config
from vmc_jax.hub.unet_loading import abstract_params, build_unet, to_torch_state_dict

# The example prompts of configs/vmc.py (and its "tiny" ones); the tokenizer has a piece per word.
PROMPTS = (
    "a car is moving", "a car is moving, underwater", "a car is moving, under the deep sea",
    "a tank is moving on the snow", "a lamborghini is moving in space", "a lamborghini is moving in desert",
    "a bird is flying", "a phoenix is flying above lava", "a majestic dragon is flying in forest",
    "a brown bear is walking", "a panda bear is walking", "a tiger is walking on the snow",
    "pills are falling.", "colorful confetti are falling", "gem stones are falling",
    "two sharks are moving", "two spaceships are moving in space", "two goldfish are moving in the ocean",
    "a red square is moving", "a blue square is moving", "low resolution, blur",
)

T5_D_MODEL = 32

MODEL_INDEX = {
    "_class_name": "TextToVideoIFPipeline",
    "_diffusers_version": "0.19.3",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDPMScheduler"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "unet": ["showone.models", "UNet3DConditionModel"],
    "watermarker": [None, None],
}

# Show-1 base's keyframe UNet, shrunk: two blocks of 32 channels, one layer each.
UNET_CONFIG = {
    "_class_name": "UNet3DConditionModel",
    "_diffusers_version": "0.19.3",
    "act_fn": "gelu",
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 4,
    "addition_time_embed_dim": None,
    "attention_head_dim": 16,
    "block_out_channels": [32, 32],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 32,
    "cross_attention_norm": None,
    "down_block_types": ["ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": T5_D_MODEL,
    "encoder_hid_dim_type": "text_proj",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 3,
    "layers_per_block": 1,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock3DSimpleCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 6,
    "projection_class_embeddings_input_dim": None,
    "resnet_out_scale_factor": math.sqrt(2.0),
    "resnet_skip_time_act": True,
    "resnet_time_scale_shift": "scale_shift",
    "sample_size": 16,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": "gelu",
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": 1,
    "transfromer_in_opt": False,
    "up_block_types": ["SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D"],
    "upcast_attention": False,
    "use_linear_projection": False,
}

# A T5 v1.1 encoder (gated gelu) as transformers writes its config.json; vocab_size is the tokenizer's.
T5_CONFIG = {
    "architectures": ["T5EncoderModel"],
    "classifier_dropout": 0.0,
    "d_ff": 64,
    "d_kv": 8,
    "d_model": T5_D_MODEL,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "dtype": "float32",
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_decoder": False,
    "is_encoder_decoder": False,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "num_decoder_layers": 2,
    "num_heads": 4,
    "num_layers": 2,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": True,
    "use_cache": False,
}

# Show-1 base's DDPM schedule (that of DeepFloyd IF): linear betas, learned-range variance, thresholding.
SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.19.3",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.95,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "steps_offset": 0,
    "thresholding": True,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "variance_type": "learned_range",
}

# Stddev of the random values of biases, zero-initialised layers and offsets of norm scales.
_SMALL_STDDEV = 0.02
# The Flax name of the zero-initialised last conv in each TemporalConvLayer (``temp_convs_<i>``).
_LAST_TEMPORAL_CONV = "conv4_3"


def make_tiny_pipeline(folder: str, seed: int = 0, unet_config: dict[str, Any] = UNET_CONFIG,
                       prompts: Sequence[str] = PROMPTS, overwrite: bool = False) -> str:
    """Writes the tiny random Show-1 keyframe pipeline (hub format) as ``folder``; returns ``folder``.

    ``unet_config`` and ``prompts`` (whose words the tokenizer spells as one piece each) default
    to the demo's; the moving-shapes world's pretraining starts from its own. The folder is built
    beside ``folder`` and renamed when complete; an existing one is replaced only if ``overwrite``.
    """
    with files.atomic_dir(folder, overwrite) as tmp:
        vocab_size = _write_tokenizer(os.path.join(tmp, "tokenizer"), prompts)
        t5_config = {**T5_CONFIG, "vocab_size": vocab_size}
        write_random_model(os.path.join(tmp, "text_encoder"), t5_config, text_encoder_from_config(t5_config),
                           "model.safetensors", seed)
        write_random_model(os.path.join(tmp, "unet"), unet_config, build_unet(unet_config),
                           "diffusion_pytorch_model.safetensors", seed + 1)
        _write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), SCHEDULER_CONFIG)
        _write_json(os.path.join(tmp, "model_index.json"), MODEL_INDEX)
    return folder


def make_synthetic_clip(path: str, num_frames: int = 8, height: int = 40, width: int = 64) -> str:
    """Writes an animated GIF of a red square moving left to right over a gradient; returns ``path``.

    A clip with one plain, known motion, for demos and tests that need a training video.
    """
    import imageio.v3 as iio  # needed only here

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    background = np.stack([40 + 80 * x / width, 90 + 100 * y / height, 200 - 60 * x / width], axis=-1)
    side = max(height // 3, 2)
    top = (height - side) // 2
    frames = []
    for i in range(num_frames):
        left = round(i * (width - side) / max(num_frames - 1, 1))
        frame = background.copy()
        frame[top:top + side, left:left + side] = (230, 30, 30)
        frames.append(frame.round().astype(np.uint8))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    iio.imwrite(path, np.stack(frames), extension=".gif", duration=250, loop=0)
    return path


def _write_tokenizer(folder: str, prompts: Sequence[str]) -> int:
    """Saves a word-level T5 tokenizer (a piece per word of ``prompts``, plus single characters); returns its size."""
    from transformers import T5Tokenizer  # heavy import, needed only here

    words = sorted({word for prompt in prompts for word in prompt.replace(",", " ").replace(".", " ").split()})
    characters = string.ascii_letters + string.digits + string.punctuation
    # Unigram scores: a whole word (-1) beats spelling it out (-5 per character).
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -1.0) for word in words]
    vocab += [(c, -5.0) for c in characters]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def write_random_model(folder: str, config: dict[str, Any], module: nn.Module, weights_name: str, seed: int) -> None:
    """Writes ``config.json`` and random weights of ``module`` under their PyTorch names (safetensors)."""
    state_dict = to_torch_state_dict(module, random_params(module, seed))
    os.makedirs(folder, exist_ok=True)
    files.write_safetensors(os.path.join(folder, weights_name), state_dict, metadata={"format": "pt"})
    _write_json(os.path.join(folder, "config.json"), config)


def random_params(module: nn.Module, seed: int) -> dict:
    """Random float32 params for ``module``, drawn in numpy from its parameter shapes.

    Kernels and embeddings are scaled like Flax's default initialisers; norm scales are near 1;
    biases, the last conv of each temporal conv layer (zero in a fresh Show-1 UNet, which makes
    it an identity in time) and other leaves get small values, so every parameter matters. This
    takes seconds where ``module.init`` on a CPU takes half a minute.
    """
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(abstract_params(module))
    return traverse_util.unflatten_dict({path: _random_leaf(path, spec.shape, rng) for path, spec in flat.items()})


def _random_leaf(path: tuple[str, ...], shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    normal = rng.standard_normal(shape).astype(np.float32)
    leaf, layer = path[-1], path[-2]
    if leaf == "scale":
        return 1 + _SMALL_STDDEV * normal
    if leaf == "kernel" and layer != _LAST_TEMPORAL_CONV:
        return normal / math.sqrt(math.prod(shape[:-1]))  # fan in: every axis but the output one
    if leaf == "embedding":
        return normal / math.sqrt(shape[-1])
    return _SMALL_STDDEV * normal


def _write_json(path: str, content: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, sort_keys=True)
        f.write("\n")


# The cascade's other stages, shrunk like UNET_CONFIG. Pixel UNets take noisy + condition channels.
INTERPOLATION_UNET_CONFIG = {**UNET_CONFIG, "in_channels": 7}  # noisy 3 + condition 3 + mask 1
SR1_UNET_CONFIG = {**UNET_CONFIG, "in_channels": 6, "class_embed_type": "timestep"}  # noisy 3 + upscaled 3
# DeepFloyd IF-II's UNet2DConditionModel (its block types and embeddings), shrunk.
IF_II_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.3",
    "act_fn": "gelu",
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 4,
    "attention_head_dim": 16,
    "block_out_channels": [32, 32],
    "class_embed_type": "timestep",
    "cross_attention_dim": 32,
    "cross_attention_norm": "group_norm",
    "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    "encoder_hid_dim": T5_D_MODEL,
    "encoder_hid_dim_type": "text_proj",
    "in_channels": 6,
    "layers_per_block": 1,
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "norm_num_groups": 32,
    "out_channels": 6,
    "resnet_out_scale_factor": math.sqrt(2.0),
    "resnet_skip_time_act": True,
    "resnet_time_scale_shift": "scale_shift",
    "sample_size": 16,
    "time_embedding_act_fn": "gelu",
    "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
}
CLIP_D_MODEL = 32
# zeroscope's (ModelScope) UNet3DConditionModel, shrunk; it attends to CLIP text states.
SR2_UNET_CONFIG = {
    "_class_name": "UNet3DConditionModel",
    "_diffusers_version": "0.19.3",
    "attention_head_dim": 8,
    "block_out_channels": [32, 32],
    "cross_attention_dim": CLIP_D_MODEL,
    "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
    "in_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,  # as released; diffusers 0.19.3 builds transformer_in with 32 groups whatever this is
    "out_channels": 4,
    "sample_size": 16,
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"],
}
VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.19.3",
    "act_fn": "silu",
    "block_out_channels": [32, 32],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "out_channels": 3,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
}
CLIP_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_act": "quick_gelu",
    "hidden_size": CLIP_D_MODEL,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": CLIP_D_MODEL,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}
# The SR stages' noise augmentation schedule (DeepFloyd IF's image_noising_scheduler).
NOISING_SCHEDULER_CONFIG = {**SCHEDULER_CONFIG, "beta_schedule": "squaredcos_cap_v2", "thresholding": False,
                            "variance_type": "fixed_small"}
# zeroscope's DDIM schedule (Stable Diffusion's scaled-linear betas).
SR2_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.19.3",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
STAGE_PIPELINES = {  # stage -> pipeline class, as in each released pipeline's model_index.json
    "interpolation": "TextToVideoIFInterpPipeline",
    "sr1_image": "IFSuperResolutionPipeline",
    "sr1": "TextToVideoIFSuperResolutionPipeline_Cond",
    "sr2": "VideoToVideoSDPipeline",
}


def make_tiny_cascade(folder: str, seed: int = 10, overwrite: bool = False) -> dict[str, str]:
    """Writes tiny random pipelines of the stages after the keyframes as ``folder/<stage>``
    (hub format, the released folder layouts); returns ``{stage: folder}``.

    The pixel stages hold ``unet/`` and ``scheduler/`` (SR stages also ``image_noising_scheduler/``);
    they take the keyframe pipeline's T5 states. sr2 holds ``unet/``, ``vae/``, ``text_encoder/``
    (CLIP), ``tokenizer/`` and ``scheduler/``. ``folder`` is built beside itself and renamed when
    complete; an existing one is replaced only if ``overwrite``.
    """
    with files.atomic_dir(folder, overwrite) as tmp:
        _write_tiny_cascade(tmp, seed)
    return {stage: os.path.join(folder, stage) for stage in STAGE_PIPELINES}


def _write_tiny_cascade(folder: str, seed: int) -> None:
    """Fills ``folder`` with the stage pipelines of :func:`make_tiny_cascade`."""
    unets = {"interpolation": (INTERPOLATION_UNET_CONFIG, "UNet3DConditionModel"),
             "sr1_image": (IF_II_UNET_CONFIG, "UNet2DConditionModel"),
             "sr1": (SR1_UNET_CONFIG, "UNet3DConditionModel"), "sr2": (SR2_UNET_CONFIG, "UNet3DConditionModel")}
    for i, (stage, (config, unet_class)) in enumerate(unets.items()):
        path = os.path.join(folder, stage)
        write_random_model(os.path.join(path, "unet"), config, build_unet(config),
                     "diffusion_pytorch_model.safetensors", seed + i)
        index = {"_class_name": STAGE_PIPELINES[stage], "_diffusers_version": "0.19.3",
                 "unet": ["diffusers", unet_class], "scheduler": ["diffusers", "DDPMScheduler"]}
        if stage == "sr2":
            _write_sr2_parts(path, seed + 10)
            index.update(scheduler=["diffusers", "DDIMScheduler"], vae=["diffusers", "AutoencoderKL"],
                         text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"])
        else:
            _write_json(os.path.join(path, "scheduler", "scheduler_config.json"), SCHEDULER_CONFIG)
        if stage.startswith("sr1"):
            _write_json(os.path.join(path, "image_noising_scheduler", "scheduler_config.json"),
                        NOISING_SCHEDULER_CONFIG)
            index["image_noising_scheduler"] = ["diffusers", "DDPMScheduler"]
        _write_json(os.path.join(path, "model_index.json"), index)


def _write_sr2_parts(path: str, seed: int) -> None:
    """sr2's VAE, CLIP text encoder, character-level CLIP tokenizer and DDIM scheduler."""
    from vmc_jax.models.vae import AutoencoderKL, VAEConfig

    vocab_size = _write_clip_tokenizer(os.path.join(path, "tokenizer"))
    clip_config = {**CLIP_CONFIG, "vocab_size": vocab_size}
    write_random_model(os.path.join(path, "text_encoder"), clip_config, text_encoder_from_config(clip_config),
                 "model.safetensors", seed)
    write_random_model(os.path.join(path, "vae"), VAE_CONFIG, AutoencoderKL(VAEConfig.from_dict(VAE_CONFIG)),
                 "diffusion_pytorch_model.safetensors", seed + 1)
    _write_json(os.path.join(path, "scheduler", "scheduler_config.json"), SR2_SCHEDULER_CONFIG)


def _write_clip_tokenizer(folder: str) -> int:
    """Saves a CLIP BPE tokenizer with one piece per character (no merges); returns its size."""
    from transformers import CLIPTokenizer  # heavy import, needed only here

    characters = string.ascii_lowercase + string.digits + string.punctuation
    pieces = ["<|startoftext|>", "<|endoftext|>"] + list(characters) + [c + "</w>" for c in characters]
    os.makedirs(folder, exist_ok=True)
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    _write_json(vocab_file, {piece: i for i, piece in enumerate(pieces)})
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab_file, merges_file, pad_token="<|endoftext|>", model_max_length=77)
    tokenizer.save_pretrained(folder)
    return len(tokenizer)
