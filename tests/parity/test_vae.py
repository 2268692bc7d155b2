"""Parity of the Flax AutoencoderKL with diffusers' (torch, CPU, fp32) on a small random config.

Every tensor of the torch model is random (norm scales and biases included), and the
quant_conv bias pushes one log-variance channel above 20 and one below -30, so the clipping is
compared too. The model goes through ``save_pretrained`` and ``load_vae`` like a hub checkpoint.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[test]')")
import diffusers
from safetensors.torch import save_file

from vmc_jax.hub import converted_store
from vmc_jax.hub.conversion import flax_to_torch
from vmc_jax.hub.vae_loading import decode_latents, encode_to_latents, load_vae
from vmc_jax.hub.weights import abstract_params
from vmc_jax.models.vae import AutoencoderKL, VAEConfig

TOLERANCE = 1e-4
CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
    act_fn="gelu",  # not SiLU, so the parity tests also check that the output layers always use SiLU
)


def _random_vae(seed: int) -> diffusers.AutoencoderKL:
    """The small diffusers VAE with every tensor random; logvar channels 0 and 1 pushed past the clip range."""
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**CONFIG).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(torch.randn_like(tensor) * (0.5 if "norm" in name else 0.2))
        latent = CONFIG["latent_channels"]
        model.quant_conv.bias[latent] += 60.0
        model.quant_conv.bias[latent + 1] -= 60.0
    return model


def _shapes_by_torch_name(vae: AutoencoderKL) -> dict[str, tuple[int, ...]]:
    """The PyTorch names and shapes of ``vae``'s parameters, without running it."""
    zeros = jax.tree.map(lambda spec: np.zeros(spec.shape, np.float16), abstract_params(vae))
    return {name: value.shape for name, value in flax_to_torch(zeros).items()}


def _torch_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in model.state_dict().items()}


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def _max_error(flax_out: jax.Array, torch_out: torch.Tensor) -> float:
    return float(np.abs(np.asarray(flax_out) - np.moveaxis(torch_out.numpy(), 1, -1)).max())


def _write_hub_folder(folder, config: dict, state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """A hub folder with ``config`` and, if given, ``state_dict`` as its safetensors weights."""
    (folder / "config.json").write_text(json.dumps(config))
    if state_dict is not None:
        save_file(state_dict, str(folder / "diffusion_pytorch_model.safetensors"))
    return str(folder)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(folder, torch model, flax module, flax params) of the random VAE saved as safetensors."""
    model = _random_vae(seed=0)
    folder = str(tmp_path_factory.mktemp("vae"))
    model.save_pretrained(folder, safe_serialization=True)
    vae, params = load_vae(folder)
    return folder, model, vae, params


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)


def test_encode_matches_diffusers(hub, images):
    """Posterior mean and clipped log-variance. Measured max abs error: mean 5.2e-6, logvar 4.4e-6 (values O(5))."""
    _, model, vae, params = hub
    mean, logvar = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(params, images)
    with torch.no_grad():
        posterior = model.encode(_nchw(images)).latent_dist
    assert float(posterior.logvar.max()) == 20.0 and float(posterior.logvar.min()) == -30.0
    assert mean.shape == (2, 16, 16, 4)
    assert _max_error(mean, posterior.mean) < TOLERANCE
    assert _max_error(logvar, posterior.logvar) < TOLERANCE


def test_decode_matches_diffusers(hub):
    """Decoded images from random latents. Measured max abs error 4.4e-6 (outputs O(3))."""
    _, model, vae, params = hub
    latents = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    out = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))(params, latents)
    with torch.no_grad():
        expected = model.decode(_nchw(latents)).sample
    assert out.shape == (2, 16, 16, 3)
    assert _max_error(out, expected) < TOLERANCE


def test_latent_helpers_scale_sample_and_take_videos(hub, images):
    """encode_to_latents / decode_latents apply scaling_factor, sample with an rng, and take videos.

    Measured max abs error of the video paths against diffusers: 5.0e-6 (outputs O(3)).
    """
    _, model, vae, params = hub
    scale = vae.config.scaling_factor
    with torch.no_grad():
        posterior = model.encode(_nchw(images)).latent_dist
        decoded = model.decode(posterior.mean).sample
    mean, logvar = (np.moveaxis(t.numpy(), 1, -1) for t in (posterior.mean, posterior.logvar))
    video_latents = encode_to_latents(vae, params, images[None])
    assert video_latents.shape == (1, 2, 16, 16, 4)
    np.testing.assert_allclose(video_latents[0], mean * scale, rtol=0, atol=TOLERANCE)
    video = decode_latents(vae, params, video_latents)
    np.testing.assert_allclose(video[0], np.moveaxis(decoded.numpy(), 1, -1), rtol=0, atol=TOLERANCE)

    rng = jax.random.key(0)
    expected = (mean + np.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)) * scale
    np.testing.assert_allclose(encode_to_latents(vae, params, images, rng), expected, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_is_exact(hub):
    """PyTorch -> Flax -> PyTorch gives the same names, dtypes and values."""
    _, model, _, params = hub
    expected = _torch_state_dict(model)
    back = flax_to_torch(params)
    assert sorted(back) == sorted(expected)
    for name, value in expected.items():
        assert back[name].dtype == value.dtype, name
        np.testing.assert_array_equal(back[name], value, err_msg=name)


@pytest.mark.parametrize("options", [
    dict(mid_block_add_attention=False),
    dict(use_quant_conv=False, use_post_quant_conv=False),
    dict(block_out_channels=[32, 32, 64], down_block_types=["DownEncoderBlock2D"] * 3,
         up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=2),
])
def test_parameters_match_diffusers_for_options(options):
    """The Flax parameters have diffusers' names and shapes for the optional parts and deeper configs."""
    config = {**CONFIG, **options}
    expected = {name: tuple(t.shape) for name, t in diffusers.AutoencoderKL(**config).state_dict().items()}
    assert _shapes_by_torch_name(AutoencoderKL(VAEConfig.from_dict(config))) == expected


def test_converted_folder_round_trip(hub, tmp_path):
    """save_model -> load_vae gives the same config and params."""
    _, _, vae, params = hub
    converted_store.save_model(str(tmp_path), vae.config.to_dict(), params)
    restored_vae, restored = load_vae(str(tmp_path))
    assert restored_vae.config == vae.config
    jax.tree.map(np.testing.assert_array_equal, restored, params)


def test_fp16_variant_keeps_its_dtype(hub, tmp_path):
    """An fp16-only hub folder (``variant="fp16"``) loads as fp16 with dtype=None and as fp32 when asked."""
    _, model, _, params = hub
    half = copy.deepcopy(model).half()
    half.save_pretrained(str(tmp_path), safe_serialization=True, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    _, fp16 = load_vae(str(tmp_path))
    assert {leaf.dtype for leaf in jax.tree.leaves(fp16)} == {np.dtype(np.float16)}
    _, fp32 = load_vae(str(tmp_path), dtype=jnp.float32)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b, np.float16).astype(np.float32)),
                 fp32, params)


def test_legacy_attention_names_load(hub, tmp_path):
    """Checkpoints saved before diffusers renamed query / key / value / proj_attn still load."""
    folder, model, _, params = hub
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state_dict = {}
    for name, tensor in model.state_dict().items():
        for new, old in old_names.items():
            name = name.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        state_dict[name] = tensor.contiguous()
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in state_dict
    _, loaded = load_vae(_write_hub_folder(tmp_path, converted_store.read_config(folder), state_dict))
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


@pytest.mark.parametrize("change, message", [
    (dict(use_tiny_decoder=True), "unknown config key 'use_tiny_decoder' (value True)"),
    (dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
     "config key 'down_block_types' has unsupported value ('DownEncoderBlock2D', 'AttnDownEncoderBlock2D')"),
    (dict(up_block_types=["UpDecoderBlock2D"]), "config key 'up_block_types' has unsupported value"),
    (dict(shift_factor=0.1159), "config key 'shift_factor' has unsupported value 0.1159 (expected null)"),
    (dict(norm_num_groups=24), "config key 'block_out_channels' has unsupported value (32, 64)"),
    (dict(_class_name="AutoencoderTiny"), "unsupported VAE class 'AutoencoderTiny'"),
])
def test_bad_config_is_refused(hub, tmp_path, change, message):
    """Unknown keys and unsupported values are named, with the config file."""
    folder, *_ = hub
    config = {**converted_store.read_config(folder), **change}
    path = _write_hub_folder(tmp_path, config)
    with pytest.raises(ValueError) as error:
        load_vae(path)
    assert message in str(error.value) and str(tmp_path / "config.json") in str(error.value)


def test_missing_weight_is_named(hub, tmp_path):
    """A weight missing from the checkpoint is reported by its PyTorch name and shape, with the file."""
    folder, model, *_ = hub
    state_dict = {k: v for k, v in model.state_dict().items() if k != "decoder.mid_block.attentions.0.to_k.weight"}
    path = _write_hub_folder(tmp_path, converted_store.read_config(folder), state_dict)
    with pytest.raises(ValueError) as error:
        load_vae(path)
    assert "missing keys: decoder.mid_block.attentions.0.to_k.weight (expected (64, 64))" in str(error.value)
    assert "diffusion_pytorch_model.safetensors" in str(error.value)
