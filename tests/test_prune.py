"""prune on onnxscript/onnx-ir: the same outputs as sorakit's former prune (frozen in
``legacy_prune.py``) on every graph of the tiny and shapes bundles, at least as many nodes
removed, and the bundle contract kept (weights untouched, I/O names, TDTM marks, IR version)."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from legacy_prune import legacy_prune_model

from sorakit.bundle.io import Bundle
from sorakit.errors import SorakitError
from sorakit.graph_passes import tdtm as tdtm_mod
from sorakit.graph_passes.pipeline import sample_inputs
from sorakit.graph_passes.prune import prune_model


def _session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _external(model):
    return {i.name: [(kv.key, kv.value) for kv in i.external_data]
            for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}


def _check_bundle(root, tmp_path):
    manifest = Bundle.open(root).manifest
    counts = {}
    for entry in manifest.all_graphs():
        src = root / entry.file
        model = onnx.load(str(src), load_external_data=False)
        new, old = prune_model(model), legacy_prune_model(model)
        # the contract: the weights are the same records in the same data file, nothing new inline
        # beyond small folded constants, the same inputs and outputs, the same IR version
        assert _external(new) == {k: v for k, v in _external(model).items() if k in _external(new)}, entry.name
        assert all(np.prod(i.dims) <= 1 << 16 for i in new.graph.initializer
                   if i.data_location != onnx.TensorProto.EXTERNAL), entry.name
        assert [i.name for i in new.graph.input] == [i.name for i in model.graph.input]
        assert [o.name for o in new.graph.output] == [o.name for o in model.graph.output]
        assert new.ir_version == model.ir_version <= 10
        assert tdtm_mod.boundaries(new) == tdtm_mod.boundaries(model), entry.name
        # the same outputs as the former prune and as the graph itself, on seeded inputs
        d = tmp_path / entry.name
        d.mkdir(parents=True)
        shutil.copy(root / entry.data, d / (root / entry.data).name)
        onnx.save(new, str(d / "new.onnx"))
        onnx.save(old, str(d / "old.onnx"))
        feeds = sample_inputs(entry, manifest)
        names = [o.name for o in entry.outputs]
        ref = _session(src).run(names, feeds)
        got_new = _session(d / "new.onnx").run(names, feeds)
        got_old = _session(d / "old.onnx").run(names, feeds)
        for r, a, b in zip(ref, got_new, got_old):
            scale = max(1.0, float(np.abs(r).max()))
            assert a.shape == b.shape == r.shape
            assert np.abs(a.astype(np.float64) - b).max() <= 1e-6 * scale, entry.name
            assert np.abs(a.astype(np.float64) - r).max() <= 1e-6 * scale, entry.name
        counts[entry.name] = (len(model.graph.node), len(old.graph.node), len(new.graph.node))
        shutil.rmtree(d)
    # at least as much removed as before, graph by graph
    assert all(new <= old for _, old, new in counts.values()), counts
    return counts


def test_prune_matches_the_former_prune_on_the_tiny_bundle(tiny_bundle, tmp_path):
    counts = _check_bundle(tiny_bundle[0], tmp_path)
    # what the former prune could not do: the epilogue's and prologue's reshapes/casts/constants
    # (tiny preset at the time of the change: prologue 137 -> 123 before, 73 now; epilogue 42 -> 42, 17)
    for name in ("transformer.prologue", "transformer.epilogue"):
        before, old, new = counts[name]
        assert new < old and new <= 0.6 * before, (name, counts[name])
    assert sum(c[2] for c in counts.values()) < 0.8 * sum(c[1] for c in counts.values())


def test_prune_matches_the_former_prune_on_the_shapes_bundle(shapes_random_bundle, tmp_path):
    counts = _check_bundle(shapes_random_bundle, tmp_path)
    assert sum(c[2] for c in counts.values()) < sum(c[1] for c in counts.values())


def test_prune_folds_static_shapes_and_never_weights():
    """Shape arithmetic folds (pin relies on it), a large weight behind foldable ops does not."""
    model = onnx.parser.parse_model("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2, 3] x) => (float[2, 3] y, float[3, 300] z) {
            s = Shape(x)
            n = ReduceProd<keepdims=0>(s)
            dead = Mul(x, x)
            c = Cast<to=1>(x)
            r = Reshape(c, s)
            y = Add(r, x)
            w2 = Mul(w, w)
            z = Identity(w2)
        }
    """)
    w = np.random.default_rng(0).standard_normal((3, 300), dtype=np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    model.graph.ClearField("value_info")
    from onnx.external_data_helper import convert_model_to_external_data

    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="w.data", size_threshold=0)
    pruned = prune_model(model)
    assert [n.op_type for n in pruned.graph.node] == ["Add", "Mul"]  # Shape/Cast/Reshape gone, w*w stays
    assert _external(pruned) == _external(model)
    assert [o.name for o in pruned.graph.output] == ["y", "z"]


def test_prune_refuses_to_change_a_weight_record():
    """The contract check fails loudly if the optimizer ever moved a weight."""
    from sorakit.graph_passes import prune as prune_mod

    model = onnx.parser.parse_model("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[3, 300] x) => (float[3, 300] y) { y = Add(x, w) }
    """)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((3, 300), np.float32), "w"))
    from onnx.external_data_helper import convert_model_to_external_data

    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="w.data", size_threshold=0)
    moved = onnx.ModelProto()
    moved.CopyFrom(model)
    for kv in moved.graph.initializer[0].external_data:
        if kv.key == "location":
            kv.value = "other.data"
    with pytest.raises(SorakitError, match="rewrite external weights"):
        prune_mod._check_contract(model, moved)


def test_text_tokens_runs_before_prune_and_refuses_after_it(tiny_bundle, tmp_path):
    """prune folds a small T5's position bias (a weight kept inline) into a constant of max_length
    tokens, which text_tokens cannot shorten: the two run in one pipeline, text_tokens first, and
    text_tokens refuses a pruned bundle instead of writing one that fails on short prompts."""
    from sorakit.graph_passes.pipeline import optimize_bundle
    from sorakit.runtime import Pipeline

    both = tmp_path / "both"
    optimize_bundle(tiny_bundle[0], both, "prune,text_tokens")
    assert [p["name"] for p in Bundle.open(both).manifest.passes] == ["text_tokens", "prune"]
    got = Pipeline.from_bundle(both)("a red circle", steps=2, seed=0)
    want = Pipeline.from_bundle(tiny_bundle[0])("a red circle", steps=2, seed=0)
    assert np.abs(got.latents - want.latents).max() <= 1e-4
    optimize_bundle(tiny_bundle[0], tmp_path / "pruned", "prune")
    with pytest.raises(SorakitError, match="'text_tokens' must run before prune"):
        optimize_bundle(tmp_path / "pruned", tmp_path / "late", "text_tokens")
    assert not (tmp_path / "late").exists()


def test_prune_and_tdtm_on_the_dynamo_exporters_graphs(tiny_transformer_dynamo, tmp_path):
    """The dynamo exporter writes graphs that verify against torch, keep the TDTM marks and
    prune exactly; tdtm refuses its static graphs by name (their reshape targets hold the frame
    count; the dynamic export then pinned takes it: tests/test_graph_passes.py)."""
    from sorakit.graph_passes.pipeline import optimize_bundle

    out, report = tiny_transformer_dynamo
    manifest = Bundle.open(out).manifest
    assert manifest.export["exporter"] == "dynamo"
    assert all(r.max_abs_err is not None and r.max_abs_err < 1e-4 for r in report.pieces)
    for g in manifest.components["transformer"].by_role("block"):
        assert len(tdtm_mod.boundaries(onnx.load(str(out / g.file), load_external_data=False))) == 6
    _check_bundle(out, tmp_path / "parity")
    rep = optimize_bundle(out, tmp_path / "opt", "prune")
    prune = next(r for r in rep.records if r.name == "prune")
    assert all(c.max_abs_err is not None and c.max_abs_err <= 1e-5 for c in prune.changes)
    with pytest.raises(SorakitError, match="dynamo exporter.*frame count") as e:
        optimize_bundle(out, tmp_path / "opt-tdtm", "tdtm", gates={"tdtm": None})
    assert "--exporter torchscript" in e.value.hint
    assert not (tmp_path / "opt-tdtm").exists() and not list(tmp_path.glob("opt-tdtm*"))
