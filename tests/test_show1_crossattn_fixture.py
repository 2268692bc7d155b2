"""Parity of the Flax UNet with Show-1's Transformer2DModel ("CrossAttn") and plain 3D blocks.

The fixture tests/fixtures/show1_crossattn was made by weights_conversion/make_show1_fixtures.py
(preset "crossattn") from Show-1's UNet3DConditionModel with diffusers 0.19.3, in fp32 on the
CPU, every parameter random and rounded to fp16. Its config: down CrossAttnDownBlock3D x2 +
DownBlock3D, mid UNetMidBlock3DCrossAttn, up UpBlock3D + CrossAttnUpBlock3D x2, 32 channels,
layers_per_block 1, attention_head_dim [2, 4, 8] (a head count per block for these blocks),
16 norm groups, cross_attention_dim 32 with no encoder_hid_proj and no addition embedding,
resnet_time_scale_shift "default", silu; inputs: batch 2, 3 frames, 16x24.

Tolerances: output max abs error <= 1e-4; gradients of sum(out * grad_proj) w.r.t. every
temporal-attention to_q / to_k / to_v weight <= 1e-4 relative to the largest element of each
reference gradient.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import vmc_jax

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "show1_crossattn")
OUTPUT_ATOL = 1e-4
GRAD_RTOL = 1e-4


def _channels_last(x: np.ndarray) -> jnp.ndarray:
    """PyTorch (b, c, f, h, w) -> (b, f, h, w, c)."""
    return jnp.asarray(np.transpose(x, (0, 2, 3, 4, 1)))


def _is_tuned(path: tuple[str, ...]) -> bool:
    return any(p.startswith("temp_attentions_") for p in path) and path[-2] in ("to_q", "to_k", "to_v")


@pytest.fixture(scope="module")
def reference():
    with jax.default_matmul_precision("highest"):
        model, params = vmc_jax.load_unet(os.path.join(FIXTURE, "unet"), dtype=np.float32)
        io = np.load(os.path.join(FIXTURE, "io.npz"))
        labels = jnp.asarray(io["class_labels"]) if "class_labels" in io.files else None
        inputs = (_channels_last(io["sample"]), jnp.asarray(io["timesteps"]),
                  jnp.asarray(io["encoder_hidden_states"]), labels)

        flat = traverse_util.flatten_dict(params)
        tuned = traverse_util.unflatten_dict({k: v for k, v in flat.items() if _is_tuned(k)})
        frozen = {k: v for k, v in flat.items() if not _is_tuned(k)}

        def loss(tuned_params, proj):
            merged = traverse_util.unflatten_dict({**frozen, **traverse_util.flatten_dict(tuned_params)})
            out = model.apply({"params": merged}, *inputs)
            return jnp.sum(out * proj), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(tuned, _channels_last(io["grad_proj"]))
    return model, io, np.asarray(out), grads


def test_output_matches_reference(reference):
    _, io, out, _ = reference
    expected = np.transpose(io["out"], (0, 2, 3, 4, 1))
    assert out.shape == expected.shape
    error = np.abs(out - expected).max()
    assert error <= OUTPUT_ATOL, f"max abs error {error:.3g} (output scale {np.abs(expected).max():.3g})"


def test_temporal_attention_gradients_match_reference(reference):
    model, io, _, grads = reference
    ours = vmc_jax.to_torch_state_dict(model, grads)
    expected = {k[len("grad/"):]: io[k] for k in io.files if k.startswith("grad/")}
    assert sorted(ours) == sorted(expected)
    errors = {name: np.abs(ours[name] - ref).max() / np.abs(ref).max() for name, ref in expected.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_RTOL, f"{worst}: relative error {errors[worst]:.3g}"
