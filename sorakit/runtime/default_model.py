"""The shipped model as a bundle, assembled on first use without torch.

sorakit ships a small trained model (``sorakit/assets/shapes``): its weights as safetensors
(the training output, also what the torch side loads) and ``bundle/``, the graphs of its
ONNX bundle without their weight files, plus ``weights.json``, which says where every weight
tensor of those files comes from (a safetensors tensor, cast to fp32 and maybe transposed).
``default_bundle()`` assembles the weight files with numpy into the cache directory and checks
every file against the checksums of the shipped manifest, so the bundle is byte for byte the
one the exporter made and verified against torch (``sorakit.export.ship`` builds the template).

The cache is safe to share: the first use takes a cross-process lock, assembles into a
private staging directory and renames it into place; every use re-checks the cached files
(about 30 MB, a few milliseconds) and rebuilds a damaged copy with a notice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

import sorakit
from sorakit.bundle.io import MANIFEST, sha256_file
from sorakit.bundle.manifest import Manifest, check_relative_path
from sorakit.cache import default_cache_dir
from sorakit.errors import BundleError, SorakitError
from sorakit.tensorfile import read_tensors

SHIPPED = Path(sorakit.__file__).resolve().parent / "assets" / "shapes"
TEMPLATE = SHIPPED / "bundle"
WEIGHTS = "weights.json"
DEFAULT_MODEL_NOTE = "the default model only knows simple shapes, colours and motions (e.g. 'a red circle moving right')"
LOCK_TIMEOUT = 600.0  # seconds another process may hold the lock (assembling takes about a second)


def shipped_model_available() -> bool:
    return (TEMPLATE / MANIFEST).is_file() and (TEMPLATE / WEIGHTS).is_file()


def cache_key() -> str:
    """Changes whenever the shipped model or this version of sorakit changes."""
    h = hashlib.sha256(sorakit.__version__.encode())
    h.update((TEMPLATE / MANIFEST).read_bytes())
    h.update((TEMPLATE / WEIGHTS).read_bytes())
    return "shapes-" + h.hexdigest()[:16]


def bundles_dir(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "bundles"


@dataclass
class CacheState:
    path: Path
    exists: bool
    problem: str | None  # None: complete and every checksum matches


def check_cached(path: Path) -> str | None:
    """None if ``path`` holds the complete default bundle with every checksum right, else what is wrong."""
    if not (path / MANIFEST).is_file():
        return "its manifest.json is missing" if path.exists() else "it does not exist"
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        for rel, rec in files.items():
            check_relative_path(rel)
            p = path / rel
            if not p.is_file():
                return f"{rel} is missing"
            if p.stat().st_size != rec["bytes"]:
                return f"{rel} has {p.stat().st_size} bytes instead of {rec['bytes']}"
            if sha256_file(p) != rec["sha256"]:
                return f"{rel} does not match its checksum"
    except (OSError, ValueError, KeyError, TypeError, BundleError) as e:
        return f"its manifest cannot be read ({e})"
    return None


def cache_state(cache_dir: str | Path | None = None) -> CacheState:
    path = bundles_dir(cache_dir) / cache_key()
    return CacheState(path, path.exists(), check_cached(path))


def default_bundle(cache_dir: str | Path | None = None, notice: Callable[[str], None] | None = None) -> Path:
    """The default model's bundle directory, assembled into the cache first if needed.

    ``notice`` receives one line when a damaged cached copy is rebuilt.
    """
    if not shipped_model_available():
        raise SorakitError(f"the shipped model is missing from this installation ({TEMPLATE})",
                           hint="reinstall sorakit, or pass --bundle DIR")
    root = bundles_dir(cache_dir)
    out = root / cache_key()
    problem = check_cached(out)
    if problem is None:
        return out
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SorakitError(f"cannot create the cache directory {root}: {e.strerror or e}",
                           hint="set SORAKIT_CACHE to a writable directory") from None
    try:
        with FileLock(str(root / f".{out.name}.lock"), timeout=LOCK_TIMEOUT):
            problem = check_cached(out)  # another process may have built it while we waited
            if problem is None:
                return out
            if out.exists():
                if notice:
                    notice(f"the cached default model at {out} is damaged ({problem}); rebuilding it")
                shutil.rmtree(out)
            staging = root / f".{out.name}.partial-{os.getpid()}-{time.monotonic_ns()}"
            try:
                assemble(TEMPLATE, staging)
                os.replace(staging, out)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except Timeout:
        raise SorakitError(f"another sorakit process has held the lock on {out} for {LOCK_TIMEOUT:.0f} s",
                           hint=f"if no other sorakit runs, remove {root / ('.' + out.name + '.lock')}") from None
    except OSError as e:
        raise SorakitError(f"cannot write the default model into {root}: {e.strerror or e}",
                           hint="free disk space or set SORAKIT_CACHE to a writable directory") from None
    return out


def clear_cache(cache_dir: str | Path | None = None) -> list[Path]:
    """Remove every cached default-model bundle (and stale staging directories); returns what went."""
    root = bundles_dir(cache_dir)
    gone = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.name.lstrip(".").startswith(("shapes-", "tiny-random-")):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                gone.append(p)
    return gone


# ---------------------------------------------------------------------------------------------
# assembling
# ---------------------------------------------------------------------------------------------
def assemble(template: Path, out: Path, assets: Path | None = None) -> Path:
    """Write the bundle of ``template`` into ``out``: copy its files, build its weight files from
    the safetensors in ``assets`` (default: the template's parent directory, where the shipped
    model keeps them), and check every file against the manifest's checksums."""
    assets = Path(assets or template.parent).resolve()
    manifest = Manifest.from_dict(json.loads((template / MANIFEST).read_text()), str(template / MANIFEST))
    spec = json.loads((template / WEIGHTS).read_text())
    out.mkdir(parents=True)
    tensors: dict[str, dict[str, np.ndarray]] = {}
    for rel in manifest.files:
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel in spec["files"]:
            _build(dst, spec["files"][rel], tensors, assets, template)
        else:
            shutil.copyfile(template / rel, dst)
        rec = manifest.files[rel]
        if dst.stat().st_size != rec["bytes"] or sha256_file(dst) != rec["sha256"]:
            raise BundleError(f"the shipped model does not assemble: {rel} differs from its recorded checksum",
                              hint="the installation is damaged; reinstall sorakit")
    shutil.copyfile(template / MANIFEST, out / MANIFEST)
    return out


def _build(dst: Path, rec: dict, tensors: dict[str, dict[str, np.ndarray]], assets: Path, template: Path) -> None:
    """One weight file: each piece is a safetensors tensor (``key``, relative to ``assets``) or
    bytes the exporter computed (``start``, in a file of the template)."""
    buf = np.zeros(rec["bytes"], dtype=np.uint8)
    for piece in rec["pieces"]:
        src = piece["source"]
        if "start" in piece:
            check_relative_path(src, WEIGHTS)
            raw = np.fromfile(template / src, dtype=np.uint8, count=piece["length"], offset=piece["start"])
            if raw.size != piece["length"]:
                raise BundleError(f"{WEIGHTS}: {src} ends before byte {piece['start'] + piece['length']}")
            buf[piece["offset"] : piece["offset"] + raw.size] = raw
            continue
        if src not in tensors:
            check_relative_path(src, WEIGHTS)
            path = (assets / src).resolve()
            if not path.is_relative_to(assets):
                raise BundleError(f"{WEIGHTS}: source {src!r} is outside the model's directory")
            tensors[src] = read_tensors(path)
        t = tensors[src].get(piece["key"])
        if t is None:
            raise BundleError(f"{WEIGHTS}: {src} has no tensor {piece['key']!r}")
        a = np.asarray(t).astype(piece["dtype"])
        if piece.get("transpose"):
            a = a.transpose(piece["transpose"])
        raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        if raw.size != piece["length"]:
            raise BundleError(f"{WEIGHTS}: {piece['key']} gives {raw.size} bytes, {dst.name} expects {piece['length']}")
        buf[piece["offset"] : piece["offset"] + raw.size] = raw
    buf.tofile(dst)
