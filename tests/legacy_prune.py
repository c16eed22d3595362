"""A frozen copy of sorakit's own prune before it moved onto onnxscript/onnx-ir (issue 18, commit 08efa41).

Only the tests use it: the new ``prune_model`` must give the same outputs as this one on every
graph of the tiny and shapes bundles and remove at least as many nodes. Do not maintain it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference


def static_shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Value name -> shape after ONNX shape inference (ints, or names of symbolic dims)."""
    inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    out: dict[str, list[int | str]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                        for d in vi.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        out[init.name] = list(init.dims)
    return out


def toposort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so every node comes after the producers of its inputs (stable)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progressed = False
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
                progressed = True
            else:
                rest.append(n)
        if not progressed:
            missing = sorted({i for n in rest for i in n.input if i not in available})[:5]
            raise ValueError(f"graph has a cycle or undefined inputs: {missing}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def clear_shapes(graph: onnx.GraphProto) -> None:
    """Drop intermediate shape annotations (stale ones fail at ORT run time, not load time)."""
    del graph.value_info[:]


FOLD_LIMIT = 1 << 16  # elements; larger results stay computed (weights are never touched)


def legacy_prune_model(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for _ in range(8):
        changed = _fold_shapes(g, static_shapes(m))
        changed |= _fold_constants(g)
        changed |= _drop_identity_casts(g, static_shapes(m))
        changed |= _drop_dead(g)
        if not changed:
            break
    clear_shapes(g)
    toposort(g)
    return m


def _inline_constants(g: onnx.GraphProto) -> dict[str, np.ndarray]:
    vals = {}
    for i in g.initializer:
        if i.data_location != onnx.TensorProto.EXTERNAL and np.prod(i.dims, dtype=np.int64) <= FOLD_LIMIT:
            vals[i.name] = numpy_helper.to_array(i)
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            vals[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return vals


def _set_constant(g: onnx.GraphProto, name: str, value: np.ndarray) -> None:
    g.initializer.append(numpy_helper.from_array(np.asarray(value), name))


def _fold_shapes(g: onnx.GraphProto, shapes) -> bool:
    changed = False
    keep = []
    for n in g.node:
        s = shapes.get(n.input[0]) if n.op_type in ("Shape", "Size") and n.input else None
        if s and all(isinstance(d, int) and d > 0 for d in s):
            if n.op_type == "Shape":
                start = next((a.i for a in n.attribute if a.name == "start"), 0)
                end = next((a.i for a in n.attribute if a.name == "end"), len(s))
                _set_constant(g, n.output[0], np.array(s[start:end], dtype=np.int64))
            else:
                _set_constant(g, n.output[0], np.array(int(np.prod(s)), dtype=np.int64))
            changed = True
            continue
        keep.append(n)
    if changed:
        del g.node[:]
        g.node.extend(keep)
    return changed


_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}


def _fold_constants(g: onnx.GraphProto) -> bool:
    from onnx.reference import ReferenceEvaluator

    vals = _inline_constants(g)
    changed = False
    keep = []
    for n in g.node:
        if n.op_type == "Constant":
            keep.append(n)
            continue
        ins = [i for i in n.input if i]
        if (n.op_type in _NONDETERMINISTIC or n.domain not in ("", "ai.onnx") or not ins
                or not all(i in vals for i in ins)):
            keep.append(n)
            continue
        try:
            sub = helper.make_graph([n], "fold", [], [helper.make_tensor_value_info(o, 0, None) for o in n.output],
                                    [numpy_helper.from_array(vals[i], i) for i in ins])
            outs = ReferenceEvaluator(helper.make_model(sub, opset_imports=[helper.make_opsetid("", 18)])).run(None, {})
        except Exception:  # noqa: BLE001 - anything the reference evaluator cannot do stays computed
            keep.append(n)
            continue
        if any(np.asarray(o).size > FOLD_LIMIT for o in outs):
            keep.append(n)
            continue
        for name, value in zip(n.output, outs):
            _set_constant(g, name, np.asarray(value))
            vals[name] = np.asarray(value)
        changed = True
    if changed:
        del g.node[:]
        g.node.extend(keep)
    return changed


def _elem_type(g: onnx.GraphProto, name: str) -> int | None:
    for coll in (g.input, g.value_info, g.output):
        for v in coll:
            if v.name == name:
                return v.type.tensor_type.elem_type
    return None


def _drop_identity_casts(g: onnx.GraphProto, shapes) -> bool:
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]),
                                            strict_mode=False).graph
    changed = False
    outputs = {o.name for o in g.output}
    for n in list(g.node):
        if n.op_type != "Cast" or n.output[0] in outputs:
            continue
        to = next(a.i for a in n.attribute if a.name == "to")
        if _elem_type(inferred, n.input[0]) == to:
            src, dst = n.input[0], n.output[0]
            for c in g.node:
                c.input[:] = [src if i == dst else i for i in c.input]
            g.node.remove(n)
            changed = True
    return changed


def _drop_dead(g: onnx.GraphProto) -> bool:
    needed = {o.name for o in g.output}
    live = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(i for i in n.input if i)
    live.reverse()
    inits = [i for i in g.initializer if i.name in needed]
    changed = len(live) != len(g.node) or len(inits) != len(g.initializer)
    if changed:
        del g.node[:]
        g.node.extend(live)
        del g.initializer[:]
        g.initializer.extend(inits)
    return changed
