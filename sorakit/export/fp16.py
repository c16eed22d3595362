"""The fp16 quality gate of the Core ML path, run without a Mac.

``sorakit export-coreml --precision fp16`` converts with Core ML's FLOAT16 compute precision:
weights and every intermediate tensor of the transformer and the VAE are fp16 (the text encoder
stays fp32). Core ML itself runs only on Apple hardware, so the gate emulates that precision in
torch: weights rounded to fp16 once, and the result of every torch operation inside the
transformer and the VAE rounded to fp16 as it is produced (overflow to inf included). The
arithmetic inside one operation stays fp32 (the accumulation inside a matmul or a convolution),
which is what the emulation cannot reproduce; on macOS the per-block numeric check compares
Core ML's own fp16 outputs with torch as well (PSNR >= 35 dB).

The gate is the ONNX fp16 pass's: the same prompts and seeds (``pipeline.GATE_PROMPTS``), videos
from the torch reference pipeline in fp32 against the emulated fp16 one, mean SSIM at least the
fp16 pass's registered gate (0.95) unless overridden.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from sorakit.export.models import TorchModels


def _round(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
        return t.to(torch.float16).to(torch.float32)
    return t


class FP16Storage(TorchFunctionMode):
    """Round every fp32 tensor a torch operation produces to fp16 (what fp16 compute precision stores)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") == "__get__":  # attribute reads (x.shape, x.T ...) are not computations
            return out
        return tree_map(_round, out)


class _FP16(nn.Module):
    """A component whose weights are fp16-rounded and whose every operation stores fp16."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.inner = copy.deepcopy(module)
        with torch.no_grad():
            for p in list(self.inner.parameters()) + list(self.inner.buffers()):
                if p.dtype == torch.float32:
                    p.copy_(p.to(torch.float16).to(torch.float32))

    def forward(self, *args, **kwargs):
        with FP16Storage():
            return self.inner(*tree_map(_round, args), **tree_map(_round, kwargs))

    def decode(self, *args, **kwargs):
        with FP16Storage():
            return self.inner.decode(*tree_map(_round, args), **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["inner"], name)


def fp16_models(models: TorchModels) -> TorchModels:
    """The Core ML path's fp16: transformer and VAE in fp16, the text encoder fp32 (T5 overflows fp16)."""
    return TorchModels(models.preset, models.text_encoder, _FP16(models.transformer), _FP16(models.vae),
                       models.tokenizer_file)


def fp16_gate(models: TorchModels, threshold: float | None = None, steps: int | None = None) -> dict[str, Any]:
    """SSIM of fp32 against emulated-fp16 videos on the fp16 pass's prompts and seeds."""
    from sorakit.export.reference import ReferencePipeline
    from sorakit.graph_passes.pipeline import GATE_PROMPTS
    from sorakit.graph_passes.registry import get
    from sorakit.metrics import psnr, video_ssim

    threshold = get("fp16").gate if threshold is None else threshold
    ref, half = ReferencePipeline(models), ReferencePipeline(fp16_models(models))
    ssims, psnrs, finite = [], [], True
    for i, prompt in enumerate(GATE_PROMPTS):
        a = ref(prompt, seed=i, steps=steps)
        b = half(prompt, seed=i, steps=steps)
        finite = finite and bool(np.isfinite(b.video_float).all())
        ssims.append(video_ssim(a.video[0], b.video[0]))
        psnrs.append(psnr(a.video[0], b.video[0]))
    mean = float(np.mean(ssims))
    return {"metric": "ssim", "value": mean, "min": float(np.min(ssims)), "psnr_db": float(np.mean(psnrs)),
            "threshold": threshold, "prompts": list(GATE_PROMPTS), "steps": steps,
            "compared": "torch fp32 vs Core ML fp16 compute precision emulated in torch (weights and every "
                        "intermediate rounded to fp16; text encoder fp32)",
            "finite": finite, "passed": mean >= threshold and finite}


__all__ = ["FP16Storage", "fp16_models", "fp16_gate"]
