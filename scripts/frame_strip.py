"""One PNG of video frames: a row per clip, a column per frame, enlarged by nearest neighbour.

    python scripts/frame_strip.py --out docs/world_demo_strip.png \\
        configs/assets/world_zigzag.gif workdirs/world/run/samples/generate_200/*.gif
    python scripts/frame_strip.py --out strip.png \\
        --evaluation workdirs/world/run/samples/generate_200/evaluation

Given gifs (or other videos imageio reads), each is one row in the order given: e.g. the input
clip, then the tuned outputs. Given ``--evaluation DIR``, the rows are the ``<i>_side_by_side.gif``
files that ``vmc-jax evaluate`` writes there (input | generated, already enlarged, tracks drawn),
in the order of ``i``. A gif frame held for several times the clip's shortest frame duration counts
as that many frames, as ``vmc_jax`` reads it. Cells are parted by dark grey lines, and rows shorter
than the longest are padded with the same grey.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
from typing import Sequence

import imageio.v3 as iio
import numpy as np

SEPARATOR = 48  # grey level of the lines between cells (and of the padding of short rows)


def read_frames(path: str) -> np.ndarray:
    """The frames of ``path`` as ``(f, h, w, 3)`` uint8, held gif frames repeated by their duration."""
    frames = [np.asarray(frame) for frame in iio.imiter(path)]
    if not frames:
        raise ValueError(f"{path}: no frames")
    frames = [np.repeat(f[..., None], 3, -1) if f.ndim == 2 else f[..., :3] for f in frames]
    if path.lower().endswith(".gif"):
        durations = [float(iio.immeta(path, index=i).get("duration") or 0) for i in range(len(frames))]
        base = min((d for d in durations if d > 0), default=0)
        if base > 0:
            counts = [max(1, round(d / base)) for d in durations]
            frames = [f for f, n in zip(frames, counts) for _ in range(n)]
    return np.stack(frames).astype(np.uint8)


def side_by_side_gifs(folder: str) -> list[str]:
    """``folder``'s ``<i>_side_by_side.gif`` files in the order of ``i``."""
    found = glob.glob(os.path.join(folder, "*_side_by_side.gif"))
    if not found:
        raise ValueError(f"{folder}: no *_side_by_side.gif (written by `vmc-jax evaluate`)")
    return sorted(found, key=lambda p: int(re.match(r"\d+", os.path.basename(p)).group()))


def frame_strip(rows: Sequence[np.ndarray], scale: int = 4, gap: int = 2) -> np.ndarray:
    """``rows`` of ``(f, h, w, 3)`` uint8 videos (one frame size) as one image, ``gap`` dark grey pixels between cells."""
    sizes = {row.shape[1:] for row in rows}
    if len(sizes) != 1:
        raise ValueError(f"the clips have different frame sizes: {sorted(s[:2] for s in sizes)}")
    h, w = rows[0].shape[1] * scale, rows[0].shape[2] * scale
    columns = max(len(row) for row in rows)
    image = np.full((len(rows) * (h + gap) - gap, columns * (w + gap) - gap, 3), SEPARATOR, np.uint8)
    for r, row in enumerate(rows):
        for c, frame in enumerate(row):
            image[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = \
                frame.repeat(scale, 0).repeat(scale, 1)
    return image


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("videos", nargs="*", help="one row each, in this order (e.g. the input, then outputs)")
    parser.add_argument("--evaluation", help="a `vmc-jax evaluate` folder: its side-by-side gifs, one row each")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--scale", type=int, default=None,
                        help="nearest-neighbour enlargement (default 4; 1 with --evaluation, already enlarged)")
    parser.add_argument("--gap", type=int, default=2, help="pixels of dark grey between frames and rows (default 2)")
    args = parser.parse_args(argv)
    if bool(args.videos) == bool(args.evaluation):
        parser.error("give either videos or --evaluation DIR")
    paths = side_by_side_gifs(args.evaluation) if args.evaluation else args.videos
    scale = args.scale if args.scale is not None else (1 if args.evaluation else 4)
    if scale < 1 or args.gap < 0:
        parser.error("--scale must be >= 1 and --gap >= 0")
    try:
        image = frame_strip([read_frames(p) for p in paths], scale, args.gap)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    iio.imwrite(args.out, image)
    print(f"{args.out}: {len(paths)} rows, {image.shape[1]}x{image.shape[0]} pixels")


if __name__ == "__main__":
    main()
