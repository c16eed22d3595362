"""The pass contract: a pass rewrites graphs of a bundle and says what it did.

A pass is small and pure over graphs: ``rewrite`` gets one graph (by its manifest entry),
writes the new graph file(s) into the workspace and returns what changed. Passes never
touch the input bundle; the pipeline (``pipeline.py``) stages a copy, verifies every
rewritten graph (exact passes against the graph they replace, lossy ones by an end-to-end
quality gate) and moves the result into place only when everything holds.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import onnx

from sorakit.bundle.manifest import GraphEntry, Manifest
from sorakit.graph_passes.onnx_utils import IR_VERSION


@dataclass
class GraphChange:
    graph: str
    nodes_before: int
    nodes_after: int
    bytes_before: int
    bytes_after: int
    max_abs_err: float | None = None  # exact passes: against the graph before the pass
    note: str = ""
    replaced: GraphEntry | None = None  # the entry before the pass (for verification)
    new_variant: str | None = None  # a variant the pass added (e.g. "tdtm")


@dataclass
class PassRecord:
    name: str
    settings: dict[str, Any]
    changes: list[GraphChange] = field(default_factory=list)
    gate: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "settings": self.settings,
            "graphs": [
                {k: v for k, v in c.__dict__.items() if k not in ("replaced",) and v not in (None, "")}
                for c in self.changes
            ],
            "gate": self.gate,
        }


class Workspace:
    """The staging directory of the bundle being written, with file helpers."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, rel: str) -> Path:
        return self.root / rel

    def size(self, entry: GraphEntry) -> int:
        return sum(self.path(f).stat().st_size for f in {entry.file, entry.data} if f and self.path(f).exists())

    def load(self, rel: str, with_data: bool = False) -> onnx.ModelProto:
        return onnx.load(str(self.path(rel)), load_external_data=with_data)

    def save(self, model: onnx.ModelProto, rel: str, data_rel: str | None = None) -> None:
        """Save a graph; with ``data_rel`` its tensors go to that external-data file (new)."""
        path = self.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        model.ir_version = min(model.ir_version or IR_VERSION, 10)
        if data_rel is None:
            onnx.save(model, str(path))
            return
        data_path = self.path(data_rel)
        if data_path.exists():
            data_path.unlink()
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=os.path.relpath(data_path, path.parent), size_threshold=1024)
        if not data_path.exists():
            data_path.write_bytes(b"")


def tensor_digest(t: onnx.TensorProto) -> str:
    return hashlib.sha256(t.raw_data or t.SerializeToString()).hexdigest()


def share_initializers(variant: onnx.ModelProto, base_refs: dict[str, tuple[str, list]]) -> int:
    """Point the variant's initializers at the base graph's external data where identical.

    ``base_refs``: name -> (content digest, external_data entries) taken from the base graph
    when it was saved. Returns how many tensors now share storage.
    """
    shared = 0
    for init in variant.graph.initializer:
        ref = base_refs.get(init.name)
        if ref is None or init.data_location == onnx.TensorProto.EXTERNAL:
            continue
        digest, entries = ref
        if tensor_digest(init) != digest:
            continue
        init.ClearField("raw_data")
        for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            init.ClearField(f)
        init.data_location = onnx.TensorProto.EXTERNAL
        del init.external_data[:]
        for key, value in entries:
            kv = init.external_data.add()
            kv.key, kv.value = key, value
        shared += 1
    return shared


def save_shared(ws: Workspace, base: onnx.ModelProto, base_rel: str, data_rel: str,
                variants: dict[str, onnx.ModelProto]) -> None:
    """Save a base graph with new external data, and variants that reuse that data file."""
    digests = {i.name: tensor_digest(i) for i in base.graph.initializer if len(i.raw_data) > 1024}
    ws.save(base, base_rel, data_rel)
    refs = {}
    for init in base.graph.initializer:
        if init.name in digests and init.data_location == onnx.TensorProto.EXTERNAL:
            refs[init.name] = (digests[init.name], [(kv.key, kv.value) for kv in init.external_data])
    for rel, model in variants.items():
        share_initializers(model, refs)
        ws.save(model, rel)


class GraphPass:
    """Base class. Subclasses set ``name``, ``order`` (and ``lossy`` + ``gate`` for a lossy pass),
    implement ``targets``/``rewrite``, and register with ``@registry.register``."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 0  # canonical position in a pipeline (pin < tdtm < prune < fp16/int8)
    lossy: ClassVar[bool] = False  # exact passes are verified graph by graph; lossy ones by the gate
    gate: ClassVar[float | None] = None  # lossy passes: the default minimum mean SSIM of the gate
    requires_static: ClassVar[bool] = False

    def __init__(self, **settings: Any):
        self._settings = settings

    def settings(self) -> dict[str, Any]:
        return dict(self._settings)

    def check(self, manifest: Manifest) -> None:
        """Refuse a bundle this pass cannot run on (raise SorakitError naming why)."""

    def targets(self, manifest: Manifest) -> list[tuple[str, GraphEntry]]:
        raise NotImplementedError

    def rewrite(self, ws: Workspace, manifest: Manifest, component: str, entry: GraphEntry) -> list[GraphChange]:
        raise NotImplementedError

    def finish(self, manifest: Manifest) -> None:
        """Manifest-level updates after every graph was rewritten."""


def new_name(rel: str, tag: str) -> str:
    """transformer/block_00.onnx -> transformer/block_00.<tag>.onnx"""
    stem = rel[: -len(".onnx")] if rel.endswith(".onnx") else rel
    return f"{stem}.{tag}.onnx"
