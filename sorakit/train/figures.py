"""The shipped model's figures for docs/training.md (from its training.json) and the plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sorakit.adherence import (
    ATTRIBUTES,
    EVAL_PROMPTS,
    MAX_SEED_GAP,
    STEADINESS,
    TARGETS_CFG_EVERY_STEP,
    seed_summary,
    target_misses,
)
from sorakit.presets import shapes_preset

DOC_BEGIN, DOC_END = "<!-- shipped-model figures: begin -->", "<!-- shipped-model figures: end -->"


def _pct(v) -> str:
    return "—" if v is None else f"{v:.0%}"


def seeds_table(by_seed: list[dict], every_step: list[dict] | None) -> list[str]:
    """Markdown rows: each attribute's target, mean over the seeds, each seed, the lowest seed's gap."""
    seeds = [r["seed"] for r in by_seed]
    lines = [
        "| attribute | target | mean | " + " | ".join(f"seed {s}" for s in seeds) + " | lowest seed below the mean |",
        "|---|---:|---:|" + "---:|" * len(seeds) + "---:|",
    ]
    summary = seed_summary(by_seed)
    for key, name, target in ATTRIBUTES:
        m = summary[key]
        lines.append(
            f"| {name} | ≥ {target:.0%} | **{m['mean']:.1%}** | " + " | ".join(_pct(r[key]) for r in by_seed)
            + f" | {m['gap'] * 100:.1f} points (≤ {MAX_SEED_GAP * 100:.0f}) |"
        )
    if every_step:
        summary = seed_summary(every_step)
        for key, name, _ in ATTRIBUTES:
            target = TARGETS_CFG_EVERY_STEP.get(key)
            m = summary[key]
            lines.append(
                f"| {name}, CFG 7 at every step | {'≥ ' + format(target, '.0%') if target else '—'} | {m['mean']:.1%} | "
                + " | ".join(_pct(r[key]) for r in every_step) + f" | {m['gap'] * 100:.1f} points |"
            )
    return lines


def figures_markdown(record: dict) -> str:
    """The shipped model's figures as Markdown, from its training.json record."""
    m = record["measured"]
    by_seed, every = m.get("by_seed") or [], m.get("by_seed_cfg_every_step")
    g = m.get("guidance_max_t")
    sampler = f"30 steps, CFG 7 at t ≤ {g:g}" if g is not None else "30 steps, CFG 7"
    lines = []
    if by_seed and all(key in by_seed[0] for key, _, _ in ATTRIBUTES):
        misses = target_misses(by_seed, every)
        verdict = "every target is met" if not misses else "missed: " + "; ".join(misses)
        lines += [
            f"**Shipped model, the {len(EVAL_PROMPTS)} evaluation prompts × noise seeds "
            f"{by_seed[0]['seed']}–{by_seed[-1]['seed']} ({len(EVAL_PROMPTS) * len(by_seed)} videos), {sampler}: "
            f"{verdict}.**",
            "",
            *seeds_table(by_seed, every),
            "",
        ]
    else:  # a record measured before shape was scored
        lines += [f"**Shipped model ({sampler}, seed 0): colour {m['colour_acc']:.0%}, direction "
                  f"{m['direction_acc']:.0%}.**", ""]
    off = m.get("cfg_1")
    if off:
        lines.append("Without guidance (CFG 1), seed 0: " + ", ".join(
            f"{name} {_pct(off.get(key))}" for key, name, _ in ATTRIBUTES if key in off) + ".")
    trained = round(shapes_preset().sampler.transform_base_resolution**0.5)
    for base in (512, 256):
        s = m.get(f"transform_base_{base}")
        if s:
            lines.append(
                f"Sampled with a {base}² timestep-transform base instead of the trained {trained}², seed 0: "
                + ", ".join(f"{name} {_pct(s.get(key))}" for key, name, _ in ATTRIBUTES if key in s) + "."
            )
    steady = [f"{what} {m[key]:.0%}" for key, what in STEADINESS if m.get(key) is not None]
    if steady:
        lines.append("Steadiness at seed 0, mean over the prompts (each is 100 % on the training clips): "
                     + "; ".join(steady) + ".")
    if m.get("direction_probe"):
        lines.append(f"Direction probe at t = 1000 (model vs data): `{json.dumps(m['direction_probe'])}`.")
    lines.append(f"Text sensitivity by t (relative change of v between opposite directions): `{json.dumps(m['text_sensitivity'])}`.")
    evals = "; ".join(
        f"step {e['step']}: " + ", ".join(f"{name} {e[key]:.0%}" for key, name, _ in ATTRIBUTES if e.get(key) is not None)
        for e in record.get("evals", [])
    )
    if evals:
        lines += ["", f"Evaluations during training (EMA weights, seed 0, decoded by the run's VAE as it was at that point): {evals}."]
    lines += ["", "Seed 0, per prompt:", "", "| prompt | colour seen | shape seen | direction seen | wrong |", "|---|---|---|---|---|"]
    for r in m["per_prompt"]:
        wrong = [k for k in ("colour", "shape", "direction") if not r.get(f"{k}_ok", True)]
        if r.get("background_steady") is False:
            wrong.append("background not steady")
        lines.append(f"| {r['prompt']} | {r['colour'] or 'none'} | {r.get('shape') or 'none'} | "
                     f"{r['direction'] or 'no clear line'} | {', '.join(wrong) or '—'} |")
    cos = m["velocity_cosine_mean"]
    lines += ["", "Velocity cosine, mean over the prompts, per step (step i = cos(v_i, v_i+1)): "
              + ", ".join(f"{v:.3f}" for v in cos) + "."]
    if m.get("velocity_cosine_every_step_mean"):
        lines += ["", f"The dip at step {m['first_guided_step']} is where guidance starts (v changes from the prompt's "
                  "velocity to the CFG velocity). With CFG 7 at every step (the paper's Figure 5 setting): "
                  + ", ".join(f"{v:.3f}" for v in m["velocity_cosine_every_step_mean"]) + "."]
    return "\n".join(lines)


def update_doc(doc: Path, record: dict) -> None:
    """Replace the block between the markers in ``doc`` with the record's figures."""
    text = doc.read_text()
    if DOC_BEGIN not in text or DOC_END not in text:
        raise ValueError(f"{doc}: markers {DOC_BEGIN!r} ... {DOC_END!r} not found")
    head, rest = text.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    doc.write_text(head + DOC_BEGIN + "\n" + figures_markdown(record) + "\n" + DOC_END + tail)


def plot_velocity_cosine(
    cos: np.ndarray, path: Path, title: str, every_step: np.ndarray | None = None, first_guided: int | None = None
) -> None:
    """Per-prompt and mean cosines of the default sampler; ``every_step``: the mean with CFG at
    every step (the paper's Figure 5 setting) as a second line; ``first_guided``: the step at
    which the guidance interval begins (marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, cos.shape[1] + 1)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for row in cos:
        ax.plot(steps, row, color="tab:blue", alpha=0.15, lw=0.8)
    label = "mean over the 24 prompts" + (" (default: guidance interval)" if every_step is not None else "")
    ax.plot(steps, cos.mean(axis=0), color="tab:red", lw=2, label=label)
    if every_step is not None:
        ax.plot(steps, every_step.mean(axis=0), color="black", lw=1.5, ls="--", label="mean, CFG 7 at every step")
    if first_guided is not None:
        ax.axvline(first_guided, color="grey", lw=0.8, ls=":")
        ax.text(first_guided + 0.3, 0.05, "guidance starts", fontsize=7, color="grey")
    ax.set_xlabel("step i (cosine of v_i and v_i+1)")
    ax.set_ylabel("cosine similarity")
    ax.set_ylim(min(0.0, float(cos.min())) - 0.02, 1.01)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def sample_strip(videos: np.ndarray, prompts: list[str], path: Path, frames=(0, 4, 8, 12, 16)) -> None:
    """One row per video (frames side by side with a gap), prompt written above the row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(videos)
    fig, axes = plt.subplots(n, 1, figsize=(len(frames) * 1.1, n * 1.35), dpi=110)
    for ax, video, prompt in zip(np.atleast_1d(axes), videos, prompts):
        gap = np.full((video.shape[1], 3, 3), 255, np.uint8)
        row = np.concatenate([np.concatenate([video[f], gap], axis=1) for f in frames], axis=1)
        ax.imshow(row)
        ax.set_title(prompt, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


