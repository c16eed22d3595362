"""The exported units ("pieces"): one torch module per ONNX graph, plus the plan of a component.

Pieces are built on the meta device by the exporter and then filled from the checkpoint, so
building one never allocates the rest of its component.

Every piece's state-dict keys are exactly its tensors' keys in the component checkpoint
(T5's embedding is the one mapped exception), so the exporter loads a piece by reading just
those keys: nothing else of the checkpoint is touched.

Transformer: prologue | block groups (spatial i + temporal i by default) | epilogue.
Text encoder: embed | one graph per T5 layer | final norm.
VAE decode: temporal stem | one graph per decoder level | temporal tail (with the front crop)
            | spatial stem (post_quant_conv, conv_in, mid block) | one per up block | spatial tail.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from sorakit.export.stdit3 import RotaryEmbedding, STDiT3, STDiT3Block, T2IFinalLayer, dims
from sorakit.export.t5 import T5Embed, T5FinalNorm, T5Layer
from sorakit.export.vae import CausalConv3d, TemporalDecoder, build_autoencoder_kl, depth_to_time
from sorakit.graph_passes.tdtm import rope_tables_np
from sorakit.presets import ModelPreset, decode_chunks


@dataclass
class IOSpec:
    name: str
    shape: list  # ints or symbolic names
    dtype: str = "float32"
    binds: str | None = None


@dataclass
class PieceSpec:
    """How to build, load, name and feed one graph."""

    name: str  # e.g. "transformer.block.03"
    role: str
    component: str
    build: Callable[[], nn.Module]
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    modules: list[str] = field(default_factory=list)
    key_map: dict[str, str] | None = None  # piece key -> checkpoint key, when not identical
    rel_file: str = ""

    def ckpt_keys(self, module: nn.Module) -> dict[str, str]:
        keys = list(module.state_dict())
        if self.key_map is None:
            return {k: k for k in keys}
        return {k: self.key_map[k] for k in keys}


# ---------------------------------------------------------------------------------------------
# transformer
# ---------------------------------------------------------------------------------------------
class Prologue(nn.Module):
    """Patch, timestep, fps and caption embedding and the position embedding."""

    grid = STDiT3.grid
    embed_time = STDiT3.embed_time
    _prologue = STDiT3.prologue

    def __init__(self, preset: ModelPreset):
        super().__init__()
        cfg = preset.stdit
        ref = STDiT3(dataclasses.replace(cfg, depth=0))  # the embedders, without any block
        self.config = cfg
        self.x_embedder = ref.x_embedder
        self.t_embedder = ref.t_embedder
        self.fps_embedder = ref.fps_embedder
        self.t_block = ref.t_block
        self.y_embedder = ref.y_embedder
        if cfg.caption_to_time:
            self.y_to_t = ref.y_to_t
        if cfg.caption_frame_embed:
            self.y_to_frame = ref.y_to_frame

    def forward(self, x, timestep, y, y_mask, fps, height, width):
        p = self._prologue(x, timestep, y, y_mask, fps, height, width)
        return p.x, p.y, p.y_bias, p.t, p.t_mlp


class BlockGroup(nn.Module):
    """Consecutive STDiT3 blocks in model order, under their checkpoint names."""

    def __init__(self, preset: ModelPreset, blocks: list[tuple[str, int]]):
        super().__init__()
        cfg = preset.stdit
        self.order = blocks
        self.spatial_blocks = nn.ModuleDict({str(i): STDiT3Block(cfg, False) for k, i in blocks if k == "spatial"})
        self.temporal_blocks = nn.ModuleDict({str(i): STDiT3Block(cfg, True) for k, i in blocks if k == "temporal"})
        if len(self.temporal_blocks):
            self.rope = RotaryEmbedding(cfg.head_dim)

    def rope_tables(self, T: int):
        if not len(self.temporal_blocks):
            return None
        if torch.jit.is_tracing():
            # static export: the tables become named constants of the graph (the TDTM pass
            # rewrites them), so compute them outside the trace
            freqs = self.rope.freqs.detach().cpu().numpy()
            cos, sin = rope_tables_np(freqs, np.arange(T, dtype=np.float32))
            return torch.from_numpy(cos), torch.from_numpy(sin)
        return self.rope.tables(T)

    def forward(self, x, y, y_bias, t_mlp):
        rope = self.rope_tables(dims(x)[1])
        for kind, i in self.order:
            if kind == "spatial":
                x = self.spatial_blocks[str(i)](x, y, y_bias, t_mlp)
            else:
                x = self.temporal_blocks[str(i)](x, y, y_bias, t_mlp, rope)
        return x


class Epilogue(nn.Module):
    epilogue = STDiT3.epilogue

    def __init__(self, preset: ModelPreset, out_size: tuple[int, int, int] | None):
        super().__init__()
        cfg = preset.stdit
        self.config = cfg
        self.final_layer = T2IFinalLayer(cfg.hidden_size, cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2],
                                          cfg.out_channels)
        self.out_size = out_size

    def forward(self, x, t, z=None):
        size = self.out_size if z is None else tuple(z.shape[2:])
        return self.epilogue(x, t, size)


def block_groups(depth: int, granularity: str) -> list[list[tuple[str, int]]]:
    """'pair' (spatial i + temporal i), 'single' (one block per graph) or an int N (N pairs)."""
    order = [(k, i) for i in range(depth) for k in ("spatial", "temporal")]
    if granularity == "single":
        return [[b] for b in order]
    n = 1 if granularity == "pair" else int(granularity)
    if n < 1:
        raise ValueError("granularity must be pair, single or a positive number of pairs")
    return [order[j : j + 2 * n] for j in range(0, len(order), 2 * n)]


def transformer_plan(preset: ModelPreset, geo: dict, granularity: str = "pair") -> list[PieceSpec]:
    cfg = preset.stdit
    B, T, h, w = geo["batch2"], geo["latent"][0], geo["latent"][1], geo["latent"][2]
    C, L = cfg.hidden_size, cfg.model_max_length
    if geo["static"]:
        S = -(-h // cfg.patch_size[1]) * -(-w // cfg.patch_size[2])
    else:
        S = "tokens"
    Tp = T
    tok = [B, Tp, S, C]
    z_shape = [B, cfg.in_channels, Tp, h, w]
    plan = [
        PieceSpec(
            "transformer.prologue", "prologue", "transformer", lambda: Prologue(preset),
            inputs=[IOSpec("x", z_shape), IOSpec("timestep", [B]), IOSpec("y", [B, L, cfg.caption_channels]),
                    IOSpec("y_mask", [B, L], "int64"), IOSpec("fps", [1]), IOSpec("height", [1]), IOSpec("width", [1])],
            outputs=[IOSpec("tokens", tok), IOSpec("y_proj", [B, L, C]), IOSpec("y_bias", [B, 1, 1, L]),
                     IOSpec("t", [B, C]), IOSpec("t_mlp", [B, 6 * C])],
            modules=["x_embedder", "t_embedder", "fps_embedder", "t_block", "y_embedder"]
            + (["y_to_t"] if cfg.caption_to_time else [])
            + (["y_to_frame"] if cfg.caption_frame_embed else []),
            rel_file="transformer/prologue.onnx",
        )
    ]
    for gi, group in enumerate(block_groups(cfg.depth, granularity)):
        plan.append(
            PieceSpec(
                f"transformer.block.{gi:02d}", "block", "transformer",
                lambda group=group: BlockGroup(preset, group),
                inputs=[IOSpec("tokens", tok), IOSpec("y_proj", [B, L, C]), IOSpec("y_bias", [B, 1, 1, L]),
                        IOSpec("t_mlp", [B, 6 * C])],
                outputs=[IOSpec("tokens_out", tok, binds="tokens")],
                modules=[f"{k}_blocks.{i}" for k, i in group],
                rel_file=f"transformer/block_{gi:02d}.onnx",
            )
        )
    out_size = tuple(geo["latent"]) if geo["static"] else None
    ep_inputs = [IOSpec("tokens", tok), IOSpec("t", [B, C])]
    if not geo["static"]:
        ep_inputs.append(IOSpec("x", z_shape))  # carries the latent size for unpatchify
    plan.append(
        PieceSpec(
            "transformer.epilogue", "epilogue", "transformer", lambda: Epilogue(preset, out_size),
            inputs=ep_inputs,
            outputs=[IOSpec("velocity", [B, cfg.out_channels, Tp, h, w])],
            modules=["final_layer"],
            rel_file="transformer/epilogue.onnx",
        )
    )
    return plan


# ---------------------------------------------------------------------------------------------
# text encoder
# ---------------------------------------------------------------------------------------------
def text_encoder_plan(preset: ModelPreset, geo: dict, lookup_outside: bool = False) -> list[PieceSpec]:
    t5 = preset.t5
    B = geo["batch"]
    L = t5.max_length
    hid = [B, L, t5.d_model]
    bias = [B, t5.num_heads, L, L]
    first_in = IOSpec("inputs_embeds", hid) if lookup_outside else IOSpec("input_ids", [B, L], "int64")
    embed_map = {"layer0.relative_attention_bias.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"}
    if not lookup_outside:
        embed_map["shared.weight"] = "shared.weight"
    plan = [
        PieceSpec(
            "text_encoder.embed", "embed", "text_encoder", lambda: T5Embed(t5, lookup_outside),
            inputs=[first_in, IOSpec("attention_mask", [B, L], "int64")],
            outputs=[IOSpec("hidden", hid), IOSpec("position_bias", bias)],
            modules=["shared", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"],
            key_map=embed_map, rel_file="text_encoder/embed.onnx",
        )
    ]
    for i in range(t5.num_layers):
        prefix = f"encoder.block.{i}."
        plan.append(
            PieceSpec(
                f"text_encoder.layer.{i:02d}", "layer", "text_encoder", lambda: T5Layer(t5),
                inputs=[IOSpec("hidden", hid), IOSpec("position_bias", bias)],
                outputs=[IOSpec("hidden_out", hid, binds="hidden")],
                modules=[f"encoder.block.{i}"],
                key_map=_prefixed(T5Layer, t5, prefix),
                rel_file=f"text_encoder/layer_{i:02d}.onnx",
            )
        )
    plan.append(
        PieceSpec(
            "text_encoder.final_norm", "final_norm", "text_encoder", lambda: T5FinalNorm(t5),
            inputs=[IOSpec("hidden", hid)], outputs=[IOSpec("text", hid)],
            modules=["encoder.final_layer_norm"], key_map={"final_layer_norm.weight": "encoder.final_layer_norm.weight"},
            rel_file="text_encoder/final_norm.onnx",
        )
    )
    return plan


def _prefixed(cls, cfg, prefix: str) -> dict[str, str]:
    with torch.device("meta"):
        keys = list(cls(cfg).state_dict())
    return {k: prefix + k for k in keys}


# ---------------------------------------------------------------------------------------------
# VAE decode path
# ---------------------------------------------------------------------------------------------
def _holder(**children: nn.Module) -> nn.Module:
    m = nn.Module()
    for k, v in children.items():
        m.add_module(k, v)
    return m


class TemporalStem(nn.Module):
    """z*scale + shift, post_quant_conv, conv1, res_blocks."""

    def __init__(self, preset: ModelPreset):
        super().__init__()
        v = preset.vae
        dec = TemporalDecoder(v.temporal)
        self.register_buffer("scale", torch.tensor(v.scale, dtype=torch.float32)[None, :, None, None, None])
        self.register_buffer("shift", torch.tensor(v.shift, dtype=torch.float32)[None, :, None, None, None])
        self.temporal_vae = _holder(
            post_quant_conv=CausalConv3d(v.temporal.embed_dim, v.temporal.latent_embed_dim, 1),
            decoder=_holder(conv1=dec.conv1, res_blocks=dec.res_blocks),
        )

    def forward(self, z):
        z = z * self.scale + self.shift
        x = self.temporal_vae.decoder.conv1(self.temporal_vae.post_quant_conv(z))
        for block in self.temporal_vae.decoder.res_blocks:
            x = block(x)
        return x


class TemporalLevel(nn.Module):
    """block_res_blocks[i] (+ conv_blocks[i-1] and depth-to-time for i > 0)."""

    def __init__(self, preset: ModelPreset, level: int):
        super().__init__()
        dec = TemporalDecoder(preset.vae.temporal)
        self.level = level
        self.temporal_downsample = dec.temporal_downsample
        parts = {"block_res_blocks": nn.ModuleDict({str(level): dec.block_res_blocks[level]})}
        if level > 0:
            parts["conv_blocks"] = nn.ModuleDict({str(level - 1): dec.conv_blocks[level - 1]})
        self.temporal_vae = _holder(decoder=_holder(**parts))

    def forward(self, x):
        d = self.temporal_vae.decoder
        for block in d.block_res_blocks[str(self.level)]:
            x = block(x)
        if self.level > 0:
            x = d.conv_blocks[str(self.level - 1)](x)
            if self.temporal_downsample[self.level - 1]:
                x = depth_to_time(x, 2)
        return x


class TemporalTail(nn.Module):
    """norm1, SiLU, conv_out and the crop of the front padding."""

    def __init__(self, preset: ModelPreset, crop: int):
        super().__init__()
        dec = TemporalDecoder(preset.vae.temporal)
        self.crop = crop
        self.temporal_vae = _holder(decoder=_holder(norm1=dec.norm1, conv_out=dec.conv_out))

    def forward(self, x):
        d = self.temporal_vae.decoder
        x = d.conv_out(torch.nn.functional.silu(d.norm1(x)))
        return x[:, :, self.crop :]


class SpatialStem(nn.Module):
    """1/scaling_factor, post_quant_conv, decoder.conv_in, decoder.mid_block."""

    def __init__(self, preset: ModelPreset):
        super().__init__()
        ae = build_autoencoder_kl(preset.vae.spatial)
        self.scaling_factor = preset.vae.spatial.scaling_factor
        self.spatial_vae = _holder(module=_holder(
            post_quant_conv=ae.post_quant_conv,
            decoder=_holder(conv_in=ae.decoder.conv_in, mid_block=ae.decoder.mid_block),
        ))

    def forward(self, z):
        m = self.spatial_vae.module
        x = m.decoder.conv_in(m.post_quant_conv(z / self.scaling_factor))
        return m.decoder.mid_block(x, None)


class SpatialUp(nn.Module):
    def __init__(self, preset: ModelPreset, index: int):
        super().__init__()
        ae = build_autoencoder_kl(preset.vae.spatial)
        self.index = str(index)
        self.spatial_vae = _holder(module=_holder(decoder=_holder(
            up_blocks=nn.ModuleDict({self.index: ae.decoder.up_blocks[index]}))))

    def forward(self, x):
        return self.spatial_vae.module.decoder.up_blocks[self.index](x, None)


class SpatialTail(nn.Module):
    def __init__(self, preset: ModelPreset):
        super().__init__()
        ae = build_autoencoder_kl(preset.vae.spatial)
        self.spatial_vae = _holder(module=_holder(decoder=_holder(
            conv_norm_out=ae.decoder.conv_norm_out, conv_out=ae.decoder.conv_out)))

    def forward(self, x):
        d = self.spatial_vae.module.decoder
        return d.conv_out(torch.nn.functional.silu(d.conv_norm_out(x)))


def vae_plan(preset: ModelPreset, geo: dict) -> list[PieceSpec]:
    v = preset.vae
    tcfg = v.temporal
    levels = len(tcfg.channel_multipliers)
    h, w = geo["latent"][1], geo["latent"][2]
    static = geo["static"]
    chunks = decode_chunks(geo["num_frames"], v.micro_frame_size, tcfg.time_downsample) if static else None
    if static and len(set(chunks)) > 1:
        raise ValueError("static VAE export needs equal temporal chunks")
    zt, nf = (chunks[0] if static else ("chunk_latent_frames", "chunk_frames"))
    full_t = (zt * tcfg.time_downsample) if static else "chunk_decoded_frames"
    crop = (-nf) % tcfg.time_downsample if static else 0

    plan = []
    t_now = zt
    c_top = tcfg.filters * tcfg.channel_multipliers[-1]
    plan.append(PieceSpec(
        "vae.temporal.stem", "temporal", "vae", lambda: TemporalStem(preset),
        inputs=[IOSpec("z", [1, tcfg.embed_dim, zt, h, w])],
        outputs=[IOSpec("h", [1, c_top, zt, h, w])],
        modules=["scale", "shift", "temporal_vae.post_quant_conv", "temporal_vae.decoder.conv1",
                 "temporal_vae.decoder.res_blocks"],
        rel_file="vae/temporal_stem.onnx",
    ))
    c_in = c_top
    for level in reversed(range(levels)):
        c_out = tcfg.filters * tcfg.channel_multipliers[level]
        t_out = t_now
        if level > 0 and tcfg.temporal_downsample[level - 1]:
            t_out = t_now * 2 if isinstance(t_now, int) else "chunk_decoded_frames" if level == 1 else f"frames_l{level}"
        plan.append(PieceSpec(
            f"vae.temporal.level{level}", "temporal", "vae", lambda level=level: TemporalLevel(preset, level),
            inputs=[IOSpec("h", [1, c_in, t_now, h, w])],
            outputs=[IOSpec("h_out", [1, c_out, t_out, h, w], binds="h")],
            modules=[f"temporal_vae.decoder.block_res_blocks.{level}"]
            + ([f"temporal_vae.decoder.conv_blocks.{level - 1}"] if level > 0 else []),
            rel_file=f"vae/temporal_level{level}.onnx",
        ))
        c_in, t_now = c_out, t_out
    plan.append(PieceSpec(
        "vae.temporal.tail", "temporal", "vae", lambda: TemporalTail(preset, crop),
        inputs=[IOSpec("h", [1, c_in, full_t, h, w])],
        outputs=[IOSpec("latent_frames", [1, tcfg.in_out_channels, nf, h, w])],
        modules=["temporal_vae.decoder.norm1", "temporal_vae.decoder.conv_out"],
        rel_file="vae/temporal_tail.onnx",
    ))
    # spatial decoder on frames
    s = v.spatial
    N = s.micro_batch_size if static else "frames"
    up = len(s.block_out_channels)
    rev = list(reversed(s.block_out_channels))
    H, W = h, w
    plan.append(PieceSpec(
        "vae.spatial.stem", "spatial", "vae", lambda: SpatialStem(preset),
        inputs=[IOSpec("frames", [N, s.latent_channels, h, w])],
        outputs=[IOSpec("image", [N, rev[0], h, w])],
        modules=["spatial_vae.module.post_quant_conv", "spatial_vae.module.decoder.conv_in",
                 "spatial_vae.module.decoder.mid_block"],
        rel_file="vae/spatial_stem.onnx",
    ))
    c = rev[0]
    for i in range(up):
        H2, W2 = (H * 2, W * 2) if i < up - 1 else (H, W)
        plan.append(PieceSpec(
            f"vae.spatial.up{i}", "spatial", "vae", lambda i=i: SpatialUp(preset, i),
            inputs=[IOSpec("image", [N, c, H, W])],
            outputs=[IOSpec("image_out", [N, rev[i], H2, W2], binds="image")],
            modules=[f"spatial_vae.module.decoder.up_blocks.{i}"],
            rel_file=f"vae/spatial_up{i}.onnx",
        ))
        c, H, W = rev[i], H2, W2
    plan.append(PieceSpec(
        "vae.spatial.tail", "spatial", "vae", lambda: SpatialTail(preset),
        inputs=[IOSpec("image", [N, c, H, W])],
        outputs=[IOSpec("video", [N, s.out_channels, H, W])],
        modules=["spatial_vae.module.decoder.conv_norm_out", "spatial_vae.module.decoder.conv_out"],
        rel_file="vae/spatial_tail.onnx",
    ))
    return plan


__all__ = ["PieceSpec", "IOSpec", "transformer_plan", "text_encoder_plan", "vae_plan", "block_groups"]
