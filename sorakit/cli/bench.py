"""`sorakit bench` (speed) and `sorakit eval` (quality, adherence) on a bundle."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from sorakit.cli._common import console, err_console
from sorakit.errors import SorakitError


def _bundle_or_default(bundle: Path | None) -> tuple[Path, bool]:
    if bundle is not None:
        return bundle, False
    from sorakit.runtime.default_model import default_bundle

    return default_bundle(notice=lambda msg: err_console.print(f"note: {msg}", highlight=False, markup=False)), True


def bench(
    bundle: Annotated[Path | None, typer.Option(help="Bundle to measure (default: the shipped model)")] = None,
    out: Annotated[Path, typer.Option(help="Directory for bench.md, bench.json, bench.png")] = Path("bench-results"),
    steps: Annotated[int, typer.Option(help="Denoising steps of every row")] = 30,
    threads: Annotated[int | None, typer.Option(help="Threads for ORT sessions and torch (default: all cores)")] = None,
    torch_row: Annotated[bool, typer.Option("--torch/--no-torch", help="Include the PyTorch eager baseline")] = True,
    prompt: Annotated[str, typer.Option(help="Prompt of every row")] = "a red circle moving right on a black background",
    work: Annotated[Path | None, typer.Option(help="Keep the optimised variant bundles here (reused next time)")] = None,
    rounds: Annotated[int, typer.Option(help="Run every row this many times, in rounds; each keeps its fastest")] = 3,
) -> None:
    """Latency per component and the LPL/TDTM/CI-DL/int8 ablation, as ratios from one run."""
    from sorakit.evaluation.bench import BenchSettings, run_bench
    from sorakit.evaluation.report import bench_chart, bench_markdown, write

    if rounds < 1:
        raise SorakitError(f"--rounds must be at least 1, got {rounds}")
    bundle, _ = _bundle_or_default(bundle)
    settings = BenchSettings(prompt=prompt, steps=steps, threads=threads, torch_row=torch_row, rounds=rounds)
    res = run_bench(bundle, settings, work, progress=lambda s: err_console.print(f"[dim]{s}[/]"))
    cmd = "sorakit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    md = bench_markdown(res, cmd)
    write(out, "bench", res, md)
    bench_chart(res, out / "bench.png")
    console.print(md)
    console.print(f"wrote {out}/bench.md, bench.json, bench.png")


def evaluate(
    bundle: Annotated[Path | None, typer.Option(help="Bundle to evaluate (default: the shipped model)")] = None,
    out: Annotated[Path, typer.Option(help="Directory for eval.md, eval.json and the plots")] = Path("eval-results"),
    steps: Annotated[int, typer.Option(help="Steps of the reference and of every setting")] = 30,
    prompts: Annotated[int, typer.Option(help="How many of the fixed quality prompts to use (1-4)")] = 4,
    seeds: Annotated[int, typer.Option(help="Seeds per prompt")] = 1,
    lpl: Annotated[str, typer.Option(help="LPL settings to compare, comma-separated")] = "10,15,20,25,dynamic",
    tdtm: Annotated[str, typer.Option(help="TDTM merge-step counts to compare, comma-separated")] = "5,10,15,20,25,30",
    precisions: Annotated[str, typer.Option(help="Precisions to compare: fp16,int8")] = "fp16,int8",
    adherence: Annotated[bool | None, typer.Option("--adherence/--no-adherence",
                                                   help="Score the 24 adherence prompts (default: on for the shipped model)")] = None,
    work: Annotated[Path | None, typer.Option(help="Keep the optimised variant bundles here")] = None,
    repeats: Annotated[int, typer.Option(help="Time each setting this many times and keep the fastest")] = 3,
    cfg_max_t: Annotated[float | None, typer.Option(help="Guidance interval of every run: CFG only at timesteps <= T (default: the bundle's; 1000 = every step)")] = None,
) -> None:
    """SSIM/PSNR of LPL, TDTM, fp16 and int8 against the full-step fp32 output; adherence; Figure 5."""
    from sorakit.evaluation.quality import EvalSettings, run_eval
    from sorakit.evaluation.report import eval_charts, eval_markdown, write

    bundle, is_default = _bundle_or_default(bundle)
    s = EvalSettings(steps=steps)
    if not 1 <= prompts <= len(s.prompts):
        raise SorakitError(f"--prompts must be between 1 and {len(s.prompts)}")
    s.prompts = s.prompts[:prompts]
    s.seeds = list(range(seeds))
    if repeats < 1:
        raise SorakitError(f"--repeats must be at least 1, got {repeats}")
    s.timing_repeats = repeats
    s.lpl = [x.strip() for x in lpl.split(",") if x.strip()]
    try:
        s.tdtm = [int(x) for x in tdtm.split(",") if x.strip()]
    except ValueError:
        raise SorakitError(f"--tdtm expects step counts like 5,10,15, got {tdtm!r}") from None
    s.precisions = [x.strip() for x in precisions.split(",") if x.strip()]
    bad = [p for p in s.precisions if p not in ("fp16", "int8")]
    if bad:
        raise SorakitError(f"unknown precision {bad[0]!r}; use fp16 and/or int8")
    s.adherence = is_default if adherence is None else adherence
    s.adherence_rows = [r for r in s.adherence_rows if r in ("reference", "cfg every step") or
                        r.split()[0] in ("lpl", "tdtm") or r in s.precisions]
    if cfg_max_t is not None and not cfg_max_t > 0:
        raise SorakitError(f"--cfg-max-t must be a positive timestep (1000 = guidance at every step), got {cfg_max_t}")
    s.cfg_max_t = cfg_max_t
    res = run_eval(bundle, s, work, progress=lambda msg: err_console.print(f"[dim]{msg}[/]"))
    cmd = "sorakit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    md = eval_markdown(res, cmd)
    write(out, "eval", res, md)
    eval_charts(res, out)
    console.print(md)
    console.print(f"wrote {out}/eval.md, eval.json, velocity_cosine.png, quality_vs_speed.png")
