"""The moving-shapes world: seeded, its ground truth matches its pixels, motions stay in frame."""

import itertools

import numpy as np
import pytest

from vmc_jax import world

SIZES = [(8, 40, 64), (8, 16, 24), (5, 32, 32)]


def test_same_seed_same_clip_other_seed_other_clip():
    a, b, c = world.make_clip(3), world.make_clip(3), world.make_clip(4)
    np.testing.assert_array_equal(a.video, b.video)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.prompt == b.prompt
    assert not np.array_equal(a.video, c.video)


@pytest.mark.parametrize("motion,shape", list(itertools.product(world.MOTIONS, world.SHAPES)))
def test_centroid_ground_truth_is_the_rendered_masks_centroid(motion, shape):
    for seed, (frames, height, width) in enumerate(SIZES):
        clip = world.make_clip(seed, frames, height, width, shape=shape, motion=motion)
        ys, xs = np.mgrid[0:height, 0:width]
        area = clip.mask.sum(axis=(1, 2))
        measured = np.stack([(clip.mask * xs).sum(axis=(1, 2)) / area, (clip.mask * ys).sum(axis=(1, 2)) / area], -1)
        # Error bound: the supersampled region's centroid is within half a sample spacing of the
        # shape's; weighting pixel centres by coverage moves each partly covered pixel's moment by at
        # most c (1 - c) / 2 <= 1/8 pixel-area px (a strip of area c at one side of the pixel).
        partial = ((clip.mask > 0) & (clip.mask < 1)).sum(axis=(1, 2))
        bound = 0.5 / world.SUPERSAMPLE + partial / (8 * area)
        assert (np.abs(measured - clip.centroids).max(axis=1) <= bound).all()


@pytest.mark.parametrize("motion", world.MOTIONS)
def test_motions_keep_the_whole_shape_in_frame_and_move(motion):
    pad = 16
    for seed in range(20):
        frames, height, width = SIZES[seed % len(SIZES)]
        clip = world.make_clip(seed, frames, height, width, motion=motion)
        # the same frames on a canvas padded all round (same sample grid): nothing lies outside the clip
        _, padded = world.render(clip.centroids + pad, clip.shape, clip.radius, clip.colour,
                                 clip.background, height + 2 * pad, width + 2 * pad)
        np.testing.assert_array_equal(padded[:, pad:-pad, pad:-pad], clip.mask)
        assert padded.sum() == clip.mask.sum()
        travelled = np.linalg.norm(clip.centroids[-1] - clip.centroids[0]) + np.ptp(clip.centroids, axis=0).max()
        assert travelled > 0.1 * min(height, width)


def test_video_is_the_background_blended_with_the_colour_by_the_mask():
    clip = world.make_clip(7, 6, 20, 30, colour="red", background="sea")
    back, fill = np.array(world.BACKGROUNDS["sea"][0]), np.array(world.COLOURS["red"])
    np.testing.assert_allclose(clip.video, back + clip.mask[..., None] * (fill - back), atol=1e-6)
    assert clip.video.min() >= 0 and clip.video.max() <= 1


@pytest.mark.parametrize("colour,shape,background",
                         list(itertools.product(world.COLOURS, world.SHAPES, world.BACKGROUNDS)))
def test_prompts_parse_back(colour, shape, background):
    prompt = world.prompt_for(colour, shape, background)
    assert world.parse_prompt(prompt) == (colour, shape, background)
    assert set(prompt.split()) <= set(world.vocabulary())


def test_bad_names_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown shape 'star'"):
        world.make_clip(0, shape="star")
    with pytest.raises(ValueError, match="not a world prompt"):
        world.parse_prompt("a red star is moving on the snow")


def test_object_colours_are_far_from_every_background():
    # the evaluator segments by colour: each object colour must stand out on every background
    for (c, rgb), (b, (back, _)) in itertools.product(world.COLOURS.items(), world.BACKGROUNDS.items()):
        assert np.linalg.norm(np.subtract(rgb, back)) > 0.3, (c, b)


def test_batch_is_in_model_range_with_prompts():
    videos, prompts = world.make_batch(0, 4, 8, 16, 24)
    assert videos.shape == (4, 8, 16, 24, 3) and videos.min() >= -1 and videos.max() <= 1
    assert all(world.parse_prompt(p) for p in prompts)
