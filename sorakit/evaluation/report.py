"""Markdown tables, JSON and PNG charts of bench and eval results."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from sorakit.adherence import STEADINESS


def machine() -> dict[str, Any]:
    import os

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import onnxruntime

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "system": platform.platform()}


def _f(v, fmt="{:.2f}") -> str:
    if v is None:
        return "-"
    try:
        return fmt.format(v)
    except (TypeError, ValueError):
        return str(v)


def bench_markdown(res: dict[str, Any], command: str) -> str:
    rows = res["rows"]
    lines = [f"Command: `{command}`", "", f"Model: {res['preset']}, {res['geometry']['height']}x{res['geometry']['width']}, "
             f"{res['geometry']['num_frames']} frames, {res['settings']['steps']} steps; prompt "
             f"\"{res['settings']['prompt']}\". Every row ran {res['settings'].get('rounds', 1)} times in rounds (a fresh "
             "process each time, every row once per round); times are its fastest round, peak RSS its largest.", ""]
    lines += ["**Latency per component (Table 1 style), seconds**", "",
              "| row | text encoder | transformer per call | transformer calls | transformer total | VAE decoder | total |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        s = r["seconds"]
        lines.append(f"| {name} | {_f(s['text_encoder'])} | {_f(s['transformer_per_call'], '{:.3f}')} | "
                     f"{r['transformer_calls']} | {_f(s['transformer'])} | {_f(s['vae'])} | {_f(s['total'])} |")
    lines += ["", f"**Ablation (Table 5 style)** — CI-DL budget {res['memory_budget_bytes'] / 1e6:.1f} MB "
              f"({res['settings']['budget_fraction']:.0%} of the transformer's {res['transformer_bytes'] / 1e6:.1f} MB)", "",
              "| row | total s | speed-up vs torch | speed-up vs ORT fp32 | transformer speed-up vs torch | peak RSS MB | "
              "SSIM vs ORT fp32 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {_f(r['seconds']['total'])} | {_f(r.get('speedup_vs_torch'))}x | {_f(r.get('speedup_vs_ort'))}x | "
            f"{_f(r.get('transformer_speedup_vs_torch'))}x | {r['peak_rss_bytes'] / 1e6:.0f} | "
            f"{_f(r.get('ssim_vs_ort_fp32'), '{:.3f}')} |")
    return "\n".join(lines) + "\n"


def _guidance(max_t) -> str:
    return f" at t <= {max_t:g} (guidance interval; the prompt's velocity alone above)" if max_t else ""


def eval_markdown(res: dict[str, Any], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"Model: {res['preset']}; {len(res['prompts'])} prompts x {len(res['seeds'])} seeds, {res['steps']} steps, "
             f"CFG {res['cfg']}{_guidance(res.get('cfg_max_t'))}. Every row is compared with the full-step fp32 video of the same prompt and seed; "
             f"transformer time is the fastest of {res.get('timing_repeats', 1)} runs, taken in rounds that run every setting once.", "",
             "| setting | SSIM | min SSIM | PSNR dB | flicker | transformer calls | transformer speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"].values():
        lines.append(f"| {r['name']} | {r['ssim']:.4f} | {r['ssim_min']:.4f} | {_f(r['psnr_db'], '{:.1f}')} | "
                     f"{r['flicker']:.2f} | {r['transformer_calls']} | {_f(r['transformer_speedup'])}x |")
    if res.get("adherence"):
        lines += ["", "**Adherence** (24 evaluation prompts, colour, shape and direction judged from the frames)", "",
                  "| setting | colour correct | shape correct | direction correct | colour and direction | background steady | "
                  + " | ".join(what.split(" (")[0] for _, what in STEADINESS) + " |",
                  "|---|---:|---:|---:|---:|---:|" + "---:|" * len(STEADINESS)]
        for name, a in res["adherence"].items():
            steady = " | ".join(_f(a.get(key), "{:.0%}") for key, _ in STEADINESS)
            lines.append(f"| {name} | {a['colour_acc']:.0%} | {_f(a.get('shape_acc'), '{:.0%}')} | {a['direction_acc']:.0%} | "
                         f"{a['both_acc']:.0%} | {_f(a.get('background_steady_acc'), '{:.0%}')} | {steady} |")
        lines += ["", "Beside the score, each 100 % on the training clips: "
                  + "; ".join(what for _, what in STEADINESS) + "."]
    cos = [c for c in res["velocity_cosine"] if c is not None]
    if cos:
        lines += ["", f"Cosine of consecutive CFG velocities: step 1 {cos[0]:.3f}, middle {cos[len(cos) // 2]:.3f}, "
                  f"last {cos[-1]:.4f} (plot: velocity_cosine.png)."]
    return "\n".join(lines) + "\n"


def write(out: Path, stem: str, res: dict[str, Any], markdown: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    res = {**res, "machine": machine()}
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=float))
    (out / f"{stem}.md").write_text(markdown)
    return [out / f"{stem}.json", out / f"{stem}.md"]


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def bench_chart(res: dict[str, Any], path: Path) -> Path | None:
    plt = _plt()
    if plt is None:
        return None
    names = list(res["rows"])
    parts = ("text_encoder", "transformer", "vae")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    left = [0.0] * len(names)
    for part, colour in zip(parts, ("#6c8ebf", "#d79b00", "#82b366")):
        vals = [res["rows"][n]["seconds"][part] for n in names]
        ax.barh(names, vals, left=left, color=colour, label=part.replace("_", " "))
        left = [a + b for a, b in zip(left, vals)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("latency by component")
    ax.legend()
    rss = [res["rows"][n]["peak_rss_bytes"] / 1e6 for n in names]
    ax2.barh(names, rss, color="#9673a6")
    ax2.invert_yaxis()
    ax2.set_xlabel("peak RSS, MB")
    ax2.set_title("memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def eval_charts(res: dict[str, Any], out: Path) -> list[Path]:
    plt = _plt()
    if plt is None:
        return []
    paths = []
    cos = res["velocity_cosine"]
    if any(c is not None for c in cos):
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [i for i, c in enumerate(cos) if c is not None]
        ax.plot(xs, [cos[i] for i in xs], marker="o")
        ax.set_xlabel("denoising step")
        ax.set_ylabel("cosine(v_k, v_k-1)")
        ax.set_title("consecutive CFG velocities (cf. On-device Sora Fig. 5)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "velocity_cosine.png", dpi=110)
        plt.close(fig)
        paths.append(out / "velocity_cosine.png")
    rows = [r for k, r in res["rows"].items() if k != "reference"]
    if rows:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for r in rows:
            ax.scatter(r["transformer_speedup"], r["ssim"])
            ax.annotate(r["name"], (r["transformer_speedup"], r["ssim"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("transformer speed-up vs 30-step fp32")
        ax.set_ylabel("SSIM vs 30-step fp32")
        ax.set_title("quality vs speed")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "quality_vs_speed.png", dpi=110)
        plt.close(fig)
        paths.append(out / "quality_vs_speed.png")
    return paths
