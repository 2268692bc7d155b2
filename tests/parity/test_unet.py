"""Parity of the Flax Show-1 UNet with golden outputs and gradients of the PyTorch reference.

The fixtures (tests/fixtures/show1_*) were produced by weights_conversion/make_show1_fixtures.py
from Show-1's UNet3DConditionModel with diffusers 0.19.3 in fp32 on the CPU, every parameter
random and rounded to fp16. show1_crossattn covers Show-1's Transformer2DModel ("CrossAttn") and
plain 3D blocks: down CrossAttnDownBlock3D x2 + DownBlock3D, mid UNetMidBlock3DCrossAttn, up
UpBlock3D + CrossAttnUpBlock3D x2, attention_head_dim [2, 4, 8] (a head count per block), no
encoder_hid_proj and no addition embedding. Measured: outputs within 1.0e-5 max abs error
(keyframes 7.5e-6, interpolation 1.0e-5, sr 9.6e-6, crossattn 4.2e-6), gradients within 4.3e-5
relative to their largest element (crossattn 5.9e-6). Tolerances: 1e-4 for both.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import GRAD_RTOL, OUTPUT_ATOL, SHOW1_FIXTURES, fixture_inputs, load_fixture, output_and_tuned_grads

import vmc_jax
from vmc_jax.hub.conversion import read_state_dict
from vmc_jax.models.resnet import TemporalConv


@pytest.fixture(scope="module", params=SHOW1_FIXTURES)
def show1(request):
    model, params, io, folder = load_fixture(request.param)
    out, grads = output_and_tuned_grads(model, params, io)
    return model, params, io, folder, np.asarray(out), grads


def test_output_matches_reference(show1):
    *_, io, _, out, _ = show1
    error = np.abs(out - np.moveaxis(io["out"], 1, -1)).max()
    assert error <= OUTPUT_ATOL, error


def test_temporal_attention_gradients_match_reference(show1):
    model, _, io, _, _, grads = show1
    ours = vmc_jax.to_torch_state_dict(model, grads)
    reference = {k[len("grad/"):]: io[k] for k in io.files if k.startswith("grad/")}
    assert sorted(ours) == sorted(reference)
    for name, ref in reference.items():
        error = np.abs(ours[name] - ref).max() / np.abs(ref).max()
        assert error <= GRAD_RTOL, (name, error)


def test_round_trip_is_identity(show1):
    model, _, _, folder, *_ = show1
    weights = os.path.join(folder, "unet", "diffusion_pytorch_model.fp16.safetensors")
    original = {k: v() for k, v in read_state_dict(weights).items()}
    _, params = vmc_jax.load_unet(os.path.join(folder, "unet"))  # dtype None: kept as stored (fp16)
    back = vmc_jax.to_torch_state_dict(model, params)
    assert sorted(back) == sorted(original)
    for name, value in original.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name


@pytest.fixture(scope="module")
def keyframes():
    return load_fixture("show1_keyframes")


def test_bf16_compute_close_to_fp32(keyframes):
    """bf16 activations with fp32 params: within 5% of the output scale (measured 3.2%)."""
    model, params, io, _ = keyframes
    out32 = np.moveaxis(io["out"], 1, -1)
    out16 = jax.jit(model.clone(dtype=jnp.bfloat16).apply)({"params": params}, *fixture_inputs(io))
    assert out16.dtype == jnp.bfloat16
    error = np.abs(np.asarray(out16, np.float32) - out32).max() / np.abs(out32).max()
    assert error <= 0.05, error


def test_remat_gives_the_same_output_and_gradients(keyframes):
    model, params, io, _ = keyframes
    out, grads = output_and_tuned_grads(model.clone(remat=True), params, io)
    assert np.abs(np.asarray(out) - np.moveaxis(io["out"], 1, -1)).max() <= OUTPUT_ATOL
    reference = {k[len("grad/"):]: io[k] for k in io.files if k.startswith("grad/")}
    for name, value in vmc_jax.to_torch_state_dict(model, grads).items():
        assert np.abs(value - reference[name]).max() <= GRAD_RTOL * np.abs(reference[name]).max(), name


def test_dropout_only_in_train_mode(keyframes):
    model, params, io, _ = keyframes
    inputs = fixture_inputs(io)
    train = jax.jit(lambda key: model.apply({"params": params}, *inputs, train=True, rngs={"dropout": key}))
    a, b, c = (np.asarray(train(jax.random.PRNGKey(k))) for k in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    assert np.abs(a - np.moveaxis(io["out"], 1, -1)).max() > 1e-3


def test_temporal_conv_is_the_3d_convolution_it_replaces():
    """Same parameters as ``nn.Conv(features, (3, 1, 1))`` (so checkpoints load), same output."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 4, 6))
    ours = TemporalConv(7)
    params = ours.init(jax.random.PRNGKey(1), x)
    conv3d = nn.Conv(7, (3, 1, 1), padding=((1, 1), (0, 0), (0, 0)))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, conv3d.init(jax.random.PRNGKey(1), x))
    np.testing.assert_allclose(ours.apply(params, x), conv3d.apply(params, x), atol=1e-5)
