"""VAE stages of the shapes recipe: spatial VAE on frames, temporal VAE on clips of spatial
latents, latent whitening and normalisation, round-trip checks and the decoder fine-tune."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sorakit.adherence import score_set
from sorakit.export.models import load
from sorakit.presets import ModelPreset
from sorakit.presets import shapes_preset as default_shapes_preset
from sorakit.train import data as shapes_data
from sorakit.train.common import Logger, lr_at, object_weights, psnr, set_lr, to_unit, weighted_recon_loss
from sorakit.train.config import RecipeConfig
from sorakit.train.weights import save_fp16

ROUNDTRIP_SCORES = ("colour_acc", "shape_acc", "direction_acc")  # what the VAE round-trip checks report

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
    """Clips of spatial latents in and out: normalised latent MSE (+ an optional pixel loss on a
    few frames through the frozen spatial decoder, off by default: ``temporal_pixel_weight``).

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
            set_lr(opt, lr_at(step, cfg.temporal_steps, cfg.temporal_lr, max(cfg.temporal_steps // 10, 1), cfg.temporal_decay_from))
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
            with torch.set_grad_enabled(cfg.temporal_pixel_weight > 0):  # logged either way
                pix = spatial.decode_frames(rec_frames)
                pix_loss = weighted_recon_loss(pix, x, object_weights(x, cfg.object_weight))
            loss = lat_loss + cfg.temporal_pixel_weight * pix_loss + cfg.kl_weight * kl
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
    return {"psnr": round(psnr(rec, x), 2)} | {k: s[k] for k in ROUNDTRIP_SCORES}


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
    return {"psnr": round(psnr(rec, x), 2)} | {k: s[k] for k in ROUNDTRIP_SCORES}


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

