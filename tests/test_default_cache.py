"""The default model's cache: safe under concurrent first use, repaired when damaged (with one
notice naming the cache path), shown, verified and cleared by `sorakit cache`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sorakit.runtime.default_model import bundles_dir, cache_key, cache_state, clear_cache, default_bundle


def sorakit(*args, cache: Path, cwd: Path) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if k != "SORAKIT_DEBUG"}, "SORAKIT_CACHE": str(cache),
           "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "sorakit", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)


def finish(p: subprocess.Popen, timeout: int = 600) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def test_two_processes_on_an_empty_cache(tmp_path):
    cache = tmp_path / "cache"
    a = sorakit("generate", "a red circle", "--steps", "2", "--out", "a.mp4", cache=cache, cwd=tmp_path)
    b = sorakit("generate", "a blue square", "--steps", "2", "--out", "b.mp4", cache=cache, cwd=tmp_path)
    for name, p in (("a", a), ("b", b)):
        code, out, err = finish(p)
        assert code == 0, f"{name}: {err[-3000:]}"
        assert "Traceback" not in err and "damaged" not in err
        assert (tmp_path / f"{name}.mp4").stat().st_size > 0
    state = cache_state(cache, verify=True)
    assert state.exists and state.problem is None and state.verified
    assert state.stale == [] and not list(bundles_dir(cache).glob("*.partial*"))
    assert sorted(p.name for p in bundles_dir(cache).iterdir()) == sorted([cache_key(), f".{cache_key()}.lock"])
    code, out, err = finish(sorakit("cache", "--verify", cache=cache, cwd=tmp_path))
    assert code == 0 and "every checksum verified" in out and str(state.path) in out.replace("\n", "")


def _damage(path: Path, kind: str) -> None:
    if kind == "truncated file":
        f = path / "transformer" / "block_01.onnx.data"
        f.write_bytes(f.read_bytes()[:-100])
    elif kind == "flipped byte":
        f = path / "vae" / "spatial_up1.onnx.data"
        data = bytearray(f.read_bytes())
        data[1234] ^= 0x10
        f.write_bytes(bytes(data))
    elif kind == "missing manifest":
        (path / "manifest.json").unlink()
    elif kind == "manifest edited":
        m = json.loads((path / "manifest.json").read_text())
        m["files"]["null_caption.npy"]["sha256"] = "0" * 64
        (path / "manifest.json").write_text(json.dumps(m))
    elif kind == "a file in its place":
        import shutil

        shutil.rmtree(path)
        path.write_text("not a bundle")


DAMAGE = ["truncated file", "flipped byte", "missing manifest", "manifest edited", "a file in its place"]


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache-src")
    default_bundle(cache)
    return cache


def _copy_cache(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_cache_is_rebuilt_with_one_notice(built_cache, tmp_path, kind):
    cache = _copy_cache(built_cache, tmp_path / "cache")
    path = bundles_dir(cache) / cache_key()
    _damage(path, kind)
    stale = bundles_dir(cache) / f".{cache_key()}.partial-99999-1"  # left by a killed process
    stale.mkdir()
    notices = []
    assert default_bundle(cache, notice=notices.append) == path
    assert len(notices) == 1 and str(path) in notices[0] and "damaged" in notices[0] and "rebuilding" in notices[0]
    assert cache_state(cache, verify=True).problem is None
    assert not stale.exists()
    assert default_bundle(cache, notice=notices.append) == path and len(notices) == 1  # intact now: silent


@pytest.mark.parametrize("kind", ["truncated file", "missing manifest"])
def test_generate_repairs_a_damaged_cache(built_cache, tmp_path, kind):
    cache = _copy_cache(built_cache, tmp_path / "cache")
    path = bundles_dir(cache) / cache_key()
    _damage(path, kind)
    code, out, err = finish(sorakit("generate", "a red circle moving right", "--steps", "1", "--out", "v.gif",
                                    cache=cache, cwd=tmp_path))
    assert code == 0, err[-3000:]
    notes = [line for line in err.splitlines() if "damaged" in line]
    assert len(notes) == 1 and str(path) in notes[0] and notes[0].startswith("note: ")
    assert "Traceback" not in err and (tmp_path / "v.gif").stat().st_size > 0
    assert cache_state(cache, verify=True).problem is None
    assert sorted(p.name for p in bundles_dir(cache).iterdir() if not p.name.endswith(".lock")) == [cache_key()]


def test_cache_command_shows_verifies_and_clears(built_cache, tmp_path):
    cache = _copy_cache(built_cache, tmp_path / "cache")
    path = bundles_dir(cache) / cache_key()
    code, out, err = finish(sorakit("cache", cache=cache, cwd=tmp_path))
    assert code == 0 and str(path) in out.replace("\n", "") and "complete" in out

    _damage(path, "flipped byte")
    code, out, err = finish(sorakit("cache", "--verify", cache=cache, cwd=tmp_path))
    assert code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and str(path) in errors[0] and "vae/spatial_up1.onnx.data does not match its checksum" \
        in errors[0]
    code, out, err = finish(sorakit("cache", "--json", cache=cache, cwd=tmp_path))
    data = json.loads(out)
    assert code == 0 and data["path"] == str(path) and data["ok"]  # sizes only without --verify

    blobs = Path(cache) / "openvino"  # an engine's compiled graphs: shown with their size, cleared too
    blobs.mkdir()
    (blobs / "1234.blob").write_bytes(b"\0" * 3000)
    code, out, err = finish(sorakit("cache", "--json", cache=cache, cwd=tmp_path))
    assert json.loads(out)["engine_caches"] == {"openvino": {"path": str(blobs), "bytes": 3000}}
    code, out, err = finish(sorakit("cache", cache=cache, cwd=tmp_path))
    assert f"openvino compiled graphs: {blobs}, 3.00 KB" in out.replace("\n", ""), out

    code, out, err = finish(sorakit("cache", "--clear", cache=cache, cwd=tmp_path))
    assert code == 0 and "removed 1 item" in out and f"removed the compiled-graph cache {blobs}" in out.replace("\n", "")
    assert not path.exists() and not blobs.exists()
    code, out, err = finish(sorakit("cache", "--verify", cache=cache, cwd=tmp_path))
    assert code == 0 and "not built yet" in out


def test_clear_removes_stale_staging_and_other_versions(built_cache, tmp_path):
    cache = _copy_cache(built_cache, tmp_path / "cache")
    root = bundles_dir(cache)
    (root / f".{cache_key()}.partial-1-2").mkdir()
    (root / "shapes-0123456789abcdef").mkdir()
    (root / "unrelated").mkdir()
    state = cache_state(cache)
    assert [p.name for p in state.stale] == [f".{cache_key()}.partial-1-2"]
    assert [p.name for p in state.others] == ["shapes-0123456789abcdef"]
    gone = {p.name for p in clear_cache(cache)}
    assert gone == {cache_key(), f".{cache_key()}.partial-1-2", "shapes-0123456789abcdef"}
    assert (root / "unrelated").is_dir()


def test_unwritable_cache_location_is_one_error_line(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    code, out, err = finish(sorakit("generate", "a red circle", "--steps", "1", "--out", "v.gif", cache=blocker,
                                    cwd=tmp_path))
    assert code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "cache" in errors[0] and "SORAKIT_CACHE" in err
    assert not (tmp_path / "v.gif").exists()
