"""Bad checkpoints, configs and inputs give errors that name the key, shape, value or file."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from helpers import FIXTURES
from safetensors.numpy import save_file

import vmc_jax
from vmc_jax.hub.conversion import read_state_dict
from vmc_jax.hub.unet_loading import build_unet

KEYFRAMES = os.path.join(FIXTURES, "show1_keyframes", "unet")
WEIGHTS = "diffusion_pytorch_model.fp16.safetensors"


@pytest.fixture()
def folder(tmp_path):
    """A writable copy of the keyframe model folder, and its state dict."""
    target = tmp_path / "unet"
    shutil.copytree(KEYFRAMES, target)
    return target, {k: v() for k, v in read_state_dict(str(target / WEIGHTS)).items()}


def rewrite(folder, state_dict):
    save_file(state_dict, str(folder / WEIGHTS))


def test_missing_key(folder):
    path, sd = folder
    del sd["conv_in.weight"]
    rewrite(path, sd)
    with pytest.raises(ValueError, match=r"missing keys: conv_in.weight \(expected \(32, 3, 3, 3\)\)"):
        vmc_jax.load_unet(str(path))


def test_unexpected_key(folder):
    path, sd = folder
    sd["extra.weight"] = np.zeros(3, np.float16)
    rewrite(path, sd)
    with pytest.raises(ValueError, match=r"unexpected keys: extra.weight"):
        vmc_jax.load_unet(str(path))


def test_shape_mismatch_names_both_shapes(folder):
    path, sd = folder
    sd["conv_out.weight"] = np.zeros((5, 32, 3, 3), np.float16)
    rewrite(path, sd)
    with pytest.raises(ValueError, match=r"conv_out.weight: checkpoint \(5, 32, 3, 3\), model \(6, 32, 3, 3\)"):
        vmc_jax.load_unet(str(path))


def test_missing_weights_and_config(tmp_path):
    (tmp_path / "config.json").write_text(open(os.path.join(KEYFRAMES, "config.json")).read())
    with pytest.raises(FileNotFoundError, match="no weights in .*diffusion_pytorch_model.safetensors"):
        vmc_jax.load_unet(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        vmc_jax.load_unet(str(tmp_path / ".."))
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        vmc_jax.load_unet(str(tmp_path / "nope"))


@pytest.mark.parametrize("key, value, message", [
    ("down_block_types", ["ResnetDownsampleBlock3D", "FancyBlock3D", "SimpleCrossAttnDownBlock3D"],
     "unknown block type 'FancyBlock3D' in down_block_types"),
    ("mid_block_type", "UNetMidBlock3DFancy", "unknown mid_block_type 'UNetMidBlock3DFancy'"),
    ("resnet_time_scale_shift", "ada_group", r"resnet_time_scale_shift='ada_group' is not supported"),
    ("time_embedding_type", "fourier", r"time_embedding_type='fourier' is not supported"),
    ("layers_per_block", [1, 2], "layers_per_block has 2 entries, expected 3"),
    ("frobnicate", 1, r"unknown config keys \['frobnicate'\]"),
])
def test_bad_config_values(key, value, message):
    with open(os.path.join(KEYFRAMES, "config.json")) as f:
        config = json.load(f)
    config[key] = value
    with pytest.raises(ValueError, match=message):
        build_unet(config, source="unet/config.json")


def test_bad_inputs():
    model, params = vmc_jax.load_unet(KEYFRAMES, dtype=np.float32)
    text = np.zeros((1, 7, 48), np.float32)
    with pytest.raises(ValueError, match=r"spatial size 16x18 is not divisible by 4"):
        model.apply({"params": params}, np.zeros((1, 2, 16, 18, 3), np.float32), np.array([1]), text)
    with pytest.raises(ValueError, match="sample has 4 channels, the model expects 3"):
        model.apply({"params": params}, np.zeros((1, 2, 16, 16, 4), np.float32), np.array([1]), text)
    with pytest.raises(ValueError, match=r"sample has shape \(1, 16, 16, 3\); this model takes \(batch, frames"):
        model.apply({"params": params}, np.zeros((1, 16, 16, 3), np.float32), np.array([1]), text)


def test_sr_model_needs_class_labels():
    model, params = vmc_jax.load_unet(os.path.join(FIXTURES, "show1_sr", "unet"), dtype=np.float32)
    with pytest.raises(ValueError, match="needs class_labels"):
        model.apply({"params": params}, np.zeros((1, 1, 16, 16, 6), np.float32), np.array([1]),
                    np.zeros((1, 3, 48), np.float32))


def test_to_torch_state_dict_rejects_foreign_trees():
    model, params = vmc_jax.load_unet(KEYFRAMES, dtype=np.float32)
    with pytest.raises(ValueError, match="conv_in/kernel: shape \\(2,\\), model has"):
        vmc_jax.to_torch_state_dict(model, {"conv_in": {"kernel": np.zeros(2)}})
    with pytest.raises(ValueError, match="nope/kernel is not a parameter of this model"):
        vmc_jax.to_torch_state_dict(model, {"nope": {"kernel": np.zeros(2)}})


def test_an_image_unet_is_refused_where_a_video_model_is_needed(tmp_path):
    """A pretrained pipeline whose unet/ is a 2D UNet (the keyframe model's config made 2D, zero weights)."""
    import ml_collections

    from vmc_jax.hub.weights import abstract_params
    from vmc_jax.jobs import generate

    with open(os.path.join(KEYFRAMES, "config.json")) as f:
        config = json.load(f)
    del config["transfromer_in_opt"]
    config = {k: json.loads(json.dumps(v).replace("3D", "2D")) for k, v in config.items()}
    config["_class_name"] = "UNet2DConditionModel"
    os.makedirs(tmp_path / "unet")
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    model = build_unet(config)
    zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, np.float32), abstract_params(model))
    save_file(vmc_jax.to_torch_state_dict(model, zeros), str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    job = ml_collections.ConfigDict({"pretrained": str(tmp_path), "train": {"compute_dtype": "float32", "remat": False}})
    with pytest.raises(ValueError, match=r"^config.pretrained = '.*': unet/ is a UNet2DConditionModel, an image "
                                         r"model; VMC tunes a video UNet"):
        generate.load_keyframe_unet(job)
