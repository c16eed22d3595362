"""FLOPs of an ONNX graph from its shapes (one multiply-add = 2 FLOPs).

Counts MatMul, Gemm and Conv, which carry ~all of a transformer's or VAE's arithmetic;
elementwise ops are ignored. Needs static shapes (after shape inference); dimensions that
stay symbolic count as 0 so the result is a lower bound.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import onnx
from onnx import shape_inference

# small shape-computing ops that are evaluated when all their inputs are constant
_FOLDABLE = {"Constant", "ConstantOfShape", "Concat", "Reshape", "Slice", "Transpose", "Cast", "Gather",
             "Unsqueeze", "Squeeze", "Range", "Add", "Sub", "Mul", "Div", "Neg", "Equal", "Where", "Expand"}
_FOLD_MAX = 4096  # elements; larger constants are weights, which shape inference does not need


def fold_shape_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose small constant sub-computations are evaluated into initializers.

    Exporters write e.g. a causal convolution's padding as a chain of ConstantOfShape, Concat,
    Reshape, Slice and Transpose feeding a Pad; ONNX shape inference does not evaluate that
    chain, so every shape after the Pad (and the FLOPs of the 5-D convolutions there) stayed
    unknown. Evaluating it with the ONNX reference implementation makes the pads constant.
    """
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    model = copy.deepcopy(model)
    g = model.graph
    known = {i.name: numpy_helper.to_array(i) for i in g.initializer
             if math.prod(i.dims) <= _FOLD_MAX and i.data_location != onnx.TensorProto.EXTERNAL}
    keep, folded = [], {}
    for node in g.node:
        ins = [i for i in node.input if i]
        if node.op_type in _FOLDABLE and all(i in known for i in ins):
            try:
                outs = ReferenceEvaluator(node).run(None, {i: known[i] for i in ins})
            except Exception:  # anything the reference cannot evaluate stays a node
                outs = None
            if outs is not None and all(getattr(o, "size", _FOLD_MAX + 1) <= _FOLD_MAX for o in outs):
                for name, value in zip(node.output, outs):
                    known[name] = folded[name] = value
                continue
        keep.append(node)
    if folded:
        del g.node[:]
        g.node.extend(keep)
        g.initializer.extend(numpy_helper.from_array(v, n) for n, v in folded.items())
    return model


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    model = fold_shape_constants(model)
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
