"""The training recipe of the shipped ``shapes`` model: data -> tokenizer -> VAE -> T5 + STDiT3.

Stages (each seeded from the recipe seed, so a run is reproducible on the same machine):

1. **data**: ``num_clips`` clips of the moving-shapes generator (``sorakit.train.data``).
2. **tokenizer**: word-level, trained on the caption grammar (``sorakit.train.tokenizer``).
3. **spatial VAE** (diffusers AutoencoderKL): trained on single frames, L1 + MSE with the
   object's pixels weighted up (the object is ~5 % of a frame, and its colour is what the
   prompt names), plus a tiny KL.
4. **temporal VAE** (causal 3-D conv VAE): trained on the frozen spatial VAE's latents of
   whole clips, latent MSE plus a pixel loss through the frozen spatial decoder on a few
   frames per clip, so errors are judged where they show.
5. **latents**: every clip is encoded once (posterior mean and std are kept, a fresh sample
   is drawn each time a clip is used); the per-channel mean/std of the latents become the
   VAE's ``shift``/``scale`` so the DiT sees unit-variance latents.
6. **DiT**: T5 and STDiT3 trained together with Open-Sora 1.2's rectified flow: t drawn
   logit-normal (sigmoid of a standard normal) and pushed through the same timestep
   transform the sampler uses, x_t = (1 - t) x0 + t eps, target v = x0 - eps, MSE on the
   first 4 output channels, 10 % caption dropout to the null caption (for CFG).
   Batches hold every direction equally often; an EMA of the weights is what is evaluated
   and shipped. Every ``eval_every`` steps the EMA model samples the 24 evaluation prompts
   with the torch reference sampler and is scored with ``sorakit.adherence``.
7. **export**: fp16 safetensors per component (the VAE's shift/scale stay fp32) with the
   keys ``sorakit.export.models.load`` expects, tokenizer.json and training.json; the final
   adherence is measured on the reloaded, fp16-rounded files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sorakit.adherence import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    EVAL_CFG,
    EVAL_PROMPTS,
    EVAL_SEED,
    EVAL_STEPS,
    SHAPES,
    parse_prompt,
    score_set,
)
from sorakit.export.models import TorchModels, build, load, save_checkpoint
from sorakit.export.reference import ReferencePipeline
from sorakit.export.sampler import timestep_transform
from sorakit.export.stdit3 import masked_mean
from sorakit.presets import ModelPreset, SpatialVAEConfig, STDiT3Config, T5Config, TemporalVAEConfig, VAEConfig
from sorakit.presets import shapes_preset as default_shapes_preset
from sorakit.tokenizer import PromptTokenizer
from sorakit.train import data as shapes_data
from sorakit.train.tokenizer import train_tokenizer


@dataclass
class RecipeConfig:
    seed: int = 0
    num_clips: int = 3200
    threads: int = 2
    # spatial VAE (frames)
    spatial_steps: int = 1500  # 500 left red/yellow and blue/cyan nearly identical in the latents (docs/training.md)
    spatial_batch: int = 16
    spatial_lr: float = 1e-3
    object_weight: float = 9.0  # extra loss weight on pixels that are not background
    kl_weight: float = 1e-7
    # temporal VAE (clips of spatial latents)
    temporal_steps: int = 500
    temporal_batch: int = 8
    temporal_pixel_frames: int = 2  # frames per clip decoded for the pixel loss
    temporal_lr: float = 1e-3
    encode_batch: int = 64  # frames per spatial-encoder call when encoding the data set
    # decoder fine-tune (encoders frozen: the latents, and the DiT trained on them, stay valid)
    decoder_steps: int = 400
    decoder_clips: int = 800
    decoder_batch: int = 6
    decoder_frames: int = 4  # frames per clip through the spatial decoder
    decoder_lr: float = 3e-4
    decoder_object_weight: float = 20.0
    decoder_latent_noise: float = 0.05  # robustness to imperfect DiT latents
    # latent whitening folded into the temporal VAE (0: off); the floor is in posterior variances
    latent_whiten_floor: float = 4.0
    # text encoder pre-training (attributes of the caption predicted from every token), then frozen
    text_steps: int = 600
    text_batch: int = 64
    text_lr: float = 2e-3
    freeze_text: bool = True  # keep the pre-trained T5 fixed while the DiT trains (Open-Sora's T5 is frozen too)
    # DiT + T5
    dit_steps: int = 8800
    dit_batch: int = 24
    dit_lr: float = 8e-4
    dit_warmup: int = 200
    dit_decay_from: float = 0.6  # cosine decay to 10 % over the last 40 % of the steps
    latent_object_weight: float = 8.0  # extra DiT loss weight on latent cells the object passes through
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    grad_clip: float = 1.0
    # evaluation
    eval_every: int = 800
    eval_prompts: int = 24
    eval_steps: int = EVAL_STEPS
    eval_cfg: float = EVAL_CFG
    eval_seed: int = EVAL_SEED
    minutes: float | None = None  # optional wall-clock cap on the DiT stage (breaks exact reproducibility)
    log_every: int = 50
    extra: dict = field(default_factory=dict)


def tiny_config() -> RecipeConfig:
    """A handful of steps on a handful of clips: for the end-to-end test."""
    return RecipeConfig(
        num_clips=16,
        spatial_steps=2,
        spatial_batch=4,
        temporal_steps=2,
        temporal_batch=2,
        temporal_pixel_frames=1,
        dit_steps=3,
        dit_batch=4,
        text_steps=3,
        text_batch=4,
        decoder_steps=2,
        decoder_clips=8,
        decoder_batch=2,
        decoder_frames=1,
        dit_warmup=1,
        eval_every=3,
        eval_prompts=4,
        eval_steps=2,
        log_every=1,
    )


def tiny_shapes_preset() -> ModelPreset:
    """The shapes preset at toy sizes (same classes, same geometry) for the end-to-end test."""
    base = default_shapes_preset()
    return dataclasses.replace(
        base,
        name="shapes-tiny",
        stdit=STDiT3Config(
            depth=1, hidden_size=32, num_heads=2, caption_channels=32, model_max_length=24, caption_to_time=True
        ),
        vae=VAEConfig(
            spatial=SpatialVAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
            temporal=TemporalVAEConfig(filters=8, num_res_blocks=1, channel_multipliers=(1, 1, 1, 1), num_groups=4),
            shift=(0.0,) * 4,
            scale=(1.0,) * 4,
        ),
        t5=T5Config(vocab_size=128, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, max_length=24),
    )


# ---------------------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------------------
class Logger:
    """Console lines plus a JSON log of every stage's measurements."""

    def __init__(self, path: Path, quiet: bool = False):
        from rich.console import Console

        self.path = path
        self.console = Console(file=sys.stdout, highlight=False)
        self.quiet = quiet
        self.t0 = time.time()
        self.record: dict = {"stages": {}, "events": []}

    def elapsed(self) -> float:
        return time.time() - self.t0

    def info(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(f"[{self.elapsed() / 60:6.1f} min] {msg}")

    def event(self, stage: str, **values) -> None:
        self.record["events"].append({"stage": stage, "t": round(self.elapsed(), 1), **values})
        self.flush()

    def stage(self, name: str, **values) -> None:
        self.record["stages"].setdefault(name, {}).update(values)
        self.flush()

    def flush(self) -> None:
        self.path.write_text(json.dumps(self.record, indent=1, default=float))

    def progress(self, total: int, description: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        prog = Progress(
            TextColumn(description),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=self.console,
            disable=self.quiet or not self.console.is_terminal,
        )
        task = prog.add_task(description, total=total, info="")
        return prog, task


def lr_at(step: int, total: int, base: float, warmup: int, decay_from: float = 1.0) -> float:
    """Linear warm-up, constant, then cosine decay to 10 % from ``decay_from`` of the run."""
    if step < warmup:
        return base * (step + 1) / warmup
    start = int(total * decay_from)
    if step < start or total <= start:
        return base
    p = (step - start) / max(total - start, 1)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def to_unit(frames_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames_uint8)).float().div(127.5).sub(1.0)
    return x.movedim(-1, -3)


def object_weights(x: torch.Tensor, extra: float) -> torch.Tensor:
    """1 on background pixels, 1 + extra on object pixels. x [N,3,H,W] in [-1,1]."""
    bg = x.flatten(2).median(dim=2).values[:, :, None, None]
    obj = ((x - bg).abs().amax(dim=1, keepdim=True) > 0.1).float()
    return 1.0 + extra * obj


def weighted_recon_loss(rec: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    err = rec - x
    return ((err.abs() + err.pow(2)) * w).mean()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.detach().clamp(-1, 1) - b).pow(2).mean())
    return 10 * math.log10(4.0 / max(mse, 1e-12))


# ---------------------------------------------------------------------------------------
# VAE stages
# ---------------------------------------------------------------------------------------
def train_spatial_vae(vae: nn.Module, videos: np.ndarray, cfg: RecipeConfig, log: Logger) -> None:
    """Frames in, frames out: L1 + MSE (object pixels weighted up) + a tiny KL."""
    torch.manual_seed(cfg.seed + 11)
    rng = np.random.default_rng([cfg.seed, 11])
    ae = vae.spatial_vae.module.train()
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.spatial_lr, weight_decay=0.0)
    N, Fr = videos.shape[:2]
    prog, task = log.progress(cfg.spatial_steps, "spatial VAE")
    history = []
    with prog:
        for step in range(cfg.spatial_steps):
            set_lr(opt, lr_at(step, cfg.spatial_steps, cfg.spatial_lr, max(cfg.spatial_steps // 10, 1), 0.6))
            clips, frames = rng.integers(N, size=cfg.spatial_batch), rng.integers(Fr, size=cfg.spatial_batch)
            x = to_unit(videos[clips, frames])
            post = ae.encode(x).latent_dist
            rec = ae.decode(post.sample()).sample
            rec_loss = weighted_recon_loss(rec, x, object_weights(x, cfg.object_weight))
            kl = post.kl().mean()
            loss = rec_loss + cfg.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ae.parameters(), cfg.grad_clip)
            opt.step()
            history.append(rec_loss.item())
            prog.update(task, advance=1, info=f"loss {rec_loss.item():.4f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.spatial_steps:
                mean = float(np.mean(history[-cfg.log_every :]))
                log.info(
                    f"spatial VAE step {step + 1}/{cfg.spatial_steps} rec {mean:.4f} kl {kl.item():.1f} psnr {psnr(rec, x):.1f}"
                )
                log.event("spatial_vae", step=step + 1, rec=mean, kl=kl.item())
    ae.eval()


@torch.no_grad()
def encode_spatial(vae: nn.Module, videos: np.ndarray, batch: int, log: Logger) -> tuple[np.ndarray, np.ndarray]:
    """Spatial posterior mean and std (times the scaling factor) of every frame: [N,4,F,h,w] each."""
    ae = vae.spatial_vae.module
    sf = vae.spatial_vae.cfg.scaling_factor
    N, Fr = videos.shape[:2]
    flat = videos.reshape(N * Fr, *videos.shape[2:])
    means, stds = [], []
    prog, task = log.progress(len(flat), "encode frames")
    with prog:
        for i in range(0, len(flat), batch):
            dist = ae.encode(to_unit(flat[i : i + batch])).latent_dist
            means.append((dist.mean * sf).numpy())
            stds.append((dist.std * sf).numpy())
            prog.update(task, advance=len(flat[i : i + batch]))
    mean = np.concatenate(means).reshape(N, Fr, *means[0].shape[1:]).transpose(0, 2, 1, 3, 4)
    std = np.concatenate(stds).reshape(N, Fr, *stds[0].shape[1:]).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(mean), np.ascontiguousarray(std)


def train_temporal_vae(
    vae: nn.Module, videos: np.ndarray, s_mean: np.ndarray, s_std: np.ndarray, cfg: RecipeConfig, log: Logger
) -> None:
    """Clips of spatial latents in and out: normalised latent MSE + pixel loss on a few frames.

    Input and target are the spatial posterior *means*: a first attempt fed posterior samples
    and asked for them back, which made the spatial noise an irreducible target (normalised
    latent MSE stuck at 0.45, 16 dB). The temporal posterior starts narrow (log-variance
    bias -8) so the decoder sees the latent instead of noise from the first step on.
    """
    torch.manual_seed(cfg.seed + 12)
    rng = np.random.default_rng([cfg.seed, 12])
    tvae = vae.temporal_vae.train()
    with torch.no_grad():
        tvae.quant_conv.conv.bias[tvae.cfg.embed_dim :] = -8.0
    spatial = vae.spatial_vae
    for p in spatial.parameters():
        p.requires_grad_(False)
    var = float(s_mean.var()) + 1e-6
    opt = torch.optim.AdamW(tvae.parameters(), lr=cfg.temporal_lr, weight_decay=0.0)
    N, _, Fr = s_mean.shape[:3]
    prog, task = log.progress(cfg.temporal_steps, "temporal VAE")
    history = []
    with prog:
        for step in range(cfg.temporal_steps):
            set_lr(opt, lr_at(step, cfg.temporal_steps, cfg.temporal_lr, max(cfg.temporal_steps // 10, 1), 0.6))
            idx = rng.integers(N, size=cfg.temporal_batch)
            xz = torch.from_numpy(s_mean[idx])
            mean, logvar = tvae.encode_moments(xz)
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
            rec = tvae.decode(z, Fr)
            lat_loss = (rec - xz).pow(2).mean() / var
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3, 4)).mean()
            k = cfg.temporal_pixel_frames
            frames = torch.from_numpy(rng.integers(Fr, size=(cfg.temporal_batch, k)))
            rec_frames = rec[torch.arange(len(idx))[:, None], :, frames].flatten(0, 1)  # [B*k, 4, h, w]
            x = to_unit(videos[idx[:, None], frames.numpy()].reshape(-1, *videos.shape[2:]))
            pix = spatial.decode_frames(rec_frames)
            pix_loss = weighted_recon_loss(pix, x, object_weights(x, cfg.object_weight))
            loss = lat_loss + pix_loss + cfg.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tvae.parameters(), cfg.grad_clip)
            opt.step()
            history.append((lat_loss.item(), pix_loss.item()))
            prog.update(task, advance=1, info=f"lat {lat_loss.item():.3f} pix {pix_loss.item():.4f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.temporal_steps:
                h = np.mean(history[-cfg.log_every :], axis=0)
                log.info(
                    f"temporal VAE step {step + 1}/{cfg.temporal_steps} latent {h[0]:.4f} pixel {h[1]:.4f} psnr {psnr(pix, x):.1f}"
                )
                log.event("temporal_vae", step=step + 1, latent=float(h[0]), pixel=float(h[1]), kl=kl.item())
    tvae.eval()
    for p in spatial.parameters():
        p.requires_grad_(True)


@torch.no_grad()
def encode_temporal(vae: nn.Module, s_mean: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Temporal posterior mean and std of each clip's spatial-latent mean: [N,4,T,h,w] each."""
    means, stds = [], []
    for i in range(0, len(s_mean), batch):
        m, logvar = vae.temporal_vae.encode_moments(torch.from_numpy(s_mean[i : i + batch]))
        means.append(m.numpy())
        stds.append(torch.exp(0.5 * logvar).numpy())
    return np.concatenate(means), np.concatenate(stds)


@torch.no_grad()
def whiten_latents(
    vae: nn.Module, z_mean: np.ndarray, z_std: np.ndarray, floor: float
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Make the temporal latent's channels uncorrelated with unit variance, inside the VAE's own weights.

    The trained temporal VAE spreads one signal over all its channels (pairwise correlations
    up to 0.998; of the 8 directions of a latent cell one carries 88 % of the variance), and
    hue lives in directions with 1 % of it or less. Per-channel normalisation cannot undo
    that, so in the DiT's loss and under its isotropic noise red and yellow are 0.17 apart
    while red and blue are 6.5. A symmetric (ZCA) whitening map W = U diag(gain) U^T,
    gain = 1 / sqrt(max(lambda, floor * posterior variance)), is folded into the 1x1x1 quant_conv
    (mean rows) and its inverse into post_quant_conv, so the classes and the decoded videos
    stay as they were and only the coordinates the DiT works in change. The floor keeps
    directions that are mostly posterior noise from being blown up to unit variance.
    ``z_mean``/``z_std`` (raw temporal posterior, [N,C,T,h,w]) come back in the new coordinates.
    """
    tvae = vae.temporal_vae
    C = z_mean.shape[1]
    cells = z_mean.transpose(0, 2, 3, 4, 1).reshape(-1, C).astype(np.float64)
    post_var = (z_std.astype(np.float64) ** 2).transpose(0, 2, 3, 4, 1).reshape(-1, C).mean(axis=0)
    m = cells.mean(axis=0)
    cov = np.cov(cells.T) + np.diag(post_var)
    lam, U = np.linalg.eigh(cov)
    gain = 1.0 / np.sqrt(np.maximum(lam, floor * post_var.mean()))
    W = (U * gain) @ U.T
    W_inv = (U / gain) @ U.T
    q, pq = tvae.quant_conv.conv, tvae.post_quant_conv.conv
    Wt, Wi, mt = (torch.from_numpy(a).to(q.weight.dtype) for a in (W, W_inv, m))
    qw = q.weight[:C, :, 0, 0, 0].clone()
    q.weight[:C, :, 0, 0, 0] = Wt @ qw
    q.bias[:C] = Wt @ (q.bias[:C] - mt)
    new_var = (W**2) @ post_var  # marginal posterior variance of each new channel (diagonal posterior)
    q.bias[C:] += torch.from_numpy(np.log(new_var / post_var)).to(q.bias.dtype)
    pw = pq.weight[:, :, 0, 0, 0].clone()
    pq.bias[:] = pq.bias + pw @ mt
    pq.weight[:, :, 0, 0, 0] = pw @ Wi
    z_w = np.einsum("ij,njthw->nithw", W, z_mean - m[None, :, None, None, None]).astype(np.float32)
    std_w = np.sqrt(np.einsum("ij,njthw->nithw", W**2, z_std.astype(np.float64) ** 2)).astype(np.float32)
    record = {
        "eigenvalues_before": [float(f"{v:.4g}") for v in lam[::-1]],
        "posterior_variance": float(f"{post_var.mean():.4g}"),
        "gain": [round(float(v), 3) for v in gain[::-1]],
    }
    return z_w, std_w, record


def set_latent_norm(vae: nn.Module, z_mean: np.ndarray, z_std: np.ndarray) -> tuple[list[float], list[float]]:
    """shift/scale = per-channel mean/std of posterior samples (rounded: the preset states them)."""
    axes = (0, 2, 3, 4)
    shift = [round(float(v), 4) for v in z_mean.mean(axis=axes)]
    scale = [round(float(v), 4) for v in np.sqrt(z_mean.var(axis=axes) + (z_std**2).mean(axis=axes))]
    with torch.no_grad():
        vae.shift.copy_(torch.tensor(shift)[None, :, None, None, None])
        vae.scale.copy_(torch.tensor(scale)[None, :, None, None, None])
    return shift, scale


@torch.no_grad()
def spatial_roundtrip_check(vae: nn.Module, cfg: RecipeConfig, num: int = 24) -> dict:
    """Frames through the spatial VAE alone (posterior mean): PSNR and adherence."""
    videos, captions, _ = shapes_data.make_dataset(num, cfg.seed, start=10_000_000)
    x = to_unit(videos.reshape(-1, *videos.shape[2:]))
    ae = vae.spatial_vae.module
    rec = torch.cat([ae.decode(ae.encode(x[i : i + 64]).latent_dist.mean).sample for i in range(0, len(x), 64)])
    rec_u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(1, -1).numpy()
    s = score_set(rec_u8.reshape(videos.shape), captions)
    return {"psnr": round(psnr(rec, x), 2), "colour_acc": s["colour_acc"], "direction_acc": s["direction_acc"]}


@torch.no_grad()
def vae_roundtrip_check(vae: nn.Module, cfg: RecipeConfig, num: int = 24) -> dict:
    """Encode/decode held-out clips: PSNR and adherence of the reconstructions (motion kept?)."""
    videos, captions, _ = shapes_data.make_dataset(num, cfg.seed, start=10_000_000)
    x = to_unit(videos).movedim(1, 2)  # [n,3,F,H,W]
    z = vae.encode(x, sample=False)
    rec = vae.decode(z, videos.shape[1])
    from sorakit.runtime.sampler import to_uint8_video

    rec_u8 = to_uint8_video(rec.numpy())
    s = score_set(rec_u8, captions)
    return {"psnr": round(psnr(rec, x), 2), "colour_acc": s["colour_acc"], "direction_acc": s["direction_acc"]}


def finetune_decoder(vae: nn.Module, cfg: RecipeConfig, log: Logger) -> None:
    """Train the temporal and spatial decoders end to end, latent -> pixels; encoders frozen.

    The staged VAE training leaves hue errors (red and yellow drift to orange: 75 % colour on
    round trips). The encoders, hence the latents the DiT learns, stay fixed; only the way
    latents become pixels improves, with the object's pixels weighted up strongly.
    """
    torch.manual_seed(cfg.seed + 15)
    rng = np.random.default_rng([cfg.seed, 15])
    videos, _, _ = shapes_data.make_dataset(cfg.decoder_clips, cfg.seed)
    vae.eval()
    with torch.no_grad():
        z = torch.cat(
            [vae.encode(to_unit(videos[i : i + 8]).movedim(1, 2), sample=False) for i in range(0, len(videos), 8)]
        )
    tv, ae = vae.temporal_vae, vae.spatial_vae.module
    modules = [tv.post_quant_conv, tv.decoder, ae.post_quant_conv, ae.decoder]
    for p in vae.parameters():
        p.requires_grad_(False)
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    for m in modules:
        m.train()
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    N, Fr = videos.shape[:2]
    prog, task = log.progress(cfg.decoder_steps, "decoder fine-tune")
    history = []
    with prog:
        for step in range(cfg.decoder_steps):
            set_lr(opt, lr_at(step, cfg.decoder_steps, cfg.decoder_lr, max(cfg.decoder_steps // 10, 1), 0.6))
            idx = rng.integers(N, size=cfg.decoder_batch)
            zb = z[idx] + cfg.decoder_latent_noise * torch.randn(z[idx].shape)
            lat = vae.decode_latent_frames(zb, Fr)  # [B, 4, F, h, w]
            frames = rng.integers(Fr, size=(cfg.decoder_batch, cfg.decoder_frames))
            sel = lat[torch.arange(len(idx))[:, None], :, torch.from_numpy(frames)].flatten(0, 1)
            x = to_unit(videos[idx[:, None], frames].reshape(-1, *videos.shape[2:]))
            pix = vae.spatial_vae.decode_frames(sel)
            loss = weighted_recon_loss(pix, x, object_weights(x, cfg.decoder_object_weight))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            history.append(loss.item())
            prog.update(task, advance=1, info=f"loss {loss.item():.4f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.decoder_steps:
                mean = float(np.mean(history[-cfg.log_every :]))
                log.info(f"decoder step {step + 1}/{cfg.decoder_steps} loss {mean:.4f} psnr {psnr(pix, x):.1f}")
                log.event("decoder", step=step + 1, loss=mean)
    for p in vae.parameters():
        p.requires_grad_(True)
    vae.eval()


def finetune_decoder_dir(out: str | Path, cfg: RecipeConfig | None = None, preset: ModelPreset | None = None) -> dict:
    """Run only the decoder stage on the VAE of a finished (or running) output directory."""
    cfg = cfg or RecipeConfig()
    preset = preset or default_shapes_preset()
    out = Path(out)
    torch.set_num_threads(cfg.threads)
    log = Logger(out / "decoder_log.json")
    vae = load("vae", out / "vae", preset).float()
    before = vae_roundtrip_check(vae, cfg)
    t = time.time()
    finetune_decoder(vae, cfg, log)
    after = vae_roundtrip_check(vae, cfg)
    log.stage("decoder", seconds=round(time.time() - t, 1), roundtrip_before=before, roundtrip_after=after)
    log.info(f"decoder fine-tune: round trip {before} -> {after}")
    save_fp16(vae, out / "vae_decoder_tuned", "vae", ("shift", "scale"))
    return {"before": before, "after": after}


# ---------------------------------------------------------------------------------------
# text encoder pre-training
# ---------------------------------------------------------------------------------------
CAPTION_ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("colour", tuple(COLOURS)),
    ("shape", SHAPES),
    ("direction", tuple(DIRECTIONS)),
    ("background", tuple(BACKGROUNDS)),
)


def caption_labels(captions: list[str]) -> np.ndarray:
    """What each caption says, [N, 4] int64: colour, shape, direction, background.

    Read from the text (``sorakit.adherence.parse_prompt``), not from the clip: an attribute
    the caption does not name gets the extra class ``len(values)`` ("not said").
    """
    out = np.empty((len(captions), len(CAPTION_ATTRIBUTES)), np.int64)
    for i, caption in enumerate(captions):
        intent = parse_prompt(caption)
        for j, (name, values) in enumerate(CAPTION_ATTRIBUTES):
            v = getattr(intent, name)
            out[i, j] = values.index(v) if v in values else len(values)
    return out


def pretrain_text_encoder(
    t5: nn.Module, ids: np.ndarray, mask: np.ndarray, labels: np.ndarray, cfg: RecipeConfig, log: Logger
) -> dict:
    """Teach the T5 to put every attribute of the caption into every token's output.

    Linear heads read colour, shape, direction and background from each valid token's output
    (cross-entropy, all four weighted alike). Trained jointly with the DiT from scratch, the T5
    had spread colour over every token but kept the direction word's meaning on its own token,
    a small share of what cross-attention and the pooled caption see; this stage makes the
    direction as loud in the text features as the colour before the DiT starts. Returns the
    held-out accuracy of each attribute read from the pooled (masked-mean) output by the heads.
    """
    torch.manual_seed(cfg.seed + 11)
    rng = np.random.default_rng([cfg.seed, 11])
    d = t5.shared.weight.shape[1]
    sizes = [len(values) + 1 for _, values in CAPTION_ATTRIBUTES]
    heads = nn.Linear(d, sum(sizes))
    t5.train()
    params = list(t5.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.text_lr, weight_decay=0.0)
    n = len(ids)
    held = max(1, n // 10)
    train_idx = np.arange(held, n)
    ids_t, mask_t, lab_t = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels)

    def logits(idx) -> tuple[torch.Tensor, torch.Tensor]:
        h = t5(input_ids=ids_t[idx], attention_mask=mask_t[idx]).last_hidden_state  # [B, L, d]
        return heads(h), mask_t[idx].bool()

    prog, task = log.progress(cfg.text_steps, "text")
    with prog:
        for step in range(cfg.text_steps):
            set_lr(opt, lr_at(step, cfg.text_steps, cfg.text_lr, max(cfg.text_steps // 10, 1), 0.5))
            idx = rng.choice(train_idx, size=min(cfg.text_batch, len(train_idx)), replace=False)
            out, valid = logits(idx)
            loss = torch.zeros(())
            for j, part in enumerate(out.split(sizes, dim=-1)):
                target = lab_t[idx, j][:, None].expand(-1, part.shape[1])
                loss = loss + F.cross_entropy(part[valid], target[valid])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            prog.update(task, advance=1, info=f"loss {loss.item():.4f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.text_steps:
                log.event("text", step=step + 1, loss=loss.item())
    t5.eval()
    with torch.no_grad():
        idx = np.arange(held)
        h = t5(input_ids=ids_t[idx], attention_mask=mask_t[idx]).last_hidden_state
        pooled = heads(masked_mean(h, mask_t[idx]))
        acc = {
            name: float((part.argmax(-1) == lab_t[idx, j]).float().mean())
            for j, ((name, _), part) in enumerate(zip(CAPTION_ATTRIBUTES, pooled.split(sizes, dim=-1)))
        }
    log.info(f"text encoder pre-trained: held-out accuracy from the pooled output {acc}")
    return {"heldout_pooled_accuracy": acc, "final_loss": loss.item()}


@torch.no_grad()
def encode_captions(t5: nn.Module, ids: np.ndarray, mask: np.ndarray, batch: int = 256) -> np.ndarray:
    """The frozen T5's outputs for every caption, [N, L, d] float32 (computed once)."""
    t5.eval()
    out = [
        t5(input_ids=torch.from_numpy(ids[i : i + batch]), attention_mask=torch.from_numpy(mask[i : i + batch]))
        .last_hidden_state.numpy()
        for i in range(0, len(ids), batch)
    ]
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------
# DiT stage
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def init_stdit_for_training(model: nn.Module, seed: int) -> None:
    """Open-Sora's STDiT3 training initialisation (xavier linears, zeroed residual outputs)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = model.x_embedder.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    for mod in (model.t_embedder.mlp[0], model.t_embedder.mlp[2], model.t_block[1]):
        nn.init.normal_(mod.weight, std=0.02)
    nn.init.normal_(model.fps_embedder.mlp[0].weight, std=0.02)
    nn.init.zeros_(model.fps_embedder.mlp[2].weight)
    nn.init.zeros_(model.fps_embedder.mlp[2].bias)
    nn.init.normal_(model.y_embedder.y_proj.fc1.weight, std=0.02)
    nn.init.normal_(model.y_embedder.y_proj.fc2.weight, std=0.02)
    for block in list(model.spatial_blocks) + list(model.temporal_blocks):
        nn.init.zeros_(block.cross_attn.proj.weight)
    for block in model.temporal_blocks:
        nn.init.zeros_(block.attn.proj.weight)
        nn.init.zeros_(block.mlp.fc2.weight)
    if hasattr(model, "y_to_t"):
        nn.init.zeros_(model.y_to_t.fc2.weight)
    if hasattr(model, "y_to_frame"):
        nn.init.zeros_(model.y_to_frame.out.weight)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)


class EMA:
    """Exponential moving average of parameters (buffers copied)."""

    def __init__(self, module: nn.Module, decay: float):
        self.module = copy.deepcopy(module).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.mul_(d).add_(p.detach(), alpha=1 - d)


def sample_t(n: int, preset: ModelPreset, latent_shape: tuple[int, int, int], generator=None) -> torch.Tensor:
    """Open-Sora 1.2 training timesteps: logit-normal, then the sampler's timestep transform."""
    t = torch.sigmoid(torch.randn(n, generator=generator)) * preset.sampler.num_timesteps
    if preset.sampler.use_timestep_transform:
        H, W = preset.resolution
        t = timestep_transform(t, H, W, latent_shape[0], preset.sampler)
    return t


def latent_object_mask(videos: np.ndarray, latent_shape: tuple[int, int, int], batch: int = 256) -> np.ndarray:
    """Where the object is, on the latent grid: [N, 1, T, h, w] float32 in {0, 1}.

    A pixel is the object's if it differs from its frame's median colour; a latent cell is
    marked if any of its pixels is, in any frame of its group (frame 0 alone, then groups of
    ``(F - 1) // (T - 1)`` frames, the causal VAE's temporal layout).
    """
    N, F_, H, W, _ = videos.shape
    T, h, w = latent_shape
    group = max((F_ - 1) // max(T - 1, 1), 1)
    out = np.zeros((N, 1, T, h, w), np.float32)
    for i in range(0, N, batch):
        v = videos[i : i + batch].astype(np.int16)
        bg = np.median(v.reshape(len(v), F_, -1, 3), axis=2)[:, :, None, None, :]
        obj = (np.abs(v - bg).max(axis=-1) > 25).reshape(len(v), F_, h, H // h, w, W // w).any(axis=(3, 5))
        lat = [obj[:, :1].any(axis=1)] + [obj[:, 1 + k * group : 1 + (k + 1) * group].any(axis=1) for k in range(T - 1)]
        out[i : i + batch, 0] = np.stack(lat, axis=1)
    return out


def rflow_loss(
    transformer: nn.Module, text_encoder: nn.Module, batch: dict, preset: ModelPreset, dropout: float
) -> torch.Tensor:
    """One rectified-flow loss: x_t = (1 - t) x0 + t eps, target v = x0 - eps."""
    x0 = batch["z"]
    B = x0.shape[0]
    if "y" in batch:  # a frozen text encoder's outputs, computed once for the whole data set
        y = batch["y"][:, None]
    else:
        y = text_encoder(input_ids=batch["ids"], attention_mask=batch["mask"]).last_hidden_state[:, None]
    drop = torch.rand(B) < dropout
    y = transformer.y_embedder.drop(y, drop)
    t = sample_t(B, preset, tuple(x0.shape[2:]))
    eps = torch.randn_like(x0)
    tau = (t / preset.sampler.num_timesteps)[:, None, None, None, None]
    x_t = (1 - tau) * x0 + tau * eps
    H, W = preset.resolution
    out = transformer(
        x_t,
        t,
        y,
        batch["mask"],
        None,
        torch.tensor([float(preset.sampler.fps)]),
        torch.tensor([float(H)]),
        torch.tensor([float(W)]),
    )
    err = (out[:, : x0.shape[1]] - (x0 - eps)).pow(2)
    if "weight" in batch:  # the object is a few latent cells: weight them up so its placement counts
        return (err * batch["weight"]).mean() / batch["weight"].mean()
    return err.mean()


def evaluate(models: TorchModels, cfg: RecipeConfig) -> dict:
    """Sample the evaluation prompts (one batch, fixed seed) and score adherence."""
    prompts = list(EVAL_PROMPTS[: cfg.eval_prompts])
    res = ReferencePipeline(models)(prompts, seed=cfg.eval_seed, steps=cfg.eval_steps, cfg_scale=cfg.eval_cfg)
    s = score_set(res.video, prompts)
    s["video"] = res.video
    return s


@torch.no_grad()
def text_sensitivity(models: TorchModels, timesteps=(1000.0, 800.0, 500.0, 200.0)) -> dict:
    """How much the conditional velocity changes between opposite directions at each t.

    Relative L2 difference of v("... moving left") vs v("... moving right") (and up/down) on
    the same noisy latent: near zero means the model ignores the direction word there.
    """
    pipe = ReferencePipeline(models)
    preset = models.preset
    pairs = [
        ("a red circle moving left", "a red circle moving right"),
        ("a blue square moving up", "a blue square moving down"),
    ]
    shape = (1, preset.stdit.in_channels, *preset.latent_size(preset.num_frames, *preset.resolution))
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    H, W = preset.resolution
    out = {}
    for t in timesteps:
        tau = t / preset.sampler.num_timesteps
        x_t = (1 - tau) * x0 + tau * eps
        diffs = []
        for a, b in pairs:
            y, mask = pipe.encode_prompts([a, b])
            v = models.transformer(
                torch.cat([x_t, x_t]),
                torch.tensor([t, t]),
                y,
                mask,
                None,
                torch.tensor([24.0]),
                torch.tensor([float(H)]),
                torch.tensor([float(W)]),
            )[:, : shape[1]]
            diffs.append(float((v[0] - v[1]).norm() / (0.5 * (v[0].norm() + v[1].norm()))))
        out[str(int(t))] = round(float(np.mean(diffs)), 4)
    return out


def train_dit(
    models: TorchModels,
    z_mean: np.ndarray,
    z_std: np.ndarray,
    ids: np.ndarray,
    mask: np.ndarray,
    cfg: RecipeConfig,
    log: Logger,
    on_eval: Callable[[int, dict], None] | None = None,
    init: bool = True,
    checkpoint_dir: Path | None = None,
    object_mask: np.ndarray | None = None,
) -> tuple[nn.Module, nn.Module]:
    """T5 + STDiT3 with rectified flow; returns the EMA (text_encoder, transformer).

    ``init=False`` keeps the modules' current weights (continuing a previous run's DiT).
    ``checkpoint_dir``: the EMA T5 and STDiT3 are saved (fp16) there at every evaluation, in
    ``step<N>/``, so a run stopped early still leaves its latest evaluated weights.
    """
    preset = models.preset
    torch.manual_seed(cfg.seed + 13)
    rng = np.random.default_rng([cfg.seed, 13])
    dit, t5 = models.transformer.train(), models.text_encoder.train()
    if init:
        init_stdit_for_training(dit, cfg.seed + 14)
    y_all = None
    if cfg.freeze_text:
        t5.eval().requires_grad_(False)
        y_all = encode_captions(t5, ids, mask)
    params = [p for p in list(dit.parameters()) + list(t5.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.dit_lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema_dit, ema_t5 = EMA(dit, cfg.ema_decay), EMA(t5, cfg.ema_decay)
    N = len(z_mean)
    t_start = time.time()
    prog, task = log.progress(cfg.dit_steps, "DiT")
    history: list[float] = []
    step = 0
    with prog:
        for step in range(cfg.dit_steps):
            set_lr(opt, lr_at(step, cfg.dit_steps, cfg.dit_lr, cfg.dit_warmup, cfg.dit_decay_from))
            idx = shapes_data.direction_balanced_indices(rng, N, cfg.dit_batch)
            z = torch.from_numpy(z_mean[idx]) + torch.from_numpy(z_std[idx]) * torch.randn(z_mean[idx].shape)
            batch = {"z": z, "ids": torch.from_numpy(ids[idx]), "mask": torch.from_numpy(mask[idx])}
            if y_all is not None:
                batch["y"] = torch.from_numpy(y_all[idx])
            if object_mask is not None and cfg.latent_object_weight > 0:
                batch["weight"] = 1.0 + cfg.latent_object_weight * torch.from_numpy(object_mask[idx])
            loss = rflow_loss(dit, t5, batch, preset, cfg.caption_dropout)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            ema_dit.update(dit, step)
            if not cfg.freeze_text:
                ema_t5.update(t5, step)
            history.append(loss.item())
            prog.update(task, advance=1, info=f"loss {loss.item():.4f}")
            if (step + 1) % cfg.log_every == 0:
                mean = float(np.mean(history[-cfg.log_every :]))
                rate = (time.time() - t_start) / (step + 1)
                log.info(f"DiT step {step + 1}/{cfg.dit_steps} loss {mean:.4f} ({rate:.2f} s/step)")
                log.event("dit", step=step + 1, loss=mean, sec_per_step=round(rate, 3))
            last = step + 1 == cfg.dit_steps
            over = cfg.minutes is not None and (time.time() - t_start) / 60 > cfg.minutes
            if (step + 1) % cfg.eval_every == 0 or last or over:
                eval_models = TorchModels(preset, ema_t5.module, ema_dit.module, models.vae, models.tokenizer_file)
                s = evaluate(eval_models, cfg)
                sens = text_sensitivity(eval_models)
                log.info(
                    f"eval @ {step + 1}: colour {s['colour_acc']:.0%} direction {s['direction_acc']:.0%} "
                    f"(text sensitivity by t: {sens})"
                )
                log.event(
                    "eval",
                    step=step + 1,
                    colour_acc=s["colour_acc"],
                    direction_acc=s["direction_acc"],
                    text_sensitivity=sens,
                )
                if checkpoint_dir is not None:
                    ck = checkpoint_dir / f"step{step + 1}"
                    for name, module in (("text_encoder", ema_t5.module), ("transformer", ema_dit.module)):
                        save_fp16(module, ck / name, name)
                    (ck / "eval.json").write_text(
                        json.dumps({k: s[k] for k in ("colour_acc", "direction_acc", "both_acc")} | {"step": step + 1})
                    )
                if on_eval is not None:
                    on_eval(step + 1, s)
                dit.train()
                if not cfg.freeze_text:
                    t5.train()
            if over:
                log.info(f"stopping at step {step + 1}: the {cfg.minutes} min cap was reached")
                break
    log.stage("dit", steps_done=step + 1, final_loss=float(np.mean(history[-cfg.log_every :])))
    return ema_t5.module.eval(), ema_dit.module.eval()


# ---------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# the whole recipe
# ---------------------------------------------------------------------------------------
def run(
    out: str | Path,
    cfg: RecipeConfig | None = None,
    preset: ModelPreset | None = None,
    quiet: bool = False,
    vae_from: str | Path | None = None,
    spatial_from: str | Path | None = None,
    dit_from: str | Path | None = None,
) -> dict:
    """Train everything into ``out``; returns the training record (also out/training.json).

    ``vae_from``: a previous output directory whose VAE is reused (for DiT-only ablations).
    ``spatial_from``: a previous output directory whose *spatial* VAE is reused (resuming a run
    after the spatial stage; every later stage re-seeds itself, so the rest is unchanged).
    ``dit_from``: a previous output directory whose T5 and STDiT3 training continues here (with
    ``vae_from`` pointing at the VAE they were trained on; the learning-rate schedule restarts).
    """
    cfg = cfg or RecipeConfig()
    preset = preset or default_shapes_preset()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    log = Logger(out / "training_log.json", quiet=quiet)
    log.record["config"] = dataclasses.asdict(cfg)
    log.record["preset"] = preset.name
    log.info(f"sorakit shapes recipe: seed {cfg.seed}, {cfg.num_clips} clips, {cfg.threads} threads -> {out}")

    t = time.time()
    videos, captions, _ = shapes_data.make_dataset(cfg.num_clips, cfg.seed)
    log.stage(
        "data", clips=cfg.num_clips, frames=videos.shape[1], size=videos.shape[2], seconds=round(time.time() - t, 1)
    )
    log.info(f"data: {videos.shape} uint8, e.g. {captions[0]!r}")

    tok_path = train_tokenizer(shapes_data.all_caption_words(), out / "tokenizer.json", preset.t5.vocab_size)
    tok = PromptTokenizer(tok_path, preset.t5.max_length)
    batch = tok(captions)
    log.stage("tokenizer", vocab=tok.tok.get_vocab_size(), max_tokens=max(batch.lengths))

    vae = build("vae", preset).float()
    if spatial_from is not None:  # resume: keep a previous run's spatial VAE, train the rest
        trained = load("vae", Path(spatial_from) / "vae", preset)
        vae.spatial_vae.load_state_dict(trained.spatial_vae.float().state_dict())
        del trained
    if vae_from is not None:  # ablations: reuse a trained VAE (and its latent normalisation), train only T5 + DiT
        vae = load("vae", Path(vae_from) / "vae", preset).float().eval()
    log.stage(
        "vae",
        params=sum(p.numel() for p in vae.parameters()),
        reused_from=str(vae_from) if vae_from else None,
        spatial_from=str(spatial_from) if spatial_from else None,
    )
    if vae_from is None and spatial_from is None:
        t = time.time()
        train_spatial_vae(vae, videos, cfg, log)
        log.stage("spatial_vae", seconds=round(time.time() - t, 1))
    if vae_from is None:
        rt_s = spatial_roundtrip_check(vae, cfg)
        log.stage("spatial_vae", roundtrip=rt_s)
        log.info(f"spatial VAE round trip on held-out clips: {rt_s}")
    t = time.time()
    s_mean, s_std = encode_spatial(vae, videos, cfg.encode_batch, log)
    log.stage("encode_spatial", seconds=round(time.time() - t, 1))
    if vae_from is None:
        t = time.time()
        train_temporal_vae(vae, videos, s_mean, s_std, cfg, log)
        log.stage("temporal_vae", seconds=round(time.time() - t, 1))
    z_mean, z_std = encode_temporal(vae, s_mean)
    if vae_from is None and cfg.latent_whiten_floor > 0:
        z_mean, z_std, whitening = whiten_latents(vae, z_mean, z_std, cfg.latent_whiten_floor)
        log.stage("whitening", **whitening)
        log.info(f"latent whitening: eigenvalues {whitening['eigenvalues_before']} -> gains {whitening['gain']}")
    if vae_from is None:
        shift, scale = set_latent_norm(vae, z_mean, z_std)
    else:
        shift, scale = vae.shift.flatten().tolist(), vae.scale.flatten().tolist()
    z_mean = (z_mean - np.array(shift, np.float32)[None, :, None, None, None]) / np.array(scale, np.float32)[
        None, :, None, None, None
    ]
    z_std = z_std / np.array(scale, np.float32)[None, :, None, None, None]
    obj_mask = latent_object_mask(videos, tuple(z_mean.shape[2:]))
    del videos, s_mean, s_std
    rt = vae_roundtrip_check(vae, cfg, num=min(24, max(cfg.eval_prompts, 4)))
    log.stage(
        "latents", shape=list(z_mean.shape), shift=shift, scale=scale, posterior_std=float(z_std.mean()), roundtrip=rt
    )
    log.info(f"VAE round trip on held-out clips: {rt}; latent shift {shift} scale {scale}")
    save_fp16(vae, out / "vae", "vae", ("shift", "scale"))  # early, so DiT-only ablations can reuse it

    if dit_from is not None:
        text_encoder = load("text_encoder", Path(dit_from) / "text_encoder", preset).float()
        transformer = load("transformer", Path(dit_from) / "transformer", preset).float()
    else:
        text_encoder = build("text_encoder", preset).float()
        transformer = build("transformer", preset)
        if cfg.text_steps > 0:
            t = time.time()
            text_record = pretrain_text_encoder(text_encoder, batch.ids, batch.mask, caption_labels(captions), cfg, log)
            log.stage("text_encoder", seconds=round(time.time() - t, 1), **text_record)
    models = TorchModels(preset, text_encoder, transformer, vae.eval(), tok_path)
    log.stage(
        "dit_params",
        transformer=sum(p.numel() for p in transformer.parameters()),
        text_encoder=sum(p.numel() for p in text_encoder.parameters()),
    )
    t = time.time()
    ema_t5, ema_dit = train_dit(
        models, z_mean, z_std, batch.ids, batch.mask, cfg, log, init=dit_from is None, checkpoint_dir=out / "checkpoints",
        object_mask=obj_mask,
    )
    log.stage("dit", seconds=round(time.time() - t, 1))

    t = time.time()
    if cfg.decoder_steps > 0:
        finetune_decoder(vae, cfg, log)
    rt_dec = vae_roundtrip_check(vae, cfg, num=min(24, max(cfg.eval_prompts, 4)))
    log.stage("decoder", seconds=round(time.time() - t, 1), roundtrip=rt_dec)
    log.info(f"VAE round trip after the decoder fine-tune: {rt_dec}")

    sizes = export(out, ema_t5, ema_dit, vae)
    shipped = load_trained(out, preset)
    t = time.time()
    final = evaluate(shipped, cfg)
    cos = velocity_cosines(shipped, list(EVAL_PROMPTS[: cfg.eval_prompts]), cfg.eval_steps, cfg.eval_cfg, cfg.eval_seed)
    record = {
        "recipe": "python -m sorakit.train --out DIR --seed SEED",
        "seed": cfg.seed,
        "config": dataclasses.asdict(cfg),
        "preset": preset.name,
        "torch": torch.__version__,
        "threads": cfg.threads,
        "minutes": round(log.elapsed() / 60, 1),
        "stage_seconds": {k: v.get("seconds") for k, v in log.record["stages"].items() if "seconds" in v},
        "vae_shift": shift,
        "vae_scale": scale,
        "vae_roundtrip": rt,
        "latent_whitening": log.record["stages"].get("whitening"),
        "reused": {"vae_from": str(vae_from) if vae_from else None, "dit_from": str(dit_from) if dit_from else None},
        "vae_roundtrip_after_decoder_finetune": rt_dec,
        "file_bytes": sizes,
        "adherence": {
            "prompts": len(final["per_prompt"]),
            "steps": cfg.eval_steps,
            "cfg_scale": cfg.eval_cfg,
            "guidance_max_t": preset.sampler.guidance_max_t,
            "seed": cfg.eval_seed,
            "colour_acc": final["colour_acc"],
            "direction_acc": final["direction_acc"],
            "both_acc": final["both_acc"],
        },
        "velocity_cosine_mean": [round(float(c), 5) for c in cos.mean(axis=0)],
        "evals": [e for e in log.record["events"] if e["stage"] == "eval"],
    }
    log.stage("final", seconds=round(time.time() - t, 1), adherence=record["adherence"])
    (out / "training.json").write_text(json.dumps(record, indent=1))
    log.info(
        f"done in {record['minutes']} min: colour {final['colour_acc']:.0%}, direction {final['direction_acc']:.0%}; "
        f"files {sum(sizes.values()) / 1e6:.1f} MB"
    )
    return record


@torch.no_grad()
def velocity_cosines(models: TorchModels, prompts: list[str], steps: int, cfg_scale: float, seed: int) -> np.ndarray:
    """Cosine similarity of consecutive CFG velocities, per prompt and step: [n, steps-1].

    The velocity of step i is recovered from the Euler update, v_i = (z_{i+1} - z_i) * 1000 / dt_i.
    """
    from sorakit.export.sampler import schedule

    preset = models.preset
    H, W = preset.resolution
    latent_t = preset.latent_size(preset.num_frames, H, W)[0]
    ts = [float(t) for t in schedule(preset.sampler, steps, H, W, latent_t)]
    dts = [ts[i] - ts[i + 1] for i in range(steps - 1)] + [ts[-1]]
    states: list[torch.Tensor] = []
    res = ReferencePipeline(models)(
        prompts, seed=seed, steps=steps, cfg_scale=cfg_scale, callback=lambda i, z: states.append(z.clone())
    )
    z_prev = torch.from_numpy(res.noise)
    vs = []
    for i, z in enumerate(states):
        vs.append(((z - z_prev) * preset.sampler.num_timesteps / dts[i]).flatten(1))
        z_prev = z
    return np.stack([F.cosine_similarity(vs[i], vs[i + 1], dim=1).numpy() for i in range(steps - 1)], axis=1)
