"""The shipped model as a bundle: assembled without torch, cached safely, current with its weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from sorakit.runtime.default_model import SHIPPED, TEMPLATE, assemble, check_cached, default_bundle

ROOT = Path(__file__).resolve().parents[1]


def test_template_assembles_byte_for_byte_without_torch(tmp_path):
    """In a process where importing torch (or onnx) fails, the template assembles into a bundle whose
    every file matches the shipped manifest's checksums, and it generates."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'onnx', 'transformers', 'diffusers'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from sorakit.runtime.default_model import default_bundle\n"
        "from sorakit.runtime.pipeline import Pipeline\n"
        f"b = default_bundle(cache_dir={str(tmp_path / 'cache')!r})\n"
        "r = Pipeline.from_bundle(b)('a red circle moving right', steps=4)\n"
        "print(b, r.frames.shape)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    path = Path(res.stdout.split()[0])
    assert check_cached(path) is None
    manifest = json.loads((TEMPLATE / "manifest.json").read_text())
    spec = json.loads((TEMPLATE / "weights.json").read_text())
    assert set(spec["files"]) <= set(manifest["files"]) and spec["files"]  # the weight files are assembled
    assert not any((TEMPLATE / rel).exists() for rel in spec["files"] if manifest["files"][rel]["bytes"])


def test_damaged_cache_is_rebuilt_with_a_notice(tmp_path):
    cache = tmp_path / "cache"
    path = default_bundle(cache_dir=cache)
    victim = next(p for p in sorted(path.rglob("*.data")) if p.stat().st_size > 1000)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    notices = []
    again = default_bundle(cache_dir=cache, notice=notices.append)
    assert again == path and check_cached(path) is None
    assert len(notices) == 1 and str(path) in notices[0] and "does not match its checksum" in notices[0]
    (path / "manifest.json").unlink()
    notices.clear()
    default_bundle(cache_dir=cache, notice=notices.append)
    assert "manifest.json is missing" in notices[0] and check_cached(path) is None
    assert [p.name for p in (cache / "bundles").iterdir() if not p.name.startswith(".")] == [path.name]


def test_assembly_refuses_a_source_outside_the_model(tmp_path):
    import shutil

    import pytest

    from sorakit.errors import BundleError

    t = tmp_path / "assets" / "bundle"
    shutil.copytree(TEMPLATE, t)
    for c in ("transformer", "vae", "text_encoder"):
        shutil.copytree(SHIPPED / c, tmp_path / "assets" / c)
    spec = json.loads((t / "weights.json").read_text())
    rel = next(iter(spec["files"]))
    spec["files"][rel]["pieces"][0]["source"] = "../../../etc/passwd"
    (t / "weights.json").write_text(json.dumps(spec))
    with pytest.raises(BundleError, match="escapes the bundle|outside the model"):
        assemble(t, tmp_path / "out")


def test_shipped_template_is_current(tmp_path):
    """The committed template is what exporting the shipped safetensors gives today (else: re-run
    python -m sorakit.export.ship)."""
    from sorakit.export.ship import build_template

    fresh = tmp_path / "bundle"
    build_template(SHIPPED, fresh)
    stale = [p.relative_to(fresh).as_posix() for p in sorted(fresh.rglob("*")) if p.is_file()
             and (TEMPLATE / p.relative_to(fresh)).read_bytes() != p.read_bytes()]
    assert not stale, f"stale template files {stale[:5]}: run python -m sorakit.export.ship"
    assert np.array_equal(sorted(p.relative_to(fresh).as_posix() for p in fresh.rglob("*") if p.is_file()),
                          sorted(p.relative_to(TEMPLATE).as_posix() for p in TEMPLATE.rglob("*") if p.is_file()))
