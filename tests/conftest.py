"""Shared test fixtures. Models are built from configs with deterministic random weights;
nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
REF = DATA / "opensora-ref"


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    return REF


def fixture_stdit_preset():
    """A preset whose transformer is the official reference vectors' small STDiT3."""
    import dataclasses

    from sorakit.presets import STDiT3Config, tiny_preset

    cfg = json.loads((REF / "stdit3_small_keys.json").read_text())["config"]
    stdit = STDiT3Config(
        depth=cfg["depth"],
        hidden_size=cfg["hidden_size"],
        num_heads=cfg["num_heads"],
        patch_size=tuple(cfg["patch_size"]),
        in_channels=cfg["in_channels"],
        pred_sigma=cfg["pred_sigma"],
        caption_channels=cfg["caption_channels"],
        model_max_length=cfg["model_max_length"],
        qk_norm=cfg["qk_norm"],
        input_sq_size=cfg["input_sq_size"],
    )
    return dataclasses.replace(tiny_preset(), name="fixture", stdit=stdit)


@pytest.fixture(scope="session")
def tiny_models():
    from sorakit.export.models import TorchModels
    from sorakit.presets import tiny_preset

    return TorchModels.random(tiny_preset(), seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """The tiny preset exported once (static 64x64, 17 frames), verified against torch.

    The session fixtures use TorchScript on purpose: on models this small it exports twice as fast
    as dynamo, the default (docs/export.md); ``tiny_transformer_dynamo`` covers the default."""
    from sorakit.export.exporter import ExportSettings, export_bundle
    from sorakit.presets import tiny_preset

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    report = export_bundle(ExportSettings(tiny_preset(), 64, 64, 17, exporter="torchscript"), out)
    return out, report


@pytest.fixture(scope="session")
def shapes_random_bundle(tmp_path_factory):
    """The shipped model's architecture with random weights (~40 MB of graphs), for memory tests."""
    from sorakit.export.exporter import ExportSettings, export_bundle
    from sorakit.presets import shapes_preset

    out = tmp_path_factory.mktemp("bundles") / "shapes-random"
    p = shapes_preset()
    export_bundle(ExportSettings(p, p.resolution[0], p.resolution[1], p.num_frames, verify=False, exporter="torchscript"),
                  out)
    return out


def copy_bundle(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_transformer_even(tmp_path_factory):
    """Only the transformer of the tiny preset, 34 frames (T = 10 latent frames, even)."""
    from sorakit.export.exporter import ExportSettings, export_bundle
    from sorakit.presets import tiny_preset

    out = tmp_path_factory.mktemp("bundles") / "tiny-even"
    export_bundle(ExportSettings(tiny_preset(), 64, 64, 34, components=("transformer",), verify=False,
                                 exporter="torchscript"), out)
    return out


@pytest.fixture(scope="session")
def tiny_transformer_dynamo(tmp_path_factory):
    """The tiny transformer from the dynamo exporter, every graph verified against torch."""
    from sorakit.export.exporter import ExportSettings, export_bundle
    from sorakit.presets import tiny_preset

    out = tmp_path_factory.mktemp("bundles") / "tiny-dynamo"
    report = export_bundle(ExportSettings(tiny_preset(), 64, 64, 17, components=("transformer",), exporter="dynamo"),
                           out)
    return out, report


@pytest.fixture(scope="session")
def optimized_tiny(tiny_bundle, tmp_path_factory):
    """tiny bundle after tdtm, prune and int8 (gates enforced)."""
    from sorakit.graph_passes.pipeline import optimize_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-opt"
    report = optimize_bundle(tiny_bundle[0], out, "tdtm,prune,int8", gate_steps=10)
    return out, report
