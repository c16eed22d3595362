"""The manifest's schema, checked field by field before anything reads it. Stdlib only.

``check_manifest(data, where)`` raises a ``BundleError`` naming the field, e.g.
``manifest.json: files must be an object (path -> {bytes, sha256}), got a list`` or
``manifest.json: files['vae/x.onnx'] lacks 'bytes'``. It checks the types and ranges of every
field the runtime and `sorakit inspect` read; ``Manifest.from_dict`` calls it first.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from sorakit.errors import BundleError

_SHA256 = re.compile(r"[0-9a-f]{64}")
_KIND = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
         bool: "true or false", type(None): "null"}


def _kind(value: Any) -> str:
    return _KIND.get(type(value), type(value).__name__)


class _Check:
    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, problem: str) -> BundleError:
        return BundleError(f"{self.where}: {field} {problem}",
                           hint="the bundle's manifest is damaged or was edited; re-export or re-copy the bundle")

    def obj(self, field: str, value: Any, required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(field, f"must be an object, got {_kind(value)}")
        missing = [k for k in required if k not in value]
        if missing:
            raise self.fail(field, f"lacks {', '.join(repr(k) for k in missing)}")
        return value

    def lst(self, field: str, value: Any, nonempty: bool = False) -> list:
        if not isinstance(value, list):
            raise self.fail(field, f"must be a list, got {_kind(value)}")
        if nonempty and not value:
            raise self.fail(field, "is an empty list")
        return value

    def text(self, field: str, value: Any, nonempty: bool = True) -> str:
        if not isinstance(value, str) or (nonempty and not value):
            raise self.fail(field, f"must be a non-empty string, got {_kind(value)} {value!r}"[:200])
        return value

    def int(self, field: str, value: Any, min: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(field, f"must be an integer, got {_kind(value)}")
        if value < min:
            raise self.fail(field, f"must be at least {min}, got {value}")
        return value

    def num(self, field: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(field, f"must be a finite number, got {_kind(value)} {value!r}"[:200])
        return value

    def boolean(self, field: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(field, f"must be true or false, got {_kind(value)}")
        return value

    def like_default(self, field: str, value: Any, default: Any) -> None:
        """A preset value of the same kind as the dataclass default (int, float, bool, str, list)."""
        if isinstance(default, bool):
            self.boolean(field, value)
        elif isinstance(default, int):
            self.int(field, value, min=0)
        elif isinstance(default, float):
            self.num(field, value)
        elif isinstance(default, str):
            self.text(field, value, nonempty=False)
        elif isinstance(default, tuple):
            for i, x in enumerate(self.lst(field, value)):
                if default:
                    self.like_default(f"{field}[{i}]", x, default[0])

    def config(self, field: str, value: Any, cls: type, required: tuple[str, ...] = ()) -> None:
        self.obj(field, value, required)
        for f in dataclasses.fields(cls):
            if f.name not in value:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                continue
            sub = f"{field}.{f.name}"
            if dataclasses.is_dataclass(default):
                self.config(sub, value[f.name], type(default))
            elif default is None:
                if value[f.name] is not None:
                    self.num(sub, value[f.name])
            else:
                self.like_default(sub, value[f.name], default)


def check_manifest(d: Any, where: str = "manifest.json") -> None:
    """Raise a BundleError naming the first field that does not fit the schema."""
    from sorakit.presets import SamplerConfig, SpatialVAEConfig, STDiT3Config, T5Config, TemporalVAEConfig

    c = _Check(where)
    c.obj("the manifest", d)
    for key in ("preset", "geometry", "sampler", "tokenizer", "null_caption", "components", "export"):
        if key in d:
            c.obj(key, d[key])
    if "files" in d and not isinstance(d["files"], dict):
        raise c.fail("files", f"must be an object (path -> {{bytes, sha256}}), got {_kind(d['files'])}")

    p = c.obj("preset", d["preset"], ("name", "stdit", "vae", "t5"))
    c.text("preset.name", p["name"])
    c.config("preset.stdit", p["stdit"], STDiT3Config)
    vae = c.obj("preset.vae", p["vae"], ("spatial", "temporal", "micro_frame_size", "shift", "scale"))
    c.config("preset.vae.spatial", vae["spatial"], SpatialVAEConfig)
    c.config("preset.vae.temporal", vae["temporal"], TemporalVAEConfig)
    c.int("preset.vae.micro_frame_size", vae["micro_frame_size"], 1)
    for k in ("shift", "scale"):
        for i, x in enumerate(c.lst(f"preset.vae.{k}", vae[k], nonempty=True)):
            c.num(f"preset.vae.{k}[{i}]", x)
    c.config("preset.t5", p["t5"], T5Config)
    if "sampler" in p:
        c.config("preset.sampler", p["sampler"], SamplerConfig)

    g = c.obj("geometry", d["geometry"], ("static", "height", "width", "num_frames"))
    c.boolean("geometry.static", g["static"])
    for k in ("height", "width", "num_frames"):
        c.int(f"geometry.{k}", g[k], 1)
    if "latent" in g:  # sizes, or names of symbolic dimensions in dynamic bundles
        for i, x in enumerate(c.lst("geometry.latent", g["latent"])):
            if not isinstance(x, str):
                c.int(f"geometry.latent[{i}]", x, 1)

    c.config("sampler", d["sampler"], SamplerConfig, ("num_steps", "cfg_scale"))
    c.int("sampler.num_steps", d["sampler"]["num_steps"], 1)

    t = c.obj("tokenizer", d["tokenizer"], ("file", "max_length", "pad_id", "eos_id"))
    c.text("tokenizer.file", t["file"])
    c.int("tokenizer.max_length", t["max_length"], 1)
    c.int("tokenizer.pad_id", t["pad_id"])
    c.int("tokenizer.eos_id", t["eos_id"])
    if "prompt_suffix" in t:
        c.text("tokenizer.prompt_suffix", t["prompt_suffix"], nonempty=False)

    n = c.obj("null_caption", d["null_caption"], ("file",))
    c.text("null_caption.file", n["file"])
    if "shape" in n:
        shape = c.lst("null_caption.shape", n["shape"])
        if len(shape) != 2:
            raise c.fail("null_caption.shape", f"must have 2 dimensions, got {len(shape)}")
        for i, x in enumerate(shape):
            c.int(f"null_caption.shape[{i}]", x, 1)

    for name, comp in c.obj("components", d["components"]).items():
        where = f"components[{name!r}]"
        comp = c.obj(where, comp, ("graphs",))
        for i, entry in enumerate(c.lst(f"{where}.graphs", comp["graphs"], nonempty=True)):
            _graph(c, f"{where}.graphs[{i}]", entry)
        info = c.obj(f"{where}.info", comp.get("info", {}))
        if name == "vae":
            c.obj(f"{where}.info", info, ("micro_frame_size", "time_downsample"))
            for k in ("micro_frame_size", "time_downsample", "spatial_batch"):
                if k in info:
                    c.int(f"{where}.info.{k}", info[k], 1)
        if "embedding_file" in info:
            c.text(f"{where}.info.embedding_file", info["embedding_file"])

    for rel, rec in d["files"].items():
        field = f"files[{rel!r}]"
        rec = c.obj(field, rec, ("bytes", "sha256"))
        c.int(f"{field}.bytes", rec["bytes"])
        if not isinstance(rec["sha256"], str) or not _SHA256.fullmatch(rec["sha256"]):
            raise c.fail(f"{field}.sha256", "must be 64 lowercase hex digits")

    e = d["export"]
    if "tools" in e:
        c.obj("export.tools", e["tools"])
    for i, p_ in enumerate(c.lst("passes", d.get("passes", []))):
        c.obj(f"passes[{i}]", p_, ("name",))
        c.text(f"passes[{i}].name", p_["name"])


def _graph(c: _Check, where: str, g: Any, depth: int = 0) -> None:
    g = c.obj(where, g, ("name", "role", "file", "inputs", "outputs"))
    for k in ("name", "role", "file"):
        c.text(f"{where}.{k}", g[k])
    if g.get("data") is not None:
        c.text(f"{where}.data", g["data"])
    for io in ("inputs", "outputs"):
        for i, t in enumerate(c.lst(f"{where}.{io}", g[io])):
            f = f"{where}.{io}[{i}]"
            t = c.obj(f, t, ("name", "shape"))
            c.text(f"{f}.name", t["name"])
            for j, dim in enumerate(c.lst(f"{f}.shape", t["shape"])):
                if isinstance(dim, bool) or not isinstance(dim, (int, str)) or (isinstance(dim, int) and dim < 0):
                    raise c.fail(f"{f}.shape[{j}]", f"must be a size or a dimension name, got {dim!r}"[:200])
            for k in ("dtype", "binds"):
                if t.get(k) is not None:
                    c.text(f"{f}.{k}", t[k])
    for k in ("params", "flops"):
        if k in g:
            c.int(f"{where}.{k}", g[k])
    if "modules" in g:
        for i, m in enumerate(c.lst(f"{where}.modules", g["modules"])):
            c.text(f"{where}.modules[{i}]", m, nonempty=False)
    if "info" in g:
        c.obj(f"{where}.info", g["info"])
    if depth > 2:
        raise c.fail(f"{where}.variants", "are nested too deeply")
    for k, var in c.obj(f"{where}.variants", g.get("variants", {})).items():
        _graph(c, f"{where}.variants[{k!r}]", var, depth + 1)
