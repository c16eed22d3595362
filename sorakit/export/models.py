"""Build, load and randomise the three components of a preset.

Component names used everywhere (CLI, manifest, checkpoint errors):
``text_encoder`` (T5), ``transformer`` (STDiT3), ``vae`` (OpenSoraVAE).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sorakit.errors import CheckpointError
from sorakit.export.checkpoint import ComponentCheckpoint, check_config, expected_shapes, load_module
from sorakit.export.init import randomize_weights
from sorakit.export.stdit3 import STDiT3
from sorakit.export.t5 import build_t5_encoder
from sorakit.export.vae import OpenSoraVAE
from sorakit.presets import ModelPreset

COMPONENTS = ("text_encoder", "transformer", "vae")
ASSETS = Path(__file__).resolve().parent.parent / "assets"
CHAR_TOKENIZER = ASSETS / "char_tokenizer.json"
TIED_T5_KEY = "encoder.embed_tokens.weight"  # transformers ties it to shared.weight


def build(component: str, preset: ModelPreset, meta: bool = False) -> nn.Module:
    ctx = torch.device("meta") if meta else torch.device("cpu")
    with ctx:
        if component == "transformer":
            module = STDiT3(preset.stdit)
        elif component == "vae":
            module = OpenSoraVAE(preset.vae)
        elif component == "text_encoder":
            module = build_t5_encoder(preset.t5)
        else:
            raise ValueError(f"unknown component {component!r}; one of {COMPONENTS}")
    return module.eval()


def component_shapes(component: str, preset: ModelPreset) -> dict[str, tuple[int, ...]]:
    """The checkpoint keys and shapes a component of this preset needs (built on meta)."""
    shapes = expected_shapes(build(component, preset, meta=True))
    if component == "text_encoder":
        shapes.pop(TIED_T5_KEY, None)
    return shapes


def config_fields(component: str, preset: ModelPreset) -> dict:
    """Preset fields that a released config.json also states (compared on load)."""
    if component == "transformer":
        s = preset.stdit
        return {
            "depth": s.depth,
            "hidden_size": s.hidden_size,
            "num_heads": s.num_heads,
            "patch_size": s.patch_size,
            "in_channels": s.in_channels,
            "caption_channels": s.caption_channels,
            "model_max_length": s.model_max_length,
            "pred_sigma": s.pred_sigma,
            "qk_norm": s.qk_norm,
        }
    if component == "text_encoder":
        t = preset.t5
        return {
            "d_model": t.d_model,
            "num_layers": t.num_layers,
            "num_heads": t.num_heads,
            "d_ff": t.d_ff,
            "d_kv": t.d_kv,
        }
    if component == "vae":
        return {"micro_frame_size": preset.vae.micro_frame_size}
    return {}


def open_checkpoint(component: str, path: str | Path, preset: ModelPreset) -> ComponentCheckpoint:
    """Open and strictly validate (keys, shapes, config.json) without reading tensor data."""
    ckpt = ComponentCheckpoint.open(path, component)
    check_config(component, ckpt.ckpt.config, config_fields(component, preset), str(path))
    ckpt.check(component_shapes(component, preset))
    return ckpt


def load(component: str, path: str | Path, preset: ModelPreset) -> nn.Module:
    ckpt = open_checkpoint(component, path, preset)
    shapes = component_shapes(component, preset)
    tensors = ckpt.read(shapes)
    module = build(component, preset, meta=True)
    if component == "text_encoder":
        tensors[TIED_T5_KEY] = tensors["shared.weight"]
    return load_module(module, tensors, str(path), component)


def randomized(component: str, preset: ModelPreset, seed: int = 0) -> nn.Module:
    module = build(component, preset)
    return randomize_weights(module, seed)


def save_checkpoint(module: nn.Module, directory: str | Path, component: str, config: dict | None = None) -> Path:
    """Write ``model.safetensors`` (+ ``config.json``) the way the released checkpoints are laid out."""
    import json

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    if component == "text_encoder":
        sd.pop(TIED_T5_KEY, None)
    save_file(sd, str(directory / "model.safetensors"))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory / "model.safetensors"


def tokenizer_json(text_encoder_dir: str | Path | None, out: Path) -> Path:
    """Write the prompt tokenizer as a tokenizers JSON file into ``out``.

    From a T5 checkpoint directory: its ``tokenizer.json`` if present, else transformers
    converts its sentencepiece model. Without a directory: the built-in character tokenizer
    (for random-weight presets).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    if text_encoder_dir is None:
        shutil.copyfile(CHAR_TOKENIZER, out)
        return out
    d = Path(text_encoder_dir)
    if (d / "tokenizer.json").is_file():
        shutil.copyfile(d / "tokenizer.json", out)
        return out
    if not any((d / n).is_file() for n in ("spiece.model", "tokenizer_config.json")):
        raise CheckpointError(f"{d} has no tokenizer (tokenizer.json or spiece.model)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d), use_fast=True)
    tok.backend_tokenizer.save(str(out))
    return out


@dataclass
class TorchModels:
    """The three components of a preset, in torch, plus the tokenizer file."""

    preset: ModelPreset
    text_encoder: nn.Module
    transformer: STDiT3
    vae: OpenSoraVAE
    tokenizer_file: Path

    @classmethod
    def random(cls, preset: ModelPreset, seed: int = 0) -> TorchModels:
        return cls(
            preset,
            randomized("text_encoder", preset, seed),
            randomized("transformer", preset, seed),
            randomized("vae", preset, seed),
            CHAR_TOKENIZER,
        )

    @classmethod
    def from_checkpoints(
        cls,
        preset: ModelPreset,
        transformer: str | Path,
        vae: str | Path,
        text_encoder: str | Path,
        tokenizer_file: str | Path | None = None,
    ) -> TorchModels:
        tok = Path(tokenizer_file) if tokenizer_file else Path(text_encoder) / "tokenizer.json"
        if not tok.is_file():
            raise CheckpointError(f"no tokenizer.json at {tok}; pass tokenizer_file")
        return cls(
            preset,
            load("text_encoder", text_encoder, preset),
            load("transformer", transformer, preset),
            load("vae", vae, preset),
            tok,
        )
