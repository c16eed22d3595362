"""sorakit's fastest settings, in one place: the ``best-*`` rows of the real-size benchmark
(``benchmarks/e2e_real.py``) and the ``best`` row of ``sorakit eval`` on the shipped model, so the
quality figures belong to the very settings that are timed.

Chosen on the shipped model (``sorakit eval --best``): the speed-ups compose until the video's
SSIM against the full 30-step fp32 output nears 0.85 (docs/benchmarks.md, "Levers").
"""

from __future__ import annotations

BUDGET = "3.3GB"  # the iPhone 15 Pro's usable memory in the On-device Sora paper

BEST = {
    "device": "cpu-bf16",  # OpenVINO bf16 where memory allows, ONNX Runtime int8 where not
    # the transformer's TDTM variants (block scope, the pass's default), the text encoder and the
    # cross-attention on the prompt's tokens, the GELUs fused, int8 beside fp32: every pass the
    # settings below need
    "passes": ["tdtm", "text_tokens", "caption_tokens", "fuse_gelu", "int8"],
    "pass_settings": {"int8": {"variant": True}},
    "lpl": "10",  # 10 steps, then the leap (11 transformer calls of 30)
    "tdtm_steps": 5,  # merged frames (block scope) for the first 5 steps
    "step_cache": 0.1,  # reuse the blocks' residual while their input barely changes
}


def best(budget: str | None = BUDGET) -> dict:
    """The best settings, with a memory budget (None: unlimited)."""
    return {**BEST, "memory_budget": budget or "unlimited"}
