"""Helpers every training stage uses: the run's logger, learning-rate schedule, pixel losses."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch


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

