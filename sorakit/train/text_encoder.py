"""Text-encoder stage of the shapes recipe: the T5 is taught every attribute of the caption, then frozen."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sorakit.adherence import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, parse_prompt
from sorakit.export.stdit3 import masked_mean
from sorakit.train.common import Logger, lr_at, set_lr
from sorakit.train.config import RecipeConfig

CAPTION_ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("colour", tuple(COLOURS)),
    ("shape", SHAPES),
    ("direction", tuple(DIRECTIONS)),
    ("background", tuple(BACKGROUNDS)),
)


def caption_labels(captions: list[str]) -> np.ndarray:
    """What each caption says, [N, 4] int64: colour, shape, direction, background.

    Read from the text (``sorakit.adherence.parse_prompt``), not from the clip: an attribute
    the caption does not name gets the extra class ``len(values)`` ("not said").
    """
    out = np.empty((len(captions), len(CAPTION_ATTRIBUTES)), np.int64)
    for i, caption in enumerate(captions):
        intent = parse_prompt(caption)
        for j, (name, values) in enumerate(CAPTION_ATTRIBUTES):
            v = getattr(intent, name)
            out[i, j] = values.index(v) if v in values else len(values)
    return out


def pretrain_text_encoder(
    t5: nn.Module, ids: np.ndarray, mask: np.ndarray, labels: np.ndarray, cfg: RecipeConfig, log: Logger
) -> dict:
    """Teach the T5 to put every attribute of the caption into every token's output.

    Linear heads read colour, shape, direction and background from each valid token's output
    (cross-entropy, all four weighted alike). Trained jointly with the DiT from scratch, the T5
    had spread colour over every token but kept the direction word's meaning on its own token,
    a small share of what cross-attention and the pooled caption see; this stage makes the
    direction as loud in the text features as the colour before the DiT starts. Returns the
    held-out accuracy of each attribute read from the pooled (masked-mean) output by the heads.
    """
    torch.manual_seed(cfg.seed + 11)
    rng = np.random.default_rng([cfg.seed, 11])
    d = t5.shared.weight.shape[1]
    sizes = [len(values) + 1 for _, values in CAPTION_ATTRIBUTES]
    heads = nn.Linear(d, sum(sizes))
    t5.train()
    params = list(t5.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.text_lr, weight_decay=0.0)
    n = len(ids)
    held = max(1, n // 10)
    train_idx = np.arange(held, n)
    ids_t, mask_t, lab_t = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels)

    def logits(idx) -> tuple[torch.Tensor, torch.Tensor]:
        h = t5(input_ids=ids_t[idx], attention_mask=mask_t[idx]).last_hidden_state  # [B, L, d]
        return heads(h), mask_t[idx].bool()

    prog, task = log.progress(cfg.text_steps, "text")
    with prog:
        for step in range(cfg.text_steps):
            set_lr(opt, lr_at(step, cfg.text_steps, cfg.text_lr, max(cfg.text_steps // 10, 1), 0.5))
            idx = rng.choice(train_idx, size=min(cfg.text_batch, len(train_idx)), replace=False)
            out, valid = logits(idx)
            loss = torch.zeros(())
            for j, part in enumerate(out.split(sizes, dim=-1)):
                target = lab_t[idx, j][:, None].expand(-1, part.shape[1])
                loss = loss + F.cross_entropy(part[valid], target[valid])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            prog.update(task, advance=1, info=f"loss {loss.item():.4f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.text_steps:
                log.event("text", step=step + 1, loss=loss.item())
    t5.eval()
    with torch.no_grad():
        idx = np.arange(held)
        h = t5(input_ids=ids_t[idx], attention_mask=mask_t[idx]).last_hidden_state
        pooled = heads(masked_mean(h, mask_t[idx]))
        acc = {
            name: float((part.argmax(-1) == lab_t[idx, j]).float().mean())
            for j, ((name, _), part) in enumerate(zip(CAPTION_ATTRIBUTES, pooled.split(sizes, dim=-1)))
        }
    log.info(f"text encoder pre-trained: held-out accuracy from the pooled output {acc}")
    return {"heldout_pooled_accuracy": acc, "final_loss": loss.item()}


@torch.no_grad()
def encode_captions(t5: nn.Module, ids: np.ndarray, mask: np.ndarray, batch: int = 256) -> np.ndarray:
    """The frozen T5's outputs for every caption, [N, L, d] float32 (computed once)."""
    t5.eval()
    out = [
        t5(input_ids=torch.from_numpy(ids[i : i + batch]), attention_mask=torch.from_numpy(mask[i : i + batch]))
        .last_hidden_state.numpy()
        for i in range(0, len(ids), batch)
    ]
    return np.concatenate(out)

