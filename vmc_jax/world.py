"""A procedural world of moving shapes: seeded clips with their prompt and ground truth, no files.

Each clip shows one plain-coloured shape (square, disc, triangle) moving over a plain background
that stands for a scene ("snow", "sea", "space", ...), along a straight line, a bounce, a zigzag
or a circle. Rendering is antialiased by supersampling, vectorised over frames in numpy, at any
(frames, height, width). The ground truth is the object's coverage mask (the fraction of each
pixel the shape covers) and its centroid per frame, in pixel-index coordinates (x, y): pixel
(row i, column j) has its centre at (j, i). Every shape's area centroid is its centre, so the
centroid is the motion's path itself. The motion keeps the whole shape inside the frame.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

# Object colours (RGB in [0, 1]); every one is far from every background colour (tested).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "orange": (0.98, 0.55, 0.0),
    "yellow": (0.95, 0.88, 0.1),
    "purple": (0.55, 0.2, 0.8),
    "pink": (0.98, 0.45, 0.75),
}
# Background name -> (RGB, the phrase that places the object there).
BACKGROUNDS: dict[str, tuple[tuple[float, float, float], str]] = {
    "snow": ((0.92, 0.94, 0.97), "on the snow"),
    "sea": ((0.08, 0.28, 0.6), "in the sea"),
    "space": ((0.04, 0.04, 0.12), "in space"),
    "grass": ((0.27, 0.55, 0.2), "on the grass"),
    "desert": ((0.82, 0.7, 0.47), "in the desert"),
}
SHAPES = ("square", "disc", "triangle")
# The shape's size: its half-extent (the half side of its bounding square) as a fraction of min(height, width).
SIZE_RANGE = (0.15, 0.22)
SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class WorldClip:
    """One rendered clip: ``video`` (f, h, w, 3) float32 RGB in [0, 1], ``mask`` (f, h, w) coverage in
    [0, 1], ``centroids`` (f, 2) float (x, y) in pixel-index coordinates, and what it shows
    (``radius``: the shape's half-extent in pixels)."""

    video: np.ndarray
    mask: np.ndarray
    centroids: np.ndarray
    colour: str
    shape: str
    background: str
    motion: str
    radius: float

    @property
    def prompt(self) -> str:
        """The clip's text prompt, e.g. "a red square is moving on the snow"."""
        return prompt_for(self.colour, self.shape, self.background)


def prompt_for(colour: str, shape: str, background: str) -> str:
    """"a red square is moving on the snow" for ("red", "square", "snow"); names are checked."""
    _check("colour", colour, COLOURS)
    _check("shape", shape, SHAPES)
    _check("background", background, BACKGROUNDS)
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} is moving {BACKGROUNDS[background][1]}"


_PROMPT = re.compile(
    r"^an? (?P<colour>" + "|".join(COLOURS) + r") (?P<shape>" + "|".join(SHAPES) + r") is moving (?P<place>.+)$"
)
_PLACES = {phrase: name for name, (_, phrase) in BACKGROUNDS.items()}


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """(colour, shape, background) of a world prompt; the inverse of :func:`prompt_for`."""
    match = _world_match(prompt)
    if match is None:
        raise ValueError(f"not a world prompt: {prompt!r}; expected e.g. {prompt_for('red', 'square', 'snow')!r}")
    return match["colour"], match["shape"], _PLACES[match["place"]]


def is_world_prompt(prompt: str) -> bool:
    """Whether :func:`parse_prompt` reads ``prompt``."""
    return _world_match(prompt) is not None


def _world_match(prompt: str) -> re.Match | None:
    """The match of a world prompt (a known colour, shape and place), or None."""
    match = _PROMPT.match(prompt.strip().lower())
    return match if match and match["place"] in _PLACES else None


def vocabulary() -> list[str]:
    """Every word a world prompt can use, sorted (for a word-level tokenizer)."""
    words = {"a", "an", "is", "moving", *COLOURS, *SHAPES}
    for _, phrase in BACKGROUNDS.values():
        words.update(phrase.split())
    return sorted(words)


def all_prompts() -> list[str]:
    """Every prompt of the world, one per (colour, shape, background)."""
    return [prompt_for(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


# ---------------------------------------------------------------------------------------------
# Motions: (rng, t in [0, 1] per frame, lo, hi) -> centres (f, 2), all inside the box [lo, hi].


def _line(rng: np.random.Generator, t: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """A straight line at constant speed in a random direction, of random length (up to the box's)."""
    angle = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    # the longest displacement along ``direction`` that fits the box
    room = np.min((hi - lo) / np.maximum(np.abs(direction), 1e-9))
    displacement = direction * room * rng.uniform(0.4, 1.0)
    start = rng.uniform(lo - np.minimum(displacement, 0), hi - np.maximum(displacement, 0))
    return start + t[:, None] * displacement


def _bounce(rng: np.random.Generator, t: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """A straight run that reflects off the box's walls, fast enough to hit at least one."""
    span = hi - lo
    angle = rng.uniform(0, 2 * np.pi)
    velocity = np.array([np.cos(angle), np.sin(angle)]) * np.max(span) * rng.uniform(1.2, 2.0)
    free = rng.uniform(lo, hi) + t[:, None] * velocity - lo
    folded = np.mod(free, 2 * span)
    return lo + span - np.abs(span - folded)


def _zigzag(rng: np.random.Generator, t: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Across the box along one axis while going back and forth (a triangle wave) along the other."""
    along = rng.integers(2)
    across = 1 - along
    span = hi - lo
    centres = np.empty((len(t), 2))
    ends = np.array([0.0, 1.0]) if rng.integers(2) else np.array([1.0, 0.0])
    ends = lo[along] + span[along] * (0.1 + 0.8 * ends)
    centres[:, along] = ends[0] + t * (ends[1] - ends[0])
    amplitude = span[across] * rng.uniform(0.25, 0.5)
    middle = rng.uniform(lo[across] + amplitude, hi[across] - amplitude)
    cycles = rng.choice([1.0, 1.5, 2.0])
    phase = 2 * np.abs(np.mod(t * cycles + 0.25, 1.0) - 0.5) * 2 - 1  # triangle wave in [-1, 1], 0 at t = 0
    centres[:, across] = middle + amplitude * phase
    return centres


def _circle(rng: np.random.Generator, t: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Part of a circle (half a turn to a full turn), either way round."""
    radius = np.min(hi - lo) / 2 * rng.uniform(0.5, 1.0)
    centre = rng.uniform(lo + radius, hi - radius)
    turns = rng.uniform(0.5, 1.0) * rng.choice([-1.0, 1.0])
    angle = rng.uniform(0, 2 * np.pi) + 2 * np.pi * turns * t
    return centre + radius * np.stack([np.cos(angle), np.sin(angle)], axis=-1)


MOTIONS: dict[str, Callable[..., np.ndarray]] = {"line": _line, "bounce": _bounce, "zigzag": _zigzag, "circle": _circle}


# ---------------------------------------------------------------------------------------------
# Shapes: (dx, dy relative to the centre, half-extent r) -> inside (bool); area centroid at (0, 0).


def _inside_square(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r


def _inside_disc(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    return dx * dx + dy * dy <= r * r


def _inside_triangle(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """An isosceles triangle pointing up, apex (0, -r), base from (-r, r/2) to (r, r/2): centroid (0, 0)."""
    return (dy <= r / 2) & (1.5 * np.abs(dx) - dy <= r)


_INSIDE = {"square": _inside_square, "disc": _inside_disc, "triangle": _inside_triangle}


def render(centres: np.ndarray, shape: str, radius: float, colour: str, background: str,
           height: int, width: int, supersample: int = SUPERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """(video (f, h, w, 3), coverage mask (f, h, w)) of ``shape`` centred at ``centres`` (f, 2) per frame."""
    _check("shape", shape, SHAPES)
    _check("colour", colour, COLOURS)
    _check("background", background, BACKGROUNDS)
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5  # sample points within a pixel
    ys = (np.arange(height)[:, None] + offsets).reshape(-1)
    xs = (np.arange(width)[:, None] + offsets).reshape(-1)
    dx = xs[None, None, :] - centres[:, 0, None, None]
    dy = ys[None, :, None] - centres[:, 1, None, None]
    inside = _INSIDE[shape](dx, dy, radius).astype(np.float32)
    frames = len(centres)
    mask = inside.reshape(frames, height, supersample, width, supersample).mean(axis=(2, 4))
    fill = np.asarray(COLOURS[colour], np.float32)
    back = np.asarray(BACKGROUNDS[background][0], np.float32)
    video = back + mask[..., None] * (fill - back)
    return video.astype(np.float32), mask


def make_clip(rng: int | np.random.Generator, num_frames: int = 8, height: int = 40, width: int = 64,
              colour: str | None = None, shape: str | None = None, background: str | None = None,
              motion: str | None = None) -> WorldClip:
    """A random clip (seeded by ``rng``); any of colour / shape / background / motion may be fixed."""
    if num_frames < 2 or height < 8 or width < 8:
        raise ValueError(f"clip size (frames {num_frames}, height {height}, width {width}) is below (2, 8, 8)")
    rng = np.random.default_rng(rng)
    colour = colour or str(rng.choice(list(COLOURS)))
    shape = shape or str(rng.choice(SHAPES))
    background = background or str(rng.choice(list(BACKGROUNDS)))
    motion = motion or str(rng.choice(list(MOTIONS)))
    _check("motion", motion, MOTIONS)
    radius = rng.uniform(*SIZE_RANGE) * min(height, width)
    # centres that keep the whole shape (half-extent radius) inside the pixel grid [-0.5, size - 0.5]
    lo = np.full(2, radius - 0.5)
    hi = np.array([width, height], float) - 0.5 - radius
    t = np.linspace(0.0, 1.0, num_frames)
    centres = MOTIONS[motion](rng, t, lo, hi)
    video, mask = render(centres, shape, radius, colour, background, height, width)
    return WorldClip(video, mask, centres, colour, shape, background, motion, float(radius))


def make_batch(rng: int | np.random.Generator, batch: int, num_frames: int, height: int,
               width: int) -> tuple[np.ndarray, list[str]]:
    """(videos (b, f, h, w, 3) in [-1, 1], prompts) of ``batch`` random clips: a training batch."""
    rng = np.random.default_rng(rng)
    clips = [make_clip(rng, num_frames, height, width) for _ in range(batch)]
    return np.stack([c.video for c in clips]) * 2 - 1, [c.prompt for c in clips]


def _check(kind: str, name: str, known) -> None:
    if name not in known:
        raise ValueError(f"unknown {kind} {name!r}; expected one of {', '.join(known)}")
