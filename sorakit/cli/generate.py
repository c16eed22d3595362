"""`sorakit generate`: prompt -> video file, on ONNX Runtime (no torch needed with --bundle)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sorakit.cli._common import DeviceOpt, JsonOpt, console, err_console, print_json, progress_bar
from sorakit.errors import SorakitError
from sorakit.units import human_bytes


def generate(
    prompt: Annotated[str, typer.Argument(help="What the video should show")],
    bundle: Annotated[Path | None, typer.Option(help="Bundle directory; default: the model shipped with sorakit")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output video (.mp4 or .gif)")] = Path("video.mp4"),
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: the bundle's, 30)")] = None,
    cfg: Annotated[float | None, typer.Option(help="Classifier-free guidance scale (default: the bundle's, 7.0)")] = None,
    cfg_max_t: Annotated[float | None, typer.Option(help="Guidance interval: CFG only at timesteps <= T, the prompt alone above (default: the bundle's; 1000 = every step)")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise")] = 0,
    lpl: Annotated[str, typer.Option(help="Linear Proportional Leap: off, N (N steps then a leap), dynamic[:start=14,tol=1e-3,patience=3]")] = "off",
    tdtm_steps: Annotated[int, typer.Option(help="Use the TDTM (token-merged) blocks for the first N steps")] = 0,
    memory_budget: Annotated[str | None, typer.Option(help="Memory for model blocks, e.g. 2GB, 40% or unlimited (default: the device's)")] = None,
    device: DeviceOpt = "cpu",
    strict: Annotated[bool, typer.Option(help="Refuse to fall back from the device's execution provider")] = False,
    threads: Annotated[int | None, typer.Option(help="Intra-op threads per session (default: the device's)")] = None,
    prefetch: Annotated[bool, typer.Option(help="Build the next block's session while the current one runs")] = True,
    fps: Annotated[int, typer.Option(help="Frames per second of the written video")] = 24,
    as_json: JsonOpt = False,
) -> None:
    """Generate a video from a text prompt."""
    from sorakit.runtime.pipeline import Pipeline
    from sorakit.runtime.sampler import LPL
    from sorakit.runtime.video import save_video

    if not prompt.strip():
        raise SorakitError("the prompt is empty; describe the video to generate")
    if out.suffix.lower() not in (".mp4", ".gif"):
        raise SorakitError(f"cannot write {out.name}: use a .mp4 or .gif file name")
    if not out.parent.exists():
        raise SorakitError(f"output directory {out.parent} does not exist")
    LPL.parse(lpl)  # fail on a bad setting before loading anything
    using_default = bundle is None
    if using_default:
        from sorakit.runtime.default_model import default_bundle

        bundle = default_bundle(notice=lambda msg: err_console.print(f"note: {msg}", highlight=False, markup=False))

    pipe = Pipeline.from_bundle(bundle, device=device, memory_budget=memory_budget, strict=strict,
                                threads=threads, prefetch=prefetch)
    with progress_bar() as bar:
        tasks = {}

        def on_progress(p):
            label = {"text": "text encoder", "denoise": "denoising", "decode": "VAE decoder"}[p.stage]
            if p.stage not in tasks:
                tasks[p.stage] = bar.add_task(label, total=p.total)
            bar.update(tasks[p.stage], completed=p.index, total=p.total)

        result = pipe(prompt, steps=steps, cfg=cfg, cfg_max_t=cfg_max_t, seed=seed, lpl=lpl, tdtm_steps=tdtm_steps, callback=on_progress)
    save_video(result.frames, out, fps=fps)
    pipe.close()
    notes = list(result.notes)
    if using_default and any("unknown to the tokenizer" in n for n in notes):
        from sorakit.runtime.default_model import DEFAULT_MODEL_NOTE

        notes.append(DEFAULT_MODEL_NOTE)
    summary = {
        "output": str(out),
        "frames": list(result.frames.shape),
        "seconds": result.timings.to_dict(),
        "transformer_calls": result.sampling.model_calls,
        "leap_step": result.sampling.leap_step[0],
        "peak_rss_bytes": result.memory.peak_rss,
        "loads": result.memory.loads,
        "bytes_loaded": result.memory.bytes_loaded,
        "load_seconds_exposed": result.memory.load_exposed,
        "load_seconds_hidden": result.memory.load_hidden,
        "notes": notes,
    }
    if as_json:
        print_json(summary)
        return
    for n in notes:
        err_console.print(f"[yellow]note:[/] {n}", highlight=False)
    t = result.timings
    table = Table(title=f"wrote {out}  ({result.frames.shape[0]} frames, {result.frames.shape[2]}x{result.frames.shape[1]})")
    table.add_column("component")
    table.add_column("seconds", justify="right")
    table.add_column("detail")
    table.add_row("text encoder", f"{t.text_encoder:.2f}", "")
    per = (sum(t.transformer_steps) / len(t.transformer_steps)) if t.transformer_steps else 0
    table.add_row("transformer", f"{t.transformer:.2f}", f"{result.sampling.model_calls} calls, {per:.3f} s each")
    table.add_row("VAE decoder", f"{t.vae:.2f}", "")
    table.add_row("total", f"{t.total:.2f}",
                  f"peak RSS {human_bytes(result.memory.peak_rss)}, {result.memory.loads} loads "
                  f"({human_bytes(result.memory.bytes_loaded)}), load time exposed {result.memory.load_exposed:.2f} s")
    console.print(table)
