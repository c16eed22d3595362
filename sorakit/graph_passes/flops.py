"""FLOPs of an ONNX graph from its shapes (one multiply-add = 2 FLOPs).

Counts MatMul, Gemm and Conv, which carry ~all of a transformer's or VAE's arithmetic;
elementwise ops are ignored. Needs static shapes (after shape inference); dimensions that
stay symbolic count as 0 so the result is a lower bound.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx
from onnx import shape_inference


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    g = inferred.graph
    out: dict[str, list[int]] = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else 0 for d in dims]
    for init in g.initializer:
        out[init.name] = list(init.dims)
    return out


def node_flops(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    if node.op_type == "MatMul":
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        if not a or not b:
            return 0
        if len(b) == 1:
            return 2 * math.prod(a)
        out = shapes.get(node.output[0]) or []
        return 2 * math.prod(out) * a[-1] if out else 0
    if node.op_type == "Gemm":
        a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        if not a or not out:
            return 0
        k = a[0] if trans_a else a[-1]
        return 2 * math.prod(out) * k
    if node.op_type == "Conv":
        w, out = shapes.get(node.input[1]), shapes.get(node.output[0])
        if not w or not out:
            return 0
        # out elements x (Cin/groups x kernel) multiply-adds; w = [Cout, Cin/g, k...]
        return 2 * math.prod(out) * math.prod(w[1:])
    return 0


def count_flops(model: onnx.ModelProto | str | Path) -> int:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    shapes = _shapes(model)
    return int(sum(node_flops(n, shapes) for n in model.graph.node))
