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
