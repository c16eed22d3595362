"""sorakit export: per-graph and end-to-end parity, resume, atomicity, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sorakit.bundle.io import Bundle
from sorakit.errors import CheckpointError, SorakitError
from sorakit.export import models
from sorakit.export.exporter import ExportSettings, export_bundle
from sorakit.presets import tiny_preset

PRESET = tiny_preset()


def test_every_graph_matches_torch(tiny_bundle):
    out, report = tiny_bundle
    comps = {r.entry.name.split(".")[0] for r in report.pieces}
    assert comps == {"text_encoder", "transformer", "vae"}
    for r in report.pieces:
        assert r.max_abs_err is not None and r.max_abs_err < 1e-4, r.entry.name
        assert r.psnr > 100, r.entry.name
    m = Bundle.open(out).manifest
    for g in m.all_graphs():
        assert g.info["verification"]["max_abs_err"] < 1e-4
    for comp, chain in report.chain.items():
        assert chain["max_abs_err"] < 1e-4, comp


def test_end_to_end_against_torch_reference(tiny_bundle):
    _, report = tiny_bundle
    e2e = report.end_to_end
    assert e2e["max_abs_err"] < 1e-3 and e2e["psnr_db"] > 80
    assert e2e["latent_max_abs_err"] < 1e-3


def test_resume_skips_finished_graphs_and_failure_leaves_no_bundle(tmp_path):
    out = tmp_path / "b"
    s = ExportSettings(PRESET, 64, 64, 17, components=("transformer",))
    with pytest.raises(SorakitError, match="simulated failure"):
        export_bundle(s, out, fail_after="transformer.block.00")
    assert not out.exists()  # nothing that looks like a bundle
    assert (tmp_path / "b.partial" / "progress.json").is_file()
    with pytest.raises(Exception, match="incomplete"):
        Bundle.open(out)
    report = export_bundle(s, out)
    skipped = {r.entry.name: r.skipped for r in report.pieces}
    assert skipped == {"transformer.prologue": True, "transformer.block.00": True,
                       "transformer.block.01": False, "transformer.epilogue": False}
    assert not (tmp_path / "b.partial").exists()
    Bundle.open(out, verify="full")
    # a second run over the finished bundle reuses everything
    again = export_bundle(s, out)
    assert all(r.skipped for r in again.pieces)
    Bundle.open(out, verify="full")


def test_settings_change_invalidates_reuse(tmp_path):
    out = tmp_path / "b"
    export_bundle(ExportSettings(PRESET, 64, 64, 17, components=("transformer",), verify=False), out)
    report = export_bundle(ExportSettings(PRESET, 64, 64, 17, components=("transformer",), verify=False, seed=1), out)
    assert not any(r.skipped for r in report.pieces)


def test_checkpoint_export_matches_checkpoint(tmp_path):
    """Streaming export from a checkpoint directory: graphs carry the checkpoint's weights."""
    te = models.randomized("transformer", PRESET, seed=7)
    models.save_checkpoint(te, tmp_path / "ck", "transformer")
    out = tmp_path / "b"
    export_bundle(ExportSettings(PRESET, 64, 64, 17, components=("transformer",)), out,
                  {"transformer": tmp_path / "ck"})
    null = np.load(out / "null_caption.npy")
    assert np.array_equal(null, te.y_embedder.y_embedding.numpy())


def test_checkpoint_keys_that_do_not_match(tmp_path):
    te = models.randomized("transformer", PRESET, seed=7)
    sd = {k: v for k, v in te.state_dict().items() if not k.startswith("temporal_blocks.1.")}
    from safetensors.torch import save_file

    (tmp_path / "ck").mkdir()
    save_file(sd, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="temporal_blocks.1.attn.qkv.weight"):
        export_bundle(ExportSettings(PRESET, 64, 64, 17, components=("transformer",)), tmp_path / "b",
                      {"transformer": tmp_path / "ck"})
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("h,w,frames,match", [(60, 64, 17, "multiple of 8"), (64, 64, 20, "multiple of 17"),
                                              (64, 64, 0, "at least 1")])
def test_unsupported_geometry(tmp_path, h, w, frames, match):
    with pytest.raises(SorakitError, match=match):
        export_bundle(ExportSettings(PRESET, h, w, frames), tmp_path / "b")


def test_output_that_is_not_a_bundle(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(SorakitError, match="exists and is not a sorakit bundle"):
        export_bundle(ExportSettings(PRESET, 64, 64, 17, components=("transformer",)), tmp_path / "b")
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"


def test_dynamic_export_runs_other_sizes(tmp_path):
    """A dynamic bundle's transformer graphs run at sizes other than the export's."""
    import onnxruntime as ort

    out = tmp_path / "dyn"
    export_bundle(ExportSettings(PRESET, 64, 64, 17, static=False, components=("transformer",), granularity="2"), out)
    m = Bundle.open(out).manifest
    block = m.components["transformer"].graphs[1]
    assert m.export["exporter"] == "dynamo"
    assert any(isinstance(d, str) for d in block.inputs[0].shape)
    sess = ort.InferenceSession(str(out / block.file))
    full = models.randomized("transformer", PRESET, seed=0)
    x = torch.randn(2, 7, 20, 64)  # 7 frames, 4x5 tokens: not the export size
    y = torch.randn(2, 16, 64)
    bias = torch.zeros(2, 1, 1, 16)
    t_mlp = torch.randn(2, 6 * 64)
    got = sess.run(None, {"tokens": x.numpy(), "y_proj": y.numpy(), "y_bias": bias.numpy(), "t_mlp": t_mlp.numpy()})[0]
    with torch.no_grad():
        rope = full.rope.tables(7)
        want = x
        for i in range(2):
            want = full.temporal_blocks[i](full.spatial_blocks[i](want, y, bias, t_mlp), y, bias, t_mlp, rope)
    assert np.abs(got - want.numpy()).max() < 1e-4
    # the prologue too (position embedding and patching at a new size)
    from sorakit.export.pieces import Prologue

    pro = Prologue(PRESET)
    pro.load_state_dict({k: v for k, v in full.state_dict().items() if k in pro.state_dict()})
    prologue = m.components["transformer"].graphs[0]
    args = (torch.randn(2, 4, 7, 8, 10), torch.tensor([300.0, 300.0]), torch.randn(2, 16, 32),
            torch.ones(2, 16, dtype=torch.int64), torch.tensor([24.0]), torch.tensor([64.0]), torch.tensor([80.0]))
    sess = ort.InferenceSession(str(out / prologue.file))
    got = sess.run(None, {t.name: a.numpy() for t, a in zip(prologue.inputs, args)})
    with torch.no_grad():
        want = pro(*args)
    assert got[0].shape == (2, 7, 20, 64)
    for g_, w_ in zip(got, want):
        assert np.abs(g_ - w_.numpy()).max() < 1e-4


def test_manifest_records_settings(tiny_bundle):
    m = json.loads((tiny_bundle[0] / "manifest.json").read_text())
    assert m["geometry"] == {"static": True, "height": 64, "width": 64, "num_frames": 17, "latent": [5, 8, 8],
                             "batch": 1, "batch2": 2}
    assert m["export"]["exporter"] == "torchscript" and m["export"]["granularity"] == "pair"
    assert m["null_caption"]["shape"] == [16, 32]
    assert m["tokenizer"]["max_length"] == 16


def test_small_model_options_export_and_verify(tmp_path):
    """The shapes model's extra embeddings (caption pooled into t, frame-index embedding, the
    caption-and-frame embedding) export and verify like the rest, and they change the output."""
    import dataclasses

    stdit = dataclasses.replace(PRESET.stdit, caption_to_time=True, temporal_pos_embed=True, caption_frame_embed=True)
    preset = dataclasses.replace(PRESET, stdit=stdit)
    report = export_bundle(ExportSettings(preset, 64, 64, 17, exporter="torchscript"), tmp_path / "b")
    for r in report.pieces:
        assert r.max_abs_err is not None and r.max_abs_err < 1e-4, r.entry.name
    assert report.end_to_end["max_abs_err"] < 1e-3
    assert Bundle.open(tmp_path / "b").manifest.preset["stdit"]["temporal_pos_embed"] is True

    full = models.randomized("transformer", preset, seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, stdit.in_channels, 5, 8, 8, generator=g)
    y = torch.randn(1, 1, stdit.model_max_length, stdit.caption_channels, generator=g)
    t = torch.tensor([500.0])
    for flag in ("temporal_pos_embed", "caption_frame_embed"):
        less = models.build("transformer", dataclasses.replace(preset, stdit=dataclasses.replace(stdit, **{flag: False})))
        less.load_state_dict(full.state_dict(), strict=False)
        with torch.no_grad():
            assert (full(x, t, y) - less(x, t, y)).abs().max() > 1e-3, flag
