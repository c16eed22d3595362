"""Exact passes that make every graph one partition of ORT's Core ML execution provider.

What the offline audit (``sorakit audit --device iphone-15-pro``) finds off the EP in an
Open-Sora bundle, and the pass that removes it:

* ``fold_pad``: ``Pad`` is not in the ML Program op list. A zero ``Pad`` in front of a
  ``Conv`` becomes the convolution's own ``pads`` (ONNX Conv takes separate begin and end
  pads, so the VAE's causal time padding fits); any other constant ``Pad`` becomes a
  ``Concat`` with constant fill blocks.
* ``conv3d_to_2d``: the EP builds only 1-D/2-D convolutions. A 3-D convolution with kT time
  taps becomes one 2-D convolution over kT shifted time slices stacked on the channel axis:
  ``y[t] = sum_k W[:, :, k] * x[t*s + k*d - p]`` is a 2-D convolution of the stacked slices
  with the kernel ``W`` reordered to ``[M, kT*C, kH, kW]``. Frames go to the batch axis
  (``Transpose``/``Reshape``), the causal time padding is a ``Concat`` with constant zeros,
  the spatial padding the 2-D convolution's ``pads``. 1x1x1 convolutions need no transpose.
* ``split_dims``: Core ML refuses a tensor with a dimension over 16384. GroupNorm, exported
  as ``Reshape [N, G, -1] -> InstanceNormalization -> Reshape``, flattens a group's values
  (46080 at 144x256 in the temporal VAE, 294912 in the spatial VAE); the flattening becomes
  ``[N, G, a, b]`` with ``a, b <= 16384`` (InstanceNormalization normalises over every axis
  after the channel, so the statistics are the same).
* ``t5_embed_outside``: the T5 token table (32128 rows) is a ``Gather`` Core ML does not take
  and a dimension over the limit. The pass lifts the lookup out of ``text_encoder.embed``: the
  graph takes ``inputs_embeds``, the table is written to ``text_encoder/embedding.npy`` (what
  ``sorakit export --t5-embedding-outside`` does at export; the runtime and ``sorakit package``
  already read it).

Every pass is exact, verified by the pipeline graph by graph on the CPU EP (max abs error
within 1e-4 of the output's scale). A graph a pass cannot make clean is left unchanged and the
pass says which node and why (``GraphChange.note``, printed by ``sorakit optimize``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sorakit.bundle.manifest import GraphEntry, Manifest, TensorSpec
from sorakit.errors import SorakitError
from sorakit.graph_passes.base import GraphChange, GraphPass, Workspace, new_name
from sorakit.graph_passes.onnx_utils import clear_shapes, static_shapes, toposort
from sorakit.graph_passes.registry import register

MAX_DIM = 16384  # Core ML fails to load a model with a larger dimension (coremltools#1003)
MAX_RANK = 5
PRECISION_PASSES = ("fp16", "int8")


class NotRewritable(SorakitError):
    """A graph a pass cannot make clean: names the node and why. The graph stays as it was."""

    def __init__(self, node: onnx.NodeProto | str, why: str):
        label = node if isinstance(node, str) else f"{node.name or node.output[0]} ({node.op_type})"
        super().__init__(f"node {label}: {why}")
        self.node = label
        self.why = why


# ---------------------------------------------------------------------------------------------
# graph helpers
# ---------------------------------------------------------------------------------------------
@dataclass
class _Graph:
    """A model plus what the rewrites ask of it: constants, producers, consumers, shapes."""

    model: onnx.ModelProto
    shapes: dict[str, list] = field(default_factory=dict)
    types: dict[str, int] = field(default_factory=dict)
    _counter: int = 0

    def __post_init__(self):
        copied = onnx.ModelProto()
        copied.CopyFrom(self.model)  # rewrites never touch the caller's model
        self.model = copied
        self.g = self.model.graph
        self.refresh()

    def refresh(self) -> None:
        self.inits = {i.name: i for i in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.g.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.g.output}

    def infer(self) -> None:
        self.shapes = static_shapes(self.model)
        inferred = onnx.shape_inference.infer_shapes(self.model, strict_mode=False)
        self.types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info)
                      + list(inferred.graph.input) + list(inferred.graph.output) if v.type.HasField("tensor_type")}

    def shape(self, name: str) -> list[int] | None:
        s = self.shapes.get(name)
        if s is None or not all(isinstance(d, int) and d > 0 for d in s):
            return None
        return list(s)

    def dtype(self, name: str) -> int | None:
        if name in self.inits:
            return self.inits[name].data_type
        if self.types.get(name):
            return self.types[name]
        for coll in (self.g.input, self.g.value_info, self.g.output):
            for v in coll:
                if v.name == name and v.type.HasField("tensor_type"):
                    return v.type.tensor_type.elem_type
        return None

    def const(self, name: str, depth: int = 0) -> np.ndarray | None:
        """The value of ``name`` if it is an initializer, a Constant, or computed from constants only."""
        if not name:
            return None
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is None or depth > 32:
            return None
        if node.op_type == "Constant":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            return numpy_helper.to_array(attr.t) if attr is not None else None
        if node.domain not in ("", "ai.onnx") or node.op_type.startswith("Random"):
            return None
        values = {}
        for i in node.input:
            if i:
                v = self.const(i, depth + 1)
                if v is None:
                    return None
                values[i] = v
        if any(v.size > 1 << 16 for v in values.values()):
            return None
        from onnx.reference import ReferenceEvaluator

        try:
            sub = helper.make_graph([node], "c", [], [helper.make_tensor_value_info(o, 0, None) for o in node.output],
                                    [numpy_helper.from_array(np.asarray(v), k) for k, v in values.items()])
            opset = [o for o in self.model.opset_import if o.domain in ("", "ai.onnx")]
            outs = ReferenceEvaluator(helper.make_model(sub, opset_imports=opset)).run(None, {})
        except Exception:  # noqa: BLE001 - whatever the evaluator cannot do is not a constant here
            return None
        return np.asarray(outs[list(node.output).index(name)])

    def unique(self, base: str) -> str:
        taken = set(self.inits) | set(self.producer) | {i.name for i in self.g.input}
        while True:
            self._counter += 1
            name = f"{base}__{self._counter}"
            if name not in taken:
                return name

    def add_init(self, base: str, value: np.ndarray) -> str:
        name = self.unique(base)
        t = numpy_helper.from_array(np.ascontiguousarray(value), name)
        self.g.initializer.append(t)
        self.inits[name] = t
        return name

    def finish(self) -> onnx.ModelProto:
        drop_dead(self.g)
        clear_shapes(self.g)
        toposort(self.g)
        return self.model


def drop_dead(g: onnx.GraphProto) -> None:
    """Remove nodes and initializers nothing reads any more (what a rewrite leaves behind)."""
    needed = {o.name for o in g.output}
    live = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(i for i in n.input if i)
    live.reverse()
    inits = [i for i in g.initializer if i.name in needed]
    del g.node[:]
    g.node.extend(live)
    del g.initializer[:]
    g.initializer.extend(inits)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _np_dtype(elem: int) -> np.dtype:
    return helper.tensor_dtype_to_np_dtype(elem)


# ---------------------------------------------------------------------------------------------
# fold_pad: Pad -> the following Conv's pads, or Concat with constant blocks
# ---------------------------------------------------------------------------------------------
def _pad_spec(gr: _Graph, node: onnx.NodeProto, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(begin pads, end pads) per axis and the fill value of a constant-mode Pad; else NotRewritable."""
    mode = _attr(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise NotRewritable(node, f"Pad in {mode!r} mode has no exact Conv/Concat form here")
    pads = gr.const(node.input[1]) if len(node.input) > 1 else None
    if pads is None:
        raise NotRewritable(node, "its pads are computed at run time (not constant)")
    pads = pads.astype(np.int64).reshape(-1)
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        a = gr.const(node.input[3])
        if a is None:
            raise NotRewritable(node, "its axes are computed at run time")
        axes = [int(x) % rank for x in a.reshape(-1)]
    if pads.size != 2 * len(axes):
        raise NotRewritable(node, f"pads {pads.tolist()} do not match {len(axes)} axes")
    begin, end = np.zeros(rank, np.int64), np.zeros(rank, np.int64)
    for i, ax in enumerate(axes):
        begin[ax], end[ax] = pads[i], pads[i + len(axes)]
    if (begin < 0).any() or (end < 0).any():
        raise NotRewritable(node, f"negative pads {pads.tolist()} (a crop)")
    value = 0.0
    if len(node.input) > 2 and node.input[2]:
        v = gr.const(node.input[2])
        if v is None:
            raise NotRewritable(node, "its constant_value is computed at run time")
        value = float(np.asarray(v).reshape(-1)[0]) if np.asarray(v).size else 0.0
    return begin, end, value


def _pad_as_concat(gr: _Graph, node: onnx.NodeProto, begin, end, value: float) -> list[onnx.NodeProto]:
    x = node.input[0]
    shape = gr.shape(x)
    if shape is None:
        raise NotRewritable(node, f"its input {x!r} has no static shape (pin the bundle's shapes first)")
    elem = gr.dtype(x)
    if elem is None:
        raise NotRewritable(node, f"the type of its input {x!r} is unknown")
    nodes, cur, cur_shape = [], x, list(shape)
    axes = [a for a in range(len(shape)) if begin[a] or end[a]]
    for j, ax in enumerate(axes):
        parts = []
        for amount in (begin[ax], None, end[ax]):
            if amount is None:
                parts.append(cur)
            elif amount:
                block = list(cur_shape)
                block[ax] = int(amount)
                parts.append(gr.add_init(f"{node.name or 'pad'}.fill", np.full(block, value, _np_dtype(elem))))
        out = node.output[0] if j == len(axes) - 1 else gr.unique(f"{node.output[0]}.axis{ax}")
        nodes.append(helper.make_node("Concat", parts, [out], name=gr.unique(f"{node.name or 'pad'}.concat"), axis=ax))
        cur, cur_shape[ax] = out, cur_shape[ax] + int(begin[ax] + end[ax])
    if not axes:  # a Pad that pads nothing
        nodes.append(helper.make_node("Identity", [x], [node.output[0]], name=node.name))
    return nodes


def fold_pads(model: onnx.ModelProto, only_before_conv3d: bool = False) -> tuple[onnx.ModelProto, int, int]:
    """Rewrite every Pad: into the pads of the Conv(s) it feeds, or as Concat with constant blocks.

    Returns (model, folded into Conv, rebuilt as Concat). All-or-nothing: the first Pad that
    cannot be rewritten raises NotRewritable and the caller keeps the graph as it was.
    """
    gr = _Graph(model)
    pads = [n for n in gr.g.node if n.op_type == "Pad"]
    if not pads:
        return model, 0, 0
    gr.infer()
    folded = concat = 0
    replace: dict[int, list[onnx.NodeProto]] = {}
    for node in pads:
        x, y = node.input[0], node.output[0]
        shape = gr.shape(x)
        rank = len(shape) if shape else None
        if rank is None:
            w = gr.const(node.input[1]) if len(node.input) > 1 else None
            rank = None if w is None else w.size // 2
        if rank is None:
            raise NotRewritable(node, f"the rank of its input {x!r} is unknown")
        begin, end, value = _pad_spec(gr, node, rank)
        users = gr.consumers.get(y, [])
        convs = [u for u in users if u.op_type == "Conv" and u.input[0] == y and y not in u.input[1:]]
        foldable = (value == 0.0 and users and len(convs) == len(users) and y not in gr.outputs
                    and begin[:2].sum() == 0 and end[:2].sum() == 0
                    and all(_attr(c, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET") for c in convs))
        if only_before_conv3d and not (foldable and rank == 5):
            continue
        if foldable:
            k = rank - 2
            for c in convs:
                cp = np.array(_attr(c, "pads", [0] * (2 * k)), np.int64)
                cp[:k] += begin[2:]
                cp[k:] += end[2:]
                _set_attr(c, "pads", [int(v) for v in cp])
                c.input[0] = x
            replace[id(node)] = []
            folded += 1
        else:
            replace[id(node)] = _pad_as_concat(gr, node, begin, end, value)
            concat += 1
    nodes = []
    for n in gr.g.node:
        nodes.extend(replace.get(id(n), [n]))
    del gr.g.node[:]
    gr.g.node.extend(nodes)
    return gr.finish(), folded, concat


# ---------------------------------------------------------------------------------------------
# conv3d_to_2d
# ---------------------------------------------------------------------------------------------
def _conv3d_nodes(gr: _Graph, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The 2-D form of one 3-D Conv node (same input and output names)."""
    x, wname = node.input[0], node.input[1]
    bname = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if wname not in gr.inits:
        raise NotRewritable(node, "its weight is not a constant initializer")
    w = numpy_helper.to_array(gr.inits[wname])
    M, Cg, kT, kH, kW = w.shape
    group = int(_attr(node, "group", 1))
    if group != 1:
        raise NotRewritable(node, f"grouped 3-D convolution (group={group}) is not supported by this rewrite")
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    if auto_pad not in (b"NOTSET", "NOTSET"):
        raise NotRewritable(node, f"auto_pad={auto_pad!r}: give explicit pads")
    shape = gr.shape(x)
    if shape is None or len(shape) != 5:
        raise NotRewritable(node, f"its input {x!r} has no static 5-D shape ({gr.shapes.get(x)}); pin shapes first")
    N, C, T, H, W = shape
    tb, hb, wb, te, he, we = (int(v) for v in _attr(node, "pads", [0] * 6))
    st, sh, sw = (int(v) for v in _attr(node, "strides", [1, 1, 1]))
    dt, dh, dw = (int(v) for v in _attr(node, "dilations", [1, 1, 1]))
    Tp = T + tb + te
    To = (Tp - dt * (kT - 1) - 1) // st + 1
    Ho = (H + hb + he - dh * (kH - 1) - 1) // sh + 1
    Wo = (W + wb + we - dw * (kW - 1) - 1) // sw + 1
    if min(To, Ho, Wo) <= 0:
        raise NotRewritable(node, "the convolution has an empty output")
    if kT * C > MAX_DIM or N * To > MAX_DIM:
        raise NotRewritable(node, f"the 2-D form would need a dimension over {MAX_DIM} "
                                  f"({kT}x{C} stacked channels, {N}x{To} frames as batch)")
    y = node.output[0]
    base = node.name or y
    elem = gr.inits[wname].data_type
    out: list[onnx.NodeProto] = []

    def mk(op, ins, outs=None, **attrs):
        o = outs or [gr.unique(f"{base}.{op.lower()}")]
        out.append(helper.make_node(op, ins, o, name=gr.unique(f"{base}.2d.{op}"), **attrs))
        return o[0]

    def shape_const(s):
        return gr.add_init(f"{base}.shape", np.array(s, np.int64))

    bias = [bname] if bname else []
    pointwise = (kT == kH == kW == 1 and not any((tb, hb, wb, te, he, we)) and (st, sh, sw) == (1, 1, 1))
    if pointwise:  # 1x1x1: a 1x1 Conv2d over [N, C, T*H, W], no transpose needed
        w2 = gr.add_init(f"{wname}.2d", w.reshape(M, Cg, 1, 1))
        r = mk("Reshape", [x, shape_const([N, C, T * H, W])])
        c = mk("Conv", [r, w2, *bias], kernel_shape=[1, 1], pads=[0, 0, 0, 0], strides=[1, 1], dilations=[1, 1])
        mk("Reshape", [c, shape_const([N, M, T, H, W])], [y])
        return out
    xt = mk("Transpose", [x], perm=[0, 2, 1, 3, 4])  # [N, T, C, H, W]
    if tb or te:
        parts = [_zeros(gr, [N, tb, C, H, W], elem)] if tb else []
        parts.append(xt)
        if te:
            parts.append(_zeros(gr, [N, te, C, H, W], elem))
        xt = mk("Concat", parts, axis=1)
    taps = []
    for k in range(kT):
        start, end = k * dt, k * dt + st * (To - 1) + 1
        if start == 0 and end == Tp and st == 1:
            taps.append(xt)
            continue
        taps.append(mk("Slice", [xt, gr.add_init(f"{base}.starts", np.array([start], np.int64)),
                                 gr.add_init(f"{base}.ends", np.array([end], np.int64)),
                                 gr.add_init(f"{base}.axes", np.array([1], np.int64)),
                                 gr.add_init(f"{base}.steps", np.array([st], np.int64))]))
    stacked = taps[0] if kT == 1 else mk("Concat", taps, axis=2)  # [N, To, kT*C, H, W]
    r = mk("Reshape", [stacked, shape_const([N * To, kT * C, H, W])])
    w2 = gr.add_init(f"{wname}.2d", np.ascontiguousarray(w.transpose(0, 2, 1, 3, 4).reshape(M, kT * Cg, kH, kW)))
    c = mk("Conv", [r, w2, *bias], kernel_shape=[kH, kW], pads=[hb, wb, he, we], strides=[sh, sw],
           dilations=[dh, dw])
    y5 = mk("Reshape", [c, shape_const([N, To, M, Ho, Wo])])
    mk("Transpose", [y5], [y], perm=[0, 2, 1, 3, 4])
    return out


def _zeros(gr: _Graph, shape: list[int], elem: int) -> str:
    """One constant block of zeros per shape and type, shared by every conv of the graph."""
    key = f"coreml.zeros.{'x'.join(map(str, shape))}.{TensorProto.DataType.Name(elem).lower()}"
    if key not in gr.inits:
        t = numpy_helper.from_array(np.zeros(shape, _np_dtype(elem)), key)
        gr.g.initializer.append(t)
        gr.inits[key] = t
    return key


def is_conv3d(gr: _Graph, node: onnx.NodeProto) -> bool:
    if node.op_type != "Conv":
        return False
    w = gr.inits.get(node.input[1]) if len(node.input) > 1 else None
    if w is not None:
        return len(w.dims) == 5
    s = gr.shapes.get(node.input[0])
    return s is not None and len(s) == 5


def conv3d_to_2d(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Every 3-D Conv as a 2-D Conv over stacked time slices; the zero Pad in front of each is folded first.

    Returns (model, convolutions rewritten). NotRewritable if one cannot be (the graph is then
    left as it was by the caller).
    """
    model, _, _ = fold_pads(model, only_before_conv3d=True)
    gr = _Graph(model)
    gr.infer()
    todo = [n for n in gr.g.node if is_conv3d(gr, n)]
    if not todo:
        return model, 0
    replace = {id(n): _conv3d_nodes(gr, n) for n in todo}
    nodes = []
    for n in gr.g.node:
        nodes.extend(replace.get(id(n), [n]))
    del gr.g.node[:]
    gr.g.node.extend(nodes)
    return gr.finish(), len(todo)


# ---------------------------------------------------------------------------------------------
# split_dims: no dimension over 16384
# ---------------------------------------------------------------------------------------------
def two_factors(dims: list[int], limit: int = MAX_DIM) -> tuple[int, int] | None:
    """Split a list of dimensions at one point into two products, both <= limit, as balanced as possible."""
    best = None
    for j in range(1, len(dims)):
        a, b = int(np.prod(dims[:j])), int(np.prod(dims[j:]))
        if a <= limit and b <= limit and (best is None or max(a, b) < max(best)):
            best = (a, b)
    return best


def big_dims(gr: _Graph, limit: int = MAX_DIM) -> list[tuple[onnx.NodeProto, str, list[int]]]:
    """(node, value, shape) for every node input or output with a dimension over the limit."""
    out = []
    for n in gr.g.node:
        for v in list(n.input) + list(n.output):
            s = gr.shapes.get(v) if v else None
            if s and any(isinstance(d, int) and d > limit for d in s):
                out.append((n, v, s))
    return out


def split_large_dims(model: onnx.ModelProto, limit: int = MAX_DIM) -> tuple[onnx.ModelProto, int]:
    """Reshape GroupNorm's flattened groups so no dimension exceeds ``limit``.

    Returns (model, flattenings rewritten); NotRewritable names the first node with a
    dimension over the limit that no rewrite covers.
    """
    gr = _Graph(model)
    gr.infer()
    if not big_dims(gr, limit):
        return model, 0
    done = 0
    fixed: set[str] = set()
    for norm in [n for n in gr.g.node if n.op_type == "InstanceNormalization"]:
        flat = norm.input[0]
        s = gr.shape(flat)
        if s is None or len(s) != 3 or s[2] <= limit:
            continue
        r1 = gr.producer.get(flat)
        src = r1.input[0] if r1 is not None and r1.op_type == "Reshape" else None
        xs = gr.shape(src) if src else None
        users = gr.consumers.get(norm.output[0], [])
        if r1 is None or xs is None or len(gr.consumers.get(flat, [])) != 1:
            raise NotRewritable(norm, f"its input {flat!r} {s} (a dimension over {limit}) does not come from a "
                                      "Reshape of a tensor with a known shape")
        if not users or any(u.op_type != "Reshape" for u in users) or norm.output[0] in gr.outputs:
            raise NotRewritable(norm, "its output is read by something else than a Reshape back")
        N, G, L = s
        if xs[0] != N or len(xs) < 3 or xs[1] % G or int(np.prod(xs[1:])) != G * L:
            raise NotRewritable(norm, f"{xs} -> {s} is not a group flattening")
        dims = [xs[1] // G, *xs[2:]]
        ab = two_factors(dims, limit)
        if ab is None:
            raise NotRewritable(norm, f"the group of {L} values ({'x'.join(map(str, dims))}) cannot be split into two "
                                      f"dimensions of at most {limit}")
        r1.input[1] = gr.add_init(f"{r1.name or flat}.shape", np.array([N, G, *ab], np.int64))
        fixed.update({flat, norm.output[0]})
        done += 1
    model = gr.finish()
    gr = _Graph(model)
    gr.infer()
    left = big_dims(gr, limit)
    if left:
        n, v, s = left[0]
        raise NotRewritable(n, f"{'input' if v in n.input else 'output'} {v!r} has the shape {s}, a dimension over "
                               f"{limit}, and no rewrite of this pass covers {n.op_type}")
    return model, done


# ---------------------------------------------------------------------------------------------
# t5_embed_outside
# ---------------------------------------------------------------------------------------------
def lift_embedding(model: onnx.ModelProto, ids: str = "input_ids",
                   embeds: str = "inputs_embeds") -> tuple[onnx.ModelProto, np.ndarray]:
    """Take the token lookup out of a graph: -> (graph reading ``embeds``, the table)."""
    gr = _Graph(model)
    gathers = [n for n in gr.g.node if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == ids]
    if len(gathers) != 1:
        raise NotRewritable(ids, f"expected one Gather reading {ids!r}, found {len(gathers)}")
    node = gathers[0]
    if int(_attr(node, "axis", 0)) != 0 or node.input[0] not in gr.inits:
        raise NotRewritable(node, "not a row lookup in a constant table (axis 0 of an initializer)")
    if any(n is not node for n in gr.consumers.get(ids, [])):
        raise NotRewritable(node, f"{ids!r} is read by other nodes too")
    table = numpy_helper.to_array(gr.inits[node.input[0]])
    if table.ndim != 2:
        raise NotRewritable(node, f"the table has shape {list(table.shape)}, not [vocab, dim]")
    vi = next(i for i in gr.g.input if i.name == ids)
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]
    new_in = helper.make_tensor_value_info(embeds, table.dtype == np.float16 and TensorProto.FLOAT16
                                           or TensorProto.FLOAT, [*dims, int(table.shape[1])])
    out = node.output[0]
    for n in gr.g.node:
        n.input[:] = [embeds if i == out else i for i in n.input]
    for o in gr.g.output:
        if o.name == out:  # the lookup's result is itself an output: keep it through an Identity
            gr.g.node.append(helper.make_node("Identity", [embeds], [out], name=f"{out}.identity"))
    gr.g.node.remove(node)
    inputs = [new_in if i.name == ids else i for i in gr.g.input]
    del gr.g.input[:]
    gr.g.input.extend(inputs)
    return gr.finish(), table.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# the passes
# ---------------------------------------------------------------------------------------------
def _applied(manifest: Manifest) -> list[str]:
    return [p["name"] for p in manifest.passes]


class _ExactCoreMLPass(GraphPass):
    """Common frame: rewrite every graph (and variant) where the pattern occurs; leave the others."""

    tag = ""
    lossy = False

    def check(self, manifest: Manifest) -> None:
        if self.name in _applied(manifest):
            raise SorakitError(f"the bundle already carries pass {self.name!r}; applying it twice is refused")
        late = [p for p in _applied(manifest) if p in PRECISION_PASSES]
        if late:
            raise SorakitError(f"pass {self.name!r} must run before {', '.join(late)}, which this bundle already "
                               f"carries; apply it to the fp32 bundle (e.g. --passes {self.name},{','.join(late)})")

    def targets(self, manifest: Manifest) -> list[tuple[str, GraphEntry]]:
        return [(c, g) for c, comp in manifest.components.items() for g in comp.graphs]

    def applies(self, model: onnx.ModelProto, entry: GraphEntry) -> bool:
        raise NotImplementedError

    def transform(self, model: onnx.ModelProto, entry: GraphEntry) -> tuple[onnx.ModelProto, str]:
        raise NotImplementedError

    def rewrite(self, ws: Workspace, manifest: Manifest, component: str, entry: GraphEntry) -> list[GraphChange]:
        changes = []
        for e in [entry, *entry.variants.values()]:
            head = ws.load(e.file)
            if not self.applies(head, e):
                continue
            nodes, size = len(head.graph.node), ws.size(e)
            try:
                model, note = self.transform(ws.load(e.file, with_data=True), e)
            except NotRewritable as err:
                changes.append(GraphChange(e.name, nodes, nodes, size, size, note=f"left unchanged: {err}"))
                continue
            old = copy.deepcopy(e)
            e.file = new_name(e.file, self.tag)
            e.data = e.file + ".data"
            ws.save(model, e.file, e.data)
            self.update_entry(ws, manifest, component, e, model)
            changes.append(GraphChange(e.name, nodes, len(model.graph.node), size, ws.size(e), note=note,
                                       replaced=old))
        return changes

    def update_entry(self, ws: Workspace, manifest: Manifest, component: str, e: GraphEntry,
                     model: onnx.ModelProto) -> None:
        """Manifest changes beyond the file names (inputs, component info)."""


@register
class FoldPadPass(_ExactCoreMLPass):
    """Pad -> the following Conv's pads (zero padding), or Concat with constant blocks."""

    name = "fold_pad"
    order = 31
    tag = "nopad"

    def applies(self, model, entry):
        return any(n.op_type == "Pad" for n in model.graph.node)

    def transform(self, model, entry):
        model, folded, concat = fold_pads(model)
        return model, f"{folded} Pad folded into Conv pads, {concat} as Concat"


@register
class Conv3dTo2dPass(_ExactCoreMLPass):
    """Each 3-D convolution as one 2-D convolution over its kT shifted time slices (stacked on channels)."""

    name = "conv3d_to_2d"
    order = 32
    tag = "conv2d"

    def applies(self, model, entry):
        gr = _Graph(model)
        return any(is_conv3d(gr, n) for n in gr.g.node)

    def transform(self, model, entry):
        model, n = conv3d_to_2d(model)
        return model, f"{n} Conv3d -> Conv2d"


@register
class SplitDimsPass(_ExactCoreMLPass):
    """No tensor dimension over Core ML's 16384: GroupNorm flattenings reshaped to [N, G, a, b]."""

    name = "split_dims"
    order = 33
    tag = "dims"

    def applies(self, model, entry):
        for t in entry.inputs + entry.outputs:
            if any(isinstance(d, int) and d > MAX_DIM for d in t.shape):
                return True
        gr = _Graph(model)
        gr.infer()
        return bool(big_dims(gr))

    def transform(self, model, entry):
        for t in entry.inputs + entry.outputs:
            big = [d for d in t.shape if isinstance(d, int) and d > MAX_DIM]
            if big:
                raise NotRewritable(t.name, f"graph {'input' if t in entry.inputs else 'output'} of shape {t.shape} "
                                            f"has a dimension over {MAX_DIM}; a pass cannot change a graph's interface")
        model, n = split_large_dims(model)
        return model, f"{n} GroupNorm flattening(s) split into two dimensions <= {MAX_DIM}"


@register
class T5EmbedOutsidePass(_ExactCoreMLPass):
    """The T5 token lookup out of the graph (text_encoder.embed takes inputs_embeds; the table ships as .npy)."""

    name = "t5_embed_outside"
    order = 34
    tag = "embeds"
    TABLE = "text_encoder/embedding.npy"

    def targets(self, manifest):
        if "text_encoder" not in manifest.components:
            return []
        return [("text_encoder", g) for g in manifest.components["text_encoder"].graphs if g.role == "embed"]

    def applies(self, model, entry):
        return any(i.name == "input_ids" for i in model.graph.input)

    def transform(self, model, entry):
        model, table = lift_embedding(model)
        self._table = table
        return model, f"token table {table.shape[0]}x{table.shape[1]} -> {self.TABLE}"

    def update_entry(self, ws, manifest, component, e, model):
        table = self._table
        path = ws.path(self.TABLE)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, table)
        manifest.components["text_encoder"].info["embedding_file"] = self.TABLE
        ids = next(t for t in e.inputs if t.name == "input_ids")
        e.inputs = [TensorSpec("inputs_embeds", [*ids.shape, int(table.shape[1])], "float32") if t.name == "input_ids"
                    else t for t in e.inputs]
        e.params = max(0, e.params - int(table.size))
        self._table = None

    def adapt_feeds(self, ws: Workspace, manifest: Manifest, old: GraphEntry, new: GraphEntry,
                    feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Verification: the new graph gets the looked-up rows of the ids the old graph got."""
        table = np.load(ws.path(self.TABLE), mmap_mode="r")
        out = {k: v for k, v in feeds.items() if k != "input_ids"}
        out["inputs_embeds"] = np.ascontiguousarray(table[feeds["input_ids"]], dtype=np.float32)
        return out


COREML_PASSES = ("fold_pad", "conv3d_to_2d", "split_dims", "t5_embed_outside")

__all__ = ["fold_pads", "conv3d_to_2d", "split_large_dims", "lift_embedding", "two_factors", "NotRewritable",
           "COREML_PASSES", "drop_dead"]
