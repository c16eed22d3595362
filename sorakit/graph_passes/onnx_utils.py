"""Small helpers over the onnx protobuf API shared by the passes (no torch)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

IR_VERSION = 9  # onnxruntime 1.31 loads at most IR 13; keep what the exporters write


def load(path: str | Path, with_data: bool = False) -> onnx.ModelProto:
    """A graph, with its external weights read in when ``with_data``.

    The weights are read here rather than by ``onnx.load``: bundles written by ``sorakit
    optimize`` hard-link the weight files a pass did not change (ONNX Runtime loads them as
    usual), and onnx refuses hard-linked external data. Locations must stay inside the graph's
    directory, and offsets and lengths inside the file.
    """
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    if with_data:
        for init in model.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                read_external(path.parent, init)
    return model


def read_external(model_dir: Path, init: onnx.TensorProto) -> None:
    """Replace an initializer's external-data reference by its bytes (in place)."""
    info = {kv.key: kv.value for kv in init.external_data}
    location = info.get("location", "")
    target = (model_dir / location).resolve()
    if not location or Path(location).is_absolute() or not target.is_relative_to(model_dir.resolve()):
        raise ValueError(f"initializer {init.name}: external data location {location!r} leaves {model_dir}")
    offset, length = int(info.get("offset", 0)), info.get("length")
    size = target.stat().st_size
    length = size - offset if length is None else int(length)
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"initializer {init.name}: bytes {offset}..{offset + length} lie outside {location} ({size} B)")
    with open(target, "rb") as f:
        f.seek(offset)
        init.raw_data = f.read(length)
    del init.external_data[:]
    init.data_location = onnx.TensorProto.DEFAULT


def module_path(node: onnx.NodeProto) -> str:
    """The torch module a node came from: dynamo metadata, else a TorchScript node name."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                break
            return scopes[-2] if len(scopes) >= 2 else ""
    name = node.name
    if name.startswith("/"):
        parts = name.strip("/").split("/")
        return ".".join(parts[:-1])
    return ""


def in_module(node: onnx.NodeProto, module: str) -> bool:
    path = module_path(node)
    return path == module or path.startswith(module + ".")


def constant_names(graph: onnx.GraphProto) -> set[str]:
    return {i.name for i in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            if i:
                out[i].append(n)
    return out


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    for n in graph.node:
        n.input[:] = [new if i == old else i for i in n.input]
        n.output[:] = [new if o == old else o for o in n.output]
    for coll in (graph.input, graph.output, graph.value_info):
        for v in coll:
            if v.name == old:
                v.name = new
    for init in graph.initializer:
        if init.name == old:
            init.name = new


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


def const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def initializer_array(model_dir: Path, init: onnx.TensorProto) -> np.ndarray:
    """An initializer's values, reading external data relative to the model's directory."""
    if init.data_location == onnx.TensorProto.EXTERNAL:
        t = onnx.TensorProto()
        t.CopyFrom(init)
        read_external(Path(model_dir), t)
        return numpy_helper.to_array(t)
    return numpy_helper.to_array(init)


def node_count(model: onnx.ModelProto) -> int:
    return len(model.graph.node)


def external_files(model: onnx.ModelProto) -> set[str]:
    files = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for kv in init.external_data:
                if kv.key == "location":
                    files.add(kv.value)
    return files
