"""STDiT3 (Open-Sora 1.2's diffusion transformer), written for export.

Same parameters, buffers and key names as the official ``opensora/models/stdit/stdit3.py``
(v1.2.0), same arithmetic, with these export-minded choices:

* Tokens travel between blocks as ``[B, T, S, C]`` (latent frames x spatial tokens), so a
  block graph's shapes say which axis is time.
* Reshapes that involve the frame count use ``-1`` for it, so a graph pass can change the
  number of frames seen by an attention (TDTM) without rewriting constants.
* Cross-attention gives every sample its own text tokens with a key-padding bias
  ``[B, 1, 1, L]`` (0 for real tokens, -1e4 for padding) instead of xformers' block-diagonal
  mask over the concatenated valid tokens. Both exclude exactly the same keys.
* RoPE (interleaved pairs, temporal blocks only) takes precomputed cos/sin tables
  ``[T, head_dim]``; the sign of the pair rotation is folded into the sine table.

Sections: helpers, embedders, attention, block, final layer, model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sorakit.presets import STDiT3Config

PAD_BIAS = -1.0e4  # additive attention bias for padded text tokens; exp(-1e4) == 0 in fp32


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def dims(t: torch.Tensor) -> tuple[int, ...]:
    """A tensor's sizes as Python ints while the TorchScript exporter traces (static graphs get
    constants, and the -1 written in reshapes survives), as-is otherwise (symbolic in dynamo)."""
    if torch.jit.is_tracing():
        return tuple(int(d) for d in t.shape)
    return tuple(t.shape)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def frame_select(x_mask: torch.Tensor | None, x: torch.Tensor, x_zero: torch.Tensor) -> torch.Tensor:
    """Per latent frame, keep x where x_mask is True, else the timestep-0 variant. x: [B,T,S,C]."""
    if x_mask is None:
        return x
    return torch.where(x_mask[:, :, None, None], x, x_zero)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoid of the raw value, laid out [cos, sin] as Open-Sora's TimestepEmbedder does."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# Mirror of sorakit.graph_passes.tdtm.rope_tables_np: keep in sync
# (tests/test_graph_passes.py::test_tdtm_mirrors_the_torch_reference).
def rope_tables(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed-sin tables [T, head_dim] for interleaved-pair RoPE at float positions."""
    half = dims(freqs)[0]
    angles = positions.to(freqs.dtype)[:, None] * freqs[None, :]  # [T, D/2]
    angles = torch.stack([angles, angles], dim=2).reshape(-1, 2 * half)  # (f0, f0, f1, f1, ...)
    sin = angles.sin()
    sin_signed = torch.stack([-sin[:, 0::2], sin[:, 1::2]], dim=2).reshape(-1, 2 * half)
    return angles.cos(), sin_signed


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x [N, heads, T, D]: pair (2i, 2i+1) -> (x0 cos - x1 sin, x1 cos + x0 sin).

    Positive axes only (the TorchScript exporter mis-handles negative ones when it loses a
    rank), and T written as -1 so a graph pass may change the frame count.
    """
    shape = dims(x)
    pairs = x.reshape(shape[0], shape[1], -1, shape[3] // 2, 2)  # [N, heads, T, D/2, 2]
    x0, x1 = torch.split(pairs, [1, 1], dim=4)  # fixed sizes: a Split op, no shape arithmetic
    swapped = torch.cat((x1, x0), dim=4).reshape(shape[0], shape[1], -1, shape[3])  # (x1, x0, x3, x2, ...)
    return x * cos + swapped * sin_signed


class RotaryEmbedding(nn.Module):
    """Holds ``rope.freqs`` (a no-grad parameter in the official model, so it is in state_dict)."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def tables(self, num_frames: int, positions: torch.Tensor | None = None):
        if positions is None:
            positions = torch.arange(num_frames, dtype=torch.float32)
        return rope_tables(self.freqs, positions)


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps), the statistics in fp32; checkpoint key ``weight``.

    One class for STDiT3's q/k norm (Open-Sora's LlamaRMSNorm) and T5's layer norm (transformers'
    T5LayerNorm, ``export/t5.py``). They compute the same thing whenever the input and the weight
    share a dtype (always in sorakit: checkpoints are upcast to fp32 on load, fp16 is a graph
    pass); they differ only when they do not: LlamaRMSNorm casts the normalised value back to
    the input's dtype before the weight (as here), T5LayerNorm to the weight's.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Mlp(nn.Module):
    """timm Mlp: fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ---------------------------------------------------------------------------------------
# embedders
# ---------------------------------------------------------------------------------------
class CaptionFrameEmbedder(nn.Module):
    """Small models only: MLP of (pooled caption, frame embedding) -> one vector per frame."""

    def __init__(self, C: int):
        super().__init__()
        self.caption = nn.Linear(C, C)
        self.frame = nn.Linear(C, C, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.out = nn.Linear(C, C)

    def forward(self, pooled: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """pooled [B, C], frames [T, C] -> [B, T, C]."""
        return self.out(self.act(self.caption(pooled)[:, None, :] + self.frame(frames)[None]))


class PatchEmbed3D(nn.Module):
    """Conv3d with kernel = stride = patch, after zero-padding W, H, T up to multiples.

    For pt == 1 the convolution is computed as a matrix product over flattened patches
    (identical maths; keeps every tensor at rank <= 5 and avoids a 3-D convolution, which
    Core ML handles poorly). Returns tokens [B, T, S, C].
    """

    def __init__(self, patch_size, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        B, Cin, T, H, W = dims(x)
        if W % pw:
            x = F.pad(x, (0, pw - W % pw))
        if H % ph:
            x = F.pad(x, (0, 0, 0, ph - H % ph))
        if T % pt:
            x = F.pad(x, (0, 0, 0, 0, 0, pt - T % pt))
        Tp, Hp, Wp = dims(x)[2] // pt, dims(x)[3] // ph, dims(x)[4] // pw
        if pt != 1:
            return self.proj(x).flatten(3).permute(0, 2, 3, 1)  # [B, T, S, C]
        x = x.permute(0, 2, 3, 4, 1).reshape(B * Tp, Hp, ph, Wp, pw * Cin)  # [BT, H', ph, W', pw*c]
        x = x.permute(0, 1, 3, 2, 4).reshape(B, Tp, Hp * Wp, ph * pw * Cin)  # patch (ph, pw, c)
        weight = self.proj.weight.permute(0, 2, 3, 4, 1).reshape(self.proj.weight.shape[0], -1)
        return x @ weight.t() + self.proj.bias


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # [B] -> [B, C]
        emb = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """y_proj MLP plus the learned null caption (a buffer: loaded, never optimised)."""

    def __init__(self, in_channels: int, hidden_size: int, token_num: int, uncond_prob: float):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def drop(self, caption: torch.Tensor, drop_ids: torch.Tensor) -> torch.Tensor:
        """Training-time caption dropout: rows with drop_ids True get the null caption."""
        return torch.where(drop_ids[:, None, None, None], self.y_embedding.to(caption.dtype), caption)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj(caption)


def position_embedding_2d(dim: int, h: int, w: int, scale: torch.Tensor, base_size) -> torch.Tensor:
    """Open-Sora's PositionEmbedding2D: [1, h*w, dim], column code first, each [sin, cos].

    ``scale`` is a tensor (sqrt(height*width)/input_sq_size) so pixel sizes can be graph inputs.
    """
    half = dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))
    grid_h = torch.arange(h, dtype=torch.float32) / scale * (base_size / h)
    grid_w = torch.arange(w, dtype=torch.float32) / scale * (base_size / w)
    rows = grid_h[:, None].repeat(1, w).reshape(-1)  # repeat (Tile), not expand: Core ML lacks Expand
    cols = grid_w[None, :].repeat(h, 1).reshape(-1)

    def code(p):
        out = p[:, None] * inv_freq[None, :]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)

    return torch.cat([code(cols), code(rows)], dim=-1).unsqueeze(0)


def frame_embedding(dim: int, num_frames) -> torch.Tensor:
    """[T, dim] sinusoid of the latent frame index, [sin, cos] (small-model option only)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim // 2, dtype=torch.float32) * 2 / dim))
    pos = torch.arange(num_frames, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([torch.sin(pos), torch.cos(pos)], dim=-1)


# ---------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Self-attention of a spatial block (over the S tokens of each frame) or a temporal block
    (over the T frames at each token position). Takes and returns tokens [B, T, S, C].

    The frame count is written as -1 in every reshape, so a graph pass may hand this module
    fewer frames (TDTM) without rewriting constants; in the exported graph the module's
    input and output are the TDTM boundaries.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, temporal: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.temporal = temporal
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, rope_cos=None, rope_sin=None) -> torch.Tensor:
        B, _, S, C = dims(h)
        H, D = self.num_heads, self.head_dim
        if self.temporal:  # sequences over frames: (B S) T C
            seq = h.transpose(1, 2).reshape(B * S, -1, C)
            qkv = self.qkv(seq).reshape(B * S, -1, 3, H, D)
        else:  # sequences over tokens: (B T) S C
            seq = h.reshape(-1, S, C)
            qkv = self.qkv(seq).reshape(-1, S, 3, H, D)
        q, k, v = (t.squeeze(0) for t in torch.split(qkv.permute(2, 0, 3, 1, 4), [1, 1, 1], dim=0))  # [N, heads, L, D]
        q, k = self.q_norm(q), self.k_norm(k)
        if rope_cos is not None:
            q = apply_rope(q, rope_cos, rope_sin)
            k = apply_rope(k, rope_cos, rope_sin)
        q = q * self.scale
        attn = (q @ k.transpose(2, 3)).float().softmax(dim=-1).to(v.dtype)
        out = (attn @ v).transpose(1, 2)  # [N, L, heads, D]
        if self.temporal:
            out = self.proj(out.reshape(B * S, -1, C))
            return out.reshape(B, S, -1, C).transpose(1, 2)
        out = self.proj(out.reshape(-1, S, C))
        return out.reshape(B, -1, S, C)


class CrossAttention(nn.Module):
    """Each sample's queries attend only to its own text tokens (key-padding bias)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_bias: torch.Tensor) -> torch.Tensor:
        # x [B,T,S,C] queries, y [B,L,C] text, y_bias [B,1,1,L]
        B, _, S, C = dims(x)
        q = self.q_linear(x.reshape(B, -1, C)).reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv_linear(y).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = (t.squeeze(0) for t in torch.split(kv, [1, 1], dim=0))  # [B, heads, L, D]
        attn = (q * self.head_dim**-0.5) @ k.transpose(2, 3) + y_bias
        attn = attn.float().softmax(dim=-1).to(v.dtype)
        out = (attn @ v).transpose(1, 2).reshape(B, -1, C)
        return self.proj(out).reshape(B, -1, S, C)


# ---------------------------------------------------------------------------------------
# block
# ---------------------------------------------------------------------------------------
class STDiT3Block(nn.Module):
    """One spatial or temporal block. x [B,T,S,C] -> [B,T,S,C]."""

    def __init__(self, config: STDiT3Config, temporal: bool):
        super().__init__()
        C = config.hidden_size
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(C, config.num_heads, config.qk_norm, temporal)
        self.cross_attn = CrossAttention(C, config.num_heads)
        self.norm2 = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(C, int(C * config.mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, C) / C**0.5)

    def modulation(self, t_mlp: torch.Tensor) -> list[torch.Tensor]:
        B, C = dims(t_mlp)[0], self.scale_shift_table.shape[1]
        mods = self.scale_shift_table[None] + t_mlp.reshape(B, 6, C)
        return [m[:, :, None, :] for m in torch.split(mods, [1] * 6, dim=1)]  # six [B,1,1,C]

    def forward(self, x, y, y_bias, t_mlp, rope=None, x_mask=None, t0_mlp=None, tdtm=None):
        """``tdtm`` (an ``export.tdtm.TokenMerge``): merge frame pairs before each attention and
        unmerge after it; ``rope`` must then hold the merged frames' tables."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(t_mlp)
        zero = self.modulation(t0_mlp) if x_mask is not None else [None] * 6

        # 1. self-attention (spatial or temporal), gated
        h = self.norm1(x)
        h_m = modulate(h, shift_msa, scale_msa)
        if x_mask is not None:
            h_m = frame_select(x_mask, h_m, modulate(h, zero[0], zero[1]))
        if tdtm is None:
            a = self.attn(h_m, *(rope or (None, None)))
        else:
            a = tdtm.unmerge(self.attn(tdtm.merge(h_m), *(rope or (None, None))))
        a_s = gate_msa * a
        if x_mask is not None:
            a_s = frame_select(x_mask, a_s, zero[2] * a)
        x = x + a_s

        # 2. cross-attention: no norm, no modulation, no gate
        if tdtm is None:
            x = x + self.cross_attn(x, y, y_bias)
        else:
            x = x + tdtm.unmerge(self.cross_attn(tdtm.merge(x), y, y_bias))

        # 3. MLP, gated
        h = self.norm2(x)
        h_m = modulate(h, shift_mlp, scale_mlp)
        if x_mask is not None:
            h_m = frame_select(x_mask, h_m, modulate(h, zero[3], zero[4]))
        if tdtm is not None and tdtm.mlp:  # TDTM scope "block"
            m = tdtm.unmerge(self.mlp(tdtm.merge(h_m)))
        else:
            m = self.mlp(h_m)
        m_s = gate_mlp * m
        if x_mask is not None:
            m_s = frame_select(x_mask, m_s, zero[5] * m)
        return x + m_s


# ---------------------------------------------------------------------------------------
# final layer
# ---------------------------------------------------------------------------------------
class T2IFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x, t, x_mask=None, t0=None):  # x [B,T,S,C], t [B,C]
        shift, scale = torch.split(self.scale_shift_table[None] + t[:, None], [1, 1], dim=1)  # [B,1,C]
        x = modulate(self.norm_final(x), shift[:, None], scale[:, None])
        if x_mask is not None:
            # Official quirk, kept for fidelity: the t0 variant is computed from the already
            # modulated x. Only matters when some frames are conditioning frames.
            shift0, scale0 = torch.split(self.scale_shift_table[None] + t0[:, None], [1, 1], dim=1)
            x = frame_select(x_mask, x, modulate(self.norm_final(x), shift0[:, None], scale0[:, None]))
        return self.linear(x)


# ---------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------
@dataclass
class PrologueOutput:
    x: torch.Tensor  # [B, T, S, C] tokens with the position embedding added
    y: torch.Tensor  # [B, L, C] projected text
    y_bias: torch.Tensor  # [B, 1, 1, L] key-padding bias
    t: torch.Tensor  # [B, C] timestep + fps embedding (final layer)
    t_mlp: torch.Tensor  # [B, 6C] block modulation
    t0: torch.Tensor | None = None  # timestep-0 variants, only with x_mask
    t0_mlp: torch.Tensor | None = None


class STDiT3(nn.Module):
    def __init__(self, config: STDiT3Config):
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, C)
        self.t_embedder = TimestepEmbedder(C)
        self.fps_embedder = TimestepEmbedder(C)  # SizeEmbedder: same parameters, same maths
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C, bias=True))
        self.y_embedder = CaptionEmbedder(
            config.caption_channels, C, config.model_max_length, config.class_dropout_prob
        )
        if config.caption_to_time:
            self.y_to_t = Mlp(C, C, C)
        if config.caption_frame_embed:
            self.y_to_frame = CaptionFrameEmbedder(C)
        self.rope = RotaryEmbedding(config.head_dim)
        self.spatial_blocks = nn.ModuleList(STDiT3Block(config, temporal=False) for _ in range(config.depth))
        self.temporal_blocks = nn.ModuleList(STDiT3Block(config, temporal=True) for _ in range(config.depth))
        self.final_layer = T2IFinalLayer(C, math.prod(config.patch_size), config.out_channels)

    # -- pieces the exporter also uses on their own --------------------------------------
    def grid(self, x_shape) -> tuple[int, int, int]:
        pt, ph, pw = self.config.patch_size
        Tx, Hx, Wx = x_shape[2:]  # callers pass dims(x): ints when tracing, symbolic under dynamo
        return -(-Tx // pt), -(-Hx // ph), -(-Wx // pw)

    def embed_time(self, timestep: torch.Tensor, fps: torch.Tensor, B: int) -> torch.Tensor:
        fps = fps.reshape(-1).to(timestep.dtype)
        if dims(fps)[0] != B:
            fps = fps.repeat(B // dims(fps)[0])
        return self.t_embedder(timestep) + self.fps_embedder(fps)

    def prologue(self, x, timestep, y, mask, fps, height, width, x_mask=None) -> PrologueOutput:
        """Embed patches, time, fps and caption. y [B,1,L,Cy] or [B,L,Cy]; mask [n or B, L]."""
        B = dims(x)[0]
        T, H, W = self.grid(dims(x))
        S = H * W
        # round(sqrt(S)) as tensor ops, so a dynamic-shape export keeps S symbolic (Python's round
        # would specialise it); torch.round also rounds half to even
        base_size = torch.round(torch.sqrt(torch.ones((), dtype=torch.float32) * S))
        scale = torch.sqrt(height.reshape(-1)[:1].float() * width.reshape(-1)[:1].float()) / self.config.input_sq_size
        pos = position_embedding_2d(self.config.hidden_size, H, W, scale, base_size).to(x.dtype)

        y = y.reshape(B, dims(y)[-2], dims(y)[-1])
        y = self.y_embedder(y)  # [B, L, C]
        if mask is None:
            mask = torch.ones(B, dims(y)[1], dtype=torch.int64)
        mask = mask.reshape(-1, dims(y)[1])
        if dims(mask)[0] != B:
            mask = mask.repeat(B // dims(mask)[0], 1)  # the null caption reuses the prompt's mask
        y_bias = ((1.0 - mask.to(y.dtype)) * PAD_BIAS)[:, None, None, :]

        t = self.embed_time(timestep, fps, B)
        if self.config.caption_to_time:
            t = t + self.y_to_t(masked_mean(y, mask))
        t_mlp = self.t_block(t)
        t0 = t0_mlp = None
        if x_mask is not None:
            t0 = self.embed_time(torch.zeros_like(timestep), fps, B)
            if self.config.caption_to_time:
                t0 = t0 + self.y_to_t(masked_mean(y, mask))
            t0_mlp = self.t_block(t0)

        tokens = self.x_embedder(x) + pos[:, None]  # [B, T, S, C]
        if self.config.temporal_pos_embed or self.config.caption_frame_embed:
            frames = frame_embedding(self.config.hidden_size, T).to(tokens.dtype)  # [T, C]
            if self.config.temporal_pos_embed:
                tokens = tokens + frames[None, :, None, :]
            if self.config.caption_frame_embed:
                tokens = tokens + self.y_to_frame(masked_mean(y, mask), frames)[:, :, None, :]
        return PrologueOutput(tokens, y, y_bias, t, t_mlp, t0, t0_mlp)

    def epilogue(self, x, t, out_size, x_mask=None, t0=None) -> torch.Tensor:
        """Final layer and unpatchify; crop back to out_size = (Tx, Hx, Wx). -> [B,Cout,Tx,Hx,Wx]."""
        x = self.final_layer(x, t, x_mask, t0)  # [B, T, S, pt*ph*pw*Cout]
        return unpatchify(x, self.config.patch_size, self.config.out_channels, out_size)

    def rope_for(self, T: int):
        return self.rope.tables(T)

    # -- full forward -----------------------------------------------------------------------
    def forward(self, x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None, tdtm=None):
        dtype = self.x_embedder.proj.weight.dtype
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)
        Tx, Hx, Wx = x.shape[2:]
        if fps is None:
            fps = torch.tensor([24.0])
        if height is None or width is None:
            height, width = torch.tensor([Hx * 8.0]), torch.tensor([Wx * 8.0])
        p = self.prologue(x, timestep, y, mask, fps, height, width, x_mask)
        T = p.x.shape[1]
        rope = self.rope_for(T) if tdtm is None else self.rope.tables(T, tdtm.positions(T))
        h = p.x
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            h = spatial(h, p.y, p.y_bias, p.t_mlp, None, x_mask, p.t0_mlp, tdtm)
            h = temporal(h, p.y, p.y_bias, p.t_mlp, rope, x_mask, p.t0_mlp, tdtm)
        return self.epilogue(h, p.t, (Tx, Hx, Wx), x_mask, p.t0).float()


def masked_mean(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of y [B,L,C] over the tokens where mask [B,L] is non-zero."""
    m = mask.to(y.dtype)[:, :, None]
    return (y * m).sum(1) / m.sum(1).clamp(min=1.0)


def unpatchify(x: torch.Tensor, patch_size, out_channels: int, out_size) -> torch.Tensor:
    """[B, T, S, (pt ph pw C)] -> [B, C, T*pt, H*ph, W*pw], cropped to out_size (Tx, Hx, Wx).

    With pt == 1 (every Open-Sora preset) no intermediate tensor has rank above 5, which
    Core ML requires.
    """
    pt, ph, pw = patch_size
    Tx, Hx, Wx = out_size
    B, T, C = dims(x)[0], dims(x)[1], out_channels
    H, W = -(-Hx // ph), -(-Wx // pw)
    if pt == 1:
        x = x.reshape(B * T, H, W, ph, pw * C).permute(0, 1, 3, 2, 4)  # [BT, H, ph, W, pw*C]
        x = x.reshape(B * T, H * ph, W * pw, C).permute(0, 3, 1, 2)  # [BT, C, Hp, Wp]
        x = x.reshape(B, T, C, H * ph, W * pw).transpose(1, 2)
    else:
        x = x.reshape(B, T, H, W, pt, ph, pw, C)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, C, T * pt, H * ph, W * pw)
    return x[:, :, :Tx, :Hx, :Wx]
