"""The Core ML passes (fold_pad, conv3d_to_2d, split_dims, t5_embed_outside), the fp16 island levels,
the Neural-Engine report and the audit next to ORT's own checker.

Each pass: on hand-built graphs (op census after the pass, ORT parity), on the tiny bundle through
the pipeline (exact parity graph by graph, census), and on the shipped model with the Apple
profile (every graph clean; the video the same as before the exact passes).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sorakit.bundle.io import Bundle, file_record
from sorakit.devices.audit import audit_bundle, audit_model, compare_with_ort_checker
from sorakit.graph_passes.coreml import NotRewritable, conv3d_to_2d, fold_pads, lift_embedding, split_large_dims
from sorakit.graph_passes.pipeline import optimize_bundle

SORAKIT = [sys.executable, "-m", "sorakit"]
COREML = "fold_pad,conv3d_to_2d,split_dims,t5_embed_outside"


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*SORAKIT, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})


def model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    return m


def out(name: str) -> onnx.ValueInfoProto:
    v = onnx.ValueInfoProto()
    v.name = name
    v.type.tensor_type.elem_type = TensorProto.FLOAT
    return v


def run(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def census(m: onnx.ModelProto) -> dict[str, int]:
    c: dict[str, int] = {}
    for n in m.graph.node:
        c[n.op_type] = c.get(n.op_type, 0) + 1
    return c


def conv_ranks(m: onnx.ModelProto) -> set[int]:
    inits = {i.name: i for i in m.graph.initializer}
    return {len(inits[n.input[1]].dims) for n in m.graph.node if n.op_type == "Conv"}


RNG = np.random.default_rng(0)


def causal_conv3d(kt: int, kh: int, kw: int, stride: int = 1, c: int = 6, m: int = 5, shape=(1, 6, 5, 7, 9),
                  bias: bool = True, pad_value: float | None = None) -> onnx.ModelProto:
    """Open-Sora's CausalConv3d as the exporter writes it: a zero Pad (time at the front), then Conv."""
    tp = kt - 1 + (1 - stride)
    w = RNG.standard_normal((m, c, kt, kh, kw)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.array([0, 0, tp, kh // 2, kw // 2, 0, 0, 0, kh // 2, kw // 2], np.int64),
                                     "pads")]
    pad_in = ["x", "pads", ""]  # torch's exporter names no constant_value (which also keeps ORT's PadFusion off)
    if pad_value is not None:
        pad_in[2] = "value"
        inits.append(numpy_helper.from_array(np.array(pad_value, np.float32), "value"))
    conv_in = ["xp", "w"]
    if bias:
        inits.append(numpy_helper.from_array(RNG.standard_normal(m).astype(np.float32), "b"))
        conv_in.append("b")
    nodes = [helper.make_node("Pad", pad_in, ["xp"], name="pad", mode="constant"),
             helper.make_node("Conv", conv_in, ["y"], name="conv3d", strides=[stride, 1, 1],
                              kernel_shape=[kt, kh, kw])]
    return model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))], [out("y")], inits)


# ---------------------------------------------------------------------------------------------
# hand-built graphs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kt,kh,kw,stride", [(3, 3, 3, 1), (3, 3, 3, 2), (1, 1, 1, 1), (3, 1, 1, 1), (1, 3, 3, 1)])
def test_conv3d_to_2d_on_hand_built_graphs(kt, kh, kw, stride):
    m = causal_conv3d(kt, kh, kw, stride)
    x = RNG.standard_normal((1, 6, 5, 7, 9)).astype(np.float32)
    ref = run(m, {"x": x})[0]
    before = audit_model(m, "iphone-15-pro")
    assert not before.clean and {"conv3d", "op"} <= set(before.reason_counts())
    new, n = conv3d_to_2d(m)
    assert n == 1
    got = run(new, {"x": x})[0]
    assert got.shape == ref.shape and float(np.abs(got - ref).max()) < 1e-4
    ops = census(new)
    assert "Pad" not in ops and conv_ranks(new) == {4} and ops["Conv"] == 1
    if (kt, kh, kw) == (1, 1, 1):
        assert set(ops) == {"Reshape", "Conv"}  # pointwise: no transpose, no time slices
    else:
        assert ops["Transpose"] == 2
    if kt > 1:
        # the causal padding is a Concat with constant zeros, the taps are Slices
        assert ops["Concat"] >= 1 and ops.get("Slice", 0) >= 1
        zeros = [i for i in new.graph.initializer if i.name.startswith("coreml.zeros")]
        assert zeros and all(not numpy_helper.to_array(z).any() for z in zeros)
    after = audit_model(new, "iphone-15-pro")
    assert after.clean and after.partitions == 1, [(f.node, [r.detail for r in f.reasons]) for f in after.fallbacks]


def test_fold_pad_into_conv_and_as_concat():
    # a zero Pad before a 2-D Conv folds into its pads; a Pad before anything else becomes a Concat
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.array([0, 0, 2, 1, 0, 0, 0, 1], np.int64), "p1"),
             numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 0, 0, 2], np.int64), "p2"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [helper.make_node("Pad", ["x", "p1"], ["xp"], name="pad_conv"),
             helper.make_node("Conv", ["xp", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Pad", ["c", "p2", "half"], ["cp"], name="pad_relu"),
             helper.make_node("Relu", ["cp"], ["y"], name="relu")]
    m = model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])], [out("y")], inits)
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    ref = run(m, {"x": x})[0]
    new, folded, concat = fold_pads(m)
    assert (folded, concat) == (1, 1)
    ops = census(new)
    assert "Pad" not in ops and ops["Concat"] == 2  # the second Pad pads two axes
    conv = next(n for n in new.graph.node if n.op_type == "Conv")
    assert list(next(a for a in conv.attribute if a.name == "pads").ints) == [3, 2, 1, 2]
    got = run(new, {"x": x})[0]
    assert np.array_equal(got, ref)  # padding is exact
    assert audit_model(new, "iphone-15-pro").clean


def test_split_dims_groupnorm_flattening():
    shape = [1, 512, 5, 18, 32]  # the temporal VAE at 144x256: groups of 16*5*18*32 = 46080 values
    inits = [numpy_helper.from_array(np.array([1, 32, -1], np.int64), "s1"),
             numpy_helper.from_array(np.ones(32, np.float32), "one"),
             numpy_helper.from_array(np.zeros(32, np.float32), "zero"),
             numpy_helper.from_array(np.array(shape, np.int64), "s2")]
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["flat"], name="flatten"),
             helper.make_node("InstanceNormalization", ["flat", "one", "zero"], ["normed"], name="norm",
                              epsilon=1e-6),
             helper.make_node("Reshape", ["normed", "s2"], ["y"], name="unflatten")]
    m = model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)], [out("y")], inits)
    before = audit_model(m, "iphone-15-pro")
    assert before.reason_counts().get("dim") == 2 and not before.clean
    x = (RNG.standard_normal(shape) * 3 + 1).astype(np.float32)
    ref = run(m, {"x": x})[0]
    new, n = split_large_dims(m)
    assert n == 1
    target = next(numpy_helper.to_array(i) for i in new.graph.initializer if i.name.startswith("flatten"))
    assert target.tolist() == [1, 32, 80, 576] and max(target) <= 16384
    assert np.abs(run(new, {"x": x})[0] - ref).max() < 1e-4
    assert audit_model(new, "iphone-15-pro").clean


def test_lift_embedding():
    table = RNG.standard_normal((50, 8)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["emb"], name="lookup"),
             helper.make_node("Relu", ["emb"], ["y"], name="relu")]
    m = model(nodes, [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 6])], [out("y")],
              [numpy_helper.from_array(table, "table")])
    ids = np.array([[3, 1, 4, 1, 5, 9]], np.int64)
    new, got_table = lift_embedding(m)
    assert np.array_equal(got_table, table) and "Gather" not in census(new) and not new.graph.initializer
    assert [i.name for i in new.graph.input] == ["inputs_embeds"]
    assert np.array_equal(run(new, {"inputs_embeds": table[ids]})[0], run(m, {"input_ids": ids})[0])


def test_passes_refuse_what_they_cannot_rewrite():
    """Bad input: the pass names the node and why; nothing is half-rewritten."""
    m = causal_conv3d(3, 3, 3)
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    conv.attribute.append(helper.make_attribute("group", 2))
    w = next(i for i in m.graph.initializer if i.name == "w")
    w.CopyFrom(numpy_helper.from_array(RNG.standard_normal((6, 3, 3, 3, 3)).astype(np.float32), "w"))
    b = next(i for i in m.graph.initializer if i.name == "b")
    b.CopyFrom(numpy_helper.from_array(RNG.standard_normal(6).astype(np.float32), "b"))
    before = m.SerializeToString()
    with pytest.raises(NotRewritable, match=r"node conv3d \(Conv\): grouped 3-D convolution \(group=2\)"):
        conv3d_to_2d(m)
    assert m.SerializeToString() == before
    reflect = causal_conv3d(3, 3, 3)
    next(n for n in reflect.graph.node if n.op_type == "Pad").attribute[0].s = b"reflect"
    with pytest.raises(NotRewritable, match=r"node pad \(Pad\): Pad in 'reflect' mode"):
        fold_pads(reflect)
    # a dimension over the limit in an op no rewrite covers
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="wide_relu")]
    wide = model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 20000])], [out("y")])
    with pytest.raises(NotRewritable, match=r"node wide_relu \(Relu\): input 'x' has the shape \[1, 20000\]"):
        split_large_dims(wide)


# ---------------------------------------------------------------------------------------------
# bundles
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_coreml(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml") / "tiny-coreml"
    report = optimize_bundle(tiny_bundle[0], out, COREML)
    return out, report


def test_tiny_bundle_passes_are_exact_and_clean(tiny_bundle, tiny_coreml):
    out, report = tiny_coreml
    recs = {r.name: r for r in report.records}
    assert set(recs) == set(COREML.split(","))
    rewritten = {c.graph for r in report.records for c in r.changes if c.replaced is not None}
    temporal = [g.name for g in Bundle.open(tiny_bundle[0]).manifest.components["vae"].by_role("temporal")]
    assert set(temporal) <= {c.graph for c in recs["conv3d_to_2d"].changes}
    assert {c.graph for c in recs["t5_embed_outside"].changes} == {"text_encoder.embed"}
    for r in report.records:
        for c in r.changes:
            assert c.max_abs_err is not None and c.max_abs_err <= 1e-4, (r.name, c.graph, c.max_abs_err)
    assert rewritten
    b = Bundle.open(out, verify="full")
    m = b.manifest
    src = Bundle.open(tiny_bundle[0])
    for g in m.all_graphs():
        g_model = onnx.load(str(b.path(g.file)), load_external_data=False)
        ops = census(g_model)
        assert "Pad" not in ops, (g.name, ops)
        assert conv_ranks(g_model) <= {3, 4}, g.name  # no 3-D convolution left
    # the token lookup left the graph; the position-bias lookup (constant buckets, folded by ORT) stays
    before = census(onnx.load(str(src.path(src.manifest.graph("text_encoder.embed").file)), load_external_data=False))
    after = census(onnx.load(str(b.path(m.graph("text_encoder.embed").file)), load_external_data=False))
    assert after.get("Gather", 0) == before["Gather"] - 1
    assert m.components["text_encoder"].info["embedding_file"] == "text_encoder/embedding.npy"
    assert [t.name for t in m.graph("text_encoder.embed").inputs] == ["inputs_embeds", "attention_mask"]
    rep = audit_bundle(out, "iphone-15-pro")
    assert rep.clean, [(a.graph, a.fallback_ops()) for a in rep.dirty()]


def test_exact_passes_keep_the_video(tiny_bundle, tiny_coreml):
    """End to end: the whole pipeline on the rewritten bundle makes the same video."""
    from sorakit.runtime.pipeline import Pipeline

    frames = []
    for root in (tiny_bundle[0], tiny_coreml[0]):
        with Pipeline.from_bundle(root, memory_budget="unlimited") as pipe:
            r = pipe("a red circle moving right", steps=4, seed=0)
        frames.append(r.frames.astype(np.int16))
        lat = r.latents
    assert frames[0].shape == frames[1].shape
    assert int(np.abs(frames[0] - frames[1]).max()) <= 1, "exact passes changed the video"
    assert np.isfinite(lat).all()


def test_pass_leaves_a_graph_it_cannot_rewrite_unchanged(tiny_bundle, tmp_path):
    """A Pad in reflect mode: fold_pad leaves that graph as it was and says which node and why."""
    src = tmp_path / "src"
    shutil.copytree(tiny_bundle[0], src)
    data = json.loads((src / "manifest.json").read_text())
    entry = next(g for g in data["components"]["vae"]["graphs"] if g["name"] == "vae.temporal.tail")
    path = src / entry["file"]
    g = onnx.load(str(path), load_external_data=False)
    pad = next(n for n in g.graph.node if n.op_type == "Pad")
    pad.attribute.append(helper.make_attribute("mode", "edge")) if not pad.attribute else None
    for a in pad.attribute:
        if a.name == "mode":
            a.s = b"edge"
    onnx.save(g, str(path))
    data["files"][entry["file"]] = file_record(path)
    (src / "manifest.json").write_text(json.dumps(data, indent=1))
    res = run_cli("optimize", src, "--passes", "fold_pad", "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "vae.temporal.tail left unchanged: node" in res.stderr and "'edge' mode" in res.stderr
    out = Bundle.open(tmp_path / "out")
    tail = out.manifest.graph("vae.temporal.tail")
    assert tail.file == entry["file"]
    assert (tmp_path / "out" / tail.file).read_bytes() == path.read_bytes()
    assert out.manifest.graph("vae.temporal.stem").file.endswith(".nopad.onnx")


def test_optimize_default_bundle_for_iphone_then_audit_clean(tmp_path):
    """The first step with a device profile on the bundle sorakit ships (it already carries tdtm): the
    profile's other passes apply, and every graph of the result is one Core ML partition."""
    from sorakit.runtime.default_model import default_bundle

    src = default_bundle(cache_dir=tmp_path / "cache")
    out = tmp_path / "apple"
    res = run_cli("optimize", src, "--device", "iphone-15-pro", "--out", out, "--gate-steps", "6")
    assert res.returncode == 0, res.stderr
    assert "already carries tdtm" in res.stderr
    m = Bundle.open(out).manifest
    applied = [p["name"] for p in m.passes]
    assert applied == ["tdtm", "prune", "fold_pad", "conv3d_to_2d", "split_dims", "t5_embed_outside", "fp16"]
    fp16 = m.passes[-1]
    assert fp16["gate"]["passed"] and fp16["settings"]["islands"] in ("none", "norms", "safe")
    audit = run_cli("audit", out, "--device", "iphone-15-pro", "--strict", "--json")
    assert audit.returncode == 0, audit.stdout[-3000:]
    data = json.loads(audit.stdout)
    assert data["clean"] and data["graphs_clean"] == len(data["graphs"])
    ane = {g["graph"]: g["neural_engine"] for g in data["graphs"]}
    # the text encoder and the transformer's prologue/epilogue stay fp32 on purpose, and say so
    assert not ane["text_encoder.layer.00"]["eligible"]
    assert any("T5" in w for w in ane["text_encoder.layer.00"]["why_not"])
    if fp16["settings"]["islands"] == "none":
        assert ane["transformer.block.00"]["eligible"] and ane["vae.temporal.stem"]["eligible"], ane


# ---------------------------------------------------------------------------------------------
# the audit next to ORT's checker, Neural-Engine eligibility
# ---------------------------------------------------------------------------------------------
def test_audit_against_ort_checker(tiny_bundle, tiny_coreml):
    """ORT's check_onnx_model_mobile_usability (ML Program) and sorakit's audit on a transformer block and a
    temporal VAE graph: ORT's checker counts by op type only, so it takes the 3-D convolutions sorakit
    rejects; after the passes both agree."""
    b = Bundle.open(tiny_bundle[0])
    block = compare_with_ort_checker(b.path(b.manifest.graph("transformer.block.00").file), "iphone-15-pro")
    assert block.ort_on_ep == block.sorakit_on_ep == block.ort_nodes and block.ort_partitions == 1
    assert block.only_sorakit_rejects == {} and block.only_ort_rejects == 0
    vae = compare_with_ort_checker(b.path(b.manifest.graph("vae.temporal.stem").file), "iphone-15-pro")
    assert vae.only_sorakit_rejects.get("conv3d", 0) >= 1 and "ai.onnx:Pad" in vae.ort_unsupported_ops
    assert vae.sorakit_on_ep < vae.ort_on_ep and vae.only_ort_rejects == 0
    o = Bundle.open(tiny_coreml[0])
    after = compare_with_ort_checker(o.path(o.manifest.graph("vae.temporal.stem").file), "iphone-15-pro")
    assert after.ort_on_ep == after.sorakit_on_ep == after.ort_nodes and after.ort_partitions == 1
    cli = run_cli("audit", tiny_bundle[0], "--compare-ort", "--graph", "vae.temporal.stem", "--json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)[0]["only_sorakit_rejects"]["conv3d"] >= 1


def test_neural_engine_eligibility_reasons():
    """fp32 compute, fp32 islands, a graph off the EP: each is named; an fp16 graph with fp32 I/O is eligible."""
    w = RNG.standard_normal((8, 8)).astype(np.float16)
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["x16", "w"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT)]
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])], [helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, [4, 8])]
    fp16 = model(nodes, *io, [numpy_helper.from_array(w, "w")])
    a = audit_model(fp16, "iphone-15-pro")
    assert a.clean and a.neural_engine.eligible and a.neural_engine.fp16_nodes == 2
    island = model([nodes[0], nodes[1], helper.make_node("Cast", ["h"], ["h32"], to=TensorProto.FLOAT),
                    helper.make_node("Softmax", ["h32"], ["y"])], *io, [numpy_helper.from_array(w, "w")])
    a = audit_model(island, "iphone-15-pro")
    assert not a.neural_engine.eligible and a.neural_engine.fp32_nodes == {"Softmax": 1}
    assert any(w.startswith("fp32 islands") for w in a.neural_engine.why_not)
    fp32 = model([helper.make_node("Relu", ["x"], ["y"])], *io)
    a = audit_model(fp32, "iphone-15-pro")
    assert not a.neural_engine.eligible and "apply the fp16 pass" in " ".join(a.neural_engine.why_not)
    assert audit_model(fp16, "cpu").neural_engine is None


# ---------------------------------------------------------------------------------------------
# packages a phone can load; placement on the device
# ---------------------------------------------------------------------------------------------
def test_apple_package_embeds_weights_names_placement_and_limits(tiny_coreml, tmp_path):
    from sorakit.devices.package import PackageError, package_bundle
    from sorakit.devices.placement import check_placement
    from sorakit.errors import SorakitError
    from sorakit.profiles import PROFILE_DIR

    out = tmp_path / "pkg"
    m = package_bundle(tiny_coreml[0], "iphone-15-pro", out, verify=False).manifest
    limits = " ".join(lim["what"] for lim in m["weights"]["limits"])
    assert m["weights"]["embedded"] and "FlatBuffers" in limits and "max_model_bytes" in limits
    files = [p for p in (out / "models").rglob("*") if p.is_file()]
    assert files and all(p.suffix == ".ort" for p in files)  # no external data next to any graph
    assert set(m["placement"]) == {"CoreMLExecutionProvider"}  # as the audit predicts: every graph whole on Core ML
    for comp in m["components"].values():
        for g in comp["graphs"]:
            assert g["audit"]["placement"]["runs_on"] == "CoreMLExecutionProvider", g["name"]
    with pytest.raises(SorakitError, match="no CoreMLExecutionProvider.*on a Mac"):
        check_placement(out)  # Linux: only a Mac or the phone can tell
    # a device whose Core ML takes smaller models: refused before anything is written, the limit named
    small = tmp_path / "small-phone.toml"
    small.write_text((PROFILE_DIR / "iphone-15-pro.toml").read_text()
                     .replace('name = "iphone-15-pro"', 'name = "small-phone"')
                     .replace('max_model_bytes = "1GB"', 'max_model_bytes = "20kB"'))
    with pytest.raises(PackageError, match=r"over the 20kB per-model limit of Core ML on small-phone.*max_model_bytes"):
        package_bundle(tiny_coreml[0], str(small), tmp_path / "pkg2", audit=False, verify=False)
    assert not (tmp_path / "pkg2").exists()


def test_placement_on_this_machine_matches_the_audit(tiny_bundle, tmp_path):
    """What ORT really assigns (record_ep_graph_assignment_info) next to the audit: on Linux for the CPU device;
    the same check runs on a Mac for Core ML."""
    from sorakit.devices.package import package_bundle
    from sorakit.devices.placement import check_placement

    rows = check_placement(tiny_bundle[0], "cpu", only=["transformer.block.00", "vae.temporal.stem"])
    assert [r.graph for r in rows] == ["transformer.block.00", "vae.temporal.stem"]
    assert all(r.matches for r in rows) and all(set(r.nodes) == {"CPUExecutionProvider"} for r in rows)
    assert all(r.nodes["CPUExecutionProvider"] == r.predicted["nodes"]["CPUExecutionProvider"] for r in rows)
    cli = run_cli("placement", tiny_bundle[0], "--device", "cpu", "--graph", "transformer.block.00", "--json",
                  "--strict")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)[0]["matches"] is True
    # a package: the .ort files as the app loads them (ORT records nothing for ORT-format files on the CPU EP)
    out = tmp_path / "cpu-pkg"
    package_bundle(tiny_bundle[0], "cpu", out, verify=False)
    rows = check_placement(out, only=["transformer.block.00"])
    assert rows[0].predicted["runs_on"] == "CPUExecutionProvider" and rows[0].matches in (True, None)
    core = run_cli("placement", tiny_bundle[0], "--device", "iphone-15-pro", "--graph", "vae")
    assert core.returncode == 1 and "no CoreMLExecutionProvider" in core.stderr


# ---------------------------------------------------------------------------------------------
# the Core ML path: fp16 with the fp16 pass's gate, TDTM variants
# ---------------------------------------------------------------------------------------------
def test_coreml_path_fp16_gate_and_tdtm_variant(tmp_path):
    pytest.importorskip("coremltools")
    import dataclasses

    from sorakit.errors import VerificationError
    from sorakit.export.coreml import CoreMLSettings, export_coreml, package_spec
    from sorakit.runtime.default_model import SHIPPED, default_bundle

    like = default_bundle(cache_dir=tmp_path / "cache")
    s = CoreMLSettings(like=like, checkpoints={c: SHIPPED / c for c in ("text_encoder", "transformer", "vae")},
                       only=("transformer.block.00",), gate_steps=6, numeric_check=False)
    rep = export_coreml(s, tmp_path / "cm")
    assert rep.gate["passed"] and rep.gate["value"] >= 0.95 and rep.gate["finite"], rep.gate
    assert [p.name for p in rep.pieces] == ["transformer.block.00", "transformer.block.00.tdtm"]
    manifest = json.loads((tmp_path / "cm" / "coreml_manifest.json").read_text())
    block = manifest["components"]["transformer"]["graphs"][0]
    variant = block["variants"]["tdtm"]
    assert variant["file"] == "transformer/block_00.tdtm.mlpackage" and manifest["tdtm"]["available"]
    assert package_spec(tmp_path / "cm" / variant["file"]) == package_spec(tmp_path / "cm" / block["file"])
    assert manifest["fp16_gate"]["value"] == rep.gate["value"]
    # a gate the emulated fp16 cannot reach refuses the conversion; nothing is written
    with pytest.raises(VerificationError, match="fp16 compute precision fails its quality gate"):
        export_coreml(dataclasses.replace(s, gate=1.0), tmp_path / "cm2")
    assert not (tmp_path / "cm2").exists()
