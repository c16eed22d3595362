"""fp16 safetensors of the trained modules (the shipped files) and loading them back strictly."""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from sorakit.export.models import TorchModels, save_checkpoint
from sorakit.presets import ModelPreset


def save_fp16(module: nn.Module, directory: Path, component: str, keep_fp32: tuple[str, ...] = ()) -> Path:
    """fp16 copy of ``module`` (``keep_fp32`` buffers stay fp32) saved with save_checkpoint's keys."""
    half = copy.deepcopy(module).half()
    for name in keep_fp32:
        getattr(half, name).data = getattr(module, name).data.float().clone()
    return save_checkpoint(half, directory, component)


def export(out: Path, text_encoder: nn.Module, transformer: nn.Module, vae: nn.Module) -> dict[str, int]:
    sizes = {}
    for name, module, keep in (
        ("text_encoder", text_encoder, ()),
        ("transformer", transformer, ()),
        ("vae", vae, ("shift", "scale")),
    ):
        path = save_fp16(module, out / name, name, keep)
        sizes[name] = path.stat().st_size
    return sizes


def load_trained(out: Path, preset: ModelPreset) -> TorchModels:
    """The exported files, loaded strictly."""
    return TorchModels.from_checkpoints(
        preset, out / "transformer", out / "vae", out / "text_encoder", tokenizer_file=out / "tokenizer.json"
    )

