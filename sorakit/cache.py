"""Where sorakit keeps what it builds for you (the default model's bundle, Core ML model caches).

``SORAKIT_CACHE`` overrides the location; otherwise ``$XDG_CACHE_HOME/sorakit`` or
``~/.cache/sorakit``. Stdlib only.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    base = os.environ.get("SORAKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sorakit"
    )
    return Path(base)


# compiled-graph caches of the engines that keep one ("{cache}/NAME" in the device profiles):
# OpenVINO's blobs hold every compiled graph's weights (a real-size bundle adds GBs)
ENGINE_CACHES = ("openvino", "coreml")


def engine_caches(root: Path | None = None) -> dict[str, tuple[Path, int]]:
    """name -> (directory, bytes on disk) of each engine cache that exists."""
    root = root or default_cache_dir()
    out = {}
    for name in ENGINE_CACHES:
        d = root / name
        if d.is_dir():
            out[name] = (d, sum(f.stat().st_size for f in d.rglob("*") if f.is_file()))
    return out


def clear_engine_caches(root: Path | None = None) -> list[Path]:
    """Remove the engine caches (each is rebuilt by compiling again on next use)."""
    import shutil

    gone = []
    for d, _ in engine_caches(root).values():
        shutil.rmtree(d, ignore_errors=True)
        gone.append(d)
    return gone
