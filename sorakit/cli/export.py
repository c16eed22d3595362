"""`sorakit export` (checkpoint -> bundle) and `sorakit inspect` (a bundle, readably)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from sorakit import validate
from sorakit.cli._common import BundleArg, JsonOpt, console, print_json, progress_bar, styled
from sorakit.errors import InvalidArgument, SorakitError
from sorakit.presets import PRESETS
from sorakit.units import human_bytes

COMPONENT_NAMES = ("text_encoder", "transformer", "vae")
MIN_OPSET = 17  # LayerNormalization
MAX_OPSET = {"torchscript": 20, "dynamo": 23}  # what torch's exporters write


def check_granularity(text: str, depth: int) -> str:
    """--granularity: pair, single, or a number of block pairs per graph in [1, depth]."""
    if text in ("pair", "single"):
        return text
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= depth:
        raise InvalidArgument(f"--granularity {text!r} must be pair, single or a number of block pairs "
                              f"from 1 to {depth}")
    return str(int(text))


def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to write")],
    preset: Annotated[str, typer.Option(help=f"Model preset: {', '.join(PRESETS)}")] = "opensora-v1.2",
    transformer: Annotated[Path | None, typer.Option(help="STDiT3 checkpoint directory or file")] = None,
    vae: Annotated[Path | None, typer.Option(help="VAE checkpoint directory or file")] = None,
    text_encoder: Annotated[Path | None, typer.Option(help="T5 encoder checkpoint directory (with its tokenizer)")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="tokenizer.json to ship (default: from --text-encoder)")] = None,
    resolution: Annotated[str | None, typer.Option(help="HEIGHTxWIDTH in pixels (default: the preset's)")] = None,
    frames: Annotated[int | None, typer.Option(help="Frame count (default: the preset's)")] = None,
    components: Annotated[str, typer.Option(help="Comma-separated subset of text_encoder,transformer,vae")] = "text_encoder,transformer,vae",
    random_weights: Annotated[bool, typer.Option(help="Deterministic random weights instead of checkpoints")] = False,
    seed: Annotated[int, typer.Option(help="Seed of --random-weights")] = 0,
    dynamic: Annotated[bool, typer.Option(help="Dynamic batch/frame/size dimensions (CPU use; Core ML wants static)")] = False,
    granularity: Annotated[str, typer.Option(help="Transformer graphs: pair (spatial+temporal block), single, or N pairs")] = "pair",
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 18,
    exporter: Annotated[str, typer.Option(help="torchscript or dynamo (torch.export: less memory, but no TDTM on its "
                                                "static graphs; docs/export.md)")] = "torchscript",
    t5_embedding_outside: Annotated[bool, typer.Option(help="Keep T5's token table out of the graph (Core ML: dims > 16384)")] = False,
    verify: Annotated[bool, typer.Option(help="Check every graph against torch, and the bundle end to end")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Export a model to a bundle of per-block ONNX graphs, verified against torch."""
    from sorakit.presets import check_geometry, get_preset

    # every option is checked before torch is imported or anything is written
    p = get_preset(preset)
    comps = tuple(c.strip() for c in components.split(",") if c.strip())
    bad = [c for c in comps if c not in COMPONENT_NAMES]
    if bad or not comps:
        raise InvalidArgument(f"--components {components!r}: unknown components {bad}; "
                              f"choose from {', '.join(COMPONENT_NAMES)}")
    out = validate.output_dir(out, "--out")
    h, w = validate.resolution(resolution, "--resolution") if resolution is not None else p.resolution
    frames = p.num_frames if frames is None else validate.frames(frames, "--frames")
    check_geometry(p, frames, h, w)
    validate.seed(seed, "--seed")
    validate.choice("--exporter", exporter, tuple(MAX_OPSET))
    validate.integer("--opset", opset, min=MIN_OPSET, max=MAX_OPSET["dynamo" if dynamic else exporter])
    granularity = check_granularity(granularity, p.stdit.depth)
    for c, path in (("--transformer", transformer), ("--vae", vae), ("--text-encoder", text_encoder),
                    ("--tokenizer", tokenizer)):
        if path is not None and not path.exists():
            raise InvalidArgument(f"{c} {path} does not exist")
    try:
        from sorakit.export.exporter import ExportSettings, export_bundle
    except ImportError as e:
        raise SorakitError(f"export needs torch and onnx ({e.name} is missing)",
                           hint="pip install 'sorakit[export]'") from None
    given = {"transformer": transformer, "vae": vae, "text_encoder": text_encoder}
    if random_weights:
        if any(given[c] for c in comps):
            raise SorakitError("--random-weights cannot be combined with checkpoint paths")
        checkpoints = {}
    else:
        missing = [c for c in comps if given[c] is None]
        if missing:
            raise SorakitError(
                f"no checkpoint given for {', '.join(missing)}",
                hint="pass " + " ".join(f"--{c.replace('_', '-')} DIR" for c in missing) + " or --random-weights",
            )
        checkpoints = {c: given[c] for c in comps}
    settings = ExportSettings(p, h, w, frames, static=not dynamic, granularity=granularity,
                              opset=opset, exporter=exporter, components=comps, verify=verify, seed=seed,
                              t5_lookup_outside=t5_embedding_outside)
    with progress_bar() as bar:
        tasks = {}

        def on_progress(component, i, n, result):
            if component not in tasks:
                tasks[component] = bar.add_task(component, total=n)
            bar.update(tasks[component], completed=i)

        report = export_bundle(settings, out, checkpoints, progress=on_progress, tokenizer_source=tokenizer)
    rows = [
        {"graph": r.entry.name, "params": r.entry.params, "max_abs_err": r.max_abs_err, "psnr_db": r.psnr,
         "skipped": r.skipped, "seconds": r.seconds}
        for r in report.pieces
    ]
    if as_json:
        print_json({"out": str(out), "graphs": rows, "chain": report.chain, "end_to_end": report.end_to_end})
        return
    table = Table(title=f"bundle {out}")
    for col in ("graph", "params", "max abs err", "PSNR dB", ""):
        table.add_column(col, justify="right" if col not in ("graph", "") else "left")
    for r in rows:
        err = "-" if r["max_abs_err"] is None else f"{r['max_abs_err']:.2e}"
        psnr = "-" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"
        table.add_row(r["graph"], f"{r['params']:,}", err, psnr, "reused" if r["skipped"] else "")
    console.print(table)
    for comp, c in report.chain.items():
        console.print(f"{comp}: graphs chained in ONNX Runtime vs torch: max abs err {c['max_abs_err']:.2e}, "
                      f"PSNR {c['psnr_db']:.1f} dB")
    if report.end_to_end and "max_abs_err" in report.end_to_end:
        e = report.end_to_end
        console.print(f"end to end (runtime vs torch reference, 2 steps): video max abs err {e['max_abs_err']:.2e}, "
                      f"PSNR {e['psnr_db']:.1f} dB")


def inspect(
    bundle: BundleArg,
    verify: Annotated[bool, typer.Option(help="Hash every file against the manifest")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show a bundle's manifest: model, geometry, graphs, passes, tools."""
    from sorakit.bundle.io import Bundle

    b = Bundle.open(bundle, verify="full" if verify else "lazy")
    m = b.manifest
    if as_json:
        print_json(m.to_dict())
        return
    g = m.geometry
    console.print(Text.assemble(styled(str(bundle), "bold"), "  preset ", styled(str(m.preset["name"]), "bold"),
                                f", bundle format v{m.format_version}"))
    shape = "static" if m.static else "dynamic"
    console.print(f"geometry: {shape}, {g['height']}x{g['width']} px, {g['num_frames']} frames, latent {g['latent']}")
    s = m.sampler
    interval = s.get("guidance_max_t")
    guidance = f" at t <= {interval:g} (guidance interval)" if interval is not None else ""
    console.print(f"sampler: {s['num_steps']} steps, CFG {s['cfg_scale']}{guidance}, timestep transform "
                  f"{'on' if s.get('use_timestep_transform', True) else 'off'}")
    e = m.export
    console.print(f"export: opset {e.get('opset', '?')}, {e.get('exporter', '?')}, granularity "
                  f"{e.get('granularity', '?')}; tools " + ", ".join(f"{k} {v}" for k, v in e.get("tools", {}).items()))
    passes = ", ".join(p["name"] for p in m.passes) or "none"
    console.print(f"passes: {passes}")
    for comp, c in m.components.items():
        table = Table(title=comp)
        for col in ("graph", "role", "inputs", "outputs", "params", "size", "verified", "variants"):
            table.add_column(col)
        for gr in c.graphs:
            size = sum(m.files[f]["bytes"] for f in gr.files() if f in m.files)
            ver = gr.info.get("verification", {})
            vs = f"{ver['max_abs_err']:.1e}" if ver else "-"
            table.add_row(gr.name, gr.role, _specs(gr.inputs), _specs(gr.outputs), f"{gr.params:,}", human_bytes(size),
                          vs, ",".join(gr.variants) or "")
        console.print(table)
    total = sum(r["bytes"] for r in m.files.values())
    console.print(f"{len(m.files)} files, {human_bytes(total)}" + (" — all checksums verified" if verify else ""))


def _specs(specs) -> str:
    return "\n".join(f"{t.name} {t.shape}" + (f" {t.dtype}" if t.dtype != "float32" else "") for t in specs)
