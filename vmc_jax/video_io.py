"""Reading a clip (video file or folder of frames) and preparing it for the pixel UNet."""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from typing import Iterator

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageSequence

from vmc_jax import files

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv")


def natural_key(name: str) -> list:
    """Sort key under which ``frame2.png`` comes before ``frame10.png``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _frame_files(folder: str) -> list[str]:
    names = sorted((n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS)), key=natural_key)
    if not names:
        raise ValueError(f"no frames ({', '.join(FRAME_EXTENSIONS)}) in folder {folder!r}")
    return [os.path.join(folder, n) for n in names]


# A frame of more pixels than this is refused before it is decoded: a decompression bomb (a small
# file whose header announces a huge image) or a mistake, never a clip to tune on.
MAX_FRAME_SIDE = 8192
MAX_FRAME_PIXELS = MAX_FRAME_SIDE * MAX_FRAME_SIDE
# Our gifs state their frame duration in a comment, so that held frames (which Pillow's writer
# always merges into one longer frame) are read back exactly.
_GIF_FRAME_COMMENT = "vmc-jax frame duration ms: "


def _too_large(path: str, pixels: str) -> ValueError:
    return ValueError(f"{path!r}: a frame of {pixels} pixels; frames are limited to {MAX_FRAME_PIXELS} pixels "
                      f"({MAX_FRAME_SIDE}x{MAX_FRAME_SIDE})")


@contextlib.contextmanager
def _frame_size_limit(path: str) -> Iterator[None]:
    """Reading ``path`` with Pillow under MAX_FRAME_PIXELS: its decompression-bomb warning is silenced
    (our lower limit is checked per frame, :func:`_checked_size`) and its error (twice Pillow's
    limit, raised on open or on seeking a later gif frame) reported as ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            yield
        except Image.DecompressionBombError:
            raise _too_large(path, f"more than {2 * Image.MAX_IMAGE_PIXELS}") from None


def _checked_size(image: Image.Image, path: str) -> Image.Image:
    """``image`` (a frame not yet decoded), refused if it exceeds MAX_FRAME_PIXELS."""
    if image.width * image.height > MAX_FRAME_PIXELS:
        raise _too_large(path, f"{image.width}x{image.height}")
    return image


def _rgb8(image: Image.Image, path: str) -> np.ndarray:
    """One frame as ``(h, w, 3)`` uint8 RGB: palette and grey frames in colour, 16-bit grey scaled to
    8 bits, transparency composited over black (a pixel's own colour times its opacity)."""
    if image.mode in ("I;16", "I;16B", "I;16L"):
        grey = np.asarray(image).astype(np.uint32)
        return np.repeat(((grey * 255 + 32767) // 65535).astype(np.uint8)[..., None], 3, axis=-1)
    if image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "floating-point"
        raise ValueError(f"{path!r}: {kind} pixels (Pillow mode {image.mode}) are not read; save the frames as "
                         "8- or 16-bit images")
    if not image.has_transparency_data:
        return np.asarray(image.convert("RGB"))
    rgba = np.asarray(image.convert("RGBA")).astype(np.uint16)
    return ((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8)


def _read_image(path: str) -> np.ndarray:
    with _frame_size_limit(path), Image.open(path) as image:
        return _rgb8(_checked_size(image, path), path)


def _read_gif(path: str) -> list[np.ndarray]:
    """A gif's frames, each repeated as often as its duration holds the base duration.

    The base duration is the one a gif of :func:`save_video` states in its comment, else the
    shortest frame's: Pillow (imageio's gif writer) merges a frame equal to the one before into
    it, adding up their durations, so a frame lasting twice the base is two frames of the clip.
    """
    with _frame_size_limit(path), Image.open(path) as gif:
        comment = gif.info.get("comment", b"").decode("utf-8", "replace")
        frames, durations = [], []
        for frame in ImageSequence.Iterator(gif):  # a later frame may enlarge the gif: each is checked
            frames.append(_rgb8(_checked_size(frame, path), path))
            durations.append(frame.info.get("duration", 0))
    stated = re.fullmatch(re.escape(_GIF_FRAME_COMMENT) + r"(\d+(?:\.\d*)?)", comment)
    base = float(stated.group(1)) if stated else min(durations)
    counts = [max(1, round(d / base)) if base > 0 else 1 for d in durations]
    return [frame for frame, count in zip(frames, counts) for _ in range(count)]


def _read_video(path: str) -> list[np.ndarray]:
    try:
        frames = [np.asarray(f) for f in iio.imiter(path)]
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot read video {path!r}: {e}") from e
    if frames and (frames[0].dtype != np.uint8 or frames[0].shape[-1:] != (3,)):
        raise ValueError(f"{path!r}: expected 8-bit RGB frames, got {frames[0].dtype} of shape {frames[0].shape}")
    return frames


def read_frames(path: str) -> np.ndarray:
    """All frames of a video file or a folder of images, ``(f, h, w, 3)`` uint8.

    Palette and grey images are read in colour, 16-bit grey ones scaled to 8 bits, and
    transparency is composited over black; gif frames count by their duration (see _read_gif).
    Frames over MAX_FRAME_PIXELS, float and 32-bit images are refused naming the file.
    """
    if os.path.isdir(path):
        frames = []
        for file in _frame_files(path):
            try:
                frames.append(_read_image(file))
            except (OSError, SyntaxError) as e:  # Pillow raises SyntaxError for some broken files
                raise ValueError(f"cannot read frame {file!r}: {e}") from e
            if frames[-1].shape != frames[0].shape:
                raise ValueError(f"frame {file!r} is {frames[-1].shape[1]}x{frames[-1].shape[0]}, "
                                 f"the first frame is {frames[0].shape[1]}x{frames[0].shape[0]}")
        return np.stack(frames)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video not found: {path!r}")
    if not path.lower().endswith(".gif"):
        frames = _read_video(path)
    else:
        try:
            frames = _read_gif(path)
        except (OSError, SyntaxError) as e:
            raise ValueError(f"cannot read video {path!r}: {e}") from e
    if not frames:
        raise ValueError(f"video {path!r} has no frames")
    return np.stack(frames)


def resize(frames: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize with antialiasing, as ``F.interpolate(mode="bilinear", antialias=True)``."""
    return jax.image.resize(frames, (*frames.shape[:-3], height, width, frames.shape[-1]), "linear", antialias=True)


def select_frames(path: str, num_frames: int | None = None, stride: int = 1, start: int = 0,
                  reverse: bool = False) -> np.ndarray:
    """Frames ``start, start + stride, ...`` of a clip, ``num_frames`` of them (None: to its end), uint8.

    ``reverse`` plays them backwards (the paper's backward-motion experiment).
    """
    if (num_frames is not None and num_frames < 1) or stride < 1 or start < 0:
        raise ValueError(f"bad clip selection: num_frames={num_frames}, stride={stride}, start={start}")
    frames = read_frames(path)
    needed = len(frames) if num_frames is None else start + (num_frames - 1) * stride + 1
    if len(frames) < max(needed, start + 1):
        raise ValueError(f"{path!r} has {len(frames)} frames; num_frames={num_frames} with stride={stride} "
                         f"from start={start} needs {max(needed, start + 1)}")
    clip = frames[start:needed:stride]
    return clip[::-1].copy() if reverse else clip


def load_clip(path: str, num_frames: int, height: int, width: int, stride: int = 1, start: int = 0,
              reverse: bool = False) -> np.ndarray:
    """:func:`select_frames` resized to ``height`` x ``width``, as float32 in [-1, 1], ``(f, h, w, 3)``."""
    clip = jnp.asarray(select_frames(path, num_frames, stride, start, reverse), jnp.float32) / 127.5 - 1.0
    return np.asarray(resize(clip, height, width))


def save_video(frames: np.ndarray, path: str, fps: float = 4.0) -> None:
    """Writes ``(f, h, w, 3)`` frames in [-1, 1] as a gif or mp4 (by extension), atomically."""
    pixels = np.clip((np.asarray(frames, np.float32) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    ext = os.path.splitext(path)[1]
    if ext not in (".gif", ".mp4"):
        raise ValueError(f"unsupported video extension {ext!r} in {path!r} (use .gif or .mp4)")
    with files.atomic_path(path) as tmp:  # the temporary name has no extension: the format is given
        if ext == ".gif":
            # Pillow merges held frames whatever the options; the comment lets read_frames undo it
            iio.imwrite(tmp, pixels, extension=".gif", duration=1000 / fps, loop=0,
                        comment=f"{_GIF_FRAME_COMMENT}{1000 / fps:.6g}")
        else:
            iio.imwrite(tmp, pixels, plugin="FFMPEG", extension=ext, fps=fps, codec="libx264", macro_block_size=1,
                        output_params=["-f", "mp4"])
