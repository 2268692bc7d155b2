"""CLIP vision tower and projections: live parity with transformers (torch, CPU, fp32) on small random
configs with every parameter randomised, exact round trips to torch names, and the CLIP metrics."""

import json
import os
import string

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[test]')")
import ml_collections
import transformers

from vmc_jax import clip_metrics, video_io
from vmc_jax.clip_metrics import ClipScorer, clip_frame_consistency, clip_text_alignment, load_clip_tower
from vmc_jax.hub.conversion import flax_to_torch
from vmc_jax.jobs import evaluate, generate
from vmc_jax.models.clip_vision import CLIPTextProjectionEncoder, CLIPVisionEncoder

TOLERANCE = 1e-5  # max abs error of embeddings, fp32
VOCAB = 60
TOWER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=16)


def _vision_config(hidden_act: str = "quick_gelu") -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(**TOWER, image_size=32, patch_size=8, hidden_act=hidden_act)


def _text_config(eos_token_id: int) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(**TOWER, vocab_size=VOCAB, max_position_embeddings=77,
                                       bos_token_id=0, eos_token_id=eos_token_id, pad_token_id=1)


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter overwritten with random values (norm scales near 1); eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.3 * noise)
    return model.eval()


def _saved(model: torch.nn.Module, folder) -> str:
    model.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def _pixels(seed: int, batch: int = 3, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def _torch_image_embeds(model, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).image_embeds.numpy()


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_vision_tower_matches_transformers(tmp_path, hidden_act):
    model = _randomised(transformers.CLIPVisionModelWithProjection(_vision_config(hidden_act)), seed=0)
    module, params = load_clip_tower(_saved(model, tmp_path), CLIPVisionEncoder)
    pixels = _pixels(1)
    ours = np.asarray(module.apply({"params": params}, pixels))
    expected = _torch_image_embeds(model, pixels)
    assert ours.shape == (3, 16) and np.abs(ours - expected).max() < TOLERANCE


def test_vision_tower_round_trip_to_torch_names(tmp_path):
    model = _randomised(transformers.CLIPVisionModelWithProjection(_vision_config()), seed=2)
    _, params = load_clip_tower(_saved(model, tmp_path), CLIPVisionEncoder)
    expected = {k: v.numpy() for k, v in model.state_dict().items()}
    converted = flax_to_torch(params)
    assert converted.keys() == expected.keys()
    for name, value in expected.items():
        assert converted[name].dtype == value.dtype and np.array_equal(converted[name], value), name


def _ids_with_end(seed: int, eos_token_id: int) -> np.ndarray:
    """Random ids (2..VOCAB-1) with the end-of-text token at a different place in each row."""
    ids = np.random.default_rng(seed).integers(3, VOCAB - 1, (3, 9))
    for row, end in enumerate((8, 3, 5)):
        ids[row, end] = eos_token_id if eos_token_id != 2 else VOCAB - 1  # legacy configs pool at the largest id
    return ids


@pytest.mark.parametrize("eos_token_id", [1, 2])
def test_text_projection_matches_transformers(tmp_path, eos_token_id):
    model = _randomised(transformers.CLIPTextModelWithProjection(_text_config(eos_token_id)), seed=3)
    module, params = load_clip_tower(_saved(model, tmp_path), CLIPTextProjectionEncoder)
    ids = _ids_with_end(4, eos_token_id)
    ours = np.asarray(module.apply({"params": params}, ids))
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids)).text_embeds.numpy()
    assert np.abs(ours - expected).max() < TOLERANCE
    converted = flax_to_torch(params)
    assert converted.keys() == model.state_dict().keys()
    assert all(np.array_equal(converted[k], v.numpy()) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def clip_model_folder(tmp_path_factory):
    """A whole hub CLIPModel folder (both towers, tokenizer files) and the torch model it holds."""
    config = transformers.CLIPConfig(text_config=_text_config(1).to_dict(), vision_config=_vision_config().to_dict(),
                                     projection_dim=16)
    model = _randomised(transformers.CLIPModel(config), seed=5)
    folder = _saved(model, tmp_path_factory.mktemp("clip_model"))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in string.ascii_lowercase:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    return folder, model


def test_metrics_of_a_whole_clip_model_match_its_logits(clip_model_folder):
    """Text alignment is CLIPModel's image-text logit over its logit scale, averaged over frames."""
    folder, model = clip_model_folder
    scorer = ClipScorer.load(folder)
    frames = np.random.default_rng(6).integers(0, 256, (4, 40, 48, 3), dtype=np.uint8)
    pixels = np.array(clip_metrics.preprocess(frames, 32))
    tokens = scorer.tokenizer(["a red square"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
        expected_alignment = float(out.logits_per_image.mean() / model.logit_scale.exp())
    image = out.image_embeds.numpy()
    expected_consistency = float(np.mean(np.sum(image[1:] * image[:-1], axis=-1)))  # already unit length
    scores = scorer.scores(frames, "a red square")
    assert abs(scores["clip_text_alignment"] - expected_alignment) < TOLERANCE
    assert abs(scores["clip_frame_consistency"] - expected_consistency) < TOLERANCE


def test_evaluate_on_a_real_video_job_runs_the_clip_metrics_or_says_what_it_needs(clip_model_folder, tmp_path):
    folder, _ = clip_model_folder
    frames = np.random.default_rng(7).integers(0, 256, (4, 40, 48, 3), dtype=np.uint8)
    samples = tmp_path / "job" / "samples" / "generate_4"
    samples.mkdir(parents=True)
    video_io.save_video(frames.astype(np.float32) / 127.5 - 1, str(samples / "0_a_tank.gif"))
    (samples / generate.SAMPLES_INDEX).write_text(json.dumps({"0_a_tank.gif": "a tank is moving on the snow"}))
    config = ml_collections.ConfigDict({"prompt": "a car is moving", "evaluation": {"clip": ""}})
    with pytest.raises(ValueError, match=r"^'a car is moving' is not a moving-shapes world prompt: .* for real "
                                         r"videos give a CLIP model .*--config.evaluation.clip="):
        evaluate.evaluate_workdir(config, str(tmp_path / "job"))
    config.evaluation.clip = folder
    result, out = evaluate.evaluate_workdir(config, str(tmp_path / "job"))
    expected = ClipScorer.load(folder).scores(video_io.read_frames(str(samples / "0_a_tank.gif")),
                                              "a tank is moving on the snow")
    assert result["summary"] == pytest.approx(expected, abs=1e-6)
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
        assert json.load(f)["clips"][0]["prompt"] == "a tank is moving on the snow"


def test_frame_consistency_and_alignment_on_known_embeddings():
    e1, e2 = np.eye(4)[0], np.eye(4)[1]
    assert clip_frame_consistency(np.stack([e1, 3 * e1, 0.5 * e1])) == pytest.approx(1.0)
    assert clip_frame_consistency(np.stack([e1, e2, e1, e2])) == pytest.approx(0.0)
    assert clip_text_alignment(np.stack([e1, e2]), 2 * e1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="frames >= 2"):
        clip_frame_consistency(e1[None])


def test_preprocess_crops_the_centre_and_normalises():
    frames = np.zeros((2, 20, 40, 3), np.uint8)
    frames[:, :, 10:30] = 255  # the centre square is white, the sides black
    pixels = np.asarray(clip_metrics.preprocess(frames, 16))
    assert pixels.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(pixels[:, 4:12, 4:12], np.broadcast_to(
        (1 - np.array(clip_metrics.CLIP_MEAN)) / np.array(clip_metrics.CLIP_STD), (2, 8, 8, 3)), atol=1e-5)


def test_wrong_image_size_is_refused(tmp_path):
    model = _randomised(transformers.CLIPVisionModelWithProjection(_vision_config()), seed=7)
    module, params = load_clip_tower(_saved(model, tmp_path), CLIPVisionEncoder)
    with pytest.raises(ValueError, match=r"images of shape \(24, 24, 3\) given; the model takes \(32, 32, 3\)"):
        module.apply({"params": params}, _pixels(0, 1, 24))
