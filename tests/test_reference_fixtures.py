"""Our models reproduce the official Open-Sora 1.2 code's outputs (tests/data/opensora-ref)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REF, fixture_stdit_preset

from sorakit.export import models
from sorakit.export.checkpoint import ComponentCheckpoint, check_keys, expected_shapes
from sorakit.export.vae import TemporalVAE
from sorakit.presets import TemporalVAEConfig

TOL = 1e-4


@pytest.fixture(scope="module")
def official_stdit(tmp_path_factory):
    # strict load by the official key names, from a checkpoint directory as released
    d = tmp_path_factory.mktemp("stdit")
    (d / "model.safetensors").symlink_to(REF / "stdit3_small.safetensors")
    return models.load("transformer", d, fixture_stdit_preset())


def run(model, data):
    t = {k: torch.from_numpy(data[k]) for k in ("x", "timestep", "y", "mask", "fps", "height", "width")}
    with torch.no_grad():
        return model(t["x"], t["timestep"], t["y"], t["mask"], None, t["fps"], t["height"], t["width"]).numpy()


@pytest.mark.parametrize("name", ["stdit3_small_base", "stdit3_small_odd_hw", "stdit3_small_mask_per_sample_t_diff"])
def test_stdit3_matches_official(official_stdit, name):
    data = np.load(REF / f"{name}.npz")
    out = run(official_stdit, data)
    assert out.shape == data["output"].shape
    err = np.abs(out - data["output"]).max()
    assert err <= TOL, f"{name}: max abs error {err:.3g}"
    assert np.abs(data["output"]).max() > 1.0  # the reference is not vacuous


def test_stdit3_stages_match_official(official_stdit):
    """Each stage's output, so a regression names the stage where it starts."""
    data = np.load(REF / "stdit3_small_base.npz")
    m = official_stdit
    captured = {}
    hooks = [
        getattr(m, n).register_forward_hook(lambda mod, i, o, n=n: captured.__setitem__(n, o))
        for n in ("t_embedder", "t_block", "final_layer")
    ]
    for kind in ("spatial_blocks", "temporal_blocks"):
        for i, blk in enumerate(getattr(m, kind)):
            hooks.append(blk.register_forward_hook(lambda mod, inp, o, n=f"{kind}.{i}": captured.__setitem__(n, o)))
    run(m, data)
    for h in hooks:
        h.remove()
    for name, got in captured.items():
        want = data[f"inter__{name}"]
        got = got.reshape(want.shape).numpy()
        assert np.abs(got - want).max() <= TOL, f"stage {name} differs from the official code"


def test_temporal_vae_decoder_matches_official():
    cfg = json.loads((REF / "vae_temporal_small_keys.json").read_text())["config"]
    vae = TemporalVAE(
        TemporalVAEConfig(filters=cfg["filters"], num_res_blocks=cfg["num_res_blocks"], num_groups=cfg["num_groups"])
    ).eval()
    ckpt = ComponentCheckpoint.open(REF / "vae_temporal_small_decoder.safetensors", "vae")
    expected = {k: s for k, s in expected_shapes(vae).items() if k.startswith(("decoder.", "post_quant_conv."))}
    check_keys("vae", expected, ckpt.shapes(), "fixture")  # strict: every decoder-side key, nothing else
    vae.load_state_dict(ckpt.read(expected), strict=False)
    data = np.load(REF / "vae_temporal_small_z5_nf17.npz")
    with torch.no_grad():
        out = vae.decode(torch.from_numpy(data["z"]), int(data["num_frames"])).numpy()
    assert out.shape == (1, 4, 17, 8, 8)
    assert np.abs(out - data["output"]).max() <= TOL
    # every key the official model has (encoder too) exists in ours under the same name
    official = {
        k["key"]: tuple(k["shape"]) for k in json.loads((REF / "vae_temporal_small_keys.json").read_text())["keys"]
    }
    assert official == expected_shapes(vae)
