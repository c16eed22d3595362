"""The training recipe of the shipped ``shapes`` model: data -> tokenizer -> VAE -> T5 + STDiT3.

Stages (each seeded from the recipe seed, so a run is reproducible on the same machine):

1. **data**: ``num_clips`` clips of the moving-shapes generator (``sorakit.train.data``).
2. **tokenizer**: word-level, trained on the caption grammar (``sorakit.train.tokenizer``).
3. **VAE** (``sorakit.train.vae``): the spatial VAE (diffusers AutoencoderKL) on single
   frames, the temporal VAE (causal 3-D conv) on the frozen spatial latents of whole clips,
   then every clip is encoded once (posterior mean and std), the latent is whitened inside
   the temporal VAE's weights and its per-channel mean/std become the VAE's ``shift``/``scale``.
4. **text encoder** (``sorakit.train.text_encoder``): the T5 is taught to put every
   attribute of the caption into every token, then frozen.
5. **DiT** (``sorakit.train.dit``): STDiT3 with Open-Sora 1.2's rectified flow, an EMA of
   the weights is evaluated on the 24 evaluation prompts every ``eval_every`` steps and shipped.
6. **decoder fine-tune**: the VAE decoders, end to end from the frozen latents to pixels.
7. **export** (``sorakit.train.weights``): fp16 safetensors per component (the VAE's
   shift/scale stay fp32), tokenizer.json and training.json; the final adherence is measured
   on the reloaded, fp16-rounded files.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sorakit.adherence import ATTRIBUTES, describe
from sorakit.export.models import TorchModels, build, load
from sorakit.presets import ModelPreset
from sorakit.presets import shapes_preset as default_shapes_preset
from sorakit.tokenizer import PromptTokenizer
from sorakit.train import data as shapes_data
from sorakit.train.common import Logger
from sorakit.train.config import RecipeConfig, eval_prompts_and_seed
from sorakit.train.dit import evaluate, latent_object_mask, train_dit, velocity_cosines
from sorakit.train.text_encoder import caption_labels, pretrain_text_encoder
from sorakit.train.tokenizer import train_tokenizer
from sorakit.train.vae import (
    encode_spatial,
    encode_temporal,
    finetune_decoder,
    set_latent_norm,
    spatial_roundtrip_check,
    train_spatial_vae,
    train_temporal_vae,
    vae_roundtrip_check,
    whiten_latents,
)
from sorakit.train.weights import export, load_trained, save_fp16


@dataclass
class Latents:
    """What the VAE stage hands the DiT: normalised posterior mean/std of every clip [N,C,T,h,w],
    the object's latent cells [N,1,T,h,w], the normalisation and the round-trip figures."""

    mean: np.ndarray
    std: np.ndarray
    object_mask: np.ndarray
    shift: list[float]
    scale: list[float]
    roundtrip: dict


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

    # 1-2. data and tokenizer
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

    # 3. VAE and the latents of every clip
    vae, latents = vae_stage(videos, cfg, preset, log, vae_from, spatial_from)
    del videos
    save_fp16(vae, out / "vae", "vae", ("shift", "scale"))  # early, so DiT-only ablations can reuse it

    # 4-5. text encoder, then the DiT on the frozen text features
    text_encoder, transformer = text_and_transformer(captions, batch, cfg, preset, log, dit_from)
    models = TorchModels(preset, text_encoder, transformer, vae.eval(), tok_path)
    log.stage(
        "dit_params",
        transformer=sum(p.numel() for p in transformer.parameters()),
        text_encoder=sum(p.numel() for p in text_encoder.parameters()),
    )
    t = time.time()
    ema_t5, ema_dit = train_dit(
        models, latents.mean, latents.std, batch.ids, batch.mask, cfg, log, init=dit_from is None,
        checkpoint_dir=out / "checkpoints", object_mask=latents.object_mask,
    )
    log.stage("dit", seconds=round(time.time() - t, 1))

    # 6. decoder fine-tune
    t = time.time()
    if cfg.decoder_steps > 0:
        finetune_decoder(vae, cfg, log)
    rt_dec = vae_roundtrip_check(vae, cfg, num=min(24, max(cfg.eval_prompts, 4)))
    log.stage("decoder", seconds=round(time.time() - t, 1), roundtrip=rt_dec)
    log.info(f"VAE round trip after the decoder fine-tune: {rt_dec}")

    # 7. export, then measure the exported files
    sizes = export(out, ema_t5, ema_dit, vae)
    record = final_record(out, cfg, preset, log, latents, rt_dec, sizes, vae_from, dit_from)
    (out / "training.json").write_text(json.dumps(record, indent=1))
    a = record["adherence"]
    log.info(
        f"done in {record['minutes']} min: {describe(a)}; "
        f"files {sum(sizes.values()) / 1e6:.1f} MB"
    )
    return record


def vae_stage(
    videos: np.ndarray,
    cfg: RecipeConfig,
    preset: ModelPreset,
    log: Logger,
    vae_from: str | Path | None,
    spatial_from: str | Path | None,
) -> tuple[nn.Module, Latents]:
    """Train (or reuse) the VAE and encode every clip into the normalised latents the DiT learns."""
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
    del s_mean, s_std
    if vae_from is None and cfg.latent_whiten_floor > 0:
        z_mean, z_std, whitening = whiten_latents(vae, z_mean, z_std, cfg.latent_whiten_floor)
        log.stage("whitening", **whitening)
        log.info(f"latent whitening: eigenvalues {whitening['eigenvalues_before']} -> gains {whitening['gain']}")
    if vae_from is None:
        shift, scale = set_latent_norm(vae, z_mean, z_std)
    else:
        shift, scale = vae.shift.flatten().tolist(), vae.scale.flatten().tolist()
    per_channel = (None, slice(None), None, None, None)
    z_mean = (z_mean - np.array(shift, np.float32)[per_channel]) / np.array(scale, np.float32)[per_channel]
    z_std = z_std / np.array(scale, np.float32)[per_channel]
    obj_mask = latent_object_mask(videos, tuple(z_mean.shape[2:]))
    rt = vae_roundtrip_check(vae, cfg, num=min(24, max(cfg.eval_prompts, 4)))
    log.stage(
        "latents", shape=list(z_mean.shape), shift=shift, scale=scale, posterior_std=float(z_std.mean()), roundtrip=rt
    )
    log.info(f"VAE round trip on held-out clips: {rt}; latent shift {shift} scale {scale}")
    return vae, Latents(z_mean, z_std, obj_mask, shift, scale, rt)


def text_and_transformer(
    captions: list[str], batch, cfg: RecipeConfig, preset: ModelPreset, log: Logger, dit_from: str | Path | None
) -> tuple[nn.Module, nn.Module]:
    """A pre-trained T5 and a fresh STDiT3, or both from a previous run (``dit_from``)."""
    if dit_from is not None:
        text_encoder = load("text_encoder", Path(dit_from) / "text_encoder", preset).float()
        transformer = load("transformer", Path(dit_from) / "transformer", preset).float()
        return text_encoder, transformer
    text_encoder = build("text_encoder", preset).float()
    transformer = build("transformer", preset)
    if cfg.text_steps > 0:
        t = time.time()
        text_record = pretrain_text_encoder(text_encoder, batch.ids, batch.mask, caption_labels(captions), cfg, log)
        log.stage("text_encoder", seconds=round(time.time() - t, 1), **text_record)
    return text_encoder, transformer


def final_record(
    out: Path,
    cfg: RecipeConfig,
    preset: ModelPreset,
    log: Logger,
    latents: Latents,
    rt_dec: dict,
    sizes: dict[str, int],
    vae_from: str | Path | None,
    dit_from: str | Path | None,
) -> dict:
    """Reload the exported files, measure them and assemble training.json's record."""
    shipped = load_trained(out, preset)
    t = time.time()
    final = evaluate(shipped, cfg)
    prompts, seed = eval_prompts_and_seed(cfg)
    cos = velocity_cosines(shipped, prompts, cfg.eval_steps, cfg.eval_cfg, seed)
    record = {
        "recipe": "python -m sorakit.train --out DIR --seed SEED",
        "seed": cfg.seed,
        "config": dataclasses.asdict(cfg),
        "preset": preset.name,
        "torch": torch.__version__,
        "threads": cfg.threads,
        "minutes": round(log.elapsed() / 60, 1),
        "stage_seconds": {k: v.get("seconds") for k, v in log.record["stages"].items() if "seconds" in v},
        "vae_shift": latents.shift,
        "vae_scale": latents.scale,
        "vae_roundtrip": latents.roundtrip,
        "latent_whitening": log.record["stages"].get("whitening"),
        "reused": {"vae_from": str(vae_from) if vae_from else None, "dit_from": str(dit_from) if dit_from else None},
        "vae_roundtrip_after_decoder_finetune": rt_dec,
        "file_bytes": sizes,
        "adherence": {
            "prompts": len(final["per_prompt"]),
            "steps": cfg.eval_steps,
            "cfg_scale": cfg.eval_cfg,
            "guidance_max_t": preset.sampler.guidance_max_t,
            "seed": seed,
            "prompt_set": cfg.eval_set,
            **{key: final[key] for key, _, _ in ATTRIBUTES},
            "both_acc": final["both_acc"],
        },
        "velocity_cosine_mean": [round(float(c), 5) for c in cos.mean(axis=0)],
        "evals": [e for e in log.record["events"] if e["stage"] == "eval"],
    }
    log.stage("final", seconds=round(time.time() - t, 1), adherence=record["adherence"])
    return record
