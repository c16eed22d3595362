"""Devices layer: profiles, the offline Core ML partition audit, ORT-format packaging, the Core ML path.

No Mac or phone here: the audit and the package are checked offline, the runtime's CoreML
fallback on Linux is checked to be reported, and Core ML predictions are skipped off macOS.
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
from sorakit.devices.audit import MAX_DIM, audit_bundle, audit_model
from sorakit.errors import ProviderError, SorakitError
from sorakit.profiles import get_profile, list_profiles, load_profile

SORAKIT = [sys.executable, "-m", "sorakit"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SORAKIT, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})


def make_model(nodes, inputs, outputs, initializers=(), name="g") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9  # ORT 1.31 reads at most IR 13; onnx 1.23 writes 14 by default
    onnx.checker.check_model(m)
    return m


# ---------------------------------------------------------------------------------------------
# fixtures: a bundle with TDTM-style variants, its package
# ---------------------------------------------------------------------------------------------
def add_variants(root: Path) -> None:
    """Give every transformer block a 'tdtm' variant graph that shares the block's external data
    (the layout the TDTM pass writes: block_00.tdtm.onnx reading block_00.onnx.data)."""
    mf = root / "manifest.json"
    data = json.loads(mf.read_text())
    for g in data["components"]["transformer"]["graphs"]:
        if g["role"] != "block":
            continue
        src = root / g["file"]
        rel = g["file"].replace(".onnx", ".tdtm.onnx")
        model = onnx.load(str(src), load_external_data=False)  # keeps the location of block_NN.onnx.data
        model.graph.name = model.graph.name + "_tdtm"
        onnx.save(model, str(root / rel))
        v = dict(g, name=g["name"] + ".tdtm", file=rel, data=g["data"], info={"pass": "test variant"})
        v.pop("variants", None)
        g["variants"] = {"tdtm": v}
        data["files"][rel] = file_record(root / rel)
    mf.write_text(json.dumps(data, indent=1))


@pytest.fixture(scope="module")
def variant_bundle(tiny_bundle, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("devices") / "tiny-variants"
    shutil.copytree(tiny_bundle[0], root)
    add_variants(root)
    Bundle.open(root, verify="full")  # still a valid bundle
    return root


@pytest.fixture(scope="module")
def iphone_package(variant_bundle, tmp_path_factory):
    from sorakit.devices.package import package_bundle

    out = tmp_path_factory.mktemp("packages") / "tiny-iphone"
    report = package_bundle(variant_bundle, "iphone-15-pro", out)
    return out, report


# ---------------------------------------------------------------------------------------------
# profiles
# ---------------------------------------------------------------------------------------------
def test_shipped_profiles_load_and_validate():
    names = list_profiles()
    assert {"cpu", "iphone-15-pro", "mac", "android"} <= set(names)
    for n in names:
        p = get_profile(n)
        assert p.name == n and p.providers[-1].name == "CPUExecutionProvider"
        json.dumps(p.to_dict())
    iphone = get_profile("iphone-15-pro")
    assert iphone.budget_bytes() == 3_300_000_000
    coreml = iphone.provider("CoreMLExecutionProvider")
    assert coreml.options["ModelFormat"] == "MLProgram" and coreml.options["MLComputeUnits"] == "ALL"
    assert iphone.static_shapes and iphone.requires_static_input_shapes and iphone.precision == "fp16"
    assert "fp16" in iphone.passes and "tdtm" in iphone.passes
    assert "int8" in get_profile("cpu").optimize_passes
    cpu = get_profile("cpu")
    assert cpu.compiling_provider is None and cpu.budget_bytes(available=1000) == 750
    assert get_profile("mac").uses_coreml
    android = [p.name for p in get_profile("android").providers]
    assert android == ["XnnpackExecutionProvider", "NnapiExecutionProvider", "CPUExecutionProvider"]
    opts = dict(iphone.provider_options("/tmp/c"))["CoreMLExecutionProvider"]
    assert opts["ModelCacheDirectory"] == "/tmp/c/coreml"


GOOD = """name = "x"
description = "a test device"
memory_budget = "1GB"
[[providers]]
name = "CPUExecutionProvider"
"""


@pytest.mark.parametrize("text, message", [
    ("name = ", "not valid TOML"),
    (GOOD.replace('name = "x"\n', ""), "lacks 'name'"),
    (GOOD.replace("CPUExecutionProvider", "TPUExecutionProvider"), "unknown execution provider"),
    (GOOD + '[[providers]]\nname = "CoreMLExecutionProvider"\n', "last provider must be CPUExecutionProvider"),
    (GOOD.replace('memory_budget = "1GB"', 'memory_budget = "lots"'), "cannot read memory size"),
    ('optimize_passes = ["fp16", "turbo boost"]\n' + GOOD, "['turbo boost'] are not pass names"),
    ('threads = -1\n' + GOOD, "threads must be"),
    ('precison = "fp16"\n' + GOOD, "unknown keys ['precison']"),
    (GOOD.replace('[[providers]]\nname = "CPUExecutionProvider"',
                  '[[providers]]\nname = "CoreMLExecutionProvider"\n[providers.options]\nMLComputeUnits = "NPU"\n'
                  '[[providers]]\nname = "CPUExecutionProvider"'), "MLComputeUnits = 'NPU'"),
    (GOOD.replace('[[providers]]\nname = "CPUExecutionProvider"',
                  '[[providers]]\nname = "CoreMLExecutionProvider"\n[providers.options]\nModelFromat = "MLProgram"\n'
                  '[[providers]]\nname = "CPUExecutionProvider"'), "unknown CoreML EP option 'ModelFromat'"),
    ('providers = []\nname = "x"\ndescription = "d"\nmemory_budget = "1GB"\n', "non-empty list"),
])
def test_malformed_profile_is_rejected(tmp_path, text, message):
    path = tmp_path / "x.toml"
    path.write_text(text)
    with pytest.raises(SorakitError, match=None) as e:
        load_profile(path)
    assert message in str(e.value) and "x.toml" in str(e.value)


def test_profile_file_and_unknown_device(tmp_path):
    path = tmp_path / "my-device.toml"
    path.write_text(GOOD.replace('name = "x"', 'name = "my-device"'))
    assert get_profile(str(path)).name == "my-device"
    with pytest.raises(SorakitError, match="unknown device 'iphone-99'; choose one of: .*iphone-15-pro"):
        get_profile("iphone-99")


# ---------------------------------------------------------------------------------------------
# the runtime uses the profile's providers and reports the fallback
# ---------------------------------------------------------------------------------------------
def test_runtime_picks_profile_providers_and_reports_fallback(tiny_bundle):
    from sorakit.runtime.session import SessionFactory, plan_providers

    plan = plan_providers(get_profile("iphone-15-pro"), cache_dir="/tmp/sorakit-test-cache")
    assert plan.requested == ["CoreMLExecutionProvider", "CPUExecutionProvider"]
    if "CoreMLExecutionProvider" in ort.get_available_providers():  # macOS wheel
        assert plan.selected[0][0] == "CoreMLExecutionProvider"
        assert plan.selected[0][1]["ModelFormat"] == "MLProgram"
        return
    assert [n for n, _ in plan.selected] == ["CPUExecutionProvider"]
    assert any("CoreMLExecutionProvider is not available" in n and "iphone-15-pro" in n for n in plan.fallbacks)
    with pytest.raises(ProviderError, match="cannot run in strict mode"):
        plan_providers(get_profile("iphone-15-pro"), strict=True)
    assert plan_providers(get_profile("cpu")).fallbacks == []
    android = plan_providers(get_profile("android"))
    assert len(android.fallbacks) == 2  # neither XNNPACK nor NNAPI is in the Linux wheel
    sess = SessionFactory(plan).create(Path(tiny_bundle[0]) / "transformer" / "block_00.onnx")
    assert sess.get_providers() == ["CPUExecutionProvider"]


# ---------------------------------------------------------------------------------------------
# audit
# ---------------------------------------------------------------------------------------------
def clean_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(16, np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["a"], name="add"),
             helper.make_node("Softmax", ["a"], ["y"], name="softmax", axis=-1)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 16])], [w, b])


def bad_model() -> onnx.ModelProto:
    """A 32128-row token table (Gather), a rank-6 tensor, a dynamic dimension, a 3-D conv, an fp16 Pow."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((32128, 4)).astype(np.float32), "table"),
        numpy_helper.from_array(np.array([1, 2, 2, 2, 1, 4], np.int64), "shape6"),
        numpy_helper.from_array(np.array([1, 8, 4], np.int64), "shape3"),
        numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3, 3)).astype(np.float32), "wconv"),
        numpy_helper.from_array(np.array(2.0, np.float16), "two"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed_lookup"),
        helper.make_node("Reshape", ["emb", "shape6"], ["r6"], name="to_rank6"),
        helper.make_node("Relu", ["r6"], ["r6_relu"], name="relu_rank6"),
        helper.make_node("Reshape", ["r6_relu", "shape3"], ["back"], name="to_rank3"),
        helper.make_node("Add", ["back", "dyn"], ["summed"], name="add_dynamic"),
        helper.make_node("Conv", ["vol", "wconv"], ["conv_out"], name="conv3d", pads=[1] * 6),
        helper.make_node("Pow", ["half", "two"], ["sq"], name="pow_fp16"),
    ]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8]),
              helper.make_tensor_value_info("dyn", TensorProto.FLOAT, ["n", 8, 4]),
              helper.make_tensor_value_info("vol", TensorProto.FLOAT, [1, 1, 4, 6, 6]),
              helper.make_tensor_value_info("half", TensorProto.FLOAT16, [4, 4])]
    outputs = [helper.make_tensor_value_info("summed", TensorProto.FLOAT, ["n", 8, 4]),
               helper.make_tensor_value_info("conv_out", TensorProto.FLOAT, [1, 2, 4, 6, 6]),
               helper.make_tensor_value_info("sq", TensorProto.FLOAT16, [4, 4])]
    return make_model(nodes, inputs, outputs, inits, name="bad")


def test_audit_known_clean_graph():
    a = audit_model(clean_model(), "iphone-15-pro")
    assert a.clean and a.partitions == 1 and a.fallbacks == []
    # ORT's basic level rewrites MatMul+Add as Reshape/Gemm/Reshape before partitioning: all on Core ML
    assert a.nodes == a.nodes_on_ep == 4 and a.provider == "CoreMLExecutionProvider" and a.model_format == "MLProgram"
    raw = audit_model(clean_model(), "iphone-15-pro", optimize=False)
    assert raw.clean and raw.nodes == raw.nodes_on_ep == 3


def test_audit_known_bad_graph_reports_each_reason():
    a = audit_model(bad_model(), "iphone-15-pro", role="embed")
    assert not a.clean
    by_node = {f.node: {r.code for r in f.reasons} for f in a.fallbacks}
    assert by_node["embed_lookup"] == {"op", "dim"}  # Gather is not in the ML Program list; 32128 > 16384
    assert "rank" in by_node["relu_rank6"]
    assert "dynamic" in by_node["add_dynamic"]
    assert "conv3d" in by_node["conv3d"]
    assert "dtype" in by_node["pow_fp16"]
    details = " ".join(r.detail for f in a.fallbacks for r in f.reasons)
    assert "32128" in details and f"> {MAX_DIM}" in details and "rank 6" in details
    hints = " ".join(a.hints)
    assert "--t5-embedding-outside" in hints and "32128-row" in hints
    assert "--passes pin" in hints and "conv3d->conv2d" in hints and "Mul(x, x)" in hints
    # a dynamic dim is fine for a device that allows dynamic shapes, but the op/dim/rank limits stay
    cpu = audit_model(bad_model(), "cpu")
    assert cpu.clean and cpu.provider == "CPUExecutionProvider"


def test_audit_and_package_run_without_torch(tiny_bundle, tmp_path):
    """The devices layer is torch-free, even though ORT's tools package imports torch when it can."""
    script = f"""
import sys
class Block:
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'diffusers', 'coremltools', 'optimum'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from sorakit.devices.audit import audit_bundle
from sorakit.devices.package import package_bundle
rep = audit_bundle({str(tiny_bundle[0])!r}, 'iphone-15-pro', only=['transformer.block.00'])
assert rep.clean
package_bundle({str(tiny_bundle[0])!r}, 'cpu', {str(tmp_path / 'pkg')!r}, audit=False, verify=False)
bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'coremltools')]
assert not bad, bad
print('ok')
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_audit_tiny_bundle(variant_bundle):
    rep = audit_bundle(variant_bundle, "iphone-15-pro")
    g = {a.graph: a for a in rep.graphs}
    names = [x.name for x in Bundle.open(variant_bundle).manifest.all_graphs()]
    assert list(g) == names  # every graph, variants included, in manifest order
    blocks = [a for a in rep.graphs if a.role == "block"]
    assert len(blocks) == 4 and all(b.clean and b.partitions == 1 for b in blocks)  # 2 plain + 2 TDTM variants
    for n in ("transformer.epilogue", "text_encoder.layer.00", "text_encoder.final_norm", "vae.spatial.stem",
              "vae.spatial.up0", "vae.spatial.tail"):
        assert g[n].clean, n
    embed = g["text_encoder.embed"]
    assert embed.fallback_ops() == {"Gather": 1} and any("--t5-embedding-outside" in h for h in embed.hints)
    stem = g["vae.temporal.stem"]
    assert stem.reason_counts().get("conv3d", 0) >= 1 and stem.fallback_ops().get("Pad", 0) >= 1
    assert any("conv3d->conv2d" in h for h in stem.hints)
    assert all(a.external_data for a in blocks)  # the bundle keeps big weights outside the graph
    assert rep.to_dict()["graphs_clean"] == sum(a.clean for a in rep.graphs)
    assert audit_bundle(variant_bundle, "cpu").clean


def test_audit_cli_strict_exit_code(variant_bundle):
    dirty = run_cli("audit", variant_bundle, "--device", "iphone-15-pro", "--strict")
    assert dirty.returncode == 1, dirty.stderr
    assert "strict" in dirty.stderr and "text_encoder.embed" in dirty.stdout and "conv3d" in dirty.stdout
    clean = run_cli("audit", variant_bundle, "--device", "iphone-15-pro", "--strict", "--graph", "transformer.block",
                    "--json")
    assert clean.returncode == 0, clean.stderr
    data = json.loads(clean.stdout)
    assert data["clean"] and [x["graph"] for x in data["graphs"]] == [
        "transformer.block.00", "transformer.block.00.tdtm", "transformer.block.01", "transformer.block.01.tdtm"]
    unknown = run_cli("audit", variant_bundle, "--device", "iphone-99")
    assert unknown.returncode == 1 and "unknown device 'iphone-99'" in unknown.stderr
    listing = run_cli("devices", "--json")
    assert listing.returncode == 0 and {p["name"] for p in json.loads(listing.stdout)} >= set(list_profiles())


def test_embedding_outside_makes_the_text_encoder_clean(tmp_path):
    """The fix the audit points to: the T5 lookup outside the graph (the table ships as raw float32)."""
    from sorakit.devices.package import package_bundle
    from sorakit.export.exporter import ExportSettings, export_bundle
    from sorakit.presets import tiny_preset

    out = tmp_path / "te"
    export_bundle(ExportSettings(tiny_preset(), 64, 64, 17, components=("text_encoder",), t5_lookup_outside=True,
                                 verify=False), out)
    rep = audit_bundle(out, "iphone-15-pro")
    assert rep.clean, [(a.graph, a.fallback_ops()) for a in rep.graphs]
    pkg = package_bundle(out, "iphone-15-pro", tmp_path / "pkg", audit=False)
    emb = pkg.manifest["text_embedding"]
    table = np.fromfile(tmp_path / "pkg" / emb["file"], dtype="<f4").reshape(emb["shape"])
    assert np.array_equal(table, np.load(out / "text_encoder" / "embedding.npy"))


# ---------------------------------------------------------------------------------------------
# package
# ---------------------------------------------------------------------------------------------
def _feeds(specs, rng):
    fixed = {"timestep": 500.0, "fps": 24.0, "height": 64.0, "width": 64.0}
    out = {}
    for s in specs:
        if s.dtype == "int64":
            a = np.zeros(s.shape, np.int64)
            a[..., : s.shape[-1] // 2] = 1
            out[s.name] = a
        elif s.name in fixed:
            out[s.name] = np.full(s.shape, fixed[s.name], np.float32)
        else:
            out[s.name] = rng.standard_normal(s.shape).astype(np.float32)
    return out


def test_package_round_trip(variant_bundle, iphone_package):
    from sorakit.devices.package import load_package

    out, report = iphone_package
    pkg = load_package(out)  # sizes and checksums of every file
    m = Bundle.open(variant_bundle).manifest
    graphs = m.all_graphs()
    assert [g.name for g in report.graphs] == [g.name for g in graphs]
    assert report.style == "runtime" and pkg["ort_format"]["optimization_style"] == "Runtime"
    assert all(g.exact or g.max_abs_err <= 1e-6 for g in report.graphs)
    # independently: every .ort against its .onnx on identical random inputs
    rng = np.random.default_rng(1)
    for g, pg in zip(graphs, report.graphs):
        feeds = _feeds(g.inputs, rng)
        ref = ort.InferenceSession(str(variant_bundle / g.file), providers=["CPUExecutionProvider"]).run(None, feeds)
        so = ort.SessionOptions()
        so.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
        got = ort.InferenceSession(str(out / pg.file), so, providers=["CPUExecutionProvider"]).run(None, feeds)
        for r, x in zip(ref, got):
            assert r.shape == x.shape and np.abs(r - x).max() <= 1e-6 * max(1.0, np.abs(r).max()), g.name
    # the app manifest: graph order, I/O, variants, sampler, budget, providers
    comps = pkg["components"]
    assert [x["name"] for x in comps["transformer"]["graphs"]] == [g.name for g in m.components["transformer"].graphs]
    block = comps["transformer"]["graphs"][1]
    assert block["variants"]["tdtm"]["file"] == "models/transformer/block_00.tdtm.ort"
    assert block["inputs"][0] == {"name": "tokens", "shape": [2, 5, 16, 64], "dtype": "float32"}
    assert pkg["device"]["memory_budget_bytes"] == 3_300_000_000
    assert pkg["session"]["providers"][0]["options"]["ModelFormat"] == "MLProgram"
    assert pkg["session"]["config_entries"]["session.enable_saved_runtime_optimizations"] == "1"
    assert pkg["sampler"]["tdtm"]["available"] and pkg["sampler"]["num_steps"] == m.sampler["num_steps"]
    assert pkg["run_order"]["step"][0] == "transformer.prologue"
    null = np.fromfile(out / pkg["null_caption"]["file"], dtype="<f4").reshape(pkg["null_caption"]["shape"])
    assert np.array_equal(null, np.load(variant_bundle / "null_caption.npy"))
    # one merged operator config for the reduced build
    config = (out / "required_operators.config").read_text().splitlines()
    ops = [ln for ln in config if ln and not ln.startswith("#")]
    assert ops and all(len(ln.split(";")) == 3 for ln in ops)
    assert any(ln.startswith("ai.onnx;") and "MatMul" in ln for ln in ops)
    assert not any("/tmp" in ln for ln in config if ln.startswith("# -"))
    # sizes: the variants share the block's data in the bundle, but each .ort embeds a copy
    s = pkg["sizes"]
    shared = sum(m.files[g.data]["bytes"] for g in m.components["transformer"].by_role("block"))
    assert s["duplicated_by_variants"] == shared
    unique = {f for g in graphs for f in (g.file, g.data) if f}
    assert s["bundle_bytes"] == sum(m.files[f]["bytes"] for f in unique)
    assert s["graphs_bytes"] == sum(g.ort_bytes for g in report.graphs)
    assert not list(out.parent.glob(".tiny-iphone.partial-*"))


def dynamic_copy(src: Path, dst: Path) -> Path:
    """The tiny bundle with one block's token axis marked dynamic (what an export with --dynamic records)."""
    shutil.copytree(src, dst)
    mf = dst / "manifest.json"
    data = json.loads(mf.read_text())
    data["geometry"]["static"] = False
    g = data["components"]["transformer"]["graphs"][1]
    g["inputs"][0]["shape"][2] = "tokens"
    mf.write_text(json.dumps(data))
    return dst


def test_package_refuses_dynamic_bundle_for_static_device(tiny_bundle, tmp_path):
    from sorakit.devices.package import PackageError, check_static, package_bundle

    bundle = dynamic_copy(tiny_bundle[0], tmp_path / "dyn")
    out = tmp_path / "pkg"
    with pytest.raises(PackageError) as e:
        package_bundle(bundle, "iphone-15-pro", out)
    msg = str(e.value)
    assert "dynamic shapes" in msg and "transformer.block.00:tokens" in msg
    assert f"sorakit optimize {bundle} --passes pin --resolution 64x64 --frames 17 --out {bundle}-pinned" in msg
    assert not out.exists() and not list(tmp_path.glob(".pkg.partial-*"))
    check_static(Bundle.open(bundle), get_profile("cpu"))  # a CPU device takes dynamic shapes
    cli = run_cli("package", bundle, "--device", "iphone-15-pro", "--out", out)
    assert cli.returncode == 1 and "--passes pin" in cli.stderr


def test_package_refuses_graph_over_the_ort_limit(tiny_bundle, tmp_path, monkeypatch):
    import sorakit.devices.package as package

    m = Bundle.open(tiny_bundle[0]).manifest
    block = m.graph("transformer.block.00")
    size = m.files[block.file]["bytes"] + m.files[block.data]["bytes"]
    monkeypatch.setattr(package, "ORT_FORMAT_LIMIT", size - 1)  # pretend the limit sits just under the block
    out = tmp_path / "pkg"
    with pytest.raises(package.PackageError) as e:
        package.package_bundle(tiny_bundle[0], "iphone-15-pro", out, audit=False)
    assert "transformer.block.00" in str(e.value) and "transformer.block.01" in str(e.value)
    assert "limit" in str(e.value) and "vae.spatial.tail" not in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".pkg.partial-*"))


def test_package_failure_leaves_previous_package_intact(tiny_bundle, tmp_path, monkeypatch):
    import sorakit.devices.package as package

    out = tmp_path / "pkg"
    out.mkdir()
    (out / "package.json").write_text("{}")  # a previous package
    real = package.convert_to_ort
    calls = []

    def flaky(src, dst, *a, **k):
        calls.append(src)
        if len(calls) == 5:
            raise package.PackageError("simulated conversion failure")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(package, "convert_to_ort", flaky)
    with pytest.raises(package.PackageError, match="simulated"):
        package.package_bundle(tiny_bundle[0], "cpu", out, audit=False)
    assert [p.name for p in out.iterdir()] == ["package.json"] and (out / "package.json").read_text() == "{}"
    assert not list(tmp_path.glob(".pkg.partial-*"))
    with pytest.raises(package.PackageError, match="not a sorakit package"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "x").write_text("keep")
        package.package_bundle(tiny_bundle[0], "cpu", tmp_path / "other", audit=False)


# ---------------------------------------------------------------------------------------------
# the Core ML path (torch + coremltools; conversion and specs on Linux, numbers on macOS)
# ---------------------------------------------------------------------------------------------
# every transformer piece; from the others, the ones that exercise each conversion path: the T5 lookup,
# the temporal VAE's 3-D convolutions and 5-D GroupNorm, the spatial VAE's attention (torch.export fallback)
CT_SUBSET = ("text_encoder.embed", "transformer.prologue", "transformer.block.00", "transformer.epilogue",
             "vae.temporal.tail", "vae.spatial.stem")


@pytest.fixture(scope="module")
def coreml_dir(tiny_bundle, tmp_path_factory):
    pytest.importorskip("coremltools")
    from sorakit.export.coreml import CoreMLSettings, export_coreml

    out = tmp_path_factory.mktemp("coreml") / "tiny"
    report = export_coreml(CoreMLSettings(like=tiny_bundle[0], random_weights=True, only=CT_SUBSET,
                                          numeric_check=False), out)
    return out, report


def test_coreml_conversion_matches_bundle_specs(tiny_bundle, coreml_dir):
    from sorakit.export.coreml import package_spec

    out, report = coreml_dir
    m = Bundle.open(tiny_bundle[0]).manifest
    want = [g.name for g in m.all_graphs() if any(g.name.startswith(p) for p in CT_SUBSET)]
    assert [p.name for p in report.pieces] == want  # the bundle's order
    manifest = json.loads((out / "coreml_manifest.json").read_text())
    assert manifest["model_type"] == "mlprogram" and manifest["geometry"] == m.geometry
    for p in report.pieces:
        g = m.graph(p.name)
        ins, outs = package_spec(out / p.file)
        assert [(n, s) for n, s, _ in ins] == [(t.name, t.shape) for t in g.inputs], p.name
        assert [(n, s) for n, s, _ in outs] == [(t.name, t.shape) for t in g.outputs], p.name
        assert all(d == ("int32" if t.dtype == "int64" else "float32") for (_, _, d), t in zip(ins, g.inputs))
        assert all(d == "float32" for _, _, d in outs)
        assert p.precision == ("fp32" if p.component == "text_encoder" else "fp16")
    # the temporal VAE's 3-D convolutions convert on this path (ORT's CoreML EP cannot take them)
    assert any(p.name == "vae.temporal.tail" for p in report.pieces)
    assert (out / "null_caption.npy").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()


def test_coreml_adaptation_is_exact_and_specs_are_checked(coreml_dir, tmp_path):
    import torch

    from sorakit.errors import VerificationError
    from sorakit.export.coreml import adapt_for_coreml, check_spec
    from sorakit.export.pieces import IOSpec, PieceSpec

    norm = torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 8, 3, 5, 5)
    wrapped = adapt_for_coreml(torch.nn.Sequential(norm))
    assert torch.equal(wrapped(x), norm(x)) or torch.allclose(wrapped(x), norm(x), atol=1e-6)
    out, report = coreml_dir
    p = report.pieces[0]
    spec = PieceSpec(p.name, p.role, p.component, lambda: None,
                     [IOSpec(i["name"], i["shape"], "int64" if i["dtype"] == "int32" else "float32") for i in p.inputs],
                     [IOSpec(o["name"], o["shape"]) for o in p.outputs])
    check_spec(out / p.file, spec)
    spec.inputs[0].shape = [9, *spec.inputs[0].shape[1:]]
    with pytest.raises(VerificationError, match="differ"):
        check_spec(out / p.file, spec)


def test_coreml_numeric_parity(coreml_dir):
    if sys.platform != "darwin":
        pytest.skip("Core ML predictions need the Core ML runtime, which exists only on macOS")
    from sorakit.export.coreml import CoreMLSettings, export_coreml

    out, _ = coreml_dir
    report = export_coreml(CoreMLSettings(like=Path(json.loads((out / "coreml_manifest.json").read_text())
                                                    ["like_bundle"]), random_weights=True, only=("transformer",),
                                          numeric_check=True), out.parent / "numeric")
    assert all(p.numeric["psnr_db"] >= 35 for p in report.pieces)
