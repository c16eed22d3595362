"""graph_passes: TDTM against the torch reference, weight sharing, exact prune, gated fp16/int8,
pinning, the manifest record, refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sorakit.bundle.io import Bundle, sha256_file
from sorakit.errors import SorakitError
from sorakit.export.exporter import WeightSource, build_piece
from sorakit.export.pieces import transformer_plan
from sorakit.export.tdtm import block_group_forward
from sorakit.graph_passes import tdtm as tdtm_mod
from sorakit.graph_passes.passes import prune_model
from sorakit.graph_passes.pipeline import optimize_bundle
from sorakit.presets import tiny_preset

PRESET = tiny_preset()


def _run_graph(path, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so)
    return s.run(None, feeds)[0]


def _torch_block(manifest, entry):
    geo = manifest.geometry
    spec = next(s for s in transformer_plan(PRESET, geo) if s.name == entry.name)
    return build_piece(spec, WeightSource("transformer", PRESET, None, manifest.export["seed"]), "random")


@pytest.mark.parametrize(
    "which,positions,scope",
    [("odd", "midpoint", "attention"), ("even", "midpoint", "attention"), ("odd", "compressed", "attention"),
     ("even", "compressed", "attention"), ("odd", "midpoint", "block"), ("even", "midpoint", "block")],
)
def test_tdtm_matches_torch_reference(tiny_bundle, tiny_transformer_even, tmp_path, which, positions, scope):
    src = tiny_bundle[0] if which == "odd" else tiny_transformer_even
    out = tmp_path / "b"
    optimize_bundle(src, out, "tdtm", settings={"tdtm": {"positions": positions, "scope": scope}},
                    gates={"tdtm": None})
    m = Bundle.open(out).manifest
    for entry in m.components["transformer"].by_role("block"):
        var = entry.variants["tdtm"]
        T = entry.inputs[0].shape[1]
        assert T == (5 if which == "odd" else 10)
        assert var.info["frames"] == T and var.info["merged_frames"] == T // 2 + T % 2
        assert var.info["flops_saved"] > 0 and var.flops < entry.flops and var.info["scope"] == scope
        # the MLPs hold most of a block's work: merging them too saves far more
        assert var.info["flops_saved"] / entry.flops > (0.3 if scope == "block" else 0.05)
        g = torch.Generator().manual_seed(3)
        args = [torch.randn(*entry.inputs[0].shape, generator=g), torch.randn(*entry.inputs[1].shape, generator=g),
                torch.zeros(*entry.inputs[2].shape), torch.randn(*entry.inputs[3].shape, generator=g)]
        args[2][..., 10:] = -1e4
        feeds = {t.name: a.numpy() for t, a in zip(entry.inputs, args)}
        got = _run_graph(out / var.file, feeds)
        module = _torch_block(m, entry)
        with torch.no_grad():
            want = block_group_forward(module, *args, mode=positions, scope=scope).numpy()
            other = block_group_forward(
                module, *args, mode=positions, scope="attention" if scope == "block" else "block"
            ).numpy()
            plain = module(*args).numpy()
        assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
        assert np.abs(got - plain).max() > 1e-2  # TDTM really changes the computation
        assert np.abs(got - other).max() > 1e-3  # and the scope matters


def test_reference_code_odd_t_fault_is_fixed():
    """Merge then unmerge keeps every frame count (the reference breaks at T = 5, 10, 14, 25)."""
    from sorakit.export.tdtm import TokenMerge

    for T in (1, 2, 5, 10, 14, 15, 20, 25):
        x = torch.randn(2, T, 3, 4)
        merged = TokenMerge.merge(x)
        assert merged.shape[1] == T // 2 + T % 2
        back = TokenMerge.unmerge_to(merged, T)
        assert back.shape == x.shape
        if T % 2:
            assert torch.equal(back[:, -1], x[:, -1])  # the odd last frame passes through


def test_tdtm_variant_shares_the_weight_file(optimized_tiny):
    out, _ = optimized_tiny
    m = Bundle.open(out, verify="full").manifest
    for entry in m.components["transformer"].by_role("block"):
        var = entry.variants["tdtm"]
        assert var.data == entry.data  # one external-data file for both graphs
        model = onnx.load(str(out / var.file), load_external_data=False)
        locations = {kv.value for i in model.graph.initializer for kv in i.external_data if kv.key == "location"}
        assert locations == {entry.data.rsplit("/", 1)[1]}
        assert (out / var.file).stat().st_size < (out / entry.data).stat().st_size


def test_prune_leaves_outputs_identical(optimized_tiny):
    _, report = optimized_tiny
    prune = next(r for r in report.records if r.name == "prune")
    assert prune.changes and all(c.max_abs_err is not None and c.max_abs_err <= 1e-5 for c in prune.changes)
    assert sum(c.nodes_before - c.nodes_after for c in prune.changes) > 0


def test_prune_on_a_hand_built_graph():
    model = onnx.parser.parse_model("""
        <ir_version: 9, opset_import: ["" : 18]>
        g (float[2, 3] x) => (float[2, 3] y) {
            s = Shape(x)
            n = ReduceProd<keepdims=0>(s)
            dead = Mul(x, x)
            c = Cast<to=1>(x)
            y = Add(c, x)
        }
    """)
    pruned = prune_model(model)
    ops = [n.op_type for n in pruned.graph.node]
    assert ops == ["Add"]  # Shape folded, dead Mul and ReduceProd dropped, identity Cast removed
    x = np.random.default_rng(0).standard_normal((2, 3), dtype=np.float32)
    a = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    b = ort.InferenceSession(pruned.SerializeToString()).run(None, {"x": x})[0]
    assert np.array_equal(a, b)


def test_precision_passes_within_their_gates(tiny_bundle, optimized_tiny, tmp_path):
    _, report = optimized_tiny
    int8 = next(r for r in report.records if r.name == "int8")
    assert int8.gate["passed"] and int8.gate["value"] >= 0.90 and "forced" not in int8.gate
    assert set(int8.gate["adherence"]) == {"colour", "shape", "direction"}
    tdtm = next(r for r in report.records if r.name == "tdtm")
    assert tdtm.gate["passed"]
    out = tmp_path / "fp16"
    rep = optimize_bundle(tiny_bundle[0], out, "fp16", gate_steps=10)
    fp16 = rep.records[0]
    assert fp16.gate["passed"] and fp16.gate["value"] >= 0.95
    m = Bundle.open(out).manifest
    block = m.components["transformer"].by_role("block")[0]
    model = onnx.load(str(out / block.file), load_external_data=False)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert all(i.data_type == onnx.TensorProto.FLOAT for i in
               onnx.load(str(out / m.components["text_encoder"].graphs[1].file), load_external_data=False).graph.initializer
               if len(i.dims) == 2)  # T5 stays fp32


def test_int8_quantizes_blocks_and_keeps_prologue_epilogue_fp32(optimized_tiny):
    out, _ = optimized_tiny
    transformer = Bundle.open(out).manifest.components["transformer"]

    def ops(role):
        return {n.op_type for g in transformer.by_role(role)
                for n in onnx.load(str(out / g.file), load_external_data=False).graph.node}

    assert "MatMulInteger" in ops("block")
    for role in ("prologue", "epilogue"):
        assert transformer.by_role(role) and "MatMulInteger" not in ops(role) and "MatMul" in ops(role), role


def test_failed_gate_is_refused_unless_forced(tiny_bundle, tmp_path):
    with pytest.raises(SorakitError, match="fails its quality gate"):
        optimize_bundle(tiny_bundle[0], tmp_path / "x", "int8", gates={"int8": 0.9999}, gate_steps=4)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    rep = optimize_bundle(tiny_bundle[0], tmp_path / "y", "int8", gates={"int8": 0.9999}, gate_steps=4, force=True)
    assert rep.records[0].gate["forced"]


def test_manifest_records_passes_and_input_untouched(tiny_bundle, optimized_tiny):
    src = tiny_bundle[0]
    before = {p.name: sha256_file(p) for p in src.rglob("*") if p.is_file()}
    out, _ = optimized_tiny
    m = json.loads((out / "manifest.json").read_text())
    assert [p["name"] for p in m["passes"]] == ["tdtm", "prune", "int8"]
    assert m["passes"][0]["settings"] == {"positions": "midpoint", "scope": "attention"}
    assert m["passes"][2]["gate"]["metric"] == "ssim"
    after = {p.name: sha256_file(p) for p in src.rglob("*") if p.is_file()}
    assert before == after


def test_optimized_bundle_runs_with_tdtm_steps(optimized_tiny):
    from sorakit.runtime import Pipeline

    pipe = Pipeline.from_bundle(optimized_tiny[0])
    r = pipe("a red circle", steps=6, tdtm_steps=3)
    assert r.frames.shape == (17, 64, 64, 3)
    used = {n for n in pipe.scheduler.stats.resident}
    assert any(n.endswith(".tdtm") for n in used) or r.memory.loads > 0


def test_refusals(tiny_bundle, optimized_tiny, tmp_path):
    with pytest.raises(SorakitError, match="applying it twice is refused"):
        optimize_bundle(optimized_tiny[0], tmp_path / "a", "tdtm")
    with pytest.raises(SorakitError, match="fp16 and int8 do not combine"):
        optimize_bundle(optimized_tiny[0], tmp_path / "b", "fp16")
    optimize_bundle(tiny_bundle[0], tmp_path / "pruned", "prune")
    with pytest.raises(SorakitError, match="'tdtm' must run before prune"):
        optimize_bundle(tmp_path / "pruned", tmp_path / "b", "tdtm")
    with pytest.raises(SorakitError, match="unknown pass 'turbo'"):
        optimize_bundle(tiny_bundle[0], tmp_path / "c", "turbo")
    with pytest.raises(SorakitError, match="already has static shapes"):
        optimize_bundle(tiny_bundle[0], tmp_path / "d", "pin", settings={"pin": {"resolution": (64, 64), "frames": 17}})
    with pytest.raises(SorakitError, match="must differ"):
        optimize_bundle(tiny_bundle[0], tiny_bundle[0], "prune")
    for d in "abcd":
        assert not (tmp_path / d).exists()
    epilogue = onnx.load(str(tiny_bundle[0] / "transformer" / "epilogue.onnx"), load_external_data=False)
    with pytest.raises(SorakitError, match="not a transformer block graph"):
        tdtm_mod.inject(epilogue)
    with pytest.raises(SorakitError, match="unknown TDTM scope"):
        tdtm_mod.inject(epilogue, scope="everything")


def test_pin_makes_a_dynamic_bundle_static(tmp_path):
    from sorakit.export.exporter import ExportSettings, export_bundle

    dyn = tmp_path / "dyn"
    export_bundle(ExportSettings(PRESET, 64, 64, 17, static=False, components=("transformer",), granularity="2",
                                 verify=False), dyn)
    out = tmp_path / "pinned"
    rep = optimize_bundle(dyn, out, "pin,tdtm", settings={"pin": {"resolution": (48, 64), "frames": 17}},
                          gates={"tdtm": None})
    m = Bundle.open(out).manifest
    assert m.static and m.geometry["height"] == 48 and m.geometry["latent"] == [5, 6, 8]
    for g in m.all_graphs():
        for t in g.inputs + g.outputs:
            assert all(isinstance(d, int) for d in t.shape), (g.name, t.name, t.shape)
        model = onnx.load(str(out / g.file), load_external_data=False)
        for i in model.graph.input:
            assert all(d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)
    pin = rep.records[0]
    assert all(c.max_abs_err is not None and c.max_abs_err < 1e-4 for c in pin.changes)
    assert "tdtm" in m.components["transformer"].by_role("block")[0].variants


def test_cli_optimize_exit_codes(tiny_bundle, tmp_path):
    bad = subprocess.run([sys.executable, "-m", "sorakit", "optimize", str(tiny_bundle[0]), "--passes", "nope",
                          "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown pass 'nope'" in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "sorakit", "optimize", str(tiny_bundle[0]), "--passes", "prune",
                         "--out", str(tmp_path / "o"), "--json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout)["passes"][0]["name"] == "prune"


def test_flops_count_5d_convs_behind_a_computed_pad(tmp_path):
    """Exporters write a causal pad's amounts as a computed chain; the FLOP count must see
    through it (it used to give 0 for every 3-D convolution of the temporal VAE)."""
    import torch

    from sorakit.graph_passes.flops import count_flops

    class CausalConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(2, 5, 3)

        def forward(self, x):
            return self.conv(torch.nn.functional.pad(x, (1, 1, 1, 1, 2, 0)))

    path = tmp_path / "causal.onnx"
    torch.onnx.export(CausalConv(), (torch.randn(1, 2, 3, 4, 4),), str(path), dynamo=False, opset_version=17)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Pad" in ops and "Conv" in ops
    # output [1, 5, 3, 4, 4]; each element is 2 x 27 multiply-adds
    assert count_flops(path) == 2 * (5 * 3 * 4 * 4) * (2 * 27)


@pytest.mark.parametrize("T", [1, 2, 5, 10])
def test_tdtm_mirrors_the_torch_reference(T):
    """graph_passes/tdtm.py writes in ONNX what export/tdtm.py and export/stdit3.rope_tables do in
    torch: merge/unmerge around a marked region, and the RoPE tables at merged positions."""
    from onnx import helper as oh

    from sorakit.export.stdit3 import rope_tables
    from sorakit.export.tdtm import TokenMerge

    S, C, mod = 3, 4, "spatial_blocks.0.attn"
    graph = oh.make_graph(
        [oh.make_node("Mul", ["x", "two"], [mod + tdtm_mod.TDTM_IN], name=f"/{mod}/in"),
         oh.make_node("Tanh", [mod + tdtm_mod.TDTM_IN], [mod + tdtm_mod.TDTM_OUT], name=f"/{mod}/tanh"),
         oh.make_node("Add", [mod + tdtm_mod.TDTM_OUT, "x"], ["y"], name="/residual")],
        "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, T, S, C])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, T, S, C])],
        [onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])
    model.ir_version = 9
    merged = tdtm_mod.inject(model).model
    x = np.random.default_rng(T).standard_normal((1, T, S, C)).astype(np.float32)
    got = ort.InferenceSession(merged.SerializeToString()).run(None, {"x": x})[0]
    xt = torch.from_numpy(x)
    want = (TokenMerge.unmerge_to(torch.tanh(TokenMerge.merge(xt * 2)), T) + xt).numpy()
    assert np.abs(got - want).max() <= 1e-6
    for mode in tdtm_mod.POSITIONS:
        freqs = torch.tensor([1.0, 0.1, 0.01])
        pos = tdtm_mod.merged_positions(T, mode)
        cos, sin = rope_tables(freqs, torch.from_numpy(pos))
        cos_np, sin_np = tdtm_mod.rope_tables_np(freqs.numpy(), pos)
        assert np.abs(cos.numpy() - cos_np).max() <= 1e-6 and np.abs(sin.numpy() - sin_np).max() <= 1e-6


def test_gate_counts_the_prompts_followed_before_and_after():
    """The gate's adherence counts come from the frames: a video whose object changes shape
    (or colour) after a pass loses that attribute, and the gate would refuse the pass."""
    from sorakit.adherence import parse_prompt
    from sorakit.graph_passes.pipeline import GATE_PROMPTS, adherence_counts
    from sorakit.train.data import MotionSpec, render

    def draw(prompt, shape=None, colour=None):
        i = parse_prompt(prompt)
        start = (16.0, 30.0) if i.direction == "right" else (30.0, 48.0)
        return render(colour or i.colour, shape or i.shape, i.direction, i.background, MotionSpec(12.0, 30.0, start))

    before = [draw(p) for p in GATE_PROMPTS]
    assert adherence_counts(GATE_PROMPTS, before, before) == {"colour": (2, 2), "shape": (2, 2), "direction": (2, 2)}
    after = [draw(GATE_PROMPTS[0], shape="diamond"), draw(GATE_PROMPTS[1], colour="cyan")]
    assert adherence_counts(GATE_PROMPTS, before, after) == {"colour": (2, 1), "shape": (2, 1), "direction": (2, 2)}
