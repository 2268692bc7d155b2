"""``vmc-jax convert`` on the tiny hub pipeline and on single model folders: the converted folders
load back to exactly the params of the hub folders, the other components are copied as they are,
and bad input is refused with a message naming what is at fault. Loading only, no forward pass
(the models' parity is tested in test_unet, test_text_encoders and test_vae)."""

import json
import logging
import os
import re
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from helpers import FIXTURES
from safetensors.numpy import save_file

from vmc_jax import schedulers
from vmc_jax.hub import converted_store
from vmc_jax.hub.text_loading import load_text_encoder, load_tokenizer
from vmc_jax.hub.tiny_pipeline import PROMPTS, T5_CONFIG, make_synthetic_clip, make_tiny_pipeline
from vmc_jax.hub.unet_loading import load_unet
from vmc_jax.jobs.convert import convert

KEYFRAMES_UNET = os.path.join(FIXTURES, "show1_keyframes", "unet")
MODEL_COMPONENTS = ("text_encoder", "unet")
COPIED_COMPONENTS = ("scheduler", "tokenizer")


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> tuple[str, str, list[str]]:
    """(hub folder, converted folder, paths ``convert`` returned) of the tiny pipeline."""
    root = tmp_path_factory.mktemp("pipeline")
    hub = make_tiny_pipeline(str(root / "hub"))
    flax = str(root / "flax")
    return hub, flax, convert(hub, flax)


def _assert_same_params(expected, actual) -> None:
    """Same tree, dtypes and values, bit for bit."""
    expected, actual = (traverse_util.flatten_dict(jax.device_get(t)) for t in (expected, actual))
    assert expected.keys() == actual.keys()
    for path, value in expected.items():
        assert actual[path].dtype == value.dtype, path
        np.testing.assert_array_equal(actual[path], value, err_msg="/".join(path))


def _files(folder: str) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its content."""
    out = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def test_pipeline_writes_every_component(pipelines):
    hub, flax, written = pipelines
    expected = ["model_index.json", *sorted(MODEL_COMPONENTS + COPIED_COMPONENTS)]
    assert written == [os.path.join(flax, name) for name in expected]
    assert sorted(os.listdir(flax)) == sorted(expected)  # no .tmp left over
    for name in MODEL_COMPONENTS:
        assert converted_store.is_converted_model(os.path.join(flax, name)), name
        assert converted_store.read_config(os.path.join(flax, name)) == converted_store.read_config(os.path.join(hub, name))


def test_converted_unet_has_the_hub_params(pipelines):
    hub, flax, _ = pipelines
    _, expected = load_unet(os.path.join(hub, "unet"))
    _, actual = load_unet(os.path.join(flax, "unet"))
    _assert_same_params(expected, actual)


def test_converted_text_encoder_has_the_hub_params(pipelines):
    hub, flax, _ = pipelines
    _, expected = load_text_encoder(os.path.join(hub, "text_encoder"))
    _, actual = load_text_encoder(os.path.join(flax, "text_encoder"))
    _assert_same_params(expected, actual)


def test_tokenizer_scheduler_and_index_are_copied(pipelines):
    hub, flax, _ = pipelines
    for name in COPIED_COMPONENTS:
        assert _files(os.path.join(flax, name)) == _files(os.path.join(hub, name)), name
    assert _files(flax)["model_index.json"] == _files(hub)["model_index.json"]
    assert schedulers.from_config(flax) == schedulers.from_config(hub)
    tokens = load_tokenizer(flax)(list(PROMPTS)).input_ids
    assert tokens == load_tokenizer(hub)(list(PROMPTS)).input_ids


def test_tiny_pipeline_is_a_hub_show1_pipeline(pipelines):
    """transformers loads the text encoder with no missing or unexpected keys, the tokenizer has a
    piece per prompt word, the schedule is Show-1's, and no UNet parameter is all zeros (so the
    temporal convs do not start as an identity)."""
    pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[test]')")
    import transformers

    hub, _, _ = pipelines
    with open(os.path.join(hub, "model_index.json"), encoding="utf-8") as f:
        assert json.load(f)["_class_name"] == "TextToVideoIFPipeline"
    model, info = transformers.T5EncoderModel.from_pretrained(
        os.path.join(hub, "text_encoder"), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokenizer = load_tokenizer(hub)
    assert len(tokenizer) == model.config.vocab_size and model.config.d_model == T5_CONFIG["d_model"]
    for prompt in PROMPTS:
        words = prompt.replace(",", " ").replace(".", " ").split()
        assert len(tokenizer(prompt).input_ids) == len(words) + prompt.count(",") + prompt.count(".") + 1, prompt
    scheduler = schedulers.from_config(hub)
    assert (scheduler.variance_type, scheduler.thresholding, scheduler.beta_end) == ("learned_range", True, 0.02)
    _, params = load_unet(os.path.join(hub, "unet"))
    flat = traverse_util.flatten_dict(params)
    assert any("temp_convs" in "/".join(path) for path in flat)
    assert all(np.any(value) for value in flat.values())


def test_synthetic_clip(tmp_path):
    import imageio.v3 as iio

    frames = iio.imread(make_synthetic_clip(str(tmp_path / "clip.gif"), num_frames=5, height=24, width=32), index=None)
    assert frames.shape == (5, 24, 32, 3)
    red = (frames[..., 0] > 200) & (frames[..., 1] < 60)
    left_edges = [int(np.argmax(mask.any(axis=0))) for mask in red]
    assert left_edges == sorted(set(left_edges)) and left_edges[0] == 0  # the square moves right every frame


def test_single_model_folder(tmp_path):
    """One hub model folder converts into ``dst`` itself, keeping the stored fp16."""
    dst = str(tmp_path / "unet")
    assert convert(KEYFRAMES_UNET, dst) == [dst]
    _, expected = load_unet(KEYFRAMES_UNET)
    _, actual = load_unet(dst)
    assert {leaf.dtype for leaf in jax.tree.leaves(actual)} == {np.dtype(np.float16)}
    _assert_same_params(expected, actual)
    assert sorted(os.listdir(tmp_path)) == ["unet"]


def test_overwrite_replaces_a_converted_model(pipelines, tmp_path):
    hub, _, _ = pipelines
    src, dst = os.path.join(hub, "text_encoder"), str(tmp_path / "text_encoder")
    convert(src, dst)
    with pytest.raises(FileExistsError, match=re.escape(f"{dst} exists; pass --overwrite to replace it")):
        convert(src, dst)
    (tmp_path / "text_encoder" / "stale").write_text("")
    assert convert(src, dst, overwrite=True) == [dst]
    assert "stale" not in os.listdir(dst) and converted_store.is_converted_model(dst)
    _assert_same_params(load_text_encoder(src)[1], load_text_encoder(dst)[1])


def test_vae_folder(tmp_path):
    pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[test]')")
    diffusers = pytest.importorskip("diffusers")
    from vmc_jax.hub.vae_loading import load_vae

    src, dst = str(tmp_path / "hub"), str(tmp_path / "flax")
    vae = diffusers.AutoencoderKL(block_out_channels=[32], norm_num_groups=32, latent_channels=4, sample_size=8)
    vae.save_pretrained(src, safe_serialization=True)
    convert(src, dst)
    _assert_same_params(load_vae(src)[1], load_vae(dst)[1])


def test_vae_without_its_loader(tmp_path, monkeypatch):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    save_file({"w": np.zeros(1, np.float32)}, str(folder / "diffusion_pytorch_model.safetensors"))
    monkeypatch.setitem(sys.modules, "vmc_jax.hub.vae_loading", None)
    with pytest.raises(NotImplementedError, match=re.escape(f"{folder}: converting an AutoencoderKL needs vmc_jax.hub.vae_loading")):
        convert(str(folder), str(tmp_path / "out"))


def test_refuses_to_overwrite_a_converted_pipeline(pipelines):
    hub, flax, _ = pipelines
    before = _files(flax)
    with pytest.raises(FileExistsError, match=re.escape(f"{flax} exists; pass --overwrite to replace it")):
        convert(hub, flax)
    assert _files(flax) == before


def test_unconvertible_components_are_skipped_with_a_warning(pipelines, tmp_path, caplog):
    """A safety checker (weights no converter takes) and a listed component without a folder are
    left out with a warning naming them; everything else is still written."""
    hub, _, _ = pipelines
    src = tmp_path / "hub"
    src.mkdir()
    index = {"_class_name": "TextToVideoIFPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
             "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
             "watermarker": ["deepfloyd_if", "IFWatermarker"], "feature_extractor": [None, None]}
    (src / "model_index.json").write_text(json.dumps(index))
    (src / "scheduler").mkdir()
    (src / "scheduler" / "scheduler_config.json").write_bytes(_files(hub)["scheduler/scheduler_config.json"])
    (src / "safety_checker").mkdir()
    (src / "safety_checker" / "config.json").write_text(
        json.dumps({"_name_or_path": "x", "architectures": ["StableDiffusionSafetyChecker"], "model_type": "clip"})
    )
    save_file({"w": np.zeros(1, np.float32)}, str(src / "safety_checker" / "model.safetensors"))
    dst = str(tmp_path / "flax")
    with caplog.at_level(logging.WARNING, logger="vmc_jax.jobs.convert"):
        written = convert(str(src), dst)
    assert written == [os.path.join(dst, "model_index.json"), os.path.join(dst, "scheduler")]
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "skipping safety_checker" in warnings and "'model_type': 'clip'" in warnings
    assert "skipping watermarker" in warnings and "feature_extractor" not in warnings


def test_missing_src(tmp_path):
    with pytest.raises(FileNotFoundError, match="SRC not found: .*nowhere"):
        convert(str(tmp_path / "nowhere"), str(tmp_path / "out"))


def test_src_neither_pipeline_nor_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a config without weights is no model folder
    with pytest.raises(ValueError, match="is neither a pipeline folder .* nor a model folder"):
        convert(str(tmp_path), str(tmp_path / "out"))


def test_unknown_model_class(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet1DModel"}))
    save_file({"w": np.zeros(1, np.float32)}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    config_path = os.path.join(str(tmp_path), "config.json")
    with pytest.raises(ValueError, match=re.escape(config_path) + ": unknown model class .*'UNet1DModel'"):
        convert(str(tmp_path), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def _copy_of(hub: str, tmp_path) -> str:
    import shutil

    return shutil.copytree(hub, str(tmp_path / "hub"))


def test_a_failed_conversion_leaves_nothing_at_the_destination(pipelines, tmp_path):
    """A truncated UNet is named in the error; the components converted before it are not left as a
    pipeline under DST, nor in a temporary folder beside it."""
    hub = _copy_of(pipelines[0], tmp_path)
    weights = os.path.join(hub, "unet", "diffusion_pytorch_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(ValueError, match=re.escape(weights)):
        convert(hub, str(tmp_path / "flax"))
    assert sorted(os.listdir(tmp_path)) == ["hub"]


def test_a_failed_overwrite_keeps_the_previous_conversion(pipelines, tmp_path):
    hub, flax, _ = pipelines
    broken = _copy_of(hub, tmp_path)
    os.remove(os.path.join(broken, "unet", "diffusion_pytorch_model.safetensors"))
    os.remove(os.path.join(broken, "unet", "config.json"))
    before = _files(flax)
    with pytest.raises(ValueError, match=r"cannot convert the pipeline's unet: .*unet has no weights file"):
        convert(broken, flax, overwrite=True)
    assert _files(flax) == before and not [n for n in os.listdir(os.path.dirname(flax)) if n.startswith(".")]


@pytest.mark.parametrize("breakage, message", [
    ("no class", r"cannot convert the pipeline's unet: vmc_jax has no converter for it: .*unet/config.json: "
                 r"unknown model class not named"),
    ("no folder", r"cannot convert the pipeline's unet: .*model_index.json lists it but there is no folder .*unet"),
])
def test_a_pipeline_without_a_convertible_unet_is_refused(pipelines, tmp_path, breakage, message):
    hub = _copy_of(pipelines[0], tmp_path)
    unet = os.path.join(hub, "unet")
    if breakage == "no class":
        config = converted_store.read_config(unet)
        del config["_class_name"]
        with open(os.path.join(unet, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
    else:
        import shutil

        shutil.rmtree(unet)
    with pytest.raises(ValueError, match=message):
        convert(hub, str(tmp_path / "flax"))
    assert not os.path.exists(tmp_path / "flax")


def test_tiny_pipelines_are_made_whole_and_never_over_an_existing_folder(tmp_path):
    from vmc_jax.hub.tiny_pipeline import make_tiny_cascade

    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=re.escape(f"{tmp_path / 'hub'} exists; pass --overwrite")):
        make_tiny_pipeline(str(tmp_path / "hub"))
    with pytest.raises(FileExistsError, match="exists; pass --overwrite"):
        make_tiny_cascade(str(tmp_path / "hub"))
    assert _files(tmp_path) == {"hub/mine.txt": b"precious"}
    make_tiny_pipeline(str(tmp_path / "hub"), overwrite=True)
    assert sorted(os.listdir(tmp_path / "hub")) == sorted(["model_index.json", *MODEL_COMPONENTS, *COPIED_COMPONENTS])
    assert sorted(os.listdir(tmp_path)) == ["hub"]
