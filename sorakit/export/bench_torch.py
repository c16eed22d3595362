"""The PyTorch baseline row of `sorakit bench`: the torch reference pipeline, eager fp32.

    python -m sorakit.export.bench_torch '{"preset": "shapes", "checkpoints": {...}, ...}'

Same JSON contract as ``sorakit.evaluation.row``. Runs in its own process so peak RSS and
thread settings are its own.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from sorakit.export.models import TorchModels
from sorakit.export.reference import ReferencePipeline
from sorakit.export.sampler import rflow_sample
from sorakit.memory import PeakRSS, rss_bytes
from sorakit.presets import get_preset
from sorakit.runtime.sampler import initial_noise, to_uint8_video


def load_models(spec: dict) -> TorchModels:
    preset = get_preset(spec["preset"])
    ck = spec.get("checkpoints")
    if ck:
        return TorchModels.from_checkpoints(preset, ck["transformer"], ck["vae"], ck["text_encoder"],
                                            spec.get("tokenizer"))
    return TorchModels.random(preset, spec.get("seed_weights", 0))


@torch.no_grad()
def run_row(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    base = rss_bytes()
    models = load_models(spec)
    pipe = ReferencePipeline(models)
    preset = models.preset
    h, w = preset.resolution
    n = preset.num_frames
    steps = spec["steps"]
    cfg = spec.get("cfg") or preset.sampler.cfg_scale
    if spec.get("warmup", True):
        pipe(spec["prompt"], steps=min(2, steps), cfg_scale=cfg)
    peak = PeakRSS()
    peak.reset()
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    y, mask = pipe.encode_prompts([spec["prompt"]])
    t_text = time.perf_counter() - t0
    y_all = torch.cat([y, pipe.null_caption(1)])
    fps = torch.tensor([float(preset.sampler.fps)])
    hw = torch.tensor([float(h)]), torch.tensor([float(w)])
    calls = []

    def model_fn(z_in, t):
        t1 = time.perf_counter()
        y_in = y_all if len(z_in) == len(y_all) else y  # prompt half only at unguided steps
        out = models.transformer(z_in, t, y_in, mask, None, fps, *hw)
        calls.append(time.perf_counter() - t1)
        return out

    shape = (1, preset.stdit.in_channels, *preset.latent_size(n, h, w))
    z = torch.from_numpy(initial_noise(spec.get("seed", 0), shape))
    t0 = time.perf_counter()
    z = rflow_sample(model_fn, z, height=h, width=w, cfg=preset.sampler, num_steps=steps, cfg_scale=cfg)
    t_tr = time.perf_counter() - t0
    t0 = time.perf_counter()
    video = models.vae.decode(z, n).float().numpy()
    t_vae = time.perf_counter() - t0
    wall = time.perf_counter() - t_all
    frames = to_uint8_video(video)[0]
    if spec.get("frames_out"):
        np.save(spec["frames_out"], frames)
    return {
        "name": spec.get("name", "torch eager fp32"),
        "seconds": {"text_encoder": t_text, "transformer": t_tr, "transformer_per_call": float(np.mean(calls)),
                    "vae": t_vae, "total": wall},
        "transformer_calls": len(calls),
        "peak_rss_bytes": peak.peak(),
        "base_rss_bytes": base,
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    print(json.dumps(run_row(json.loads(sys.argv[1]))))
