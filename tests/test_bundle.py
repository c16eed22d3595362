"""Bundle round trip and validation errors."""

from __future__ import annotations

import json
import os

import pytest
from conftest import copy_bundle

from sorakit.bundle.io import Bundle
from sorakit.bundle.manifest import FORMAT_VERSION, Manifest
from sorakit.errors import BundleError


def test_manifest_round_trip(tiny_bundle):
    out, _ = tiny_bundle
    b = Bundle.open(out, verify="full")
    m = b.manifest
    again = Manifest.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again.to_dict() == m.to_dict()
    assert set(m.components) == {"text_encoder", "transformer", "vae"}
    roles = [g.role for g in m.components["transformer"].graphs]
    assert roles == ["prologue", "block", "block", "epilogue"]
    block = m.components["transformer"].graphs[1]
    assert block.data == block.file + ".data" and block.params > 0
    assert block.inputs[0].shape == [2, 5, 16, 64] and block.outputs[0].binds == "tokens"
    assert m.passes == [] and m.format_version == FORMAT_VERSION
    assert m.sampler["num_steps"] == 30 and m.sampler["cfg_scale"] == 7.0
    assert m.export["tools"]["onnxruntime"] and m.export["opset"] == 18
    for rel, rec in m.files.items():
        assert (out / rel).stat().st_size == rec["bytes"]


def test_missing_file(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle[0], tmp_path / "b")
    (b / "transformer" / "block_01.onnx.data").unlink()
    with pytest.raises(BundleError, match="missing transformer/block_01.onnx.data"):
        Bundle.open(b)


def test_bad_checksum_named(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle[0], tmp_path / "b")
    p = b / "transformer" / "block_00.onnx.data"
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF  # same size, different content
    p.write_bytes(bytes(data))
    bundle = Bundle.open(b)  # sizes match: lazy mode opens
    with pytest.raises(BundleError, match="transformer/block_00.onnx.data is corrupt"):
        bundle.verify_all()
    with pytest.raises(BundleError, match="corrupt"):
        Bundle.open(b, verify="full")


def test_truncated_file(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle[0], tmp_path / "b")
    p = b / "vae" / "spatial_tail.onnx"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(BundleError, match="truncated"):
        Bundle.open(b)


def _edit_manifest(b, fn):
    mf = b / "manifest.json"
    d = json.loads(mf.read_text())
    fn(d)
    mf.write_text(json.dumps(d))


def test_unknown_format_version(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle[0], tmp_path / "b")
    _edit_manifest(b, lambda d: d.update(format_version=99))
    with pytest.raises(BundleError, match="format version 99"):
        Bundle.open(b)


@pytest.mark.parametrize("bad", ["../outside.onnx", "/etc/passwd", "transformer/../../x.onnx"])
def test_path_escaping_the_bundle(tiny_bundle, tmp_path, bad):
    b = copy_bundle(tiny_bundle[0], tmp_path / "b")

    def edit(d):
        g = d["components"]["vae"]["graphs"][0]
        old = g["file"]
        g["file"] = bad
        d["files"][bad] = d["files"].pop(old)

    _edit_manifest(b, edit)
    with pytest.raises(BundleError, match="escapes the bundle directory"):
        Bundle.open(b)


def test_symlink_escaping_the_bundle(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle[0], tmp_path / "b")
    outside = tmp_path / "outside.onnx"
    target = b / "vae" / "spatial_tail.onnx"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    os.symlink(outside, target)
    with pytest.raises(BundleError, match="escapes the bundle directory"):
        Bundle.open(b)


def test_not_a_bundle_and_incomplete(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.open(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(BundleError, match="not a sorakit bundle"):
        Bundle.open(tmp_path / "plain")
    (tmp_path / "half.partial").mkdir()
    with pytest.raises(BundleError, match="incomplete"):
        Bundle.open(tmp_path / "half")


def test_unlisted_file_reference(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle[0], tmp_path / "b")
    _edit_manifest(b, lambda d: d["files"].pop("null_caption.npy"))
    with pytest.raises(BundleError, match="not listed with a checksum"):
        Bundle.open(b)
