"""T5 encoder and CLIP text model: live parity with transformers (torch, CPU, fp32), conversion
round trips, converted (orbax) folders, dtype handling, error messages and prompt encoding.

Every model is built from a small random config, every parameter is overwritten with random
values (embeddings and the relative attention bias N(0, 1), everything else, layer-norm weights
included, N(0, 0.3^2)), saved with ``save_pretrained`` and loaded through ``load_text_encoder``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import string

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[test]')")
import transformers
from safetensors.numpy import save_file

from vmc_jax.hub.conversion.layout import flax_to_torch
from vmc_jax.hub.converted_store import read_config
from vmc_jax.hub.text_loading import encode_prompts, load_text_encoder, load_tokenizer, save_converted
from vmc_jax.hub.unet_loading import to_torch_state_dict
from vmc_jax.models.clip import CLIPTextEncoder
from vmc_jax.models.t5 import T5Encoder, relative_position_buckets

TOLERANCE = 1e-4  # max abs error, fp32; measured at most 6.6e-7 here (stated per test)
VOCAB = 100
T5_WORDS = ["a", "car", "is", "moving", "tank", "on", "the", "snow"]


def _t5_config(feed_forward_proj: str) -> transformers.T5Config:
    return transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=20,
        feed_forward_proj=feed_forward_proj,
    )


def _clip_config(hidden_act: str) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=77, hidden_act=hidden_act,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrites every parameter (tied ones once) with random values; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            std = 1.0 if ("shared" in name or "embedding" in name or "relative_attention_bias" in name) else 0.3
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.eval()


def _state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory) -> tuple[str, transformers.T5EncoderModel]:
    """A hub-style gated-gelu T5 encoder folder (safetensors) and the torch model it holds."""
    model = _randomised(transformers.T5EncoderModel(_t5_config("gated-gelu")), seed=0)
    folder = str(tmp_path_factory.mktemp("t5"))
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> tuple[str, transformers.CLIPTextModel]:
    """A hub-style quick_gelu CLIP text model folder and the torch model it holds."""
    model = _randomised(transformers.CLIPTextModel(_clip_config("quick_gelu")), seed=1)
    folder = str(tmp_path_factory.mktemp("clip"))
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def _inputs(length: int, lengths: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random ids and a right-padded mask with the given number of real tokens per row."""
    ids = np.random.default_rng(seed).integers(0, VOCAB, (len(lengths), length))
    mask = (np.arange(length)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    return ids, mask


def _hub_folder_with(tmp_path, source: str, state_dict: dict[str, np.ndarray]) -> str:
    """A copy of the hub folder ``source`` whose weights are ``state_dict``."""
    save_file(state_dict, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(read_config(source)))
    return str(tmp_path)


@functools.partial(jax.jit, static_argnums=0)
def _run(
    encoder: T5Encoder | CLIPTextEncoder, params: dict, ids: np.ndarray, mask: np.ndarray | None = None
) -> jax.Array:
    """The encoder's last hidden state, jitted (one compile is cheaper than eager op-by-op dispatch)."""
    return encoder.apply({"params": params}, ids, mask)


def _max_error(flax_out: jax.Array, torch_out: torch.Tensor) -> float:
    return float(np.abs(np.asarray(flax_out, np.float32) - torch_out.detach().numpy()).max())


def test_relative_position_buckets_match_transformers():
    """Buckets equal transformers' for T5 v1.1's (32, 128) and the test config's (32, 20), up to 300 tokens."""
    relative = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    for buckets, distance in [(32, 128), (32, 20)]:
        expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            relative, bidirectional=True, num_buckets=buckets, max_distance=distance
        )
        np.testing.assert_array_equal(relative_position_buckets(300, 300, buckets, distance), expected.numpy())


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_t5_matches_transformers(tmp_path, feed_forward_proj):
    """Last hidden state, all positions (padded ones included), with and without a mask.

    Measured max abs error (masked / unmasked): 5.4e-7 / 4.5e-7 (gated-gelu), 3.6e-7 / 3.6e-7 (relu);
    outputs are O(1).
    """
    model = _randomised(transformers.T5EncoderModel(_t5_config(feed_forward_proj)), seed=2)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    encoder, params = load_text_encoder(str(tmp_path))
    assert isinstance(encoder, T5Encoder) and encoder.config.gated == (feed_forward_proj == "gated-gelu")
    ids, mask = _inputs(12, (12, 7, 3), seed=0)
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
        unmasked = model(input_ids=torch.from_numpy(ids)).last_hidden_state
    assert _max_error(_run(encoder, params, ids, mask), expected) < TOLERANCE
    assert _max_error(_run(encoder, params, ids), unmasked) < TOLERANCE


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_clip_matches_transformers(tmp_path, hidden_act):
    """Last hidden state at 77 tokens without a mask (the pipelines' use) and with a padding mask.

    Measured max abs error (unmasked / masked): 6.6e-7 / 4.8e-7 (quick_gelu), 6.0e-7 / 6.0e-7 (gelu);
    outputs are O(1).
    """
    model = _randomised(transformers.CLIPTextModel(_clip_config(hidden_act)), seed=3)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    encoder, params = load_text_encoder(str(tmp_path))
    assert isinstance(encoder, CLIPTextEncoder) and encoder.config.hidden_act == hidden_act
    ids, mask = _inputs(77, (77, 40, 5), seed=1)
    with torch.no_grad():
        unmasked = model(input_ids=torch.from_numpy(ids)).last_hidden_state
        masked = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    assert _max_error(_run(encoder, params, ids), unmasked) < TOLERANCE
    assert _max_error(_run(encoder, params, ids, mask), masked) < TOLERANCE


def test_t5_round_trip_to_torch_names(t5_folder):
    """to_torch_state_dict(encoder, params) is the torch state dict exactly, less the tied alias of shared.weight."""
    folder, model = t5_folder
    encoder, params = load_text_encoder(folder)
    expected = _state_dict(model)
    for alias, target in T5Encoder.TIED_WEIGHTS.items():
        np.testing.assert_array_equal(expected.pop(alias), expected[target])
    converted = to_torch_state_dict(encoder, params)
    assert converted.keys() == expected.keys()
    for name, value in expected.items():
        assert converted[name].dtype == value.dtype and np.array_equal(converted[name], value), name


def test_t5_checkpoint_holding_only_the_tied_alias(t5_folder, tmp_path):
    """A checkpoint that kept encoder.embed_tokens.weight instead of shared.weight loads the same."""
    folder, model = t5_folder
    state_dict = _state_dict(model)
    del state_dict["shared.weight"]
    _, params = load_text_encoder(_hub_folder_with(tmp_path, folder, state_dict))
    np.testing.assert_array_equal(params["shared"]["embedding"], state_dict["encoder.embed_tokens.weight"])


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "sharded safetensors"])
def test_t5_other_checkpoint_layouts(t5_folder, tmp_path, layout):
    """A legacy ``pytorch_model.bin`` (holding both tied names, as older hub checkpoints do) and a
    sharded safetensors checkpoint with its index load to the same params as model.safetensors."""
    folder, model = t5_folder
    if layout == "pytorch_model.bin":
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
        (tmp_path / "config.json").write_text(json.dumps(read_config(folder)))
    else:
        model.save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
    _, expected = load_text_encoder(folder)
    _, params = load_text_encoder(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_clip_round_trip_to_torch_names(clip_folder):
    """flax_to_torch(params) is the torch state dict exactly, under the hub's ``text_model.`` names."""
    folder, model = clip_folder
    _, params = load_text_encoder(folder)
    expected = {
        (k if k.startswith("text_model.") else "text_model." + k): v for k, v in _state_dict(model).items()
    }
    converted = flax_to_torch(params)
    assert converted.keys() == expected.keys()
    for name, value in expected.items():
        assert converted[name].dtype == value.dtype and np.array_equal(converted[name], value), name


def test_clip_checkpoint_with_text_model_prefix(clip_folder, tmp_path):
    """Checkpoints written by transformers 4 (names under ``text_model.``) load to the same params."""
    folder, model = clip_folder
    prefixed = {"text_model." + k: v for k, v in _state_dict(model).items()}
    _, expected = load_text_encoder(folder)
    _, params = load_text_encoder(_hub_folder_with(tmp_path, folder, prefixed))
    jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_t5_encoder_from_full_t5_checkpoint(tmp_path):
    """A T5ForConditionalGeneration folder loads as its encoder (decoder and lm_head ignored); error 4.5e-7."""
    model = _randomised(transformers.T5ForConditionalGeneration(_t5_config("gated-gelu")), seed=4)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    encoder, params = load_text_encoder(str(tmp_path))
    ids, mask = _inputs(10, (10, 4), seed=2)
    with torch.no_grad():
        expected = model.get_encoder()(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state
    assert _max_error(_run(encoder, params, ids, mask), expected) < TOLERANCE


def test_converted_folder_round_trip(t5_folder, tmp_path):
    """save_converted then load_text_encoder gives identical params (dtypes included); dtype= casts."""
    folder, _ = t5_folder
    encoder, params = load_text_encoder(folder)
    save_converted(str(tmp_path / "converted"), read_config(folder), params)
    assert sorted(os.listdir(tmp_path / "converted")) == ["config.json", "params"]
    restored_encoder, restored = load_text_encoder(str(tmp_path / "converted"))
    assert restored_encoder == encoder
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    cast_encoder, cast = load_text_encoder(str(tmp_path / "converted"), dtype=jnp.bfloat16)
    assert cast_encoder.dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(cast)} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ValueError, match="unsupported text encoder"):
        save_converted(str(tmp_path / "other"), {"model_type": "bert"}, params)
    assert not (tmp_path / "other").exists()


def test_converted_folder_not_fitting_its_config_is_reported(t5_folder, tmp_path):
    folder, _ = t5_folder
    _, params = load_text_encoder(folder)
    save_converted(str(tmp_path), read_config(folder), params)
    config = read_config(folder)
    config["d_ff"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    message = r"encoder/block_0/layer_1/DenseReluDense/wi_0/kernel: stored \(32, 64\), model \(32, 48\)"
    with pytest.raises(ValueError, match=message):
        load_text_encoder(str(tmp_path))


def test_interrupted_save_leaves_no_params(t5_folder, tmp_path, monkeypatch):
    """Orbax writes into a temporary folder and renames it at the end: a save that fails before
    that leaves neither ``params/`` nor ``config.json``, so the folder is never taken as whole."""
    from orbax.checkpoint._src.path import atomicity

    folder, _ = t5_folder
    _, params = load_text_encoder(folder)

    async def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        save_converted(str(tmp_path), read_config(folder), params)
    assert not (tmp_path / "params").exists() and not (tmp_path / "config.json").exists()


def test_fp16_checkpoint_keeps_fp16(tmp_path):
    """An fp16 checkpoint loads as fp16 with dtype=None (bit-exact), as float32 with dtype=float32,
    and computes in float32 like the torch model upcast from the same fp16 weights (error 2.4e-7)."""
    model = _randomised(transformers.T5EncoderModel(_t5_config("gated-gelu")), seed=5).half()
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    encoder, params = load_text_encoder(str(tmp_path))
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float16)}
    assert encoder.dtype == jnp.float32
    for name, value in flax_to_torch(params).items():
        assert np.array_equal(value, model.state_dict()[name].numpy()), name
    _, params32 = load_text_encoder(str(tmp_path), dtype=jnp.float32)
    assert {leaf.dtype for leaf in jax.tree.leaves(params32)} == {jnp.dtype(jnp.float32)}
    ids, mask = _inputs(9, (9, 5), seed=3)
    with torch.no_grad():
        expected = model.float()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    assert _max_error(_run(encoder, params, ids, mask), expected.last_hidden_state) < TOLERANCE


@pytest.mark.parametrize("fixture, dtype, tolerance", [
    ("t5_folder", jnp.float16, 5e-3), ("t5_folder", jnp.bfloat16, 5e-2), ("clip_folder", jnp.bfloat16, 5e-2),
])
def test_reduced_precision_compute_stays_close(request, fixture, dtype, tolerance):
    """dtype=fp16 / bf16 casts the params and computes in that dtype (softmax, norms and residual
    in float32). Measured max abs error against fp32, outputs O(1): T5 2.1e-3 (fp16), 2.1e-2 (bf16,
    about one bf16 ulp); CLIP 8.4e-3 (bf16)."""
    folder, _ = request.getfixturevalue(fixture)
    encoder, params = load_text_encoder(folder)
    reduced_encoder, reduced = load_text_encoder(folder, dtype=dtype)
    assert reduced_encoder.dtype == dtype
    assert {leaf.dtype for leaf in jax.tree.leaves(reduced)} == {jnp.dtype(dtype)}
    ids, mask = _inputs(77, (77, 10), seed=4)
    out = _run(reduced_encoder, reduced, ids, mask)
    assert out.dtype == dtype
    error = np.abs(np.asarray(out, np.float32) - np.asarray(_run(encoder, params, ids, mask))).max()
    assert error < tolerance


def test_bfloat16_checkpoint_keeps_bfloat16(clip_folder, tmp_path):
    """A bf16 safetensors checkpoint loads as bf16 with dtype=None, bit-exact."""
    folder, model = clip_folder
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in _state_dict(model).items()}
    _, params = load_text_encoder(_hub_folder_with(tmp_path, folder, bf16))
    converted = flax_to_torch(params)
    for name, value in bf16.items():
        assert converted["text_model." + name].dtype == ml_dtypes.bfloat16
        assert np.array_equal(converted["text_model." + name], value), name


def test_missing_config_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        load_text_encoder(str(tmp_path))


def test_unknown_model_type_is_reported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="model_type='bert'.*supported model_type: t5, clip_text_model"):
        load_text_encoder(str(tmp_path))


def test_missing_key_is_reported(t5_folder, tmp_path):
    folder, model = t5_folder
    state_dict = _state_dict(model)
    del state_dict["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"]
    message = r"missing keys: encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_0\.weight \(expected \(64, 32\)\)"
    with pytest.raises(ValueError, match=message):
        load_text_encoder(_hub_folder_with(tmp_path, folder, state_dict))


def test_unexpected_key_is_reported(t5_folder, tmp_path):
    folder, model = t5_folder
    state_dict = _state_dict(model)
    state_dict["encoder.block.0.layer.0.SelfAttention.extra.weight"] = np.zeros(3, np.float32)
    message = r"unexpected keys: encoder\.block\.0\.layer\.0\.SelfAttention\.extra\.weight"
    with pytest.raises(ValueError, match=message):
        load_text_encoder(_hub_folder_with(tmp_path, folder, state_dict))


def test_wrong_shape_is_reported(clip_folder, tmp_path):
    folder, model = clip_folder
    state_dict = _state_dict(model)
    state_dict["encoder.layers.0.mlp.fc1.weight"] = np.zeros((36, 32), np.float32)
    message = r"text_model\.encoder\.layers\.0\.mlp\.fc1\.weight: checkpoint \(36, 32\), model \(37, 32\)"
    with pytest.raises(ValueError, match=message):
        load_text_encoder(_hub_folder_with(tmp_path, folder, state_dict))


def test_untied_embedding_is_reported(t5_folder, tmp_path):
    folder, model = t5_folder
    state_dict = _state_dict(model)
    state_dict["encoder.embed_tokens.weight"] = state_dict["shared.weight"] + 1
    with pytest.raises(ValueError, match="encoder.embed_tokens.weight should be tied to shared.weight"):
        load_text_encoder(_hub_folder_with(tmp_path, folder, state_dict))


def test_missing_tokenizer_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        load_tokenizer(str(tmp_path))


def test_encode_prompts_t5_matches_pipeline(t5_folder, tmp_path):
    """Show-1 / IF encode_prompt: lowercase + strip, pad to 77, mask applied in the encoder (error 6.0e-7)."""
    folder, model = t5_folder
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -1.0) for word in T5_WORDS]
    transformers.T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(str(tmp_path / "tokenizer"))
    tokenizer = load_tokenizer(str(tmp_path))
    prompts = ["  A Car is MOVING ", "a tank on the snow"]
    encoder, params = load_text_encoder(folder)
    hidden, mask = encode_prompts(tokenizer, encoder, params, prompts)
    tokens = tokenizer([p.lower().strip() for p in prompts], padding="max_length", max_length=77,
                       truncation=True, add_special_tokens=True, return_tensors="pt")
    assert tokenizer.unk_token_id not in tokens.input_ids  # lowercasing made every word known
    np.testing.assert_array_equal(mask, tokens.attention_mask.numpy())
    assert mask.sum(axis=1).tolist() == [5, 6]  # the words + </s>
    with torch.no_grad():
        expected = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    assert hidden.shape == (2, 77, 32) and _max_error(hidden, expected) < TOLERANCE


def test_encode_prompts_clip_matches_pipeline(clip_folder, tmp_path):
    """diffusers text-to-video: pad to 77, encoder run without a mask (error 3.6e-7)."""
    folder, model = clip_folder
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in string.ascii_lowercase:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(str(tmp_path / "tokenizer"))
    tokenizer = load_tokenizer(str(tmp_path))
    encoder, params = load_text_encoder(folder)
    hidden, mask = encode_prompts(tokenizer, encoder, params, "a tank is moving")
    tokens = tokenizer(
        ["a tank is moving"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    np.testing.assert_array_equal(mask, tokens.attention_mask.numpy())
    with torch.no_grad():
        expected = model(input_ids=tokens.input_ids).last_hidden_state
    assert hidden.shape == (1, 77, 32) and _max_error(hidden, expected) < TOLERANCE


@pytest.mark.parametrize("key, value, message", [
    ("feed_forward_proj", "gated-swish", "unsupported activation 'swish'"),
    ("model_type", "bert", "unsupported text encoder"),
])
def test_bad_config_errors_name_the_file(t5_folder, tmp_path, key, value, message):
    """Every config is read by its class's ``from_dict(raw, source)``: errors start with the config file."""
    folder, _ = t5_folder
    shutil.copytree(folder, tmp_path / "t5")
    config = read_config(str(tmp_path / "t5"))
    config[key] = value
    (tmp_path / "t5" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"^{tmp_path / 't5' / 'config.json'}: {message}"):
        load_text_encoder(str(tmp_path / "t5"))
