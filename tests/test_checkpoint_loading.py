"""Checkpoint layouts, strictness, safe formats and block streaming."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from sorakit.errors import CheckpointError
from sorakit.export import models
from sorakit.export.checkpoint import Checkpoint, ComponentCheckpoint
from sorakit.presets import tiny_preset

PRESET = tiny_preset()


@pytest.fixture(scope="module")
def stdit_sd():
    return {k: v.clone() for k, v in models.randomized("transformer", PRESET, seed=5).state_dict().items()}


def write(sd, d, name="model.safetensors"):
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / name))
    return d


def test_roundtrip_single_file(tmp_path, stdit_sd):
    write(stdit_sd, tmp_path / "ck")
    m = models.load("transformer", tmp_path / "ck", PRESET)
    for k, v in m.state_dict().items():
        assert torch.equal(v, stdit_sd[k]), k


def test_sharded_safetensors_and_streaming(tmp_path, stdit_sd):
    d = tmp_path / "sharded"
    keys = sorted(stdit_sd)
    first = [k for k in keys if not k.startswith("temporal_blocks.")]
    second = [k for k in keys if k.startswith("temporal_blocks.")]
    write({k: stdit_sd[k] for k in first}, d, "model-00001-of-00002.safetensors")
    write({k: stdit_sd[k] for k in second}, d, "model-00002-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in second})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ckpt = ComponentCheckpoint.open(d, "transformer")
    # once indexed, reading one block touches only its shard: delete the other and read on
    (d / "model-00002-of-00002.safetensors").unlink()
    block = ckpt.read([k for k in ckpt.shapes() if k.startswith("spatial_blocks.1.")])
    assert block and all(k.startswith("spatial_blocks.1.") for k in block)
    assert torch.equal(block["spatial_blocks.1.attn.qkv.weight"], stdit_sd["spatial_blocks.1.attn.qkv.weight"])
    with pytest.raises(FileNotFoundError):
        ckpt.read(["temporal_blocks.0.attn.qkv.weight"])


def test_missing_unexpected_and_wrong_shape_are_all_listed(tmp_path, stdit_sd):
    sd = dict(stdit_sd)
    del sd["spatial_blocks.0.mlp.fc1.bias"]
    sd["spatial_blocks.0.extra.weight"] = torch.zeros(3)
    sd["final_layer.linear.weight"] = torch.zeros(5, 5)
    write(sd, tmp_path / "bad")
    with pytest.raises(CheckpointError) as e:
        models.load("transformer", tmp_path / "bad", PRESET)
    msg = str(e.value)
    assert "1 missing keys" in msg and "spatial_blocks.0.mlp.fc1.bias" in msg
    assert "1 unexpected keys" in msg and "spatial_blocks.0.extra.weight" in msg
    assert "final_layer.linear.weight: checkpoint [5, 5]" in msg
    assert str(tmp_path / "bad") in msg


def test_absent_rope_freqs_is_tolerated(tmp_path, stdit_sd):
    sd = {k: v for k, v in stdit_sd.items() if k != "rope.freqs"}
    write(sd, tmp_path / "norope")
    m = models.load("transformer", tmp_path / "norope", PRESET)
    assert torch.allclose(m.rope.freqs, stdit_sd["rope.freqs"])


def test_pickle_file_is_refused(tmp_path, stdit_sd):
    d = tmp_path / "pkl"
    d.mkdir()
    (d / "model.pkl").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(CheckpointError, match="pickle"):
        Checkpoint.open(d)


def test_pickle_disguised_as_safetensors(tmp_path):
    d = tmp_path / "fake"
    d.mkdir()
    (d / "model.safetensors").write_bytes(pickle.dumps({"x": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        Checkpoint.open(d)


def test_torch_bin_only_weights(tmp_path, stdit_sd):
    d = tmp_path / "bin"
    d.mkdir()
    torch.save(stdit_sd, d / "pytorch_model.bin")
    m = models.load("transformer", d, PRESET)
    assert torch.equal(m.t_block[1].weight, stdit_sd["t_block.1.weight"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"a": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        Checkpoint.open(tmp_path / "evil.bin")


def test_missing_directory_and_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weights found"):
        Checkpoint.open(tmp_path / "empty")


def test_vae_layout_and_legacy_attention_names(tmp_path):
    vae_sd = models.randomized("vae", PRESET, seed=2).state_dict()
    legacy = {}
    for k, v in vae_sd.items():
        k2 = k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
        k2 = k2.replace(".to_out.0.", ".proj_attn.")
        legacy[k2] = v
    assert any(".query." in k for k in legacy)
    write(legacy, tmp_path / "vae")
    m = models.load("vae", tmp_path / "vae", PRESET)
    assert torch.equal(m.scale, vae_sd["scale"])
    key = "spatial_vae.module.decoder.mid_block.attentions.0.to_q.weight"
    assert torch.equal(m.state_dict()[key], vae_sd[key])


def test_t5_layout_with_tied_embedding(tmp_path):
    te = models.randomized("text_encoder", PRESET, seed=4)
    torch.save(te.state_dict(), tmp_path / "pytorch_model.bin")  # contains both tied keys
    m = models.load("text_encoder", tmp_path, PRESET)
    assert torch.equal(m.shared.weight, te.shared.weight)


def test_config_json_mismatch(tmp_path, stdit_sd):
    write(stdit_sd, tmp_path / "cfg")
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"depth": 28, "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="depth: checkpoint 28 vs preset 2"):
        models.load("transformer", tmp_path / "cfg", PRESET)
