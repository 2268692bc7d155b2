"""Reading a clip (video file or folder of frames) and preparing it for the pixel UNet."""

from __future__ import annotations

import os
import re

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np

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


def _rgb(frame: np.ndarray, source: str) -> np.ndarray:
    if frame.ndim == 2:
        frame = np.repeat(frame[..., None], 3, axis=-1)
    if frame.ndim != 3 or frame.shape[-1] not in (3, 4):
        raise ValueError(f"{source}: expected an RGB(A) or grey image, got shape {frame.shape}")
    return frame[..., :3]


def read_frames(path: str) -> np.ndarray:
    """All frames of a video file or a folder of images, ``(f, h, w, 3)`` uint8."""
    if os.path.isdir(path):
        frames = []
        for file in _frame_files(path):
            try:
                frames.append(_rgb(iio.imread(file), file))
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read frame {file!r}: {e}") from e
            if frames[-1].shape != frames[0].shape:
                raise ValueError(f"frame {file!r} is {frames[-1].shape[1]}x{frames[-1].shape[0]}, "
                                 f"the first frame is {frames[0].shape[1]}x{frames[0].shape[0]}")
        return np.stack(frames)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video not found: {path!r}")
    try:
        frames = [_rgb(np.asarray(f), path) for f in iio.imiter(path)]
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot read video {path!r}: {e}") from e
    if not frames:
        raise ValueError(f"video {path!r} has no frames")
    return np.stack(frames)


def resize(frames: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize with antialiasing, as ``F.interpolate(mode="bilinear", antialias=True)``."""
    return jax.image.resize(frames, (*frames.shape[:-3], height, width, frames.shape[-1]), "linear", antialias=True)


def load_clip(path: str, num_frames: int, height: int, width: int, stride: int = 1, start: int = 0,
              reverse: bool = False) -> np.ndarray:
    """``num_frames`` frames (every ``stride``-th from ``start``) as float32 in [-1, 1], ``(f, h, w, 3)``.

    ``reverse`` plays the clip backwards (the paper's backward-motion experiment).
    """
    if num_frames < 1 or stride < 1 or start < 0:
        raise ValueError(f"bad clip selection: num_frames={num_frames}, stride={stride}, start={start}")
    frames = read_frames(path)
    needed = start + (num_frames - 1) * stride + 1
    if len(frames) < needed:
        raise ValueError(f"{path!r} has {len(frames)} frames; num_frames={num_frames} with stride={stride} "
                         f"from start={start} needs {needed}")
    clip = frames[start:needed:stride]
    clip = jnp.asarray(clip, jnp.float32) / 127.5 - 1.0
    clip = np.asarray(resize(clip, height, width))
    return clip[::-1].copy() if reverse else clip


def save_video(frames: np.ndarray, path: str, fps: float = 4.0) -> None:
    """Writes ``(f, h, w, 3)`` frames in [-1, 1] as a gif or mp4 (by extension), atomically."""
    pixels = np.clip((np.asarray(frames, np.float32) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    ext = os.path.splitext(path)[1]
    if ext not in (".gif", ".mp4"):
        raise ValueError(f"unsupported video extension {ext!r} in {path!r} (use .gif or .mp4)")
    with files.atomic_path(path) as tmp:  # the temporary name has no extension: the format is given
        if ext == ".gif":
            iio.imwrite(tmp, pixels, extension=ext, duration=1000 / fps, loop=0)
        else:
            iio.imwrite(tmp, pixels, plugin="FFMPEG", extension=ext, fps=fps, codec="libx264", macro_block_size=1,
                        output_params=["-f", "mp4"])
