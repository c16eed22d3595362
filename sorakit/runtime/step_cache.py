"""Step caching: reuse the transformer blocks' residual while their input barely changes.

Training-free and TeaCache-style (beyond the On-device Sora paper): at every denoising step
the cheap prologue runs as usual, and the blocks' input, modulated by the step's timestep
embedding the way the first block sees it (LayerNorm, then ``x (1 + scale) + shift``), is
compared with the previous step's. The relative L1 changes accumulate; while their sum since
the blocks last ran stays below ``threshold`` the blocks are skipped and their last residual
(output minus input) is added to the new input instead, then the epilogue runs. When the
sum crosses the threshold, the blocks run and the sum restarts.

Never cached: a step before the blocks ran once for its batch layout and chain (TDTM or
plain blocks), the last step, and the step of a fixed LPL leap (the leap extrapolates from
that velocity over most of the schedule). ``threshold=0`` never skips, so the results are
then identical to running without a cache. All state lives in one generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def modulated(tokens: np.ndarray, t_mlp: np.ndarray) -> np.ndarray:
    """LayerNorm(tokens) (1 + scale) + shift with the first two of the six modulation vectors."""
    x = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]).astype(np.float32)
    c = x.shape[-1]
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    shift, scale = t_mlp[:, None, :c], t_mlp[:, None, c : 2 * c]
    return x * (1 + scale) + shift


@dataclass
class _Slot:
    previous: np.ndarray | None = None  # the modulated input of the previous step
    residual: np.ndarray | None = None  # blocks' output minus input at that step
    accumulated: float = 0.0


@dataclass
class StepCache:
    threshold: float
    slots: dict[tuple, _Slot] = field(default_factory=dict)
    skipped: int = 0  # steps (CFG calls) whose blocks were skipped
    evaluated: int = 0

    def decide(self, key: tuple, tokens: np.ndarray, t_mlp: np.ndarray, may_skip: bool) -> np.ndarray | None:
        """The residual to reuse for this call, or None when the blocks must run (then call ``store``)."""
        slot = self.slots.setdefault(key, _Slot())
        mod = modulated(tokens, t_mlp)
        change = np.inf
        if slot.previous is not None and slot.previous.shape == mod.shape:
            change = float(np.abs(mod - slot.previous).mean() / max(np.abs(slot.previous).mean(), 1e-12))
        slot.previous = mod
        if may_skip and slot.residual is not None and slot.accumulated + change < self.threshold:
            slot.accumulated += change
            self.skipped += 1
            return slot.residual
        slot.accumulated = 0.0
        self.evaluated += 1
        return None

    def store(self, key: tuple, tokens_in: np.ndarray, tokens_out: np.ndarray) -> None:
        self.slots[key].residual = tokens_out - tokens_in
