"""Offline partition audit: which nodes of each graph a device's compiling EP would take.

No Mac or phone is needed. For every graph (plain blocks and their variants) the audit

1. lets ONNX Runtime apply its basic optimizations (constant folding and the other rewrites
   ORT runs *before* it hands the graph to an execution provider), then ONNX shape inference;
2. decides node by node whether the EP would take it, with the reasons when it would not:
   the op list ORT ships for the EP (``onnxruntime/tools/mobile_helpers/*.md``, the same lists
   ``python -m onnxruntime.tools.check_onnx_model_mobile_usability`` uses), plus the checks that
   tool leaves out and ORT's CoreML EP makes in ``helper.cc IsInputSupported`` and the op
   builders: every input needs a shape, no dimension over 16384, rank at most 5, static shapes
   when the device requires them, float inputs for float ops, constant parameters where the op
   list says so, 1-D/2-D convolutions only;
3. groups the supported nodes into partitions with ORT's own estimator
   (``usability_checker.check_partitioning``, a port of ORT's ``CreateSupportedPartitions``).

A graph is *clean* when every node lands on the EP in one partition. The audit also says how
to fix what is not (``hints``). CPU-only devices have nothing to partition: every graph is clean.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
from onnx import TensorProto

from sorakit.devices._ort_tools import ensure_ort_tools_without_torch
from sorakit.errors import SorakitError
from sorakit.profiles import DeviceProfile, get_profile

log = logging.getLogger(__name__)

MAX_DIM = 16384  # Core ML fails to load a model with a larger input dimension (coremltools#1003)
MAX_RANK = 5  # Core ML tensors have at most rank 5 (coremltools#832, ORT#14212)

OP_LISTS = {
    ("CoreMLExecutionProvider", "MLProgram"): "coreml_supported_mlprogram_ops.md",
    ("CoreMLExecutionProvider", "NeuralNetwork"): "coreml_supported_neuralnetwork_ops.md",
    ("NnapiExecutionProvider", None): "nnapi_supported_ops.md",
}

# ops the EP computes on floats: ORT's op builders check that input 0 is float (or float16 in
# ML Program); an int64/bool input (shape arithmetic, masks) makes the node fall back
FLOAT_OPS = {
    "Add", "Sub", "Mul", "Div", "Pow", "MatMul", "Gemm", "Conv", "ConvTranspose", "Softmax", "LayerNormalization",
    "GroupNormalization", "InstanceNormalization", "BatchNormalization", "Relu", "Sigmoid", "Tanh", "Gelu", "Erf",
    "Exp", "Sqrt", "Reciprocal", "Sin", "Cos", "ReduceMean", "ReduceSum", "ReduceMax", "Max", "Clip", "LeakyRelu",
    "Elu", "PRelu", "HardSigmoid", "Softplus", "AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool",
    "Resize", "Round", "Ceil", "GridSample", "QuickGelu", "LRN",
}
# caveats in the op lists that the audit does not model (reported as "not checked")
UNCHECKED = {"Resize", "ConvTranspose", "Reciprocal", "GatherND", "ArgMax", "Argmax"}
FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16}

REASONS = {
    "op": "the op is not in the execution provider's op list",
    "dim": f"an input has a dimension over {MAX_DIM} (Core ML refuses to load such a model)",
    "rank": f"an input has rank over {MAX_RANK} (Core ML tensors have at most rank {MAX_RANK})",
    "dynamic": "an input has a dynamic (symbolic or unknown) dimension and the device requires static shapes",
    "no_shape": "an input has no shape information at all",
    "dtype": "an input has a type the EP does not compute this op in (e.g. int64 or bool, or fp16 where fp32 is required)",
    "conv3d": "a 3-D convolution or pooling (5-D tensors): the EP takes only 1-D/2-D ones",
    "constant": "a parameter the EP needs as a constant initializer is computed at run time",
    "caveat": "another limitation listed for this op",
}


@dataclass
class Reason:
    code: str  # a key of REASONS
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "detail": self.detail}


@dataclass
class NodeFinding:
    node: str
    op: str
    reasons: list[Reason]

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "op": self.op, "reasons": [r.to_dict() for r in self.reasons]}


@dataclass
class GraphAudit:
    graph: str
    role: str
    file: str
    provider: str
    model_format: str | None
    nodes: int
    nodes_on_ep: int
    partitions: int
    partition_sizes: list[int] = field(default_factory=list)
    fallbacks: list[NodeFinding] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # ops with caveats the audit cannot check
    external_data: bool = False

    @property
    def clean(self) -> bool:
        return self.nodes_on_ep == self.nodes and self.partitions <= 1

    def reason_counts(self) -> dict[str, int]:
        c: Counter[str] = Counter()
        for f in self.fallbacks:
            for code in dict.fromkeys(r.code for r in f.reasons):
                c[code] += 1
        return dict(c)

    def fallback_ops(self) -> dict[str, int]:
        return dict(Counter(f.op for f in self.fallbacks))

    def to_dict(self) -> dict[str, Any]:
        return {
            "graph": self.graph,
            "role": self.role,
            "file": self.file,
            "provider": self.provider,
            "model_format": self.model_format,
            "clean": self.clean,
            "nodes": self.nodes,
            "nodes_on_ep": self.nodes_on_ep,
            "nodes_on_cpu": self.nodes - self.nodes_on_ep,
            "partitions": self.partitions,
            "partition_sizes": self.partition_sizes,
            "reasons": self.reason_counts(),
            "fallbacks": [f.to_dict() for f in self.fallbacks],
            "hints": self.hints,
            "notes": self.notes,
            "unchecked": self.unchecked,
            "external_data": self.external_data,
        }


@dataclass
class AuditReport:
    device: str
    provider: str
    model_format: str | None
    bundle: str
    graphs: list[GraphAudit]
    op_list: str | None = None

    @property
    def clean(self) -> bool:
        return all(g.clean for g in self.graphs)

    @property
    def fallback_nodes(self) -> int:
        return sum(g.nodes - g.nodes_on_ep for g in self.graphs)

    def dirty(self) -> list[GraphAudit]:
        return [g for g in self.graphs if not g.clean]

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "provider": self.provider,
            "model_format": self.model_format,
            "op_list": self.op_list,
            "onnxruntime": ort.__version__,
            "bundle": self.bundle,
            "clean": self.clean,
            "graphs_clean": sum(g.clean for g in self.graphs),
            "graphs": [g.to_dict() for g in self.graphs],
            "fallback_nodes": self.fallback_nodes,
            "reasons": REASONS,
        }


# ---------------------------------------------------------------------------------------------
# op lists
# ---------------------------------------------------------------------------------------------
def op_list_path(provider: str, model_format: str | None) -> Path:
    ensure_ort_tools_without_torch()
    from onnxruntime.tools.mobile_helpers import usability_checker

    name = OP_LISTS.get((provider, model_format if provider == "CoreMLExecutionProvider" else None))
    if name is None:
        raise SorakitError(f"no op list for {provider} ({model_format}) in onnxruntime {ort.__version__}")
    path = Path(usability_checker.__file__).parent / name
    if not path.is_file():
        raise SorakitError(f"this onnxruntime ({ort.__version__}) lacks {name}; the audit needs onnxruntime's tools")
    return path


def read_op_list(path: Path) -> dict[str, str]:
    """'domain:Op' -> caveat text, from the markdown table ORT ships (the format its checker reads)."""
    ops: dict[str, str] = {}
    for line in path.read_text().splitlines():
        cells = line.strip().split("|")
        if len(cells) == 4 and ":" in cells[1]:
            op = cells[1].strip().replace("ai.onnx.", "ai.onnx:")  # one entry in the NN list has a typo
            ops[op] = cells[2].replace("<br/>", " ").strip()
    return ops


# ---------------------------------------------------------------------------------------------
# the graph as the EP sees it
# ---------------------------------------------------------------------------------------------
def uses_external_data(model: str | Path | onnx.ModelProto) -> bool:
    m = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    return any(t.data_location == TensorProto.EXTERNAL for t in m.graph.initializer)


def prepare_model(model: str | Path | onnx.ModelProto, optimize: bool = True) -> onnx.ModelProto:
    """ORT basic optimizations (what runs before partitioning), then shape inference.

    Weights are not read into memory: the result keeps initializer shapes, not values.
    """
    with tempfile.TemporaryDirectory(prefix="sorakit-audit-") as tmp:
        tmpdir = Path(tmp)
        if isinstance(model, onnx.ModelProto):
            src = tmpdir / "in.onnx"
            onnx.save(model, str(src))
        else:
            src = Path(model)
        if optimize:
            out = tmpdir / "basic.onnx"
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            so.optimized_model_filepath = str(out)
            so.log_severity_level = 3
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "basic.onnx.data")
            so.add_session_config_entry("session.disable_prepacking", "1")
            try:
                ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - ORT raises several types
                raise SorakitError(f"onnxruntime cannot load {src.name}: {str(e).splitlines()[0]}") from None
            src = out
        loaded = onnx.load(str(src), load_external_data=False)
    if optimize:
        undo_inserted_casts(loaded)
    try:
        return onnx.shape_inference.infer_shapes(loaded, data_prop=True)
    except Exception as e:  # noqa: BLE001 - keep the shapes ORT wrote
        log.debug("onnx shape inference failed (%s); using the shapes in the file", e)
        return loaded


INSERTED_CAST = "InsertedPrecisionFreeCast_"


def undo_inserted_casts(model: onnx.ModelProto) -> int:
    """Remove the Casts ORT's CPU EP wraps around fp16 nodes it has no fp16 kernel for.

    The audit session runs on the CPU EP only, so ORT inserts them after partitioning; on the
    device the compiling EP sees the node before that, in fp16. Returns how many were removed.
    """
    g = model.graph
    casts = [n for n in g.node if n.op_type == "Cast" and n.name.startswith(INSERTED_CAST)]
    if not casts:
        return 0
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while x in parent:
            x = parent[x]
        return x

    for n in casts:  # a cast is an identity here: join its input and output names
        a, b = find(n.input[0]), find(n.output[0])
        if a != b:
            keep, drop = (a, b) if not a.startswith(INSERTED_CAST) else (b, a)
            parent[drop] = keep
    names = {x for n in casts for x in (*n.input, *n.output)}
    canon = {x: find(x) for x in names}
    for n in casts:
        g.node.remove(n)
    for n in g.node:
        n.input[:] = [canon.get(i, i) for i in n.input]
        n.output[:] = [canon.get(o, o) for o in n.output]
    kept = [v for v in g.value_info if v.name not in names]
    del g.value_info[:]
    g.value_info.extend(kept)
    return len(casts)


def _dims(t: onnx.TypeProto) -> list[int | str | None] | None:
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


class _Values:
    """Shape, type and constness of every value of a graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.shape: dict[str, list[int | str | None] | None] = {}
        self.dtype: dict[str, int] = {}
        for v in list(graph.input) + list(graph.value_info) + list(graph.output):
            self.shape[v.name] = _dims(v.type)
            if v.type.HasField("tensor_type"):
                self.dtype[v.name] = v.type.tensor_type.elem_type
        inputs = {i.name for i in graph.input}
        self.const: set[str] = set()
        self.initializers: dict[str, list[int]] = {}
        for init in graph.initializer:
            self.shape[init.name] = list(init.dims)
            self.dtype[init.name] = init.data_type
            self.initializers[init.name] = list(init.dims)
            if init.name not in inputs:
                self.const.add(init.name)
        for n in graph.node:
            if n.op_type == "Constant":
                self.const.update(n.output)

    def known(self, name: str) -> bool:
        return name in self.shape


# ---------------------------------------------------------------------------------------------
# per-node rules
# ---------------------------------------------------------------------------------------------
class _Rules:
    def __init__(self, provider: str, model_format: str | None, require_static: bool, ops: dict[str, str]):
        self.provider = provider
        self.format = model_format
        self.coreml = provider == "CoreMLExecutionProvider"
        self.require_static = require_static
        self.ops = ops
        self.seen: set[str] = set()

    def check(self, node: onnx.NodeProto, v: _Values) -> list[Reason]:
        reasons: list[Reason] = []
        domain = node.domain or "ai.onnx"
        key = f"{domain}:{node.op_type}"
        what = f"{self.provider.replace('ExecutionProvider', '')} EP" + (f" ({self.format})" if self.format else "")
        if key not in self.ops:
            reasons.append(Reason("op", f"{key} is not in the {what} op list of onnxruntime {ort.__version__}"))
        else:
            self.seen.add(node.op_type)
        for name in node.input:
            if not name:
                continue  # an optional input that is not given
            reasons += self._input(node, name, v)
        reasons += self._op_rules(node, v)
        # one reason of each kind per input is enough
        out, seen = [], set()
        for r in reasons:
            if (r.code, r.detail) not in seen:
                seen.add((r.code, r.detail))
                out.append(r)
        return out

    def _input(self, node, name: str, v: _Values) -> list[Reason]:
        if not v.known(name):
            return [Reason("no_shape", f"input {name!r} has no shape information")]
        shape = v.shape[name]
        if shape is None:
            return [Reason("no_shape", f"input {name!r} has no shape information")]
        out = []
        dynamic = [d for d in shape if not isinstance(d, int) or d < 0]
        if dynamic and self.require_static:
            out.append(Reason("dynamic", f"input {name!r} has the dynamic shape {_fmt(shape)}"))
        if self.coreml:
            big = [d for d in shape if isinstance(d, int) and d > MAX_DIM]
            if big:
                out.append(Reason("dim", f"input {name!r} of shape {_fmt(shape)} has a dimension of {max(big)} "
                                         f"(> {MAX_DIM})"))
            if len(shape) > MAX_RANK:
                out.append(Reason("rank", f"input {name!r} has rank {len(shape)} (> {MAX_RANK}): {_fmt(shape)}"))
        return out

    def _op_rules(self, node, v: _Values) -> list[Reason]:
        op, ins = node.op_type, list(node.input)
        out: list[Reason] = []

        def rank(i: int) -> int | None:
            if i < len(ins) and ins[i] and v.shape.get(ins[i]) is not None:
                return len(v.shape[ins[i]])
            return None

        def dtype(i: int) -> int | None:
            return v.dtype.get(ins[i]) if i < len(ins) and ins[i] else None

        def need_const(i: int, what: str) -> None:
            if i < len(ins) and ins[i] and ins[i] not in v.const:
                out.append(Reason("constant", f"{what} of {op} ({ins[i]!r}) must be a constant initializer"))

        floats = FLOATS if self.format == "MLProgram" else {TensorProto.FLOAT}
        if op in FLOAT_OPS and dtype(0) is not None and dtype(0) not in floats:
            out.append(Reason("dtype", f"input {ins[0]!r} of {op} is {_dtype(dtype(0))}; the EP computes it in "
                                       + "/".join(_dtype(t) for t in sorted(floats))))
        if op in ("Conv", "ConvTranspose", "AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool"):
            r = rank(0) or rank(1)
            if r is not None and r > 4:
                kind = "convolution" if op.startswith("Conv") else "pooling"
                out.append(Reason("conv3d", f"{op} on a {r}-D tensor (a {r - 2}-D {kind}): the "
                                            f"{self.provider.replace('ExecutionProvider', '')} EP takes only 1-D/2-D"))
        if not self.coreml:
            return out
        if op == "Conv":
            need_const(2, "the bias")
            if self.format != "MLProgram":
                need_const(1, "the weight")
        elif op == "ConvTranspose":
            need_const(1, "the weight")
            need_const(2, "the bias")
        elif op == "Gemm":
            need_const(1, "input B")
        elif op == "MatMul" and self.format != "MLProgram":
            need_const(1, "input B")
        elif op == "Slice":
            for i, what in ((1, "starts"), (2, "ends"), (3, "axes"), (4, "steps")):
                need_const(i, what)
        elif op == "Split":
            need_const(1, "the split sizes")
        elif op == "Pow":
            if dtype(0) != TensorProto.FLOAT or dtype(1) not in (None, TensorProto.FLOAT):
                out.append(Reason("dtype", f"Pow takes only float32 inputs in the {self.format} op list of "
                                           f"onnxruntime {ort.__version__} (got {_dtype(dtype(0))}, {_dtype(dtype(1))})"))
        elif op == "Where":
            for i in (1, 2):
                if dtype(i) is not None and dtype(i) not in FLOATS:
                    out.append(Reason("dtype", f"the branches of Where must be float or float16 ({ins[i]!r} is "
                                               f"{_dtype(dtype(i))})"))
        elif op == "And":
            if any(dtype(i) not in (None, TensorProto.BOOL) for i in (0, 1)):
                out.append(Reason("dtype", "And takes only bool inputs"))
        elif op == "GridSample":
            if rank(0) not in (None, 4):
                out.append(Reason("caveat", f"GridSample needs a 4-D input (rank {rank(0)})"))
        elif op == "DepthToSpace":
            mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "DCR")
            shape = v.shape.get(ins[0])
            if mode == "CRD" and (shape is None or not all(isinstance(d, int) for d in shape)):
                out.append(Reason("caveat", "DepthToSpace in CRD mode needs a fixed input shape"))
        elif op == "Gather" and self.format == "NeuralNetwork":
            s = v.shape.get(ins[1]) if len(ins) > 1 else None
            if s == []:
                out.append(Reason("caveat", "Gather with scalar indices"))
        return out


def _fmt(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _dtype(t: int | None) -> str:
    if t is None:
        return "unknown"
    try:
        return TensorProto.DataType.Name(t).lower()
    except ValueError:
        return str(t)


class _Checker:
    """What ``usability_checker.check_partitioning`` asks of an op checker, backed by our rules."""

    def __init__(self, verdict: dict[int, bool]):
        self.verdict = verdict

    def is_op_supported(self, node) -> bool:
        return self.verdict.get(id(node), False)

    def get_caveats(self) -> list[str]:
        return []


# ---------------------------------------------------------------------------------------------
# hints: how to fix what falls back
# ---------------------------------------------------------------------------------------------
PIN_COMMAND = "sorakit optimize {bundle} --passes pin --resolution {resolution} --frames {frames} --out {bundle}-pinned"


def _hints(audit: GraphAudit, v: _Values, nodes: dict[str, onnx.NodeProto], ctx: dict[str, Any]) -> list[str]:
    hints: list[str] = []
    by_code: dict[str, list[NodeFinding]] = {}
    for f in audit.fallbacks:
        for r in f.reasons:
            by_code.setdefault(r.code, []).append(f)
    ops = {f.op for f in audit.fallbacks}

    def table_rows(f: NodeFinding) -> int:
        n = nodes.get(f.node)
        if n is None or not n.input:
            return 0
        dims = v.initializers.get(n.input[0])
        return dims[0] if dims else 0

    gathers = [f for f in audit.fallbacks if f.op == "Gather"]
    big_tables = [table_rows(f) for f in gathers if table_rows(f) > MAX_DIM]
    if audit.role == "embed" and (gathers or "dim" in by_code):
        rows = max(big_tables) if big_tables else max((table_rows(f) for f in gathers), default=0)
        size = f"{rows}-row " if rows else ""
        hints.append(
            f"the token embedding lookup (a Gather on the {size}table) cannot run on the EP"
            + (f": the table is over Core ML's {MAX_DIM}-row limit, and Gather is not in the op list" if big_tables
               else ": Gather is not in the op list")
            + ". Re-export with `sorakit export ... --t5-embedding-outside`: the table is written to "
              "text_encoder/embedding.npy, the app looks the rows up itself, and this graph takes inputs_embeds"
        )
    elif gathers:
        hints.append("Gather is not in the op list: replace a constant-index Gather with Slice, or do the lookup "
                     "outside the graph")
    if "Expand" in ops:
        hints.append("Expand is not in the ML Program op list: broadcast with Mul/Add against a ones tensor, or use "
                     "Tile (which is), in the exporter or a graph pass")
    if "Pad" in ops:
        hints.append("Pad is not in the ML Program op list: fold zero padding into the following Conv's pads "
                     "(ONNX Conv takes separate begin/end pads, so the VAE's causal time padding fits), or build it "
                     "from Concat with a zeros constant")
    if "conv3d" in by_code:
        hints.append(
            "3-D convolutions (the temporal VAE's CausalConv3d) do not run on ORT's CoreML EP. Options: "
            "(a) decompose each Conv3d with kT time taps into kT Conv2d over shifted time slices, summed "
            "(a conv3d->conv2d graph pass; not in sorakit yet); (b) run these graphs on the CPU EP "
            "(they are small next to the transformer); (c) use the Core ML path (`sorakit export-coreml`), whose "
            "conv takes 3-D kernels directly"
        )
    if "dynamic" in by_code or "no_shape" in by_code:
        hints.append("pin the shapes for this device: " + PIN_COMMAND.format(**ctx))
    if "rank" in by_code:
        hints.append(f"reshape rank-{MAX_RANK + 1}+ tensors to rank <= {MAX_RANK} (merge two axes) in the exporter")
    if "dim" in by_code and audit.role != "embed":
        hints.append(f"a dimension over {MAX_DIM}: lower the resolution/frame count, or split the tensor along it "
                     "(e.g. batched cross-attention instead of one flattened sequence)")
    pow_fp16 = [f for f in by_code.get("dtype", []) if f.op == "Pow"]
    if pow_fp16:
        hints.append("Pow runs only in fp32 on the EP: the fp16 pass should keep Pow (RMSNorm's x^2) in fp32, or "
                     "rewrite Pow(x, 2) as Mul(x, x)")
    if any(f.op != "Pow" for f in by_code.get("dtype", [])):
        hints.append("integer/bool arithmetic runs on the CPU: fold shape computations into constants (a static "
                     "export does) or move them out of the graph")
    if "constant" in by_code:
        hints.append("parameters computed at run time (Slice starts/ends, Split sizes, Conv bias, Gemm B) must be "
                     "constants: pin shapes and constant-fold")
    return hints


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------
def audit_model(
    model: str | Path | onnx.ModelProto,
    profile: DeviceProfile | str,
    name: str | None = None,
    role: str = "",
    optimize: bool = True,
    context: dict[str, Any] | None = None,
) -> GraphAudit:
    """Audit one ONNX graph for a device; ``model`` is a path or a ModelProto."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    file = str(model) if not isinstance(model, onnx.ModelProto) else ""
    name = name or (Path(file).stem if file else (model.graph.name or "graph"))
    prepared = prepare_model(model, optimize)
    g = prepared.graph
    ep = profile.compiling_provider
    if ep is None:
        return GraphAudit(name, role, file, "CPUExecutionProvider", None, len(g.node), len(g.node),
                          1 if len(g.node) else 0, [len(g.node)] if len(g.node) else [],
                          notes=["no compiling execution provider: the CPU EP runs every node"])
    fmt = profile.coreml_model_format if ep.name == "CoreMLExecutionProvider" else None
    ops = read_op_list(op_list_path(ep.name, fmt))
    rules = _Rules(ep.name, fmt, profile.requires_static_input_shapes, ops)
    values = _Values(g)
    verdict: dict[int, bool] = {}
    fallbacks: list[NodeFinding] = []
    nodes: dict[str, onnx.NodeProto] = {}
    for i, n in enumerate(g.node):
        label = n.name or f"{n.op_type}_{i}"
        nodes[label] = n
        reasons = rules.check(n, values)
        verdict[id(n)] = not reasons
        if reasons:
            fallbacks.append(NodeFinding(label, n.op_type, reasons))
    partitions: list[int] = []
    if g.node:
        ensure_ort_tools_without_torch()
        from onnxruntime.tools.mobile_helpers import usability_checker

        info = usability_checker.check_partitioning(g, _Checker(verdict), require_fixed_input_sizes=False)
        partitions = [len(p) for p in info.supported_groups]
    on_ep = sum(verdict.values())
    audit = GraphAudit(name, role, file, ep.name, fmt, len(g.node), on_ep, len(partitions), partitions, fallbacks)
    audit.unchecked = sorted(op for op in rules.seen if op in UNCHECKED)
    if ep.name == "CoreMLExecutionProvider" and uses_external_data(model):
        audit.external_data = True
        audit.notes.append(
            "weights are stored as external data: ORT's CoreML EP has skipped nodes whose initializers live in "
            "external data (HasExternalInitializer in its base op builder); the packaged .ort embeds the weights "
            "(sorakit package), which avoids this. Not verifiable without a Mac: there, check with "
            "session.record_ep_graph_assignment_info=1"
        )
    if not profile.requires_static_input_shapes and any(
        not all(isinstance(d, int) for d in (values.shape.get(i.name) or [None])) for i in g.input
    ):
        audit.notes.append("dynamic input shapes: allowed on this device, but a compiling EP runs them slowly")
    if ep.name == "NnapiExecutionProvider" and any(p.name == "XnnpackExecutionProvider" for p in profile.providers):
        audit.notes.append("XNNPACK (first in this profile) is not modelled: ORT ships no op list for it; nodes it "
                           "takes are counted here as NNAPI or CPU nodes")
    ctx = {"bundle": "BUNDLE", "resolution": "HxW", "frames": "N"}
    ctx.update(context or {})
    audit.hints = _hints(audit, values, nodes, ctx)
    return audit


def audit_bundle(
    bundle,
    profile: DeviceProfile | str,
    only: list[str] | None = None,
    optimize: bool = True,
    verify: bool = True,
    progress=None,
) -> AuditReport:
    """Audit every graph of a bundle (plain graphs and their variants, in manifest order).

    ``bundle`` is a path or an opened ``Bundle``; ``only`` filters graphs by name prefix.
    """
    from fnmatch import fnmatch

    from sorakit.bundle.io import Bundle

    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify="lazy")
    profile = get_profile(profile) if isinstance(profile, str) else profile
    m = b.manifest
    geo = m.geometry
    ctx = {"bundle": str(b.root), "resolution": f"{geo.get('height', 'H')}x{geo.get('width', 'W')}",
           "frames": str(geo.get("num_frames", "N"))}
    graphs = m.all_graphs()
    if only:
        graphs = [g for g in graphs if any(g.name.startswith(p) or fnmatch(g.name, p) for p in only)]
        if not graphs:
            raise SorakitError(f"no graph of {b.root} matches {only}; its graphs: "
                               f"{', '.join(x.name for x in m.all_graphs())}")
    ep = profile.compiling_provider
    fmt = profile.coreml_model_format if ep and ep.name == "CoreMLExecutionProvider" else None
    report = AuditReport(profile.name, ep.name if ep else "CPUExecutionProvider", fmt, str(b.root), [],
                         op_list_path(ep.name, fmt).name if ep else None)
    for i, g in enumerate(graphs):
        if progress:
            progress(g.name, i, len(graphs))
        if verify:
            b.verify_graph_files(g)
        a = audit_model(b.path(g.file), profile, name=g.name, role=g.role, optimize=optimize, context=ctx)
        a.file = g.file
        report.graphs.append(a)
    if progress:
        progress("", len(graphs), len(graphs))
    return report


__all__ = ["audit_model", "audit_bundle", "prepare_model", "AuditReport", "GraphAudit", "NodeFinding", "Reason",
           "REASONS", "MAX_DIM", "MAX_RANK"]
