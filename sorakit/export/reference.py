"""The torch reference pipeline: prompt -> video, the ground truth for every later check.

prompt (+ preset suffix) -> tokenizer -> T5 -> y, mask; null caption = the STDiT3's
``y_embedding``; noise from sorakit's seeded numpy convention; rectified flow with CFG;
VAE decode; Open-Sora's uint8 conversion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sorakit.export.models import TorchModels
from sorakit.export.sampler import rflow_sample
from sorakit.presets import check_geometry
from sorakit.runtime.sampler import initial_noise, to_uint8_video
from sorakit.tokenizer import PromptTokenizer


@dataclass
class ReferenceResult:
    video: np.ndarray  # [n, F, H, W, 3] uint8
    video_float: np.ndarray  # [n, 3, F, H, W] decoder output
    latents: np.ndarray  # [n, 4, T, h, w] final latent
    noise: np.ndarray  # the initial latent


class ReferencePipeline:
    def __init__(self, models: TorchModels):
        self.models = models
        self.preset = models.preset
        self.tokenizer = PromptTokenizer(models.tokenizer_file, self.preset.t5.max_length)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> y [n, 1, L, D], mask [n, L] (Open-Sora's T5 output layout)."""
        batch = self.tokenizer([p + self.preset.prompt_suffix for p in prompts])
        ids, mask = torch.from_numpy(batch.ids), torch.from_numpy(batch.mask)
        hidden = self.models.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden[:, None], mask

    def null_caption(self, n: int) -> torch.Tensor:
        emb = self.models.transformer.y_embedder.y_embedding
        return emb[None, None].repeat(n, 1, 1, 1)

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str] | str,
        *,
        seed: int = 0,
        noise: np.ndarray | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        callback: Callable[[int, torch.Tensor], None] | None = None,
    ) -> ReferenceResult:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        preset = self.preset
        height, width = height or preset.resolution[0], width or preset.resolution[1]
        num_frames = num_frames or preset.num_frames
        check_geometry(preset, num_frames, height, width)
        shape = (len(prompts), preset.stdit.in_channels, *preset.latent_size(num_frames, height, width))
        if noise is None:
            noise = initial_noise(seed, shape)
        y, mask = self.encode_prompts(prompts)
        y_all = torch.cat([y, self.null_caption(len(prompts))])
        fps = torch.tensor([float(preset.sampler.fps)])
        hw = torch.tensor([float(height)]), torch.tensor([float(width)])

        def model_fn(z_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            y_in = y_all if len(z_in) == len(y_all) else y  # prompt half only at unguided steps
            return self.models.transformer(z_in, t, y_in, mask, None, fps, *hw)

        z = rflow_sample(
            model_fn,
            torch.from_numpy(noise),
            height=height,
            width=width,
            cfg=preset.sampler,
            num_steps=steps,
            cfg_scale=cfg_scale,
            callback=callback,
        )
        video = self.models.vae.decode(z, num_frames)
        video_np = video.float().numpy()
        return ReferenceResult(to_uint8_video(video_np), video_np, z.numpy(), noise)
