"""The mesh (vmc_jax.parallel): axis sizes, the batch padding policy, several clips tuned at once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CLIP

from vmc_jax import parallel, schedulers, training, video_io
from vmc_jax.hub import tiny_pipeline
from vmc_jax.hub.unet_loading import build_unet


@pytest.mark.parametrize("sizes, devices, expected", [
    ({"data": -1}, 4, (1, 4)),
    ({"clips": 2, "data": -1}, 4, (2, 2)),
    ({"clips": -1, "data": 1}, 8, (8, 1)),
    ({}, 1, (1, 1)),
])
def test_axis_sizes(sizes, devices, expected):
    assert parallel.axis_sizes(sizes, devices) == expected


@pytest.mark.parametrize("sizes, message", [
    ({"model": 2}, r"unknown axes \['model'\]"),
    ({"clips": 3, "data": -1}, "4 devices do not divide by 3"),
    ({"clips": 2, "data": 4}, "needs 8 devices, there are 4"),
    ({"clips": -1, "data": -1}, "at most one is -1"),
    ({"data": 0}, "sizes are positive"),
])
def test_bad_mesh_sizes_are_named(sizes, message):
    with pytest.raises(ValueError, match=message):
        parallel.axis_sizes(sizes, 4)


def test_pad_batch_repeats_the_last_item(caplog):
    x = jnp.arange(6.0).reshape(3, 2)
    (padded, same), size = parallel.pad_batch((x, x + 1), 4, "test")
    assert size == 3 and padded.shape == (4, 2)
    np.testing.assert_array_equal(padded[3], x[2])
    np.testing.assert_array_equal(same[3], x[2] + 1)
    assert "test: a batch of 3 padded to 4" in caplog.text
    unchanged, size = parallel.pad_batch(x, 3, "test")
    assert size == 3 and unchanged is x


def test_partial_multi_process_arguments_are_refused():
    with pytest.raises(ValueError, match="needs all of --coordinator, --num_processes and --process_id"):
        parallel.initialize("localhost:1234", 2, None)


def test_four_clips_at_once_equal_each_clip_alone():
    """Four clips tuned together, one per device on the "clips" axis, each get the delta that
    tuning it alone gives (2 AdamW steps). The batched convolutions round differently (~1e-9), and
    Adam's first update, lr * g / (|g| + 1e-8), turns that into up to ~lr for an element whose
    gradient is near 1e-8 (measured: one element in 24576 off by 2.4e-3 of the largest delta).
    So: 99.9% of the elements within 1e-4 of the largest delta, all within 1e-2, losses to 1e-5."""
    model = build_unet(tiny_pipeline.UNET_CONFIG)
    params = tiny_pipeline.random_params(model, 0)
    scheduler = schedulers.from_config(tiny_pipeline.SCHEDULER_CONFIG)
    clip = jnp.asarray(video_io.load_clip(CLIP, 4, 16, 32))
    clips = jnp.stack([clip, clip[::-1], -clip, jnp.roll(clip, 5, axis=2)])[:, None]  # (clips, batch 1, f, h, w, c)
    texts = jax.random.normal(jax.random.PRNGKey(3), (4, 1, 6, tiny_pipeline.UNET_CONFIG["encoder_hid_dim"]))
    tuned, frozen = training.split_params(params)
    optimizer = training.make_optimizer(1e-3)
    rngs = jax.random.split(jax.random.PRNGKey(0), 4)

    mesh = parallel.make_mesh({"clips": 4, "data": 1})
    states = jax.device_put(training.init_per_clip(tuned, optimizer, rngs), parallel.sharded(mesh, "clips"))
    step = training.make_train_step(model, scheduler, optimizer, per_clip=True)
    placed = jax.device_put((clips, texts), parallel.sharded(mesh, "clips"))
    shared = jax.device_put(frozen, parallel.replicated(mesh))
    losses = []
    for _ in range(2):
        states, metrics = step(states, shared, *placed)
        losses.append(np.asarray(metrics["loss"]))
    assert metrics["loss"].shape == (4,)
    assert len(jax.tree.leaves(states.tuned)[0].sharding.device_set) == 4

    alone_step = training.make_train_step(model, scheduler, optimizer)
    for i in range(4):
        state = training.TrainState.create(tuned, optimizer, rngs[i])
        for k in range(2):
            state, alone_metrics = alone_step(state, frozen, clips[i], texts[i])
            np.testing.assert_allclose(losses[k][i], float(alone_metrics["loss"]), rtol=1e-5)
        together = np.concatenate([np.ravel(a[i]) for a in jax.tree.leaves(states.tuned)])
        alone = np.concatenate([np.ravel(a) for a in jax.tree.leaves(state.tuned)])
        start = np.concatenate([np.ravel(a) for a in jax.tree.leaves(tuned)])
        largest_delta = np.abs(alone - start).max()
        assert largest_delta > 1e-3
        difference = np.abs(together - alone) / largest_delta
        assert np.quantile(difference, 0.999) <= 1e-4 and difference.max() <= 1e-2, difference.max()
    first = [np.ravel(a[0] - a[1]) for a in jax.tree.leaves(states.tuned)]
    assert np.abs(np.concatenate(first)).max() > 1e-4  # the clips really were tuned apart


def test_global_batch_places_each_row_on_its_device():
    mesh = parallel.make_mesh({"clips": 2, "data": 2})
    batch = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    assert parallel.host_rows(mesh, 4, ("clips", "data")) == slice(0, 4)  # one process holds every row
    placed = parallel.global_batch(mesh, {"x": batch}, ("clips", "data"))["x"]
    np.testing.assert_array_equal(np.asarray(placed), batch)
    for shard in placed.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), batch[shard.index])
    assert len({shard.device for shard in placed.addressable_shards}) == 4
