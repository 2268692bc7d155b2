"""The real cascade configs of configs/models build, abstractly, at their published sizes.

Only shapes are traced (`weights.abstract_params`, no weights). Reference counts come from the
reference implementations built from the same config.json on torch's meta device (no memory),
and from published figures; configs/models/README.md gives each source.
"""

import functools
import json
import math
import os

import jax
import pytest
from helpers import REPO

from vmc_jax.hub.text_loading import text_encoder_from_config
from vmc_jax.hub.unet_loading import build_unet
from vmc_jax.hub.weights import abstract_params
from vmc_jax.models.vae import AutoencoderKL, VAEConfig

MODELS = os.path.join(REPO, "configs", "models")


def _config(part: str) -> dict:
    with open(os.path.join(MODELS, part, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def _flax_count(part: str) -> int:
    config = _config(part)
    if part.endswith("unet"):
        module = build_unet(config, source=part)
    elif part.endswith("vae"):
        module = AutoencoderKL(VAEConfig.from_dict(config, source=part))
    else:
        module = text_encoder_from_config(config, source=part)
    return _count(abstract_params(module))


def _torch_count(part: str) -> int:
    """The parameter count of the diffusers / transformers module of ``part``'s config, built on the meta device."""
    torch = pytest.importorskip("torch")
    config = {k: v for k, v in _config(part).items() if not k.startswith("_")}
    with torch.device("meta"):
        if part.endswith("unet"):
            diffusers = pytest.importorskip("diffusers")
            cls = {"UNet2DConditionModel": diffusers.UNet2DConditionModel,
                   "UNet3DConditionModel": diffusers.UNet3DConditionModel}[_config(part)["_class_name"]]
            model = cls.from_config(config)
        elif part.endswith("vae"):
            model = pytest.importorskip("diffusers").AutoencoderKL.from_config(config)
        else:
            transformers = pytest.importorskip("transformers")
            if config["model_type"] == "t5":
                model = transformers.T5EncoderModel(transformers.T5Config(**config))
            else:
                model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    return sum(p.numel() for p in model.parameters())


# Models the current diffusers / transformers build: the Flax tree must have exactly their count.
@pytest.mark.parametrize("part", ["IF-II-L-v1.0/unet", "show-1-sr2/unet", "show-1-sr2/vae",
                                  "show-1-sr2/text_encoder", "t5-v1_1-xxl/text_encoder"])
def test_parameter_count_equals_the_reference_implementation(part):
    assert _flax_count(part) == _torch_count(part)


# Published figures (README.md): (part, count, tolerance). IF-II-L "1.2B" is rounded to 0.1B; the
# zeroscope UNet file is 2.82 GB of fp16 (2 bytes a parameter, rounded to 0.01 GB); the ViT-H text
# tower and the SD VAE are quoted to the parameter.
PUBLISHED = [("IF-II-L-v1.0/unet", 1.2e9, 0.05e9), ("show-1-sr2/unet", 2.82e9 / 2, 0.005e9 / 2),
             ("show-1-sr2/text_encoder", 340_387_840, 0), ("show-1-sr2/vae", 83_653_863, 0)]


@pytest.mark.parametrize("part,published,tolerance", PUBLISHED)
def test_parameter_count_matches_the_published_figure(part, published, tolerance):
    assert abs(_flax_count(part) - published) <= tolerance


def test_show1_pixel_unets_build_and_interpolation_differs_only_in_its_input_conv():
    base, interpolation = _flax_count("show-1-base/unet"), _flax_count("show-1-interpolation/unet")
    extra_inputs = _config("show-1-interpolation/unet")["in_channels"] - _config("show-1-base/unet")["in_channels"]
    first_channels = _config("show-1-base/unet")["block_out_channels"][0]
    assert interpolation - base == extra_inputs * 3 * 3 * first_channels  # conv_in's 3x3 kernel, nothing else
    assert _flax_count("show-1-sr1/unet") > 0
