"""`sorakit bench` (speed) and `sorakit eval` (quality, adherence) on a bundle."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from sorakit import validate
from sorakit.cli._common import console, err_console, note, styled
from sorakit.errors import InvalidArgument, SorakitError

DEFAULT_LPL = "10,15,20,25,dynamic"
DEFAULT_TDTM = "5,10,15,20,25,30"


def _fits(check) -> bool:
    try:
        check()
    except SorakitError:
        return False
    return True


def _bundle_or_default(bundle: Path | None) -> tuple[Path, bool]:
    if bundle is not None:
        return bundle, False
    from sorakit.runtime.default_model import default_bundle

    return default_bundle(notice=note), True


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

    out = validate.output_dir(out, "--out")
    if work is not None:
        validate.output_dir(work, "--work")
    validate.steps(steps, "--steps")
    if threads is not None:
        validate.threads(threads, "--threads")
    validate.integer("--rounds", rounds, min=1, max=100)
    validate.prompt(prompt, "--prompt")
    bundle, _ = _bundle_or_default(bundle)
    settings = BenchSettings(prompt=prompt, steps=steps, threads=threads, torch_row=torch_row, rounds=rounds)
    res = run_bench(bundle, settings, work, progress=lambda s: err_console.print(styled(s, "dim")))
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
    lpl: Annotated[str | None, typer.Option(help=f"LPL settings to compare, comma-separated (default: those of "
                                                  f"{DEFAULT_LPL} that fit --steps)")] = None,
    tdtm: Annotated[str | None, typer.Option(help=f"TDTM merge-step counts to compare, comma-separated (default: "
                                                   f"those of {DEFAULT_TDTM} that fit --steps)")] = None,
    precisions: Annotated[str | None, typer.Option(help="Precisions to compare: fp16,int8,bf16 (bf16: OpenVINO; default: all three where OpenVINO is installed)")] = None,
    adherence: Annotated[bool | None, typer.Option("--adherence/--no-adherence",
                                                   help="Score the 24 adherence prompts (default: on for the shipped model)")] = None,
    work: Annotated[Path | None, typer.Option(help="Keep the optimised variant bundles here")] = None,
    repeats: Annotated[int, typer.Option(help="Time each setting this many times and keep the fastest")] = 3,
    cfg_max_t: Annotated[float | None, typer.Option(help="Guidance interval of every run: CFG only at timesteps <= T (default: the bundle's; 1000 = every step)")] = None,
    step_cache: Annotated[str, typer.Option(help="Step-cache thresholds to compare, comma-separated ('' for none)")] = "0.1,0.2,0.4",
    best: Annotated[bool, typer.Option("--best/--no-best", help="Measure sorakit's fastest settings as a whole (sorakit.evaluation.best), with their adherence")] = True,
) -> None:
    """SSIM/PSNR of LPL, TDTM, fp16 and int8 against the full-step fp32 output; adherence; Figure 5."""
    from sorakit.evaluation.quality import EvalSettings, run_eval
    from sorakit.evaluation.report import eval_charts, eval_markdown, write
    from sorakit.runtime.validate import lpl_setting

    out = validate.output_dir(out, "--out")
    if work is not None:
        validate.output_dir(work, "--work")
    s = EvalSettings(steps=validate.steps(steps, "--steps"))
    validate.integer("--prompts", prompts, min=1, max=len(s.prompts))
    s.prompts = s.prompts[:prompts]
    s.seeds = list(range(validate.integer("--seeds", seeds, min=1, max=1000)))
    s.timing_repeats = validate.integer("--repeats", repeats, min=1, max=100)
    if lpl is None:  # the defaults that fit the schedule
        s.lpl = [x for x in DEFAULT_LPL.split(",") if _fits(lambda x=x: lpl_setting(x, steps))]
    else:
        s.lpl = [x.strip() for x in lpl.split(",") if x.strip()]
        for spec in s.lpl:
            lpl_setting(spec, steps, "--lpl")
    tdtm_items = [x.strip() for x in (tdtm if tdtm is not None else DEFAULT_TDTM).split(",") if x.strip()]
    if not all(x.isascii() and x.isdigit() for x in tdtm_items):
        raise InvalidArgument(f"--tdtm expects step counts like 5,10,15, got {tdtm!r}")
    if tdtm is None:
        tdtm_items = [x for x in tdtm_items if int(x) <= steps]
    s.tdtm = [validate.integer("--tdtm", int(x), min=1, max=steps) for x in tdtm_items]
    if precisions is None:
        import importlib.util

        precisions = "fp16,int8" + (",bf16" if importlib.util.find_spec("openvino") else "")
    s.precisions = [x.strip() for x in precisions.split(",") if x.strip()]
    bad = [p for p in s.precisions if p not in ("fp16", "int8", "bf16")]
    if bad:
        raise SorakitError(f"unknown precision {bad[0]!r}; use fp16, int8 and/or bf16")
    s.cfg_max_t = None if cfg_max_t is None else validate.timestep_bound(cfg_max_t, "--cfg-max-t")
    items = [x.strip() for x in step_cache.split(",") if x.strip()]
    try:
        s.step_cache = [validate.number("--step-cache", float(x), min=0.0, min_open=True, max=10.0) for x in items]
    except ValueError as e:
        raise InvalidArgument(f"--step-cache expects thresholds like 0.1,0.2 (each in (0, 10]), got {step_cache!r}"
                              + (f": {e}" if isinstance(e, SorakitError) else "")) from None
    bundle, is_default = _bundle_or_default(bundle)
    s.adherence = is_default if adherence is None else adherence
    s.adherence_rows = [r for r in s.adherence_rows if r in ("reference", "cfg every step") or r in s.precisions
                        or r.startswith("cache ") and float(r.split()[1]) in s.step_cache
                        or r.startswith("lpl ") and _fits(lambda r=r: lpl_setting(r.split()[1], steps))
                        or r.startswith("tdtm ") and int(r.split()[1]) <= steps]
    if best:
        from sorakit.evaluation.best import best as best_settings

        b = best_settings()
        if _fits(lambda: lpl_setting(b.get("lpl"), steps)) and b.get("tdtm_steps", 0) <= steps:
            s.combined["best"] = b
            if s.adherence:
                s.adherence_rows.append("best")
        else:
            note(f"the 'best' row (lpl {b.get('lpl')}, {b.get('tdtm_steps', 0)} TDTM steps) does not fit "
                 f"--steps {steps}; it is left out")
    res = run_eval(bundle, s, work, progress=lambda msg: err_console.print(styled(msg, "dim")))
    cmd = "sorakit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    md = eval_markdown(res, cmd)
    write(out, "eval", res, md)
    eval_charts(res, out)
    console.print(md)
    console.print(f"wrote {out}/eval.md, eval.json, velocity_cosine.png, quality_vs_speed.png")
