"""fuse_gelu: the tanh GELU of the transformer's MLPs as one ONNX Runtime ``FastGelu`` node.

The exporters write ``nn.GELU(approximate="tanh")`` as nine element-wise nodes,

    0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))

each a pass over the MLP's widest tensor ([B, T, S, 4 * hidden]). ONNX Runtime's own fusion
does not match the order the exporters use, so on a real-size STDiT3 block these nodes take a
sixth of the block's time on 2 cores. ``com.microsoft.FastGelu`` computes the same function in
one pass (ONNX Runtime's CPU kernel; OpenVINO reads it too). Exact up to float rounding;
verified graph by graph like every exact pass. Not for Core ML (no contrib operators there).

The match is anchored on ``Tanh`` and checks every constant; a GELU written any other way is
left alone (the pass reports how many it fused).
"""

from __future__ import annotations

import math

import onnx
from onnx import helper, numpy_helper

from sorakit.bundle.manifest import GraphEntry, Manifest
from sorakit.errors import SorakitError
from sorakit.graph_passes.base import GraphChange, GraphPass, Workspace, new_name
from sorakit.graph_passes.onnx_utils import consumers, producers
from sorakit.graph_passes.passes import _refuse_after, _refuse_twice
from sorakit.graph_passes.registry import register

MS_DOMAIN = "com.microsoft"
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _scalar(g: onnx.GraphProto, name: str, prods, inits) -> float | None:
    if name in inits:
        a = numpy_helper.to_array(inits[name])
    else:
        n = prods.get(name)
        if n is None or n.op_type != "Constant" or not n.attribute or n.attribute[0].name != "value":
            return None
        a = numpy_helper.to_array(n.attribute[0].t)
    return float(a.reshape(-1)[0]) if a.size == 1 else None


def _split(n: onnx.NodeProto, g, prods, inits) -> tuple[float, str] | None:
    """A binary node with one scalar constant input: (constant, the other input)."""
    if len(n.input) != 2:
        return None
    for k in (0, 1):
        c = _scalar(g, n.input[k], prods, inits)
        if c is not None:
            return c, n.input[1 - k]
    return None


def _close(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= 1e-5 * max(1.0, abs(b))


def _cube_of(name: str, g, prods, inits) -> str | None:
    """x if ``name`` is x*x*x (as Mul(x, Mul(x, x)) in any order) or Pow(x, 3), else None."""
    n = prods.get(name)
    if n is None:
        return None
    if n.op_type == "Pow":
        return n.input[0] if _close(_scalar(g, n.input[1], prods, inits), 3.0) else None
    if n.op_type != "Mul":
        return None
    a, b = n.input
    for x, sq in ((a, b), (b, a)):
        s = prods.get(sq)
        if s is not None and s.op_type == "Mul" and s.input[0] == s.input[1] == x:
            return x
    return None


def fuse(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(the model with every tanh GELU fused, how many were fused)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    prods, uses = producers(g), consumers(g)
    inits = {i.name: i for i in g.initializer if i.data_location != onnx.TensorProto.EXTERNAL}
    outputs = {o.name for o in g.output}
    drop: set[int] = set()
    fused = 0
    replace: dict[int, onnx.NodeProto] = {}
    for tanh in [n for n in g.node if n.op_type == "Tanh"]:
        inner = prods.get(tanh.input[0])  # sqrt(2/pi) * (x + 0.044715 x^3)
        if inner is None or inner.op_type != "Mul" or not (s := _split(inner, g, prods, inits)) \
                or not _close(s[0], SQRT_2_OVER_PI):
            continue
        add = prods.get(s[1])
        if add is None or add.op_type != "Add":
            continue
        x = None
        for k in (0, 1):
            cube_mul = prods.get(add.input[1 - k])
            if cube_mul is not None and cube_mul.op_type == "Mul" and (c := _split(cube_mul, g, prods, inits)) \
                    and _close(c[0], 0.044715) and _cube_of(c[1], g, prods, inits) == add.input[k]:
                x = add.input[k]
                chain = [cube_mul, prods[c[1]]]
                cube = prods[c[1]]
                if cube.op_type == "Mul":
                    chain.append(prods[next(i for i in cube.input if i != x)])
                break
        if x is None:
            continue
        # forward: (1 + tanh) * x * 0.5, in any of the orders the exporters write
        one = uses.get(tanh.output[0], [])
        if len(one) != 1 or one[0].op_type != "Add" or not _close((_split(one[0], g, prods, inits) or (None,))[0], 1.0):
            continue
        rest, tail = uses.get(one[0].output[0], []), []
        if len(rest) != 1 or rest[0].op_type != "Mul":
            continue
        mul1 = rest[0]
        other = next(i for i in mul1.input if i != one[0].output[0])
        if other == x:  # x * (1 + t), then * 0.5
            nxt = uses.get(mul1.output[0], [])
            if len(nxt) != 1 or nxt[0].op_type != "Mul" or not _close((_split(nxt[0], g, prods, inits) or (None,))[0], 0.5):
                continue
            tail, out = [mul1, nxt[0]], nxt[0].output[0]
        else:  # (0.5 * x) * (1 + t)
            half = prods.get(other)
            if half is None or half.op_type != "Mul" or (h := _split(half, g, prods, inits)) is None \
                    or not _close(h[0], 0.5) or h[1] != x:
                continue
            tail, out = [half, mul1], mul1.output[0]
        body = [inner, add, *chain, tanh, one[0], *tail]
        inside = {o for n in body for o in n.output} - {out}
        # every intermediate must be used only inside the pattern, and none be a graph output
        if inside & outputs or any(u not in body for v in inside for u in uses.get(v, [])):
            continue
        idx = {id(n): i for i, n in enumerate(g.node)}
        first = min(idx[id(n)] for n in body)
        drop |= {idx[id(n)] for n in body}
        replace[first] = helper.make_node("FastGelu", [x], [out], domain=MS_DOMAIN, name=f"{tanh.name}_FastGelu")
        fused += 1
    if not fused:
        return m, 0
    nodes = []
    for i, n in enumerate(g.node):
        if i in replace:
            nodes.append(replace[i])
        elif i not in drop:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == MS_DOMAIN for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return m, fused


@register
class FuseGeluPass(GraphPass):
    """The transformer's tanh GELUs as one FastGelu node each (exact; ONNX Runtime and OpenVINO)."""

    name = "fuse_gelu"
    order = 25  # on the exporter's pattern, before prune rewrites it; before precision passes

    def check(self, manifest: Manifest) -> None:
        _refuse_twice(manifest, self.name)
        # int8's dynamic activation quantization rounds the GELU's output: a 1e-7 change there
        # moves values across rounding steps, so a fused int8 graph is not verifiable as exact
        _refuse_after(manifest, self.name, ("prune", "simplify", "fp16", "int8"))
        if "transformer" not in manifest.components:
            raise SorakitError("pass 'fuse_gelu' needs the transformer, which this bundle lacks")

    def targets(self, manifest):
        return [("transformer", g) for g in manifest.components["transformer"].graphs if g.role == "block"]

    def rewrite(self, ws: Workspace, manifest: Manifest, component: str, entry: GraphEntry) -> list[GraphChange]:
        import copy

        changes = []
        for e in [entry] + list(entry.variants.values()):
            model = ws.load(e.file)
            new, n = fuse(model)
            if not n:
                continue
            old = copy.deepcopy(e)
            e.file = new_name(e.file, "gelu")
            ws.save(new, e.file)  # the weights stay where they are
            changes.append(GraphChange(e.name, len(model.graph.node), len(new.graph.node), ws.size(old), ws.size(e),
                                       note=f"{n} tanh GELU(s) -> FastGelu", replaced=old))
        return changes

