"""Open-Sora 1.2 VAE: a diffusers AutoencoderKL per frame, then a causal time-only VAE.

Key names follow the released ``OpenSora-VAE-v1.2`` checkpoint: ``spatial_vae.module.*``
(diffusers AutoencoderKL), ``temporal_vae.*`` (this file's ``TemporalVAE``), ``scale``, ``shift``.

Decoding (all text-to-video needs): z*scale + shift, the temporal decoder on chunks of
5 latent frames (each decoded to 20 frames and cropped at the front to 17, or fewer for the
last chunk), then the spatial decoder frame by frame, 4 frames per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sorakit.export.stdit3 import dims
from sorakit.presets import SpatialVAEConfig, TemporalVAEConfig, VAEConfig, decode_chunks, latent_frames_of_chunk


# ---------------------------------------------------------------------------------------
# temporal VAE (MAGVIT-v2 style, time-only)
# ---------------------------------------------------------------------------------------
class CausalConv3d(nn.Module):
    """Zero-pad H and W symmetrically and time at the front only, then a plain Conv3d."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size, stride: int = 1, bias: bool = True):
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        self.time_pad = (kt - 1) + (1 - stride)
        self.padding = (kw // 2, kw // 2, kh // 2, kh // 2, self.time_pad, 0)
        self.conv = nn.Conv3d(chan_in, chan_out, (kt, kh, kw), stride=(stride, 1, 1), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, filters: int, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, filters, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, filters)
        self.conv2 = CausalConv3d(filters, filters, 3, bias=False)
        self.conv3 = CausalConv3d(in_channels, filters, 1, bias=False) if in_channels != filters else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.conv3 is None else self.conv3(x)
        x = self.conv1(F.silu(self.norm1(x)))
        x = self.conv2(F.silu(self.norm2(x)))
        return x + residual


def depth_to_time(x: torch.Tensor, ts: int) -> torch.Tensor:
    """'B (C ts) T H W -> B C (T ts) H W' with channels major, in rank <= 5 steps."""
    B, Cts, T, H, W = dims(x)
    C = Cts // ts
    x = x.reshape(B * C, ts, T, H * W).transpose(1, 2)  # [B*C, T, ts, HW]
    return x.reshape(B, C, T * ts, H, W)


class TemporalEncoder(nn.Module):
    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        f, g, n = cfg.filters, cfg.num_groups, cfg.num_res_blocks
        mults = cfg.channel_multipliers
        self.conv_in = CausalConv3d(cfg.in_out_channels, f, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        prev = f
        for i, m in enumerate(mults):
            filters = f * m
            items = nn.ModuleList()
            for _ in range(n):
                items.append(ResBlock(prev, filters, g))
                prev = filters
            self.block_res_blocks.append(items)
            if i < len(mults) - 1:
                if cfg.temporal_downsample[i]:
                    self.conv_blocks.append(CausalConv3d(prev, filters, 3, stride=2))
                else:
                    self.conv_blocks.append(nn.Identity())
                prev = filters
        self.res_blocks = nn.ModuleList(ResBlock(prev, filters, g) for _ in range(n))
        self.norm1 = nn.GroupNorm(g, prev)
        self.conv2 = CausalConv3d(prev, cfg.latent_embed_dim * 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for i, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)
            if i < len(self.block_res_blocks) - 1:
                x = self.conv_blocks[i](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(F.silu(self.norm1(x)))


class TemporalDecoder(nn.Module):
    """Stages (each exportable alone): conv1+res_blocks, then per level i = L-1..0 its
    ResBlocks followed (for i > 0) by conv_blocks[i-1] and depth-to-time, then the tail."""

    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        f, g, n = cfg.filters, cfg.num_groups, cfg.num_res_blocks
        mults = cfg.channel_multipliers
        self.temporal_downsample = tuple(cfg.temporal_downsample)
        filters = f * mults[-1]
        prev = filters
        self.conv1 = CausalConv3d(cfg.latent_embed_dim, filters, 3)
        self.res_blocks = nn.ModuleList(ResBlock(filters, filters, g) for _ in range(n))
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(mults))):
            filters = f * mults[i]
            items = nn.ModuleList()
            for _ in range(n):
                items.append(ResBlock(prev, filters, g))
                prev = filters
            self.block_res_blocks.insert(0, items)
            if i > 0:
                if cfg.temporal_downsample[i - 1]:
                    self.conv_blocks.insert(0, CausalConv3d(prev, prev * 2, 3))
                else:
                    self.conv_blocks.insert(0, nn.Identity())
        self.norm1 = nn.GroupNorm(g, prev)
        self.conv_out = CausalConv3d(filters, cfg.in_out_channels, 3)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.res_blocks:
            x = block(x)
        return x

    def level(self, i: int, x: torch.Tensor) -> torch.Tensor:
        for block in self.block_res_blocks[i]:
            x = block(x)
        if i > 0:
            x = self.conv_blocks[i - 1](x)
            if self.temporal_downsample[i - 1]:
                x = depth_to_time(x, 2)
        return x

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in reversed(range(len(self.block_res_blocks))):
            x = self.level(i, x)
        return self.tail(x)


class TemporalVAE(nn.Module):
    """VAE_Temporal_SD: 4x in time, none in space."""

    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.time_downsample = cfg.time_downsample
        self.encoder = TemporalEncoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.latent_embed_dim, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = CausalConv3d(cfg.embed_dim, cfg.latent_embed_dim, 1)
        self.decoder = TemporalDecoder(cfg)

    def time_padding(self, num_frames: int) -> int:
        return (-num_frames) % self.time_downsample

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.pad(x, (0, 0, 0, 0, self.time_padding(x.shape[2]), 0))
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        mean, logvar = self.encode_moments(x)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, self.time_padding(num_frames) :]


# ---------------------------------------------------------------------------------------
# spatial VAE (diffusers AutoencoderKL, SDXL layout)
# ---------------------------------------------------------------------------------------
def build_autoencoder_kl(cfg: SpatialVAEConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        act_fn="silu",
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=256,
        scaling_factor=cfg.scaling_factor,
    )


class SpatialVAE(nn.Module):
    """VideoAutoencoderKL: frames folded into the batch, micro-batches of frames per call."""

    def __init__(self, cfg: SpatialVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.module = build_autoencoder_kl(cfg)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        B, _, T = x.shape[:3]
        frames = x.transpose(1, 2).flatten(0, 1)  # (B T) C H W
        out = []
        for i in range(0, frames.shape[0], self.cfg.micro_batch_size):
            dist = self.module.encode(frames[i : i + self.cfg.micro_batch_size]).latent_dist
            z = dist.sample(generator) if sample else dist.mean
            out.append(z * self.cfg.scaling_factor)
        z = torch.cat(out)
        return z.unflatten(0, (B, T)).transpose(1, 2)

    def decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, 4, h, w] latent frames -> [N, 3, H, W]."""
        return self.module.decode(z / self.cfg.scaling_factor).sample

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        B, _, T = z.shape[:3]
        frames = z.transpose(1, 2).flatten(0, 1)
        out = [
            self.decode_frames(frames[i : i + self.cfg.micro_batch_size])
            for i in range(0, frames.shape[0], self.cfg.micro_batch_size)
        ]
        return torch.cat(out).unflatten(0, (B, T)).transpose(1, 2)


# ---------------------------------------------------------------------------------------
# the pipeline (OpenSoraVAE_V1_2)
# ---------------------------------------------------------------------------------------
class OpenSoraVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.spatial_vae = SpatialVAE(cfg.spatial)
        self.temporal_vae = TemporalVAE(cfg.temporal)
        self.register_buffer("scale", torch.tensor(cfg.scale, dtype=torch.float32)[None, :, None, None, None])
        self.register_buffer("shift", torch.tensor(cfg.shift, dtype=torch.float32)[None, :, None, None, None])

    @property
    def micro_z_frame_size(self) -> int:
        return latent_frames_of_chunk(self.cfg.micro_frame_size, self.cfg.temporal.time_downsample)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """x [B,3,F,H,W] in [-1,1] -> normalised latent [B,4,T,h,w]."""
        x_z = self.spatial_vae.encode(x, generator, sample)
        step = self.cfg.micro_frame_size
        z = torch.cat(
            [
                self.temporal_vae.encode(x_z[:, :, i : i + step], generator, sample)
                for i in range(0, x_z.shape[2], step)
            ],
            dim=2,
        )
        return (z - self.shift) / self.scale

    def decode_latent_frames(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Temporal half of decoding: normalised z [B,4,T,h,w] -> spatial latents [B,4,F,h,w]."""
        z = z * self.scale + self.shift
        chunks, start = [], 0
        time_down = self.cfg.temporal.time_downsample
        for z_frames, frames in decode_chunks(num_frames, self.cfg.micro_frame_size, time_down):
            chunks.append(self.temporal_vae.decode(z[:, :, start : start + z_frames], frames))
            start += z_frames
        return torch.cat(chunks, dim=2)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Normalised latent -> video [B,3,F,H,W] in about [-1,1]."""
        return self.spatial_vae.decode(self.decode_latent_frames(z, num_frames))
