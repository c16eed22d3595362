"""The speed levers of the runtime, each held to parity or to its gate (issue 17).

Not timed: what is checked is that each lever computes what it should. Speed is measured by
``benchmarks/e2e_real.py`` and ``sorakit bench``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sorakit.errors import SorakitError
from sorakit.graph_passes.pipeline import optimize_bundle
from sorakit.metrics import video_ssim
from sorakit.runtime.pipeline import Pipeline

PROMPT = "a red circle moving right"


@pytest.fixture(scope="session")
def shipped(tmp_path_factory) -> Path:
    """The shipped model's bundle, assembled into a private cache (no torch involved)."""
    from sorakit.runtime.default_model import default_bundle

    return default_bundle(cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def levers_bundle(shipped, tmp_path_factory) -> Path:
    """The shipped bundle with the CPU levers: text encoder and cross-attention on the prompt's
    tokens, int8 variants."""
    out = tmp_path_factory.mktemp("bundles") / "levers"
    optimize_bundle(shipped, out, ["text_tokens", "caption_tokens", "int8"], settings={"int8": {"variant": True}},
                    gates={"int8": 0.9}, gate_steps=10)
    return out


def test_caption_tokens_is_exact_and_feeds_the_transformer_the_prompts_tokens(shipped, levers_bundle):
    """The transformer's caption axis is dynamic in the prologue, every block and every variant;
    a generation feeds it the prompt's tokens only (a batch: the longest prompt's) and computes
    the video of the padded caption (fp32), also with guidance and with a batch of prompts."""
    from sorakit.bundle.io import Bundle

    tr = Bundle.open(levers_bundle).manifest.components["transformer"].graphs
    for g in tr:
        for e in [g, *g.variants.values()]:
            for t in e.inputs:
                if t.name in ("y", "y_mask", "y_proj"):
                    assert t.shape[1] == "text_tokens", (e.name, t.name)
    record = next(p for p in Bundle.open(levers_bundle).manifest.passes if p["name"] == "caption_tokens")
    assert all(g["max_abs_err"] < 1e-5 for g in record["graphs"])
    a = Pipeline.from_bundle(shipped, precision="fp32")
    b = Pipeline.from_bundle(levers_bundle, precision="fp32")
    seen = []
    run = b.scheduler.run_chain

    def spy(chain, ctx, then=None):
        if "y" in ctx:
            seen.append((ctx["y"].shape[1], ctx["y_mask"].shape[1], int(ctx["y_mask"].sum(axis=1).max())))
        return run(chain, ctx, then)

    b.scheduler.run_chain = spy
    prompts = [PROMPT, "a big blue square"]
    ra, rb = a(prompts, steps=5, seed=2, cfg=4.0), b(prompts, steps=5, seed=2, cfg=4.0)
    full = a.manifest.tokenizer["max_length"]
    assert seen and all(n == m == longest < full for n, m, longest in seen), seen
    np.testing.assert_allclose(rb.latents, ra.latents, atol=1e-4)
    assert np.abs(rb.frames.astype(int) - ra.frames.astype(int)).max() <= 1


def test_text_tokens_is_exact_and_runs_on_the_prompts_tokens(shipped, levers_bundle):
    from sorakit.bundle.io import Bundle

    te = Bundle.open(levers_bundle).manifest.components["text_encoder"].graphs
    assert te[0].inputs[0].shape[1] == "text_tokens"
    record = next(p for p in Bundle.open(levers_bundle).manifest.passes if p["name"] == "text_tokens")
    assert all(g["max_abs_err"] < 1e-5 for g in record["graphs"])  # verified at the full length by the pipeline
    a = Pipeline.from_bundle(shipped, precision="fp32")
    b = Pipeline.from_bundle(levers_bundle, precision="fp32")
    lengths = []
    run = b.scheduler.run_chain

    def spy(chain, ctx, then=None):
        if "input_ids" in ctx and chain is b.te_graphs:
            lengths.append(ctx["input_ids"].shape[1])
        return run(chain, ctx, then)

    b.scheduler.run_chain = spy
    ra, rb = a(PROMPT, steps=6, seed=1), b(PROMPT, steps=6, seed=1)
    assert lengths and lengths[0] < a.tokenizer.max_length  # the prompt's tokens, not the padding
    assert np.abs(ra.latents - rb.latents).max() < 1e-5
    assert np.array_equal(ra.frames, rb.frames)


def test_int8_variants_are_chosen_by_the_plan_and_pass_their_gate(levers_bundle):
    from sorakit.bundle.io import Bundle

    m = Bundle.open(levers_bundle).manifest
    gate = next(p for p in m.passes if p["name"] == "int8")["gate"]
    assert gate["passed"] and gate["value"] >= 0.9
    fp32 = Pipeline.from_bundle(levers_bundle, precision="fp32")
    int8 = Pipeline.from_bundle(levers_bundle, precision="int8")
    assert fp32.plan.choice("transformer").precision == "fp32"
    assert int8.plan.choice("transformer").tag == "int8" and int8.plan.choice("text_encoder").tag == "int8"
    assert all(g.name.endswith(".int8") for g in int8._blocks(False))
    a, b = fp32(PROMPT, steps=10), int8(PROMPT, steps=10)
    assert video_ssim(a.frames, b.frames) >= 0.9
    with pytest.raises(SorakitError, match="precision 'bf16' is not available"):
        Pipeline.from_bundle(levers_bundle, precision="bf16", device="cpu")


def test_budget_plan_stays_within_a_small_budget(levers_bundle):
    """A budget the fp32 transformer does not fit resident: the plan takes the int8 variants,
    and the measured peak stays within the budget."""
    from sorakit.bundle.io import Bundle
    from sorakit.memory import rss_bytes

    m = Bundle.open(levers_bundle).manifest
    tr = m.components["transformer"].graphs
    fp32_bytes = sum(m.files[f]["bytes"] for g in tr for f in [g.file, g.data] if f)
    base = rss_bytes()
    budget = base + int(0.9 * fp32_bytes)
    pipe = Pipeline.from_bundle(levers_bundle, memory_budget=budget)
    assert pipe.plan.choice("transformer").precision == "int8"
    assert "fit the budget resident" in pipe.plan.components["transformer"].reason
    r = pipe(PROMPT, steps=6)
    assert r.memory.peak_rss <= budget * 1.1 + 30e6, (r.memory.peak_rss / 1e6, budget / 1e6)
    # held to fp32, the same budget cannot keep the transformer resident: it is streamed
    fp32 = Pipeline.from_bundle(levers_bundle, memory_budget=rss_bytes() + int(0.9 * fp32_bytes), precision="fp32")
    assert fp32.plan.choice("transformer").precision == "fp32"
    assert fp32.plan.components["transformer"].resident_bytes > pipe.plan.components["transformer"].resident_bytes
    assert "streamed" in fp32.plan.components["transformer"].reason
    r32 = fp32(PROMPT, steps=3)
    assert r32.memory.loads > len(fp32._step_chain(False))  # blocks were loaded again at later steps


def test_step_cache_off_is_identical_and_on_skips_blocks(shipped):
    pipe = Pipeline.from_bundle(shipped)
    plain = pipe(PROMPT, steps=12, seed=3)
    off = pipe(PROMPT, steps=12, seed=3, step_cache=None)
    zero = pipe(PROMPT, steps=12, seed=3, step_cache=0.0)
    assert np.array_equal(plain.latents, off.latents) and np.array_equal(plain.latents, zero.latents)
    assert zero.sampling.cached_steps == 0
    on = pipe(PROMPT, steps=12, seed=3, step_cache=0.3)
    assert 0 < on.sampling.cached_steps < 11  # the last call always runs the blocks
    assert on.sampling.model_calls == 12
    assert video_ssim(plain.frames, on.frames) > 0.5  # close, not equal: it is a lossy shortcut
    assert not np.array_equal(plain.latents, on.latents)
    leap = pipe(PROMPT, steps=12, seed=3, step_cache=10.0, lpl="6")  # huge threshold: all but the rule's steps
    assert leap.sampling.model_calls == 7 and leap.sampling.cached_steps == 6 - 1


def test_openvino_engine_matches_onnx_runtime(shipped):
    pytest.importorskip("openvino", reason="the openvino extra is part of .[all]")
    from sorakit.runtime.session import openvino_problem

    ort_pipe = Pipeline.from_bundle(shipped, device="cpu")
    ref = ort_pipe(PROMPT, steps=8, seed=2)
    if openvino_problem({"INFERENCE_PRECISION_HINT": "bf16"}) is None:
        ov = Pipeline.from_bundle(shipped, device="cpu-bf16", precision="bf16")
        assert set(ov.plan.engines().values()) == {"OpenVINO bf16"}
        got = ov(PROMPT, steps=8, seed=2)
        assert video_ssim(ref.frames, got.frames) > 0.97
    # OpenVINO at f32 computes what ONNX Runtime computes
    from sorakit.profiles import DeviceProfile, ProviderSpec, get_profile

    base = get_profile("cpu-bf16")
    f32 = DeviceProfile(**{**base.__dict__, "name": "cpu-f32-ov",
                           "providers": (ProviderSpec("OpenVINO", {"INFERENCE_PRECISION_HINT": "f32"}),
                                         ProviderSpec("CPUExecutionProvider"))})
    ov32 = Pipeline.from_bundle(shipped, device=f32, precision="f32")  # f32: OpenVINO only
    assert set(ov32.plan.engines().values()) == {"OpenVINO f32"}, ov32.plan.engines()
    got32 = ov32(PROMPT, steps=8, seed=2)
    assert np.abs(got32.latents - ref.latents).max() < 2e-3
    assert np.abs(got32.frames.astype(int) - ref.frames.astype(int)).max() <= 2


def test_missing_openvino_is_a_reported_fallback_or_refused_in_strict_mode(shipped, tmp_path):
    """With openvino unimportable, cpu-bf16 falls back to ONNX Runtime with a note; --strict refuses."""
    script = tmp_path / "no_openvino.py"
    script.write_text(
        "import sys, json\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'openvino' or name.startswith('openvino.'):\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import importlib.util\n"
        "_orig = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n == 'openvino' else _orig(n, *a)\n"
        "from sorakit.runtime.pipeline import Pipeline\n"
        "from sorakit.errors import ProviderError\n"
        f"p = Pipeline.from_bundle({str(shipped)!r}, device='cpu-bf16')\n"
        "out = {'notes': p.providers.fallbacks, 'engines': p.plan.engines()}\n"
        "try:\n"
        f"    Pipeline.from_bundle({str(shipped)!r}, device='cpu-bf16', strict=True)\n"
        "    out['strict'] = 'accepted'\n"
        "except ProviderError as e:\n"
        "    out['strict'] = str(e)\n"
        "print(json.dumps(out))\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert any("OpenVINO cannot run device 'cpu-bf16'" in n and "not installed" in n for n in out["notes"])
    assert "OpenVINO" not in " ".join(out["engines"].values())
    assert "cannot run in strict mode" in out["strict"]


def test_budget_too_small_for_any_plan_names_the_smallest(levers_bundle):
    from sorakit.errors import BudgetError

    with pytest.raises(BudgetError, match="smallest workable budget is about"):
        Pipeline.from_bundle(levers_bundle, memory_budget="1MB")


def test_e2e_benchmark_writes_json_markdown_and_png(levers_bundle, tmp_path):
    """The real-size benchmark's harness, on the shipped model's size (rows in their own processes)."""
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "benchmarks.e2e_real", "--bundle", str(levers_bundle), "--out", str(out),
           "--rounds", "2", "--steps", "4", "--leap", "2", "--tdtm-steps", "1", "--step-cache", "0.3",
           "--rows", "torch-fp32,ort-fp32,+step-cache,best-3.3GB"]
    # the best rows use the TDTM variants; the shipped bundle carries them, the levers bundle kept them
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((out / "e2e-real.json").read_text())
    assert set(data["rows"]) == {"torch-fp32", "ort-fp32", "+step-cache", "best-3.3GB"}
    assert len(data["rows"]["torch-fp32"]["rounds_total_s"]) == 2 and len(data["rows"]["ort-fp32"]["rounds_total_s"]) == 1
    for key in ("speedup_vs_torch_fp32", "budget_bytes", "best_3_3gb_peak_rss_bytes"):
        assert key in data, key
    assert data["speedup_vs_torch_fp32"] == pytest.approx(
        data["rows"]["torch-fp32"]["seconds"]["total"] / data["rows"]["best-3.3GB"]["seconds"]["total"])
    best = data["rows"]["best-3.3GB"]
    assert best["transformer_calls"] == 3 and best["plan"]["transformer"]["engine"]
    md = (out / "e2e-real.md").read_text()
    assert "| best-3.3GB |" in md and "speedup_vs_torch_fp32" in md
    assert (out / "e2e-real.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_without_a_budget_leaves_out_what_the_machine_cannot_hold(levers_bundle, monkeypatch):
    """No budget: a choice whose graphs the available memory cannot hold resident is left out
    (the smallest one is kept when none fits)."""
    import dataclasses

    from sorakit.bundle.io import Bundle
    from sorakit.runtime import plan as plan_mod

    # int8 estimated slow here, so that the fastest choice is the larger fp32 one
    slow = dataclasses.replace(plan_mod.COSTS[(plan_mod.ORT, "int8")], gflops=1e-3)
    monkeypatch.setitem(plan_mod.COSTS, (plan_mod.ORT, "int8"), slow)
    pipe = Pipeline.from_bundle(levers_bundle, memory_budget="unlimited", device="cpu")
    roomy = plan_mod.make_plan(Bundle.open(levers_bundle), pipe.providers, None)
    assert roomy.choice("transformer").precision == "fp32"  # the fastest estimate, with room for it
    tr = roomy.components["transformer"].resident_bytes
    monkeypatch.setattr(plan_mod, "available_memory", lambda: tr - 1)
    tight = plan_mod.make_plan(Bundle.open(levers_bundle), pipe.providers, None)
    assert tight.choice("transformer").tag == "int8"
    assert tight.components["transformer"].resident_bytes < tr


def test_fuse_gelu_is_exact_and_refused_after_precision_passes(shipped, tmp_path):
    """Every block's tanh GELUs become FastGelu nodes (the nine element-wise nodes each gone);
    the video equals the unfused bundle's (fp32); after int8 the pass is refused, naming why."""
    import onnx

    from sorakit.bundle.io import Bundle

    out = tmp_path / "gelu"
    optimize_bundle(shipped, out, ["fuse_gelu"])
    b = Bundle.open(out)
    record = next(p for p in b.manifest.passes if p["name"] == "fuse_gelu")
    blocks = [g for g in b.manifest.components["transformer"].graphs if g.role == "block"]
    graphs = [e for g in blocks for e in (g, *g.variants.values())]  # the TDTM variants too
    assert len(record["graphs"]) == len(graphs) > 0
    assert all(g["max_abs_err"] < 1e-4 for g in record["graphs"]), [g["max_abs_err"] for g in record["graphs"]]
    for g in graphs:
        ops = [n.op_type for n in onnx.load(str(b.path(g.file)), load_external_data=False).graph.node]
        assert ops.count("FastGelu") == 2 and "Tanh" not in ops  # the spatial and the temporal MLP
    ra = Pipeline.from_bundle(shipped, precision="fp32")(PROMPT, steps=5, seed=4)
    rb = Pipeline.from_bundle(out, precision="fp32")(PROMPT, steps=5, seed=4)
    np.testing.assert_allclose(rb.latents, ra.latents, atol=1e-4)
    int8 = tmp_path / "int8"
    optimize_bundle(shipped, int8, ["int8"], gates={"int8": 0.5}, gate_steps=4)
    with pytest.raises(SorakitError, match="'fuse_gelu' must run before int8"):
        optimize_bundle(int8, tmp_path / "late", ["fuse_gelu"])


def test_fuse_gelu_leaves_other_tanh_patterns_alone():
    """A Tanh that is not a GELU (wrong constant) is not fused."""
    import math

    from onnx import TensorProto, helper

    from sorakit.graph_passes.fuse_gelu import fuse

    def gelu_graph(c1: float):
        k = lambda n, v: helper.make_tensor(n, TensorProto.FLOAT, [], [v])  # noqa: E731
        nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]), helper.make_node("Mul", ["x", "sq"], ["cube"]),
                 helper.make_node("Mul", ["cube", "c0"], ["a"]), helper.make_node("Add", ["x", "a"], ["b"]),
                 helper.make_node("Mul", ["b", "c1"], ["c"]), helper.make_node("Tanh", ["c"], ["t"]),
                 helper.make_node("Add", ["t", "one"], ["u"]), helper.make_node("Mul", ["x", "u"], ["v"]),
                 helper.make_node("Mul", ["v", "half"], ["y"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])],
                              initializer=[k("c0", 0.044715), k("c1", c1), k("one", 1.0), k("half", 0.5)])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    import onnxruntime as ort

    good, n = fuse(gelu_graph(math.sqrt(2 / math.pi)))
    assert n == 1 and [x.op_type for x in good.graph.node] == ["FastGelu"]
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    (y,) = ort.InferenceSession(good.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))), atol=1e-6)
    bad, n = fuse(gelu_graph(0.7))
    assert n == 0 and len(bad.graph.node) == 9


def test_cpu_passes_compose_with_tdtm_and_int8(tiny_bundle, tmp_path):
    """The CPU chain of exact passes (text encoder and cross-attention on the prompt's tokens,
    fused GELU, prune) composes with TDTM and int8 variants: the fp32 video with TDTM steps equals
    the one of TDTM alone, and the int8 variants of every block carry the rewrites too."""
    import onnx

    from sorakit.bundle.io import Bundle

    tdtm_only, full = tmp_path / "tdtm", tmp_path / "full"
    optimize_bundle(tiny_bundle[0], tdtm_only, ["tdtm"], gate_steps=4)
    optimize_bundle(tiny_bundle[0], full, ["text_tokens", "caption_tokens", "tdtm", "fuse_gelu", "prune", "int8"],
                    settings={"int8": {"variant": True}}, gates={"int8": 0.5, "tdtm": 0.5}, gate_steps=4)
    b = Bundle.open(full)
    assert [p["name"] for p in b.manifest.passes] == ["text_tokens", "caption_tokens", "tdtm", "fuse_gelu", "prune",
                                                      "int8"]
    for g in b.manifest.components["transformer"].graphs:
        if g.role != "block":
            continue
        assert set(g.variants) == {"tdtm", "int8", "tdtm+int8"}
        for e in (g, *g.variants.values()):
            assert next(t for t in e.inputs if t.name == "y_proj").shape[1] == "text_tokens"
            assert "FastGelu" in {n.op_type for n in onnx.load(str(b.path(e.file)), load_external_data=False).graph.node}
    kw = dict(steps=4, seed=5, tdtm_steps=2)
    ra = Pipeline.from_bundle(tdtm_only, precision="fp32")(PROMPT, **kw)
    rb = Pipeline.from_bundle(full, precision="fp32")(PROMPT, **kw)
    np.testing.assert_allclose(rb.latents, ra.latents, atol=1e-4)
    rc = Pipeline.from_bundle(full, precision="int8")(PROMPT, **kw)
    assert np.isfinite(rc.latents).all()
