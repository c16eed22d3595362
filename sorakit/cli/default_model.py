"""The model `sorakit generate` uses without --bundle.

sorakit ships a small trained model (``sorakit/assets/shapes``: safetensors and tokenizer).
On first use it is exported to a bundle in the cache directory, keyed by a hash of the
shipped files, the preset (its sampler defaults go into the bundle's manifest) and the sorakit
version, and reused afterwards. Exporting needs torch (the ``export`` extra).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import sorakit
from sorakit.devices.profiles import default_cache_dir
from sorakit.errors import SorakitError

ASSETS = Path(sorakit.__file__).resolve().parent / "assets"
SHIPPED = ASSETS / "shapes"
SHIPPED_FILES = ("transformer/model.safetensors", "vae/model.safetensors", "text_encoder/model.safetensors",
                 "tokenizer.json")
DEFAULT_MODEL_NOTE = "the default model only knows simple shapes, colours and motions (e.g. 'a red circle moving right')"


def shipped_model_available() -> bool:
    return all((SHIPPED / f).is_file() for f in SHIPPED_FILES)


def _key() -> str:
    from sorakit.presets import get_preset

    h = hashlib.sha256(sorakit.__version__.encode())
    if shipped_model_available():
        h.update(json.dumps(get_preset("shapes").to_dict(), sort_keys=True).encode())
        for f in SHIPPED_FILES:
            h.update(hashlib.sha256((SHIPPED / f).read_bytes()).digest())
        return "shapes-" + h.hexdigest()[:16]
    return "tiny-random-" + h.hexdigest()[:16]


def default_bundle(progress: Callable | None = None, cache_dir: Path | None = None) -> Path:
    """The default bundle's directory, exporting it first if it is not cached yet."""
    out = Path(cache_dir or default_cache_dir()) / "bundles" / _key()
    if (out / "manifest.json").is_file():
        return out
    try:
        from sorakit.export.exporter import ExportSettings, export_bundle
        from sorakit.presets import get_preset
    except ImportError as e:
        raise SorakitError(
            f"the default model is exported to a bundle on first use, which needs torch ({e.name} is missing)",
            hint="install the export extra (pip install 'sorakit[export]') or pass --bundle DIR",
        ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    if shipped_model_available():
        preset = get_preset("shapes")
        checkpoints = {c: SHIPPED / c for c in ("transformer", "vae", "text_encoder")}
        tokenizer = SHIPPED / "tokenizer.json"
    else:  # before a trained model ships: the tiny preset with deterministic random weights
        preset, checkpoints, tokenizer = get_preset("tiny"), {}, None
    h, w = preset.resolution
    settings = ExportSettings(preset, h, w, preset.num_frames)
    plain = out.with_name(out.name + "-export")
    export_bundle(settings, plain, checkpoints, progress=progress, tokenizer_source=tokenizer)
    # add the TDTM block variants, so --tdtm-steps works out of the box (graph-only, seconds)
    from sorakit.graph_passes.pipeline import optimize_bundle

    optimize_bundle(plain, out, ["tdtm"], gates={"tdtm": None})
    shutil.rmtree(plain, ignore_errors=True)
    return out
