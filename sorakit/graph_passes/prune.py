"""Exact graph clean-up on onnxscript's optimizer and onnx-ir's passes (the ``prune`` pass and ``pin``).

What the maintained tools do here: constant folding with shape inference (shape arithmetic,
identity casts and reshapes, small constant subgraphs: ``onnxscript.optimizer``), a chosen set
of exact rewrite rules (``onnxscript.rewriter``), identity elimination, unused-node removal,
common-subexpression elimination, lifting constants to initializers and a stable topological
sort (``onnx_ir.passes.common``).

What sorakit adds is the bundle contract around them:

- weights are never read or rewritten: a node with an external-data input is never folded, and
  every external initializer that survives keeps its exact file/offset/length record (so TDTM
  variants keep sharing their block's data file, and the data files are not rewritten);
- graph input and output names stay as the manifest records them;
- nodes that are not rewritten keep their names and metadata (the module paths from which
  ``tdtm.mark_boundaries`` finds the attention boundaries of a pinned block);
- the IR version stays what the graph had (ONNX Runtime 1.31 loads at most IR 10 here).

The pipeline still verifies every pruned graph against the graph it replaces (``verify_exact``).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
from onnxscript import rewriter
from onnxscript.optimizer import fold_constants_ir
from onnxscript.rewriter.rules import common as rules

from sorakit.errors import SorakitError

FOLD_LIMIT = 1 << 16  # elements: larger folded results stay computed (weights are never folded at all)
MAX_ROUNDS = 8


def _exact_rules() -> list:
    """Rewrite rules that are exact and never read or write a weight.

    Left out on purpose: batch-norm fusion and optional-bias removal (they read or rewrite
    weights), Cast(Cast(x)) collapsing (not exact for every type pair), Slice pairs to Split
    (changes the op set the device audits reason about).
    """
    return [
        *rules.mul_by_1_rule.commute(),
        *rules.add_0_rule.commute(),
        rules.sub_0_rule,
        rules.div_by_1_rule,
        rules.dropout_inference_rule,
        rules.dropout_zero_rule,
        rules.no_op_cast_rule,
        rules.no_op_expand_rule,
        rules.no_op_transpose_rule,
        rules.transpose_transpose_rule,
        rules.unsqueeze_unsqueeze_rule,
        rules.reshape_reshape_rule,
        rules.collapse_slice_rule,
        rules.collapse_slice2_rule,
        rules.materialize_reshape_shape_rule,
        rules.normalize_pad_format_conv_rule,
        rules.fuse_pad_into_conv_rule,  # a zero constant Pad in front of a Conv becomes the Conv's pads
    ]


def _should_fold(node: ir.Node) -> bool | None:
    """Never fold a node that reads external data (the weights); fold the small ConstantOfShape
    results that exporters use for pad amounts (onnxscript keeps them by default to save bytes,
    which leaves the shapes behind them unknown)."""
    for v in node.inputs:
        if v is not None and isinstance(v.const_value, ir.ExternalTensor):
            return False
    if node.domain == "" and node.op_type == "ConstantOfShape":
        return True  # the output size limit still applies
    return None


def _external_records(model: onnx.ModelProto) -> dict[str, list[tuple[str, str]]]:
    return {i.name: [(kv.key, kv.value) for kv in i.external_data]
            for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}


def prune_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """An exact, cleaned-up copy of ``model`` (loaded without its external data)."""
    m = ir.serde.deserialize_model(model)
    cleanup = ir.passes.Sequential(rewriter.RewritePass(_exact_rules()), ir_passes.IdentityEliminationPass(),
                                   ir_passes.RemoveUnusedNodesPass())
    for _ in range(MAX_ROUNDS):
        folded = fold_constants_ir(m, onnx_shape_inference=True, input_size_limit=FOLD_LIMIT,
                                   output_size_limit=FOLD_LIMIT, should_fold=_should_fold).modified
        if not (cleanup(m).modified or folded):
            break
    ir.passes.Sequential(
        ir_passes.CommonSubexpressionEliminationPass(),
        ir_passes.RemoveUnusedNodesPass(),
        ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        ir_passes.RemoveUnusedOpsetsPass(),
        ir_passes.TopologicalSortPass(),
    )(m)
    out = ir.serde.serialize_model(m)
    del out.graph.value_info[:]  # intermediate shapes: the runtime infers its own; stale ones fail late
    out.ir_version = model.ir_version
    _check_contract(model, out)
    return out


def _check_contract(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """Fail loudly if the clean-up broke what the bundle relies on (it should never)."""
    io_before = ([i.name for i in before.graph.input], [o.name for o in before.graph.output])
    io_after = ([i.name for i in after.graph.input], [o.name for o in after.graph.output])
    if io_before != io_after:
        raise SorakitError(f"prune changed the graph's inputs/outputs: {io_before} -> {io_after}")
    old, new = _external_records(before), _external_records(after)
    moved = sorted(k for k in new if old.get(k) != new[k])
    if moved:
        raise SorakitError(f"prune would rewrite external weights {moved[:5]}; the weight files must stay as they are")
    inline_big = sorted(i.name for i in after.graph.initializer
                        if i.data_location != onnx.TensorProto.EXTERNAL and i.name in old)
    if inline_big:
        raise SorakitError(f"prune would inline external weights {inline_big[:5]}")


__all__ = ["FOLD_LIMIT", "prune_model"]
