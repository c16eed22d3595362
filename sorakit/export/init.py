"""Deterministic random weights that make every sub-path of a model matter.

Recipe "osref-detinit-v1" (the one the official reference vectors were made with): every
floating tensor gets its own generator seeded from its key, so the values do not depend on
key order or on which other tensors exist. Fan-in scaling keeps activations O(1), and
unlike the training initialisation nothing is zero (adaLN-Zero would make parity vacuous).
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn


def detinit_tensor(key: str, shape, seed: int = 0) -> torch.Tensor:
    seed_k = (zlib.crc32(key.encode()) + seed) % 2**63
    n = torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(seed_k), dtype=torch.float32)
    if len(shape) >= 2:
        return n / math.sqrt(math.prod(shape[1:]))
    if key.endswith("bias"):
        return 0.02 * n
    return 1 + 0.1 * n  # 1-D weights (norms) and other 1-D tensors


def keeps_constructor_value(key: str) -> bool:
    """Tensors the recipe leaves at their constructor value (fixed by definition)."""
    return key == "rope.freqs" or key.endswith(".rope.freqs") or key in ("scale", "shift")


@torch.no_grad()
def randomize_weights(module: nn.Module, seed: int = 0, prefix: str = "") -> nn.Module:
    """Fill every floating parameter and persistent buffer of ``module`` in place.

    ``prefix`` is prepended to each key before hashing, so a block built on its own gets the
    same values as the same block inside the full model (pass e.g. ``"spatial_blocks.3."``).
    """
    seen: set[int] = set()
    for key, tensor in module.state_dict(keep_vars=True).items():
        full = prefix + key
        if not torch.is_floating_point(tensor) or keeps_constructor_value(full) or id(tensor) in seen:
            continue  # a tied tensor (T5's embed_tokens is shared.weight) keeps its first key's values
        seen.add(id(tensor))
        tensor.data.copy_(detinit_tensor(full, tensor.shape, seed).to(tensor.dtype))
    return module


def random_state_dict(
    shapes: dict[str, tuple[int, ...]], seed: int = 0, constructor: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The recipe's tensors for just the given keys (used to stream random weights per block).

    Keys the recipe leaves at their constructor value take it from ``constructor``.
    """
    constructor = constructor or {}
    out = {}
    for k, s in shapes.items():
        if keeps_constructor_value(k):
            if k in constructor:
                out[k] = constructor[k]
            continue
        out[k] = detinit_tensor(k, s, seed)
    return out


def constructor_values(vae_scale, vae_shift, head_dim: int) -> dict[str, torch.Tensor]:
    """The fixed-by-construction tensors of the three components."""
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    return {
        "scale": torch.tensor(vae_scale, dtype=torch.float32)[None, :, None, None, None],
        "shift": torch.tensor(vae_shift, dtype=torch.float32)[None, :, None, None, None],
        "rope.freqs": freqs,
    }
