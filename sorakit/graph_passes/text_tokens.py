"""text_tokens: the text encoder runs on the prompt's tokens instead of ``max_length`` padded ones.

T5 attends to padding only through its attention mask, which gives padded keys a bias of
the float minimum, so their softmax weight is exactly 0: a prompt's outputs do not depend on
how much padding follows it, and the transformer masks the padded rows out of its
cross-attention. A 20-token prompt thus needs 1/15 of the encoder's FLOPs at 300 tokens.

The exporter traces the text encoder at ``max_length`` tokens, which bakes that length into
the graphs in two places, rewritten here (exactly):

* the shape constants of the attention's Reshapes ([1, L, heads, d] and [1, L, -1]) get 0 on
  the token axis, which ONNX Reshape reads as "the input's size on this axis";
* the relative-position bucket table [L, L] of the embedding graph becomes a Slice of itself
  to the input's token count (a bucket depends on j - i only, so the top-left corner of the
  table is the table of a shorter prompt).

The token axis of every input and output becomes the symbolic ``text_tokens``. A graph with
any other occurrence of L that this cannot account for is refused, naming the node.
For devices that need static shapes (Core ML) this pass is not used.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sorakit.bundle.manifest import GraphEntry, Manifest, TensorSpec
from sorakit.errors import SorakitError
from sorakit.graph_passes.base import GraphChange, GraphPass, Workspace, new_name
from sorakit.graph_passes.onnx_utils import clear_shapes, consumers, producers
from sorakit.graph_passes.registry import register

DIM = "text_tokens"
# inputs/outputs of the text encoder's graphs and their token axes
TOKEN_AXES = {"input_ids": (1,), "attention_mask": (1,), "inputs_embeds": (1,), "hidden": (1,),
              "hidden_out": (1,), "text": (1,), "position_bias": (2, 3)}
# the transformer's caption inputs/outputs (prologue: y, y_mask -> y_proj, y_bias; blocks read
# y_proj and y_bias) and their token axes
CAPTION_AXES = {"y": (1,), "y_mask": (1,), "y_proj": (1,), "y_bias": (3,)}


def _constant(g: onnx.GraphProto, name: str, prods, inits) -> tuple[str, np.ndarray] | None:
    """('init'|'node', value) of a constant value, or None."""
    if name in inits:
        return "init", numpy_helper.to_array(inits[name])
    n = prods.get(name)
    if n is not None and n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
        return "node", numpy_helper.to_array(n.attribute[0].t)
    return None


def make_dynamic(model: onnx.ModelProto, length: int, graph_name: str,
                 axes: dict[str, tuple[int, ...]] = TOKEN_AXES, cross: bool = False) -> onnx.ModelProto:
    """The graph with a symbolic token axis. ``cross``: the tokens are another sequence's keys
    and values (cross-attention), so a MatMul of two token-carrying values (weights x values)
    contracts the token axis away and what follows is left alone."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    prods, uses = producers(g), consumers(g)
    inits = {i.name: i for i in g.initializer if i.data_location != onnx.TensorProto.EXTERNAL}
    handled: set[str] = set()
    token_source = next((i.name for i in g.input if i.name in ("input_ids", "attention_mask", "inputs_embeds",
                                                                "hidden", "y")), None)
    # only values computed from a token-axis input can carry the token count (a Reshape of the
    # video tokens whose shape holds the same number by coincidence is left alone)
    reach = {i.name for i in g.input if i.name in axes}
    for n in g.node:  # graphs are stored in topological order
        ins = [i for i in n.input if i]
        if cross and n.op_type in ("MatMul", "FusedMatMul") and all(i in reach for i in ins):
            continue
        if any(i in reach for i in ins):
            reach.update(n.output)
    new_nodes: list[onnx.NodeProto] = []
    for n in list(g.node):
        if n.op_type == "Reshape" and any(i in reach for i in n.input):
            c = _constant(g, n.input[1], prods, inits)
            if c is not None and c[1].ndim == 1 and len(c[1]) > 1 and c[1][1] == length:
                shape = c[1].copy()
                shape[1] = 0  # "as the input": the data input's axis 1 is the token axis
                name = f"{n.input[1]}__{DIM}"
                if name not in handled:  # one shape constant may feed several Reshapes (after prune's CSE)
                    g.initializer.append(numpy_helper.from_array(shape.astype(np.int64), name))
                    handled.add(name)
                n.input[1] = name
        elif n.op_type == "Gather":
            c = _constant(g, n.input[1], prods, inits)
            if c is not None and c[1].shape == (length, length):
                if token_source is None:
                    raise SorakitError(f"{graph_name}: node {n.name} needs the token count, but the graph has no "
                                       "token input")
                table = n.input[1]
                base = f"{table}__{DIM}"
                n.input[1] = base
                if base in handled:  # the same table feeds several Gathers: one Slice serves them all
                    continue
                new_nodes += [
                    helper.make_node("Shape", [token_source], [base + "_shape"], start=1, end=2),
                    helper.make_node("Concat", [base + "_shape", base + "_shape"], [base + "_ends"], axis=0),
                    helper.make_node("Slice", [table, base + "_starts", base + "_ends", base + "_axes"], [base]),
                ]
                g.initializer.extend([numpy_helper.from_array(np.zeros(2, np.int64), base + "_starts"),
                                      numpy_helper.from_array(np.array([0, 1], np.int64), base + "_axes")])
                handled.add(base)
    # anything else still holding the length is a shape this pass does not understand
    for n in g.node:
        if not any(i in reach for i in n.input):  # the position-bias table is handled above
            continue
        for i in n.input:
            c = _constant(g, i, prods, inits) if i not in handled else None
            if c is not None and c[1].dtype in (np.int64, np.int32) and c[1].size <= 8 and length in c[1].ravel():
                if n.op_type == "Reshape" and i == n.input[1] and c[1].ndim == 1 and len(c[1]) > 1 \
                        and c[1][1] in (-1, 0):
                    continue  # the token axis is inferred; the other entries are other sizes (heads, ...)
                if n.op_type in ("Reshape", "Expand", "ConstantOfShape", "Slice", "Tile", "Range"):
                    raise SorakitError(f"{graph_name}: node {n.name} ({n.op_type}) uses the token count {length} in a "
                                       "way this pass cannot rewrite; the graph is left as it was")
    del uses
    if new_nodes:
        nodes = list(g.node)
        del g.node[:]
        g.node.extend(new_nodes + nodes)
    for coll in (g.input, g.output):
        for vi in coll:
            for axis in axes.get(vi.name, ()):
                d = vi.type.tensor_type.shape.dim[axis]
                if d.dim_value != length:
                    raise SorakitError(f"{graph_name}: {vi.name} has {d.dim_value or d.dim_param} on its token axis, "
                                       f"not {length}")
                d.ClearField("dim_value")
                d.dim_param = DIM
    clear_shapes(g)
    return m


def _symbolic(t: TensorSpec, axes: dict[str, tuple[int, ...]]) -> TensorSpec:
    """The manifest's spec of a tensor whose token axes became ``DIM``."""
    shape = [DIM if i in axes.get(t.name, ()) else d for i, d in enumerate(t.shape)]
    return TensorSpec(t.name, shape, t.dtype, t.binds)


@register
class TextTokensPass(GraphPass):
    """Run the text encoder on the prompt's tokens (exact; CPU and other dynamic-shape devices)."""

    name = "text_tokens"
    order = 15

    def check(self, manifest: Manifest) -> None:
        if any(p["name"] == self.name for p in manifest.passes):
            raise SorakitError(f"the bundle already carries pass {self.name!r}; applying it twice is refused")
        if "text_encoder" not in manifest.components:
            raise SorakitError("pass 'text_tokens' needs the text encoder, which this bundle lacks")
        folded = [p["name"] for p in manifest.passes if p["name"] in ("prune", "simplify")]
        if folded:  # they fold the position bias of a small T5 into a constant of max_length tokens
            raise SorakitError(f"pass 'text_tokens' must run before {', '.join(folded)}, which this bundle already "
                               f"carries; apply it to the bundle as exported (e.g. --passes text_tokens,{folded[0]})")
        first = manifest.components["text_encoder"].graphs[0].inputs[0]
        if not isinstance(first.shape[1], int):
            raise SorakitError("the text encoder's token axis is already dynamic")

    def targets(self, manifest):
        return [("text_encoder", g) for g in manifest.components["text_encoder"].graphs]

    def rewrite(self, ws: Workspace, manifest: Manifest, component: str, entry: GraphEntry) -> list[GraphChange]:
        length = int(manifest.tokenizer["max_length"])
        model = ws.load(entry.file)
        new = make_dynamic(model, length, entry.name)
        old = copy.deepcopy(entry)
        rel = new_name(entry.file, "tokens")
        ws.save(new, rel)  # the weights stay where they are
        entry.file = rel
        entry.inputs = [_symbolic(t, TOKEN_AXES) for t in entry.inputs]
        entry.outputs = [_symbolic(t, TOKEN_AXES) for t in entry.outputs]
        entry.info = {**entry.info, "flops_at": {"text_tokens": length}}
        return [GraphChange(entry.name, len(model.graph.node), len(new.graph.node), ws.size(old), ws.size(entry),
                            note=f"token axis {length} -> {DIM}", replaced=old)]


@register
class CaptionTokensPass(GraphPass):
    """The transformer's cross-attention on the prompt's tokens (exact; dynamic-shape devices).

    STDiT3 attends to the caption through a bias that gives padded tokens -1e4 before the
    softmax, so their weight is exactly 0 in float32: the prompt's tokens alone give the same
    output, which is what the reference model computes too (it packs the valid tokens of every
    prompt before cross-attention). At real size with a 20-token prompt a block's key/value
    projections and cross-attention shrink 15x (an fp32 block's outputs within 1.5e-6 of the
    padded run; the speed is in docs/benchmarks.md). The prologue's caption Reshapes get 0 ("as the input") on the token axis;
    the caption inputs and outputs of the prologue and of every block (and their variants) get
    the symbolic ``text_tokens`` axis. The pipeline then feeds the caption cut to the longest
    prompt of the call.
    """

    name = "caption_tokens"
    order = 16

    def check(self, manifest: Manifest) -> None:
        if any(p["name"] == self.name for p in manifest.passes):
            raise SorakitError(f"the bundle already carries pass {self.name!r}; applying it twice is refused")
        if "transformer" not in manifest.components:
            raise SorakitError("pass 'caption_tokens' needs the transformer, which this bundle lacks")
        y = next((t for g in manifest.components["transformer"].graphs for t in g.inputs if t.name == "y"), None)
        if y is None:
            raise SorakitError("pass 'caption_tokens' needs a transformer graph with the caption input 'y'")
        if not isinstance(y.shape[1], int):
            raise SorakitError("the transformer's caption token axis is already dynamic")

    def targets(self, manifest):
        return [("transformer", g) for g in manifest.components["transformer"].graphs
                if any(t.name in CAPTION_AXES for t in g.inputs)]

    def rewrite(self, ws: Workspace, manifest: Manifest, component: str, entry: GraphEntry) -> list[GraphChange]:
        length = int(manifest.tokenizer["max_length"])
        changes = []
        for e in [entry] + list(entry.variants.values()):
            model = ws.load(e.file)
            new = make_dynamic(model, length, e.name, CAPTION_AXES, cross=True)
            old = copy.deepcopy(e)
            e.file = new_name(e.file, "captions")
            ws.save(new, e.file)  # the weights stay where they are
            e.inputs = [_symbolic(t, CAPTION_AXES) for t in e.inputs]
            e.outputs = [_symbolic(t, CAPTION_AXES) for t in e.outputs]
            changes.append(GraphChange(e.name, len(model.graph.node), len(new.graph.node), ws.size(old), ws.size(e),
                                       note=f"caption axis {length} -> {DIM}", replaced=old))
        return changes
