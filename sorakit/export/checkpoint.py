"""Checkpoint reading: the released layouts, safe formats only, strict key matching, streaming.

A ``Checkpoint`` is a lazy index over one checkpoint (a directory or a file): it knows every
key's file, shape and dtype without reading tensor data, and ``read()`` loads just the keys
asked for. The exporter uses that to load one block at a time.

Layouts understood (the ones the released Open-Sora 1.2 components use):

* ``config.json`` + ``model.safetensors`` (STDiT3 and VAE on the Hugging Face hub),
* sharded safetensors with ``*.safetensors.index.json``,
* sharded or single ``pytorch_model*.bin`` with ``pytorch_model.bin.index.json`` (the T5-XXL
  encoder); torch files are read with ``weights_only=True`` only,
* a single ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` file given directly.

Pickle files (``.pkl``, ``.pickle``) and anything torch refuses to load with
``weights_only=True`` are rejected.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sorakit.errors import CheckpointError
from sorakit.tensorfile import read_header

SAFE_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
UNSAFE_SUFFIXES = (".pkl", ".pickle")


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


class Checkpoint:
    """Lazy key -> tensor index over a checkpoint directory or file."""

    def __init__(self, root: Path, index: dict[str, TensorInfo], config: dict | None):
        self.root = root
        self.index = index
        self.config = config
        self._torch_cache: dict[Path, dict[str, torch.Tensor]] = {}

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"checkpoint path {path} does not exist")
        if path.is_file():
            return cls(path.parent, _index_files([path]), _read_config(path.parent))
        files = _find_weight_files(path)
        return cls(path, _index_files(files), _read_config(path))

    # -- queries ------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return sorted(self.index)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.index.items()}

    def nbytes(self) -> int:
        itemsize = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}
        total = 0
        for info in self.index.values():
            n = 1
            for d in info.shape:
                n *= d
            total += n * itemsize.get(info.dtype.upper(), 4)
        return total

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read only ``keys`` (fp32), file by file."""
        keys = list(keys)
        missing = [k for k in keys if k not in self.index]
        if missing:
            raise CheckpointError(f"checkpoint {self.root} has no tensors named: {', '.join(missing[:20])}")
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.index[k].file, []).append(k)
        out: dict[str, torch.Tensor] = {}
        for file, ks in by_file.items():
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(file), framework="pt") as f:
                    for k in ks:
                        out[k] = f.get_tensor(k).float()
            else:
                tensors = self._torch_file(file)
                for k in ks:
                    out[k] = tensors[k].float()
        return out

    def read_prefix(self, prefix: str, rename: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
        """Every tensor under ``prefix``, with the prefix stripped."""
        keys = [k for k in self.index if k.startswith(prefix)]
        return {k[len(prefix) :]: v for k, v in self.read(keys).items()}

    def _torch_file(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._torch_cache:
            self._torch_cache[file] = _torch_load(file)
        return self._torch_cache[file]

    def release(self) -> None:
        """Drop memory-mapped torch files (safetensors reads hold nothing)."""
        self._torch_cache.clear()


# ---------------------------------------------------------------------------------------------
# layout detection
# ---------------------------------------------------------------------------------------------
def _read_config(directory: Path) -> dict | None:
    cfg = directory / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg} is not valid JSON: {e}") from None


def _find_weight_files(directory: Path) -> list[Path]:
    indexes = sorted(directory.glob("*.index.json"))
    if indexes:
        if len(indexes) > 1:
            raise CheckpointError(
                f"{directory} holds several shard indexes ({', '.join(p.name for p in indexes)}); keep one"
            )
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{indexes[0]} is not a shard index (no weight_map): {e}") from None
        files = []
        for name in sorted(set(weight_map.values())):
            shard = (directory / name).resolve()
            if directory.resolve() not in shard.parents:
                raise CheckpointError(f"{indexes[0]} names a shard outside its directory: {name}")
            if not shard.is_file():
                raise CheckpointError(f"shard {name} listed in {indexes[0].name} is missing from {directory}")
            files.append(shard)
        return files
    unsafe = [p for p in directory.iterdir() if p.suffix in UNSAFE_SUFFIXES]
    safe = sorted(p for p in directory.iterdir() if p.suffix in SAFE_SUFFIXES)
    if safe:
        return safe
    torch_files = sorted(p for p in directory.iterdir() if p.suffix in TORCH_SUFFIXES)
    if torch_files:
        return torch_files
    if unsafe:
        raise CheckpointError(
            f"{unsafe[0]} is a pickle file; sorakit loads only safetensors, or torch files with "
            "weights_only=True. Convert it with safetensors.torch.save_file."
        )
    raise CheckpointError(
        f"no weights found in {directory}: expected model.safetensors, sharded safetensors with an "
        "index, or pytorch_model*.bin"
    )


def _index_files(files: list[Path]) -> dict[str, TensorInfo]:
    index: dict[str, TensorInfo] = {}
    for file in files:
        if file.suffix in UNSAFE_SUFFIXES:
            raise CheckpointError(f"{file} is a pickle file; only safetensors and weights-only torch files load")
        if file.suffix == ".safetensors":
            entries = _safetensors_header(file)
        elif file.suffix in TORCH_SUFFIXES:
            entries = {k: (tuple(t.shape), str(t.dtype).replace("torch.", "")) for k, t in _torch_load(file).items()}
        else:
            raise CheckpointError(f"{file}: unknown weight file type {file.suffix!r}")
        for k, (shape, dtype) in entries.items():
            if k in index:
                raise CheckpointError(f"tensor {k} appears in both {index[k].file.name} and {file.name}")
            index[k] = TensorInfo(file, shape, dtype)
    return index


def _safetensors_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Parse and check the header only (8-byte length + JSON, every entry's dtype, shape and
    offsets); fails clearly, naming the file and the tensor."""
    try:
        header, _ = read_header(file)
    except CheckpointError as e:
        if "not a safetensors file" in str(e):
            raise CheckpointError(str(e).replace("not a safetensors file", "not a valid safetensors file")
                                  + "; is it a pickle renamed?") from None
        raise
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items()}


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():  # torch's own warnings say nothing the error below does not
            warnings.simplefilter("ignore")
            try:
                obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file} holds Python objects other than tensors ({_refused_global(str(e))}); sorakit reads torch "
            "files only with weights_only=True and refuses to unpickle anything else (unpickling can run code)",
            hint="convert the checkpoint to safetensors where it was made (safetensors.torch.save_file)",
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CheckpointError(f"{file} could not be read as a torch weights file: {str(e).splitlines()[0][:300]}") \
            from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{file} is not a flat dictionary of tensors")
    return obj


def _refused_global(message: str) -> str:
    """What torch's weights-only unpickler refused, without its advice to load unsafely."""
    m = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", message)
    return f"it needs {m.group(1)}" if m else "objects the weights-only loader refuses"


# ---------------------------------------------------------------------------------------------
# key normalisation and strict matching
# ---------------------------------------------------------------------------------------------
_LEGACY_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"(.*\.attentions\.\d+\.)(query|key|value|proj_attn)(\.(?:weight|bias))$")


def canonical_keys(component: str, keys: Iterable[str]) -> dict[str, str]:
    """checkpoint key -> model key, for the tolerated naming variants."""
    mapping = {}
    keys = list(keys)
    for k in keys:
        ck = k
        if component == "vae":
            m = _LEGACY_RE.match(k)
            if m:
                ck = m.group(1) + _LEGACY_VAE_ATTN[m.group(2)] + m.group(3)
        if component == "text_encoder" and k == "encoder.embed_tokens.weight":
            if "shared.weight" in keys:
                continue  # tied copy of shared.weight
            ck = "shared.weight"
        mapping[k] = ck
    return mapping


OPTIONAL_KEYS = {"transformer": {"rope.freqs"}, "vae": set(), "text_encoder": set()}


def check_keys(
    component: str,
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    where: str,
    ignore_unexpected: Iterable[str] = (),
) -> None:
    """Raise CheckpointError listing every missing key, unexpected key and shape mismatch."""
    ignore = set(ignore_unexpected)
    missing = sorted(set(expected) - set(found) - OPTIONAL_KEYS.get(component, set()))
    unexpected = sorted(set(found) - set(expected) - ignore)
    wrong = sorted(
        f"{k}: checkpoint {list(found[k])} vs model {list(expected[k])}"
        for k in set(expected) & set(found)
        if tuple(found[k]) != tuple(expected[k])
    )
    if not (missing or unexpected or wrong):
        return
    lines = [f"checkpoint {where} does not match the {component} of this preset:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines += [f"    {x}" for x in items[:40]]
            if len(items) > 40:
                lines.append(f"    ... and {len(items) - 40} more")
    raise CheckpointError("\n".join(lines))


class ComponentCheckpoint:
    """A checkpoint seen through one component's canonical key names."""

    def __init__(self, ckpt: Checkpoint, component: str):
        self.ckpt = ckpt
        self.component = component
        self.to_model = canonical_keys(component, ckpt.keys())
        self.to_ckpt = {v: k for k, v in self.to_model.items()}
        self.ignored = [k for k in ckpt.keys() if k not in self.to_model]

    @classmethod
    def open(cls, path: str | Path, component: str) -> ComponentCheckpoint:
        return cls(Checkpoint.open(path), component)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {self.to_model[k]: s for k, s in self.ckpt.shapes().items() if k in self.to_model}

    def has(self, key: str) -> bool:
        return key in self.to_ckpt

    def read(self, model_keys: Iterable[str]) -> dict[str, torch.Tensor]:
        model_keys = [k for k in model_keys if k in self.to_ckpt]
        raw = self.ckpt.read(self.to_ckpt[k] for k in model_keys)
        return {k: raw[self.to_ckpt[k]] for k in model_keys}

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        check_keys(self.component, expected, self.shapes(), str(self.ckpt.root))


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_module(module: nn.Module, tensors: dict[str, torch.Tensor], where: str, component: str) -> nn.Module:
    """Strictly copy ``tensors`` into ``module`` (materialising meta tensors if needed)."""
    expected = expected_shapes(module)
    check_keys(component, expected, {k: tuple(v.shape) for k, v in tensors.items()}, where)
    if any(p.is_meta for p in module.parameters()) or any(b.is_meta for b in module.buffers()):
        module.to_empty(device="cpu")
        _reset_constructor_values(module)
    result = module.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return module


def _reset_constructor_values(module: nn.Module) -> None:
    """After to_empty(), recompute tensors whose value is fixed by construction (rope freqs)."""
    from sorakit.export.stdit3 import RotaryEmbedding

    for m in module.modules():
        if isinstance(m, RotaryEmbedding):
            dim = m.freqs.shape[0] * 2
            with torch.no_grad():
                m.freqs.copy_(1.0 / (10000.0 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)))


def check_config(component: str, config: dict | None, wanted: dict, where: str) -> None:
    """Compare a checkpoint's config.json with the preset on the fields both define."""
    if not config:
        return
    diffs = []
    for k, v in wanted.items():
        if k in config:
            cv = config[k]
            if isinstance(v, tuple):
                v = list(v)
            if cv != v:
                diffs.append(f"{k}: checkpoint {cv!r} vs preset {v!r}")
    if diffs:
        raise CheckpointError(
            f"{where}/config.json describes a different {component} than the preset:\n  " + "\n  ".join(diffs)
        )
