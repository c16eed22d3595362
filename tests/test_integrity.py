"""Bundle integrity covers what ONNX Runtime loads: the stdlib scan of a graph's external-data
references (checked against onnx's own parsing), the manifest's schema, and the refusal of a
graph re-pointed at a file its manifest does not vouch for."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import _get_all_tensors, set_external_data

from sorakit.bundle.io import Bundle, sha256_file
from sorakit.bundle.onnx_refs import ExternalRef, MalformedModel, external_refs, scan_bytes
from sorakit.errors import BundleError
from tests.conftest import copy_bundle

SHIPPED = Path(__file__).resolve().parents[1] / "sorakit" / "assets" / "shapes" / "bundle"


def onnx_refs(path: Path) -> list[tuple]:
    """The same question answered by onnx: every tensor with external data, in file order."""
    model = onnx.load(str(path), load_external_data=False)
    out = []
    for t in _get_all_tensors(model):
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            info = {e.key: e.value for e in t.external_data}
            out.append((t.name, info.get("location"), info.get("offset"), info.get("length"),
                        t.data_location == TensorProto.EXTERNAL))
    return out


def as_tuples(refs: list[ExternalRef]) -> list[tuple]:
    return [(r.tensor, r.location, r.offset, r.length, r.external) for r in refs]


def graph_files(*roots: Path) -> list[Path]:
    return sorted(p for r in roots for p in r.rglob("*.onnx"))


def test_scan_matches_onnx_on_real_bundle_graphs(tiny_bundle, optimized_tiny):
    files = graph_files(SHIPPED, tiny_bundle[0], optimized_tiny[0])
    assert len(files) > 40
    with_refs = 0
    for f in files:
        ours = as_tuples(external_refs(f))
        # onnx lists initializers before attribute tensors; the scan goes in file order
        assert sorted(ours, key=str) == sorted(onnx_refs(f), key=str), f
        with_refs += bool(ours)
    assert with_refs > 30  # the bundles keep their weights outside the graphs


def _external(t: TensorProto, location: str, offset: int, length: int) -> TensorProto:
    set_external_data(t, location, offset, length)
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("raw_data")
    return t


def crafted_model() -> onnx.ModelProto:
    """External data in every place a tensor can hide: an initializer, a Constant node's
    attribute, a subgraph (If branch) initializer, a sparse initializer, a model-local function."""
    w = _external(numpy_helper.from_array(np.ones((2, 2), np.float32), "w"), "w.bin", 0, 16)
    inline = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(2, 2), "inline")
    const = helper.make_node("Constant", [], ["c"], value=_external(
        numpy_helper.from_array(np.zeros(2, np.float32), "cval"), "const.bin", 64, 8))
    branch_init = _external(numpy_helper.from_array(np.ones(2, np.float32), "b_init"), "sub/branch.bin", 0, 8)
    out_then = helper.make_tensor_value_info("o", TensorProto.FLOAT, [2])
    then_g = helper.make_graph([helper.make_node("Identity", ["b_init"], ["o"])], "then", [], [out_then],
                               [branch_init])
    else_g = helper.make_graph([helper.make_node("Identity", ["c"], ["o"])], "else", [], [out_then])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    if_node = helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)
    sparse_vals = _external(numpy_helper.from_array(np.ones(2, np.float32), "sp"), "sparse.bin", 8, 8)
    sparse_idx = numpy_helper.from_array(np.array([0, 3], np.int64), "sp_idx")
    sparse = helper.make_sparse_tensor(sparse_vals, sparse_idx, [4])
    fn_const = helper.make_node("Constant", [], ["k"], value=_external(
        numpy_helper.from_array(np.ones(1, np.float32), "fk"), "fn.bin", 0, 4))
    fn = helper.make_function("local", "F", [], ["k"], [fn_const], [helper.make_opsetid("", 18)])
    g = helper.make_graph([const, if_node, helper.make_node("MatMul", ["w", "inline"], ["z"])], "g", [cond],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [w, inline],
                          sparse_initializer=[sparse])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)],
                             functions=[fn])


def test_scan_finds_external_data_wherever_a_tensor_hides():
    refs = as_tuples(scan_bytes(crafted_model().SerializeToString()))
    assert sorted(refs) == sorted([
        ("w", "w.bin", "0", "16", True),
        ("cval", "const.bin", "64", "8", True),
        ("b_init", "sub/branch.bin", "0", "8", True),
        ("sp", "sparse.bin", "8", "8", True),
        ("fk", "fn.bin", "0", "4", True),
    ])
    # onnx's own walk agrees on the tensors it covers (initializers, attributes, subgraphs, functions)
    model = crafted_model()
    theirs = {t.name for t in _get_all_tensors(model) if t.data_location == TensorProto.EXTERNAL}
    assert theirs <= {r[0] for r in refs} and {"w", "cval", "b_init", "fk"} <= theirs


def test_malformed_graph_bytes_are_refused_cleanly():
    good = crafted_model().SerializeToString()
    for bad in (b"", b"not an onnx model", good[: len(good) // 2], good[:-3], b"\x3a\xff\xff\xff\xff\x0f",
                b"\x08\x07"):  # the last: an ir_version and no graph
        with pytest.raises(MalformedModel):
            scan_bytes(bad)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_scan_never_fails_other_than_malformed(data):
    base = crafted_model().SerializeToString()
    choice = data.draw(st.sampled_from(["random", "truncate", "flip"]))
    if choice == "random":
        blob = data.draw(st.binary(max_size=300))
    elif choice == "truncate":
        blob = base[: data.draw(st.integers(0, len(base)))]
    else:
        i = data.draw(st.integers(0, len(base) - 1))
        blob = base[:i] + bytes([base[i] ^ data.draw(st.integers(1, 255))]) + base[i + 1 :]
    try:
        refs = scan_bytes(blob)
    except MalformedModel:
        return
    assert all(isinstance(r, ExternalRef) for r in refs)


# ------------------------------------------------------------------------------------------------
# re-pointed locations
# ------------------------------------------------------------------------------------------------
def _rewrite_graph(bundle: Path, rel: str, location: str, listed: bool = False) -> Path:
    """Point every external tensor of graph ``rel`` at ``location`` (next to it), holding other
    weights, and update the manifest so the graph's own checksum still matches (what a careful
    attacker does); the new data file is listed in the manifest only if ``listed``."""
    g = bundle / rel
    model = onnx.load(str(g), load_external_data=False)
    src = g.parent / (g.name + ".data")
    target = (g.parent / location)
    if target.parent.is_dir() and not target.exists():
        data = bytearray(src.read_bytes())
        data[:64] = bytes(64)  # other weights
        target.write_bytes(bytes(data))
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
    g.write_bytes(model.SerializeToString())
    mf = bundle / "manifest.json"
    m = json.loads(mf.read_text())
    m["files"][rel] = {"bytes": g.stat().st_size, "sha256": sha256_file(g)}
    if listed:
        new_rel = (Path(rel).parent / location).as_posix()
        m["files"][new_rel] = {"bytes": target.stat().st_size, "sha256": sha256_file(target)}
    mf.write_text(json.dumps(m))
    return g


@pytest.mark.parametrize("location,listed,message", [
    ("evil.data", False, "which the manifest does not list with a checksum"),
    ("evil.data", True, "which is not this graph's data file"),
    ("block_01.onnx.data", False, "which is not this graph's data file"),
    ("../../../../etc/passwd", False, "a path outside the bundle"),
    ("/etc/passwd", False, "a path outside the bundle"),
])
def test_repointed_external_data_is_refused(tiny_bundle, tmp_path, location, listed, message):
    b = copy_bundle(tiny_bundle[0], tmp_path / "b")
    _rewrite_graph(b, "transformer/block_00.onnx", location, listed)
    with pytest.raises(BundleError, match="transformer/block_00.onnx") as e:
        Bundle.open(b)
    assert message in str(e.value)
    res = subprocess.run([sys.executable, "-m", "sorakit", "inspect", str(b), "--verify"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("Error: ") and message in res.stderr and "verified" not in res.stdout


def test_offsets_past_the_data_file_are_refused(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle[0], tmp_path / "b")
    g = b / "transformer" / "block_00.onnx"
    model = onnx.load(str(g), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    for e in t.external_data:
        if e.key == "offset":
            e.value = str(10**9)
    g.write_bytes(model.SerializeToString())
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["transformer/block_00.onnx"] = {"bytes": g.stat().st_size, "sha256": sha256_file(g)}
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"reads bytes 1000000000\.\."):
        Bundle.open(b)


def test_corrupt_graph_with_matching_checksum_is_refused_at_open(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle[0], tmp_path / "b")
    g = b / "vae" / "spatial_tail.onnx"
    g.write_bytes(g.read_bytes()[:-40])
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["vae/spatial_tail.onnx"] = {"bytes": g.stat().st_size, "sha256": sha256_file(g)}
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="vae/spatial_tail.onnx is not a valid ONNX model"):
        Bundle.open(b)


def test_the_intact_bundles_pass(tiny_bundle, optimized_tiny, tmp_path):
    from sorakit.runtime.default_model import default_bundle

    for root in (tiny_bundle[0], optimized_tiny[0], default_bundle(tmp_path / "cache")):
        Bundle.open(root, verify="full")


# ------------------------------------------------------------------------------------------------
# manifest schema
# ------------------------------------------------------------------------------------------------
def _edit(m: dict, path: str, value) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        m = m[k] if not k.isdigit() else m[int(k)]
    if value is _DELETE:
        del m[keys[-1]]
    else:
        m[keys[-1]] = value


_DELETE = object()
SCHEMA_CASES = [
    ("files", [], "files must be an object"),
    ("geometry.height", _DELETE, "geometry lacks 'height'"),
    ("geometry.height", "64", "geometry.height must be an integer"),
    ("geometry.static", "yes", "geometry.static must be true or false"),
    ("sampler.num_steps", 0, "sampler.num_steps must be at least 1"),
    ("sampler.cfg_scale", "7", "sampler.cfg_scale must be a finite number"),
    ("tokenizer.max_length", -1, "tokenizer.max_length must be at least 1"),
    ("null_caption", "null_caption.npy", "null_caption must be an object"),
    ("preset.stdit.in_channels", "4", "preset.stdit.in_channels must be an integer"),
    ("preset.vae.shift", 1.0, "preset.vae.shift must be a list"),
    ("components.transformer.graphs", {}, "components['transformer'].graphs must be a list"),
    ("components.transformer.graphs.0.file", 7, "components['transformer'].graphs[0].file must be a non-empty string"),
    ("components.transformer.graphs.0.inputs.0.shape", [2, -1], "inputs[0].shape[1] must be a size"),
    ("components.vae.info.micro_frame_size", 0, "info.micro_frame_size must be at least 1"),
    ("passes", {"name": "x"}, "passes must be a list"),
]


@pytest.mark.parametrize("path,value,message", SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES])
def test_manifest_schema_names_the_field(tiny_bundle, tmp_path, path, value, message):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle[0], b)
    m = json.loads((b / "manifest.json").read_text())
    _edit(m, path, value)
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="manifest.json: ") as e:
        Bundle.open(b)
    assert message in str(e.value)


def test_file_record_without_bytes(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle[0], tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    del m["files"]["vae/spatial_tail.onnx"]["bytes"]
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"files\['vae/spatial_tail.onnx'\] lacks 'bytes'"):
        Bundle.open(b)
