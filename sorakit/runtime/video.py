"""Writing frames to video files: mp4 (H.264 through imageio-ffmpeg's bundled ffmpeg) or gif.

The file is written next to its destination under a temporary name and renamed when done,
so a failed write never leaves a half-written video.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from sorakit.errors import SorakitError


def save_video(frames: np.ndarray, path: str | Path, fps: int = 24) -> Path:
    """Write uint8 frames [F, H, W, 3] to ``path`` (.mp4 or .gif)."""
    import imageio.v2 as imageio

    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise SorakitError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise SorakitError(f"cannot write {path.name}: use a .mp4 or .gif file name")
    if not path.parent.exists():
        raise SorakitError(f"output directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        if suffix == ".mp4":
            if frames.shape[1] % 2 or frames.shape[2] % 2:  # yuv420p needs even sizes
                frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
            imageio.mimwrite(tmp, list(frames), fps=fps, codec="libx264", quality=9, macro_block_size=1,
                             ffmpeg_log_level="error", output_params=["-pix_fmt", "yuv420p"])
        else:
            imageio.mimwrite(tmp, list(frames), format="GIF", duration=1000.0 / fps, loop=0)
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


def read_video(path: str | Path) -> np.ndarray:
    """Read a video back as uint8 [F, H, W, 3] (used by tests and `sorakit eval`)."""
    import imageio.v2 as imageio

    return np.stack([np.asarray(f)[..., :3] for f in imageio.mimread(str(path), memtest=False)])
