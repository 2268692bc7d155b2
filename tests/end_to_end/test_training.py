"""VMC tuning behaviour on the tiny random pipeline: what moves, that the loss falls, resuming."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import CLIP, tiny_config

from vmc_jax import parallel, schedulers, training, video_io
from vmc_jax.hub import tiny_pipeline
from vmc_jax.hub.unet_loading import build_unet
from vmc_jax.jobs import tune

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def tiny():
    model = build_unet(tiny_pipeline.UNET_CONFIG)
    params = tiny_pipeline.random_params(model, 0)
    scheduler = schedulers.from_config(tiny_pipeline.SCHEDULER_CONFIG)
    clip = jnp.asarray(video_io.load_clip(CLIP, 4, 16, 32))[None]
    text = jax.random.normal(jax.random.PRNGKey(3), (1, 6, tiny_pipeline.UNET_CONFIG["encoder_hid_dim"]))
    return model, params, scheduler, clip, text


def run_steps(tiny, steps, lr, loss="paper"):
    model, params, scheduler, clip, text = tiny
    tuned, frozen = training.split_params(params)
    optimizer = training.make_optimizer(lr)
    step = training.make_train_step(model, scheduler, optimizer, loss)
    state = training.TrainState.create(tuned, optimizer, jax.random.PRNGKey(0))
    for _ in range(steps):
        state, _ = step(state, frozen, clip, text)
    return state, frozen


def test_only_the_temporal_attention_projections_move(tiny):
    _, params, *_ = tiny
    state, frozen = run_steps(tiny, 3, 1e-3)
    before = traverse_util.flatten_dict(params)
    after = traverse_util.flatten_dict(training.merge_params(state.tuned, frozen))
    tuned_paths = set(traverse_util.flatten_dict(state.tuned))
    assert tuned_paths and all("temp_attentions" in "/".join(p) and p[-2] in ("to_q", "to_k", "to_v")
                               for p in tuned_paths)
    temporal_transformers = {p[:p.index(n) + 1] for p in before for n in p if n.startswith("temp_attentions_")}
    assert len(tuned_paths) == len(temporal_transformers) * 2 * 3  # x (attn1, attn2) x (q, k, v)
    for path, value in after.items():
        if path in tuned_paths:
            assert not np.array_equal(value, before[path]), path
        else:
            assert np.array_equal(value, before[path]), path


def test_loss_falls_on_a_fixed_clip(tiny):
    """The motion-distillation loss, averaged over 8 fixed (t, noise) draws, falls after tuning."""
    model, params, scheduler, clip, text = tiny
    keys = jax.random.split(jax.random.PRNGKey(42), 8)
    t = jnp.array([50, 150, 300, 450, 600, 750, 850, 950])

    @jax.jit
    def eval_loss(params):
        def one(key, t):
            noise = jax.random.normal(key, clip.shape)
            out = model.apply({"params": params}, schedulers.add_noise(scheduler, clip, noise, t), t[None], text)
            return training.motion_distillation_loss(out[..., :3], noise, "paper")
        return jnp.mean(jax.vmap(one)(keys, t))

    state, frozen = run_steps(tiny, 25, 3e-3)
    before, after = float(eval_loss(params)), float(eval_loss(training.merge_params(state.tuned, frozen)))
    assert after < before - 0.01, (before, after)


def test_killed_run_resumes_bit_identical(tiny_pipeline_flax, tmp_path, monkeypatch):
    uninterrupted = tune.train_and_evaluate(tiny_config(tiny_pipeline_flax), str(tmp_path / "a"))

    real = training.make_train_step

    def dies_at_step_3(*args, **kwargs):
        step, calls = real(*args, **kwargs), []

        def killed(*a):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt("killed")
            return step(*a)
        return killed

    monkeypatch.setattr(training, "make_train_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        tune.train_and_evaluate(tiny_config(tiny_pipeline_flax), str(tmp_path / "b"))
    monkeypatch.setattr(training, "make_train_step", real)
    resumed = tune.train_and_evaluate(tiny_config(tiny_pipeline_flax), str(tmp_path / "b"))

    assert int(resumed.step) == int(uninterrupted.step) == 4
    for a, b in zip(jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = [[json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in ("a", "b")]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4]
    assert rows[0] == rows[1]


def test_data_parallel_step_equals_single_device(tiny):
    """A batch of 4 noisy copies split over the 4 host devices gives the single-device update."""
    model, params, scheduler, clip, text = tiny
    tuned, frozen = training.split_params(params)
    optimizer = training.make_optimizer(1e-3)
    clips = jnp.repeat(clip, 4, axis=0)
    sharding = parallel.sharded(parallel.make_mesh(), "data")
    assert len(sharding.device_set) == 4

    def one_step(clips):
        state = training.TrainState.create(tuned, optimizer, jax.random.PRNGKey(0))
        step = training.make_train_step(model, scheduler, optimizer, "paper")
        return step(state, frozen, clips, text)

    single, single_metrics = one_step(clips)
    spread, spread_metrics = one_step(jax.device_put(clips, sharding))
    np.testing.assert_allclose(float(spread_metrics["loss"]), float(single_metrics["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(single.tuned), jax.tree.leaves(spread.tuned)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_data_parallel_job_compiles_its_step_once(tiny_pipeline_flax, tmp_path, caplog):
    """batch_size 4 over the 4 host devices: frozen weights and state placed once, one compile."""
    config = tiny_config(tiny_pipeline_flax, steps=3)
    config.train.batch_size = 4
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        state = tune.train_and_evaluate(config, str(tmp_path))
    compiles = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(step)")]
    assert len(compiles) == 1, [r.getMessage()[:200] for r in compiles]
    assert len(jax.tree.leaves(state.tuned)[0].sharding.device_set) == 4
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]
