"""The bundle manifest: typed, validated, JSON on disk. No torch, no onnx.

A bundle is a directory:

    manifest.json               this schema (format "sorakit-bundle", version FORMAT_VERSION)
    text_encoder/*.onnx(.data)  T5 graphs: embed, one per layer, final norm
    transformer/*.onnx(.data)   STDiT3 graphs: prologue, blocks (and TDTM variants), epilogue
    vae/*.onnx(.data)           temporal decoder stages, spatial decoder stages
    tokenizer/tokenizer.json    prompt tokenizer (tokenizers JSON)
    null_caption.npy            CFG null caption [L, caption_channels]

Graph chaining inside a component is by name: the runtime keeps a dictionary of named
tensors; each graph reads its inputs from it by name and writes its outputs back under the
output's ``binds`` name (default: the output's own name). See docs/bundle-format.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sorakit.bundle.schema import check_manifest
from sorakit.errors import BundleError

FORMAT = "sorakit-bundle"
FORMAT_VERSION = 1
COMPONENTS = ("text_encoder", "transformer", "vae")


@dataclass
class TensorSpec:
    name: str
    shape: list[int | str]  # ints, or names of symbolic dimensions
    dtype: str = "float32"
    binds: str | None = None  # context name an output is stored under (outputs only)

    @property
    def static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.binds:
            d["binds"] = self.binds
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], list(d["shape"]), d.get("dtype", "float32"), d.get("binds"))


@dataclass
class GraphEntry:
    name: str  # unique in the bundle, e.g. "transformer.block.03"
    role: str  # prologue | block | epilogue | embed | layer | final_norm | temporal | spatial
    file: str  # path of the .onnx file, relative to the bundle
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    data: str | None = None  # external-data file, relative to the bundle (may be shared)
    modules: list[str] = field(default_factory=list)  # source modules (checkpoint key prefixes)
    params: int = 0
    flops: int = 0  # per call, multiply-add = 2
    variants: dict[str, GraphEntry] = field(default_factory=dict)  # e.g. {"tdtm": ...}
    info: dict[str, Any] = field(default_factory=dict)  # free-form (verification, pass notes)

    def files(self) -> list[str]:
        out = [self.file] + ([self.data] if self.data else [])
        for v in self.variants.values():
            out += [f for f in v.files() if f not in out]
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "role": self.role,
            "file": self.file,
            "data": self.data,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "modules": self.modules,
            "params": self.params,
            "flops": self.flops,
        }
        if self.variants:
            d["variants"] = {k: v.to_dict() for k, v in self.variants.items()}
        if self.info:
            d["info"] = self.info
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraphEntry:
        return cls(
            name=d["name"],
            role=d["role"],
            file=d["file"],
            data=d.get("data"),
            inputs=[TensorSpec.from_dict(t) for t in d["inputs"]],
            outputs=[TensorSpec.from_dict(t) for t in d["outputs"]],
            modules=list(d.get("modules", [])),
            params=int(d.get("params", 0)),
            flops=int(d.get("flops", 0)),
            variants={k: GraphEntry.from_dict(v) for k, v in d.get("variants", {}).items()},
            info=dict(d.get("info", {})),
        )


@dataclass
class Component:
    graphs: list[GraphEntry]
    info: dict[str, Any] = field(default_factory=dict)  # e.g. chunking of the VAE, embedding table

    def by_role(self, role: str) -> list[GraphEntry]:
        return [g for g in self.graphs if g.role == role]

    def to_dict(self) -> dict[str, Any]:
        return {"graphs": [g.to_dict() for g in self.graphs], "info": self.info}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Component:
        return cls([GraphEntry.from_dict(g) for g in d["graphs"]], dict(d.get("info", {})))


@dataclass
class Manifest:
    preset: dict[str, Any]  # ModelPreset.to_dict()
    geometry: dict[str, Any]  # static, height, width, num_frames, latent, batch
    sampler: dict[str, Any]  # SamplerConfig fields (defaults for generation)
    tokenizer: dict[str, Any]  # file, max_length, pad_id, eos_id, prompt_suffix
    null_caption: dict[str, Any]  # file, shape
    components: dict[str, Component]
    files: dict[str, dict[str, Any]]  # relative path -> {bytes, sha256}
    export: dict[str, Any]  # opset, exporter, tool versions, settings, verification
    passes: list[dict[str, Any]] = field(default_factory=list)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["components"] = {k: c.to_dict() for k, c in self.components.items()}
        order = ["format", "format_version", "preset", "geometry", "sampler", "tokenizer", "null_caption",
                 "components", "files", "export", "passes"]
        return {k: d[k] for k in order}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest.json") -> Manifest:
        if not isinstance(d, dict):
            raise BundleError(f"{where} is not a JSON object")
        if d.get("format") != FORMAT:
            raise BundleError(f"{where} is not a sorakit bundle manifest (format {d.get('format')!r})")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{where} has bundle format version {version!r}; this sorakit reads version {FORMAT_VERSION}",
                hint="re-export the bundle with this version of sorakit (sorakit export ...)",
            )
        missing = [k for k in ("preset", "geometry", "sampler", "tokenizer", "null_caption", "components", "files",
                               "export") if k not in d]
        if missing:
            raise BundleError(f"{where} lacks required fields: {', '.join(missing)}")
        check_manifest(d, where)
        try:
            comps = {k: Component.from_dict(v) for k, v in d["components"].items()}
        except (KeyError, TypeError) as e:
            raise BundleError(f"{where}: malformed component entry ({e})") from None
        unknown = sorted(set(comps) - set(COMPONENTS))
        if unknown:
            raise BundleError(f"{where}: unknown components {unknown}; known: {list(COMPONENTS)}")
        m = cls(
            preset=d["preset"],
            geometry=d["geometry"],
            sampler=d["sampler"],
            tokenizer=d["tokenizer"],
            null_caption=d["null_caption"],
            components=comps,
            files=d["files"],
            export=d["export"],
            passes=list(d.get("passes", [])),
        )
        m.check_consistency(where)
        return m

    # -- queries ------------------------------------------------------------------------------
    def all_graphs(self) -> list[GraphEntry]:
        out = []
        for c in self.components.values():
            for g in c.graphs:
                out.append(g)
                out.extend(g.variants.values())
        return out

    def graph(self, name: str) -> GraphEntry:
        for g in self.all_graphs():
            if g.name == name:
                return g
        raise BundleError(f"bundle has no graph named {name!r}")

    def referenced_files(self) -> list[str]:
        files = [self.tokenizer["file"], self.null_caption["file"]]
        for c in self.components.values():
            for g in c.graphs:
                files += g.files()
            for key in ("embedding_file",):
                if key in c.info:
                    files.append(c.info[key])
        return list(dict.fromkeys(files))

    def check_consistency(self, where: str = "manifest.json") -> None:
        names = [g.name for g in self.all_graphs()]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise BundleError(f"{where}: duplicate graph names {dup}")
        unlisted = [f for f in self.referenced_files() if f not in self.files]
        if unlisted:
            raise BundleError(f"{where}: files referenced but not listed with a checksum: {unlisted}")
        for rel in self.files:
            check_relative_path(rel, where)

    @property
    def static(self) -> bool:
        return bool(self.geometry.get("static"))


def check_relative_path(rel: str, where: str = "manifest.json") -> None:
    """Reject absolute paths and any '..' component: manifest paths stay inside the bundle."""
    from pathlib import PurePosixPath, PureWindowsPath

    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or PureWindowsPath(rel).is_absolute() or ".." in p.parts or "\\" in rel:
        raise BundleError(f"{where}: path {rel!r} escapes the bundle directory")
