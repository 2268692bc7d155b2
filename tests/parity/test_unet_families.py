"""Live parity with diffusers (torch, CPU) for the other UNet families of the cascade:
UNet3DConditionModel (ModelScope / zeroscope, the latent sr2 stage) and UNet2DConditionModel
with DeepFloyd IF-II's blocks (the first frame of sr1). Small random configs, every parameter
random. Measured: max abs error 3.0e-6 (zeroscope-like) and 2.7e-6 (IF-II-like); tolerance 1e-4.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[test]')")
from diffusers import UNet2DConditionModel, UNet3DConditionModel

import vmc_jax

ATOL = 1e-4

ZEROSCOPE_LIKE = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    cross_attention_dim=24, attention_head_dim=8, norm_num_groups=16,
)
IF_II_LIKE = dict(
    sample_size=16, in_channels=6, out_channels=6, block_out_channels=(32, 64), layers_per_block=(1, 2),
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), cross_attention_dim=32,
    attention_head_dim=16, encoder_hid_dim=40, encoder_hid_dim_type="text_proj", addition_embed_type="text",
    addition_embed_type_num_heads=4, class_embed_type="timestep", act_fn="gelu", time_embedding_act_fn="gelu",
    resnet_time_scale_shift="scale_shift", resnet_skip_time_act=True, resnet_out_scale_factor=1.414,
    cross_attention_norm="group_norm", norm_num_groups=32,
)


def randomised(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


def compare(torch_model, tmp_path, sample_torch, timesteps, text, **kwargs):
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    model, params = vmc_jax.load_unet(str(tmp_path), dtype=np.float32)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(sample_torch), torch.from_numpy(timesteps),
                          torch.from_numpy(text), **{k: torch.from_numpy(v) for k, v in kwargs.items()}).sample
    ref = np.moveaxis(ref.numpy(), 1, -1)
    out = model.apply({"params": params}, np.moveaxis(sample_torch, 1, -1), timesteps, text, **kwargs)
    return np.abs(np.asarray(out) - ref).max(), model, params, torch_model


def test_modelscope_unet3d_matches_diffusers(tmp_path):
    rng = np.random.default_rng(0)
    sample = rng.normal(size=(2, 4, 3, 16, 24)).astype(np.float32)  # (b, c, f, h, w)
    text = rng.normal(size=(2, 5, 24)).astype(np.float32)
    torch_model = randomised(UNet3DConditionModel(**ZEROSCOPE_LIKE), 0)
    error, model, params, _ = compare(torch_model, tmp_path, sample, np.array([10, 700]), text)
    assert model.config.family == "modelscope"
    assert error <= ATOL, error
    back = vmc_jax.to_torch_state_dict(model, params)
    reference = torch_model.state_dict()
    assert sorted(back) == sorted(reference)
    assert all(np.array_equal(back[k], reference[k].numpy()) for k in reference)


def test_if_unet2d_matches_diffusers(tmp_path):
    rng = np.random.default_rng(1)
    sample = rng.normal(size=(2, 6, 16, 16)).astype(np.float32)  # (b, c, h, w)
    text = rng.normal(size=(2, 7, 40)).astype(np.float32)
    torch_model = randomised(UNet2DConditionModel(**IF_II_LIKE), 1)
    error, model, _, _ = compare(torch_model, tmp_path, sample, np.array([3, 900]), text,
                                 class_labels=np.array([150, 250]))
    assert model.config.family == "unet2d"
    assert error <= ATOL, error


def test_family_specific_block_types_are_enforced():
    config = {"_class_name": "UNet2DConditionModel",
              "down_block_types": ["CrossAttnDownBlock3D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "block_out_channels": [32, 32]}
    with pytest.raises(ValueError, match="unknown block type 'CrossAttnDownBlock3D' in down_block_types"):
        vmc_jax.hub.unet_loading.build_unet(config)
    with pytest.raises(ValueError, match=r"unknown config keys \['resnet_out_scale_factor'\]"):
        vmc_jax.hub.unet_loading.build_unet({"_class_name": "UNet3DConditionModel", "resnet_out_scale_factor": 1.0})
