"""Writing frames to video files and reading them back.

- ``.mp4``: H.264 written by ``sorakit.runtime.mp4`` in pure numpy, no binary dependency. Every macroblock is
  stored uncompressed (I_PCM), so the only loss is the conversion to BT.601 limited-range YCbCr 4:2:0, and
  files are large (about 1.5 bytes per pixel per frame). An odd width or height is padded to even by
  repeating the last column or row (4:2:0 H.264 cannot crop to an odd size).
- ``.gif``: through Pillow, imported only when a GIF is written or read.

The file is written next to its destination under a temporary name and renamed when done, so a failed
write never leaves a half-written video. Inputs are checked before any work is done.

``read_video`` decodes the MP4 files written here without any dependency; other MP4 files need imageio
and imageio-ffmpeg.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from pathlib import Path

import numpy as np

from sorakit.errors import SorakitError

SUFFIXES = (".mp4", ".gif")
# the optional dependencies: GIF needs Pillow; reading MP4 files written by other tools needs imageio-ffmpeg
VIDEO_EXTRA = "sorakit[video]"


def check_video_target(path: str | Path, fps: float = 24) -> Path:
    """Check where a video will go and its frame rate, before anything expensive (such as generating it)."""
    path = Path(path)
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not math.isfinite(fps) or fps <= 0:
        raise SorakitError(f"fps must be a positive finite number, got {fps!r}")
    if not 1 / 1000 <= fps <= 1000:
        raise SorakitError(f"fps must be between 0.001 and 1000 frames per second, got {fps!r}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise SorakitError(f"cannot write {path.name}: use a .mp4 or .gif file name")
    if path.is_dir():
        raise SorakitError(f"cannot write {path}: it is a directory; give a file name ending in {suffix}")
    if not path.parent.exists():
        raise SorakitError(f"output directory {path.parent} does not exist")
    if not path.parent.is_dir():
        raise SorakitError(f"cannot write {path}: {path.parent} is not a directory")
    if suffix == ".gif":
        _pillow("writing .gif files")
    return path


def _check_frames(frames) -> np.ndarray:
    try:
        frames = np.asarray(frames)
    except ValueError as e:  # e.g. a list of frames of different sizes
        raise SorakitError(f"expected uint8 frames [F, H, W, 3] of one size: {e}") from None
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise SorakitError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[0] == 0:
        raise SorakitError(f"no frames to write: expected at least one frame, got shape {frames.shape}")
    if frames.shape[1] == 0 or frames.shape[2] == 0:
        raise SorakitError(f"frames have no pixels: height and width must be at least 1, got shape {frames.shape}")
    from sorakit.runtime.mp4 import MAX_DIMENSION

    if max(frames.shape[1:3]) > MAX_DIMENSION:
        raise SorakitError(f"frames of {frames.shape[2]}x{frames.shape[1]} are too large for a video file "
                           f"(at most {MAX_DIMENSION} pixels a side)")
    return frames


def save_video(frames: np.ndarray, path: str | Path, fps: float = 24) -> Path:
    """Write uint8 frames [F, H, W, 3] to ``path`` (.mp4 or .gif) at ``fps`` frames per second."""
    path = check_video_target(path, fps)
    frames = _check_frames(frames)
    suffix = path.suffix.lower()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if suffix == ".mp4":
                from sorakit.runtime.mp4 import write_mp4

                write_mp4(frames, f, fps)
            else:
                _write_gif(frames, f, fps)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pillow(purpose: str):
    try:
        from PIL import Image
    except ImportError:
        raise SorakitError(f"{purpose} needs Pillow, which is not installed",
                           hint=f"pip install pillow (or pip install '{VIDEO_EXTRA}')") from None
    return Image


def _write_gif(frames: np.ndarray, f, fps: float) -> None:
    Image = _pillow("writing .gif files")
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(f, format="GIF", save_all=True, append_images=images[1:], duration=1000.0 / fps, loop=0)


def read_video(path: str | Path) -> np.ndarray:
    """Read a video back as uint8 [F, H, W, 3] (used by tests and `sorakit eval`).

    MP4 files written by ``save_video`` are decoded here with numpy alone; GIFs need Pillow; other
    videos are handed to imageio (which needs imageio-ffmpeg for MP4).
    """
    from sorakit.runtime.mp4 import DamagedMp4, NotOurMp4, read_mp4

    path = Path(path)
    if not path.is_file():
        raise SorakitError(f"cannot read {path}: no such file")
    if path.suffix.lower() == ".gif":
        Image = _pillow("reading .gif files")
        with Image.open(path) as im:
            frames = []
            for i in range(getattr(im, "n_frames", 1)):
                im.seek(i)
                frames.append(np.asarray(im.convert("RGB")))
        return np.stack(frames)
    try:
        return read_mp4(path).frames
    except DamagedMp4 as e:
        raise SorakitError(f"cannot read {path.name}: the file is truncated or damaged ({e})") from None
    except NotOurMp4:
        pass
    try:
        import imageio.v2 as imageio
    except ImportError:
        raise SorakitError(f"reading {path.name} needs imageio and imageio-ffmpeg (only MP4 files written by "
                           "sorakit can be read without them)",
                           hint=f"pip install imageio imageio-ffmpeg (or pip install '{VIDEO_EXTRA}')") from None
    try:
        frames = imageio.mimread(str(path), memtest=False)
    except ImportError as e:
        raise SorakitError(f"reading {path.name} needs imageio-ffmpeg: {e}",
                           hint=f"pip install imageio-ffmpeg (or pip install '{VIDEO_EXTRA}')") from None
    except Exception as e:  # imageio's errors name no common type
        raise SorakitError(f"cannot read {path.name} as a video: {e}") from e
    return np.stack([np.asarray(f)[..., :3] for f in frames])
