"""Model structure: released key lists and sizes, frame mapping, RoPE, embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sorakit.errors import SorakitError
from sorakit.export import models
from sorakit.export.stdit3 import STDiT3, apply_rope, position_embedding_2d, rope_tables, timestep_embedding
from sorakit.export.vae import OpenSoraVAE
from sorakit.presets import decode_chunks, get_preset, latent_frames, opensora_v12_preset, tiny_preset


def test_opensora_v12_transformer_keys_and_size():
    shapes = models.component_shapes("transformer", opensora_v12_preset())
    assert len(shapes) == 973
    assert sum(math.prod(s) for s in shapes.values()) == 1_208_872_772
    assert shapes["y_embedder.y_embedding"] == (300, 4096)
    assert shapes["x_embedder.proj.weight"] == (1152, 4, 1, 2, 2)
    assert shapes["t_block.1.weight"] == (6912, 1152)
    assert shapes["rope.freqs"] == (36,)
    assert shapes["spatial_blocks.27.attn.q_norm.weight"] == (72,)
    assert shapes["temporal_blocks.0.cross_attn.kv_linear.weight"] == (2304, 1152)
    assert shapes["final_layer.linear.weight"] == (32, 1152)
    assert not any("norm1" in k or "pos_embed" in k for k in shapes)


def test_opensora_v12_vae_keys_and_size():
    shapes = models.component_shapes("vae", opensora_v12_preset())
    assert sum(math.prod(s) for s in shapes.values()) == 393_341_015
    assert len([k for k in shapes if k.startswith("spatial_vae.module.")]) == 248
    assert len([k for k in shapes if k.startswith("temporal_vae.")]) == 267
    assert shapes["temporal_vae.decoder.conv_blocks.2.conv.weight"] == (1024, 512, 3, 3, 3)
    assert shapes["temporal_vae.encoder.block_res_blocks.1.0.conv3.conv.weight"] == (256, 128, 1, 1, 1)
    assert shapes["spatial_vae.module.decoder.conv_in.weight"] == (512, 4, 3, 3)
    assert shapes["scale"] == (1, 4, 1, 1, 1)


def test_opensora_v12_text_encoder_size():
    shapes = models.component_shapes("text_encoder", opensora_v12_preset())
    assert sum(math.prod(s) for s in shapes.values()) == 4_762_310_656
    assert shapes["encoder.block.23.layer.1.DenseReluDense.wi_0.weight"] == (10240, 4096)


@pytest.mark.parametrize("frames,latent", [(17, 5), (51, 15), (68, 20), (102, 30), (204, 60), (408, 120), (1, 1)])
def test_frame_mapping(frames, latent):
    assert latent_frames(frames) == latent


@pytest.mark.parametrize("frames", [17, 51, 68])
def test_decoder_crops_front_padding(frames):
    preset = tiny_preset()
    vae = models.randomized("vae", preset, seed=1)
    T = latent_frames(frames)
    z = torch.randn(1, 4, T, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = vae.decode_latent_frames(z, frames)
    assert x.shape[2] == frames
    assert decode_chunks(frames) == [(5, 17)] * (frames // 17)
    # each chunk decodes 20 frames; the first 3 are padding and are dropped
    with torch.no_grad():
        full = vae.temporal_vae.decoder(vae.temporal_vae.post_quant_conv(z[:, :, :5] * vae.scale + vae.shift))
    assert full.shape[2] == 20
    assert torch.equal(full[:, :, 3:], x[:, :, :17])


def test_rope_interleaved_pairs_by_hand():
    # head dim 4: freqs = [1, 1/100]; position 2 rotates pair (0,1) by 2 rad and (2,3) by 0.02 rad
    freqs = 1.0 / (10000 ** (torch.arange(0, 4, 2).float() / 4))
    cos, sin = rope_tables(freqs, torch.arange(3, dtype=torch.float32))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 3)[None, None]  # [N=1, heads=1, T=3, D=4]
    out = apply_rope(x, cos, sin)[0, 0, 2]
    a, b = 2.0, 0.02
    want = torch.tensor(
        [
            1 * math.cos(a) - 2 * math.sin(a),
            2 * math.cos(a) + 1 * math.sin(a),
            3 * math.cos(b) - 4 * math.sin(b),
            4 * math.cos(b) + 3 * math.sin(b),
        ]
    )
    assert torch.allclose(out, want, atol=1e-6)
    assert torch.equal(apply_rope(x, cos, sin)[0, 0, 0], x[0, 0, 0])  # position 0 is the identity


def test_position_embedding_width_code_first_sin_then_cos():
    dim, h, w = 8, 2, 3
    pe = position_embedding_2d(dim, h, w, torch.tensor([1.0]), base_size=torch.tensor(1.0))[0]  # [h*w, dim]
    inv = 1.0 / (10000 ** (torch.arange(0, 4, 2).float() / 4))
    token = 1 * w + 2  # row 1, column 2
    col, row = 2 * (1.0 / w), 1 * (1.0 / h)
    want = torch.cat([torch.sin(col * inv), torch.cos(col * inv), torch.sin(row * inv), torch.cos(row * inv)])
    assert torch.allclose(pe[token], want, atol=1e-6)


def test_timestep_embedding_cos_first():
    e = timestep_embedding(torch.tensor([3.0]), 8)[0]
    freqs = torch.exp(-math.log(10000) * torch.arange(4).float() / 4)
    assert torch.allclose(e, torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))


def test_unknown_preset_names_choices():
    with pytest.raises(SorakitError, match="unknown preset 'nope'.*opensora-v1.2"):
        get_preset("nope")


def test_blocks_build_on_their_own():
    """One block pair, one T5 layer, one VAE stage can each be built and loaded alone."""
    from sorakit.export.stdit3 import STDiT3Block
    from sorakit.export.t5 import T5Layer

    preset = tiny_preset()
    full = models.randomized("transformer", preset, seed=3)
    blk = STDiT3Block(preset.stdit, temporal=True)
    prefix = "temporal_blocks.1."
    blk.load_state_dict({k[len(prefix) :]: v for k, v in full.state_dict().items() if k.startswith(prefix)})
    layer = T5Layer(preset.t5)
    te = models.randomized("text_encoder", preset, seed=3).state_dict()
    layer.load_state_dict({k[len("encoder.block.1.") :]: v for k, v in te.items() if k.startswith("encoder.block.1.")})
    assert isinstance(full, STDiT3) and isinstance(models.build("vae", preset), OpenSoraVAE)


def test_random_weights_are_not_training_init():
    """adaLN-Zero would zero the outputs; the recipe must not (else parity is vacuous)."""
    preset = tiny_preset()
    m = models.randomized("transformer", preset, seed=0)
    assert m.final_layer.linear.weight.abs().min() > 0
    x = torch.randn(2, 4, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randn(2, 1, preset.stdit.model_max_length, preset.stdit.caption_channels)
    with torch.no_grad():
        out = m(x, torch.tensor([500.0, 500.0]), y, torch.ones(1, preset.stdit.model_max_length, dtype=torch.long))
    assert out.abs().mean() > 0.1
    assert np.isfinite(out.numpy()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_rmsnorm_is_both_llama_rmsnorm_and_t5_layer_norm(dtype):
    """STDiT3's q/k norm (LlamaRMSNorm in Open-Sora) and T5's layer norm are one class: the same
    values as both transformers classes whenever input and weight share a dtype."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    from sorakit.export.stdit3 import RMSNorm

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(48, generator=g) + 1.0
    x = (torch.randn(3, 5, 48, generator=g) * 4).to(dtype)
    ours, llama, t5 = RMSNorm(48, 1e-6), LlamaRMSNorm(48, eps=1e-6), T5LayerNorm(48, eps=1e-6)
    for m in (ours, llama, t5):
        m.weight.data = weight.clone()
        m.to(dtype)
    assert set(ours.state_dict()) == set(llama.state_dict()) == set(t5.state_dict()) == {"weight"}
    with torch.no_grad():
        got, want_llama, want_t5 = ours(x), llama(x), t5(x)
    assert got.dtype == dtype
    assert torch.equal(got, want_llama) and torch.equal(got, want_t5)
