"""DiT stage of the shapes recipe: STDiT3 with Open-Sora 1.2's rectified flow, EMA, periodic evaluation."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sorakit.adherence import ATTRIBUTES, describe, score_set
from sorakit.export.models import TorchModels
from sorakit.export.reference import ReferencePipeline
from sorakit.export.sampler import timestep_transform
from sorakit.presets import ModelPreset
from sorakit.train import data as shapes_data
from sorakit.train.common import Logger, lr_at, set_lr
from sorakit.train.config import RecipeConfig, eval_prompts_and_seed
from sorakit.train.text_encoder import encode_captions
from sorakit.train.weights import save_fp16


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
    prompts, seed = eval_prompts_and_seed(cfg)
    res = ReferencePipeline(models)(prompts, seed=seed, steps=cfg.eval_steps, cfg_scale=cfg.eval_cfg)
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
            over = (cfg.minutes is not None and (time.time() - t_start) / 60 > cfg.minutes) or (
                cfg.run_deadline_minutes is not None and log.elapsed() / 60 > cfg.run_deadline_minutes
            )
            if (step + 1) % cfg.eval_every == 0 or last or over:
                eval_models = TorchModels(preset, ema_t5.module, ema_dit.module, models.vae, models.tokenizer_file)
                s = evaluate(eval_models, cfg)
                sens = text_sensitivity(eval_models)
                scores = {key: s[key] for key, _, _ in ATTRIBUTES}
                log.info(
                    f"eval @ {step + 1}: {describe(s)} (text sensitivity by t: {sens})"
                )
                log.event("eval", step=step + 1, **scores, text_sensitivity=sens)
                if checkpoint_dir is not None:
                    ck = checkpoint_dir / f"step{step + 1}"
                    for name, module in (("text_encoder", ema_t5.module), ("transformer", ema_dit.module)):
                        save_fp16(module, ck / name, name)
                    (ck / "eval.json").write_text(
                        json.dumps(scores | {"both_acc": s["both_acc"], "step": step + 1})
                    )
                if on_eval is not None:
                    on_eval(step + 1, s)
                dit.train()
                if not cfg.freeze_text:
                    t5.train()
            if over:
                log.info(f"stopping at step {step + 1}: a time cap was reached (DiT {cfg.minutes} min, "
                         f"run {cfg.run_deadline_minutes} min)")
                log.stage("dit", stopped_early_by_time_cap=True)
                break
    log.stage("dit", steps_done=step + 1, final_loss=float(np.mean(history[-cfg.log_every :])))
    return ema_t5.module.eval(), ema_dit.module.eval()



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

