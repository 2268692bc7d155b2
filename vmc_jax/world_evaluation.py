"""Measuring motion transfer on the moving-shapes world: where the object is, what it looks like.

A clip is read by colour alone, as the world draws it: the background is the clip's median colour,
the object colour the median of the pixels farthest from it, and each pixel's membership the
projection of its colour onto the segment background -> object (1 = object, 0 = background),
counted on the object (projection over 1/2) and the pixels next to it. That gives per frame a
centroid (the track), and over the clip a colour, a background and a shape (by the fill ratio of
the object's bounding box, square 1, disc pi/4, triangle 1/2, and the skewness of its row
profile, against the world's own renderings at the clip's size). Comparing a generated clip with
the input it was made from gives the motion error (mean centroid distance in pixels), appearance
(colour, shape, background against the target prompt) and leakage (the input's colour or
background surviving where the target asked for another).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from vmc_jax import files, world

# A frame whose object covers less area than this (pixels) has no object.
MIN_AREA = 0.5
# Nor one whose "object" covers more than this fraction of it (2.5 times the world's largest shape):
# scattered noise, not a shape.
MAX_AREA_FRACTION = 0.25
# The object colour is the median of the pixels at least this fraction of the farthest's distance away.
CORE = 0.85
# The least colour distance (RGB in [0, 1]) at which an object is told from a plain background.
MIN_CONTRAST = 0.15
# A colour is named after the nearest of the world's colours (or backgrounds) only if it is within this
# fraction of the distance between the two closest of them, so at most one name fits; else "none".
NAME_CUTOFF = 0.5


@dataclasses.dataclass(frozen=True)
class ClipReading:
    """What the evaluator sees in one clip: the object's track (f, 2) (x, y), NaN where ``found`` is
    False; its colour, shape and background (world names), and the measurements behind them."""

    track: np.ndarray
    found: np.ndarray
    object_rgb: np.ndarray
    background_rgb: np.ndarray
    shape_descriptor: np.ndarray
    colour: str
    shape: str
    background: str
    background_flicker: float


def as_unit_rgb(video: np.ndarray, source: str = "video") -> np.ndarray:
    """``(f, h, w, 3)`` uint8, or float in [0, 1], as float32 in [0, 1]; anything else is refused by name."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"{source}: expected frames (f, h, w, 3), got shape {video.shape}")
    if video.dtype == np.uint8:
        return video.astype(np.float32) / 255
    video = video.astype(np.float32)
    if video.min() < -1e-3 or video.max() > 1 + 1e-3:
        raise ValueError(f"{source}: float frames must be in [0, 1] (got [{video.min():.3f}, {video.max():.3f}]; "
                         "map model outputs in [-1, 1] with (x + 1) / 2)")
    return video


def object_membership(video: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(membership (f, h, w) in [0, 1], object RGB, background RGB) of a clip in [0, 1]."""
    background = np.median(video.reshape(-1, 3), axis=0)
    distance = np.linalg.norm(video - background, axis=-1)
    farthest = np.percentile(distance, 99.9)
    if farthest < MIN_CONTRAST:
        return np.zeros(video.shape[:3], np.float32), background, background
    object_rgb = np.median(video[distance >= CORE * farthest], axis=0)
    direction = object_rgb - background
    projection = (video - background) @ direction / np.dot(direction, direction)
    # the object is where the projection passes half way, and the pixels around it (its antialiased
    # edge); noise far from it (generated frames) is not counted
    near = _dilate(projection > 0.5)
    membership = np.where(near, np.clip(projection, 0.0, 1.0), 0.0)
    return membership.astype(np.float32), object_rgb, background


def _dilate(mask: np.ndarray) -> np.ndarray:
    """``mask`` (f, h, w) grown by one pixel in each of the 8 directions."""
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    height, width = mask.shape[1:]
    return np.any([padded[:, i:i + height, j:j + width] for i in range(3) for j in range(3)], axis=0)


def shape_descriptor(membership: np.ndarray) -> np.ndarray:
    """Per frame (fill ratio, vertical skewness) of the object, (f, 2); NaN where it is missing.

    The fill ratio is the area over (tallest column x widest row): the bounding box's fill ratio
    for the world's shapes (square 1, disc pi/4, triangle 1/2), made of sums over rows and
    columns so that noise in single pixels barely moves it. The skewness of the object's row
    profile tells the triangle (widest at its base) from the symmetric square and disc, which
    small antialiased renderings blur towards each other in fill ratio.
    """
    area = membership.sum(axis=(1, 2))
    rows = membership.sum(axis=2)
    tallest = membership.sum(axis=1).max(axis=-1)
    y = np.arange(membership.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (rows * y).sum(-1) / area
        central = y - mean[:, None]
        skew = (rows * central**3).sum(-1) / area / ((rows * central**2).sum(-1) / area) ** 1.5
        descriptor = np.stack([area / (tallest * rows.max(axis=-1)), skew], -1)
    descriptor[area < MIN_AREA] = np.nan
    return descriptor


@functools.lru_cache(maxsize=None)
def shape_prototypes(height: int, width: int) -> dict[str, np.ndarray]:
    """Each world shape's mean descriptor as the world renders it at this size (over sizes and sub-pixel offsets)."""
    rng = np.random.default_rng(0)
    radii = np.repeat(np.linspace(*world.SIZE_RANGE, 4) * min(height, width), 4)
    centres = np.array([width / 2, height / 2]) + rng.uniform(-0.5, 0.5, (len(radii), 2))
    return {
        shape: np.mean([shape_descriptor(world.render(centre[None], shape, radius, "red", "snow", height, width)[1])[0]
                        for centre, radius in zip(centres, radii)], axis=0)
        for shape in world.SHAPES
    }


_BACKGROUND_RGB = {name: rgb for name, (rgb, _) in world.BACKGROUNDS.items()}


def _nearest(value: np.ndarray, named: Mapping[str, Any]) -> str:
    return min(named, key=lambda name: np.linalg.norm(np.subtract(value, named[name])))


def name_cutoff(named: Mapping[str, Any]) -> float:
    """The farthest a colour may be from a name in ``named`` to be called by it (see ``NAME_CUTOFF``)."""
    values = list(named.values())
    return NAME_CUTOFF * min(np.linalg.norm(np.subtract(a, b)) for i, a in enumerate(values) for b in values[i + 1:])


def colour_name(rgb: np.ndarray, named: Mapping[str, Any]) -> str:
    """The name in ``named`` nearest to ``rgb``, or "none" if even that is farther than :func:`name_cutoff`."""
    name = _nearest(rgb, named)
    return name if np.linalg.norm(np.subtract(rgb, named[name])) <= name_cutoff(named) else "none"


def background_flicker(video: np.ndarray, membership: np.ndarray) -> float:
    """How much the background's colour moves from frame to frame: the RMS distance (RGB in [0, 1]) of
    each frame's background (median of its pixels off the object) from their mean over frames."""
    per_frame = np.stack([np.median(frame[weight < 0.5], axis=0) for frame, weight in zip(video, membership)])
    return float(np.sqrt(np.mean(np.sum((per_frame - per_frame.mean(0)) ** 2, -1))))


def read_clip(video: np.ndarray, source: str = "video") -> ClipReading:
    """Finds the object in every frame of ``video`` (uint8, or float in [0, 1]) and names what it looks like."""
    video = as_unit_rgb(video, source)
    membership, object_rgb, background_rgb = object_membership(video)
    area = membership.sum(axis=(1, 2))
    found = (area >= MIN_AREA) & (area <= MAX_AREA_FRACTION * video.shape[1] * video.shape[2])
    membership = membership * found[:, None, None]
    ys, xs = np.mgrid[0:video.shape[1], 0:video.shape[2]]
    with np.errstate(invalid="ignore", divide="ignore"):
        track = np.stack([(membership * xs).sum(axis=(1, 2)), (membership * ys).sum(axis=(1, 2))], -1) / area[:, None]
    track[~found] = np.nan
    background, flicker = colour_name(background_rgb, _BACKGROUND_RGB), background_flicker(video, membership)
    if not found.any():
        return ClipReading(track, found, object_rgb, background_rgb, np.full(2, np.nan), "none", "none",
                           background, flicker)
    descriptor = np.nanmedian(shape_descriptor(membership), axis=0)
    return ClipReading(track, found, object_rgb, background_rgb, descriptor, colour_name(object_rgb, world.COLOURS),
                       _nearest(descriptor, shape_prototypes(*video.shape[1:3])), background, flicker)


def motion_error(reference: ClipReading, generated: ClipReading, diagonal: float) -> float:
    """Mean distance (pixels) between the two tracks; a frame missing the object in either counts as ``diagonal``."""
    if reference.track.shape != generated.track.shape:
        raise ValueError(f"tracks of {len(reference.track)} and {len(generated.track)} frames cannot be compared")
    distance = np.linalg.norm(reference.track - generated.track, axis=-1)
    return float(np.mean(np.where(reference.found & generated.found, distance, diagonal)))


def track_jerk(reading: ClipReading) -> float:
    """Mean size (pixels) of the track's second differences: 0 for constant velocity, large for jumps."""
    second = np.diff(reading.track, n=2, axis=0)
    sizes = np.linalg.norm(second, axis=-1)
    return float(np.nanmean(sizes)) if np.isfinite(sizes).any() else float("nan")


def appearance(reading: ClipReading, target_prompt: str) -> dict[str, Any]:
    """What a clip shows against what ``target_prompt`` asks for, and how steadily its object moves."""
    colour, shape, background = world.parse_prompt(target_prompt)
    metrics = {
        "target_prompt": target_prompt,
        "found_fraction": float(reading.found.mean()),
        "track_jerk_px": _finite_or_none(track_jerk(reading)),
        "background_flicker": reading.background_flicker,
        "colour": reading.colour, "shape": reading.shape, "background": reading.background,
        "fill_ratio": _finite_or_none(reading.shape_descriptor[0]),
        "vertical_skew": _finite_or_none(reading.shape_descriptor[1]),
        "colour_ok": reading.colour == colour,
        "shape_ok": reading.shape == shape,
        "background_ok": reading.background == background,
    }
    metrics["appearance_ok"] = metrics["colour_ok"] and metrics["shape_ok"] and metrics["background_ok"]
    return metrics


def compare(input_video: np.ndarray, input_prompt: str, generated_video: np.ndarray,
            target_prompt: str) -> tuple[dict[str, Any], ClipReading, ClipReading]:
    """Metrics of one generated clip against its input: (metrics, input reading, generated reading)."""
    source_colour, _, source_background = world.parse_prompt(input_prompt)
    colour, _, background = world.parse_prompt(target_prompt)
    reference = read_clip(input_video, "input")
    generated = read_clip(generated_video, "generated")
    height, width = np.shape(generated_video)[1:3]
    metrics = {
        "input_prompt": input_prompt,
        **appearance(generated, target_prompt),
        "motion_error_px": motion_error(reference, generated, float(np.hypot(height, width))),
        # leakage is only defined where the target asks for something other than the input shows
        "colour_leak": generated.colour == source_colour if colour != source_colour else None,
        "background_leak": generated.background == source_background if background != source_background else None,
    }
    return metrics, reference, generated


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: an undefined measurement (no object found) is written as null."""
    return float(value) if np.isfinite(value) else None


def summarise(per_clip: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Means over clips of each metric: errors, accuracies, leakage rates (None where undefined or absent)."""
    def mean(key: str) -> float | None:
        values = [float(m[key]) for m in per_clip if m.get(key) is not None]
        return float(np.mean(values)) if values else None

    keys = ("motion_error_px", "found_fraction", "track_jerk_px", "background_flicker", "colour_ok", "shape_ok",
            "background_ok", "appearance_ok", "colour_leak", "background_leak")
    return {"clips": len(per_clip), **{key: mean(key) for key in keys}}


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The summary as printed: a figure a line, rounded to 3 places ("-" where no clip defines it), in a column."""
    width = max(map(len, summary)) + 2
    return [f"{name:{width}}{'-' if value is None else round(value, 3)}" for name, value in summary.items()]


def evaluate_world_clips(inputs: Sequence[np.ndarray], input_prompts: Sequence[str],
                         generated: Sequence[np.ndarray], target_prompts: Sequence[str],
                         out_dir: str | None = None) -> dict[str, Any]:
    """Compares each generated clip with its input; returns {"summary", "clips"} and, given ``out_dir``,
    writes it as ``metrics.json`` with a side-by-side gif per clip (``<i>_side_by_side.gif``, named in
    its "gif" relative to ``out_dir``).

    Videos are ``(f, h, w, 3)`` uint8 or float in [0, 1]; prompts are world prompts.
    """
    lengths = {len(inputs), len(input_prompts), len(generated), len(target_prompts)}
    if len(lengths) != 1:
        raise ValueError(f"inputs ({len(inputs)}), input_prompts ({len(input_prompts)}), generated "
                         f"({len(generated)}) and target_prompts ({len(target_prompts)}) must match in number")
    per_clip = []
    for i, (source, source_prompt, made, prompt) in enumerate(zip(inputs, input_prompts, generated, target_prompts)):
        metrics, reference, reading = compare(source, source_prompt, made, prompt)
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            metrics["gif"] = f"{i}_side_by_side.gif"
            write_side_by_side(os.path.join(out_dir, metrics["gif"]), as_unit_rgb(source), as_unit_rgb(made),
                               reference.track, reading.track)
        per_clip.append(metrics)
    result = {"summary": summarise(per_clip), "clips": per_clip}
    if out_dir is not None:
        files.write_text_atomic(os.path.join(out_dir, "metrics.json"), json.dumps(result, indent=2) + "\n")
    return result


def evaluate_samples(generated: Sequence[np.ndarray], target_prompts: Sequence[str]) -> dict[str, Any]:
    """{"summary", "clips"} of clips sampled from noise for world prompts: appearance and track steadiness
    (nothing to follow, so no motion error); how the pretrained model is judged."""
    if len(generated) != len(target_prompts):
        raise ValueError(f"{len(generated)} clips and {len(target_prompts)} prompts")
    per_clip = [appearance(read_clip(video, f"sample {i}"), prompt)
                for i, (video, prompt) in enumerate(zip(generated, target_prompts))]
    return {"summary": summarise(per_clip), "clips": per_clip}


def evaluate_files(input_path: str, input_prompt: str, samples: Mapping[str, str], out_dir: str,
                   num_frames: int | None = None, stride: int = 1, start: int = 0,
                   reverse: bool = False) -> dict[str, Any]:
    """:func:`evaluate_world_clips` on video files: the input clip and ``samples`` (path -> target prompt).

    The input's frames are those a job tunes on (:func:`data.select_frames`; all by default),
    resized (bilinear, antialiased) to each sample's size, and paired with the sample's frames by
    index: a sample with another number of frames is refused. This is what ``vmc-jax evaluate`` runs.
    """
    from vmc_jax import video_io  # jax-backed resize, needed only for files

    source = video_io.select_frames(input_path, num_frames, stride, start, reverse)
    inputs, generated = [], []
    for path in samples:
        made = video_io.read_frames(path)
        if len(made) != len(source):
            raise ValueError(f"{path!r} has {len(made)} frames, the input {input_path!r} {len(source)} "
                             f"(num_frames={num_frames}, stride={stride}, start={start}): frames are compared "
                             "one to one")
        resized = video_io.resize(source.astype(np.float32) / 255, *made.shape[1:3])
        inputs.append(np.clip(np.asarray(resized), 0, 1))
        generated.append(made)
    return evaluate_world_clips(inputs, [input_prompt] * len(samples), generated, list(samples.values()), out_dir)


# Track colours in the gif: the input's path (cyan) on both panels, the generated one's (magenta) on its own.
_INPUT_TRACK = (0, 230, 230)
_GENERATED_TRACK = (230, 0, 230)


def write_side_by_side(path: str, input_video: np.ndarray, generated_video: np.ndarray, input_track: np.ndarray,
                       generated_track: np.ndarray, scale: int = 4, fps: float = 4.0) -> str:
    """A gif of input | generated (each ``(f, h, w, 3)`` in [0, 1]), enlarged ``scale`` times, tracks drawn."""
    import imageio.v3 as iio
    from PIL import Image, ImageDraw

    frames = []
    width = generated_video.shape[2] * scale
    gap = 2 * scale
    for i in range(len(generated_video)):
        panels = [np.kron(np.asarray(v[i]), np.ones((scale, scale, 1))) for v in (input_video, generated_video)]
        separator = np.ones((panels[0].shape[0], gap, 3))
        image = Image.fromarray((np.concatenate([panels[0], separator, panels[1]], 1) * 255).round().astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for track, colour, offsets in ((input_track, _INPUT_TRACK, (0, width + gap)),
                                       (generated_track, _GENERATED_TRACK, (width + gap,))):
            for offset in offsets:
                _draw_track(draw, track[: i + 1], colour, scale, offset)
        frames.append(np.asarray(image))
    iio.imwrite(path, np.stack(frames), extension=".gif", duration=1000 / fps, loop=0)
    return path


def _draw_track(draw: Any, track: np.ndarray, colour: tuple[int, int, int], scale: int, offset: int) -> None:
    """The track so far as a polyline with a dot at its last point (frames without the object skipped)."""
    points = [((x + 0.5) * scale + offset, (y + 0.5) * scale) for x, y in track if np.isfinite(x)]
    if len(points) > 1:
        draw.line(points, fill=colour, width=max(scale // 2, 1))
    if points and np.isfinite(track[-1, 0]):
        x, y = points[-1]
        draw.ellipse([x - scale, y - scale, x + scale, y + scale], outline=colour, width=max(scale // 2, 1))
