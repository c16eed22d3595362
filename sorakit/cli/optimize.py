"""`sorakit optimize`: graph passes over a bundle, each verified, into a new bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sorakit import validate
from sorakit.cli._common import BundleArg, JsonOpt, console, err_console, parse_resolution, print_json, progress_bar
from sorakit.errors import InvalidArgument, SorakitError
from sorakit.units import human_bytes


def optimize(
    bundle: BundleArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to write (the input is not modified)")],
    passes: Annotated[str | None, typer.Option(help="Comma-separated: pin, text_tokens, caption_tokens, tdtm, "
                                                    "fuse_gelu, prune, fold_pad, conv3d_to_2d, split_dims, "
                                                    "t5_embed_outside, simplify, fp16, int8 (docs/graph-passes.md)")] = None,
    device: Annotated[str | None, typer.Option(help="Apply a device profile's passes (e.g. iphone-15-pro)")] = None,
    resolution: Annotated[str | None, typer.Option(help="pin: HEIGHTxWIDTH")] = None,
    frames: Annotated[int | None, typer.Option(help="pin: frame count")] = None,
    tdtm_positions: Annotated[str, typer.Option(help="tdtm: RoPE positions of merged frames, midpoint or compressed")] = "midpoint",
    tdtm_scope: Annotated[str, typer.Option(help="tdtm: merge around the attentions only (attention, the paper) "
                                                 "or around the MLPs too (block, faster)")] = "attention",
    fp16_islands: Annotated[str, typer.Option(help="fp16: ops kept in fp32; auto (try none, norms, safe and keep the "
                                                  "first that passes the gate), none, norms, safe or OP,OP,...")] = "auto",
    gate: Annotated[list[str] | None, typer.Option(help="Quality gate override, NAME=MIN_SSIM (e.g. int8=0.9)")] = None,
    gate_steps: Annotated[int | None, typer.Option(help="Denoising steps of the gate's videos (default: the bundle's)")] = None,
    force: Annotated[bool, typer.Option(help="Apply a lossy pass even when it fails its quality gate")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Rewrite a bundle's graphs: TDTM, pruning, precision, shape pinning."""
    from sorakit.bundle.io import Bundle
    from sorakit.graph_passes.pipeline import optimize_bundle
    from sorakit.graph_passes.registry import plan_passes
    from sorakit.profiles import get_profile

    # options first, before the bundle is read
    out = validate.output_dir(out, "--out")
    if resolution is not None:
        validate.resolution(resolution, "--resolution")
    if frames is not None:
        validate.frames(frames, "--frames")
    if gate_steps is not None:
        validate.steps(gate_steps, "--gate-steps")
    gates = {}
    for g in gate or []:
        key, sep, val = g.partition("=")
        try:
            gates[key.strip()] = validate.number(f"--gate {g!r}", float(val), min=0.0, max=1.0)
        except ValueError as e:
            raise InvalidArgument(f"--gate expects NAME=MIN_SSIM with MIN_SSIM in [0, 1], got {g!r}"
                                  + (f" ({e})" if sep and isinstance(e, SorakitError) else "")) from None
    plan = plan_passes(Bundle.open(bundle).manifest, passes, get_profile(device) if device else None)
    if plan.already:
        err_console.print(f"note: the bundle already carries {', '.join(plan.already)} of device {device!r}; "
                          "applying the rest", highlight=False)
    if not plan.apply:
        err_console.print(f"nothing to do: {bundle} already carries every pass of device {device!r}; use it as it is",
                          highlight=False)
        return
    names = plan.apply
    settings = {**plan.settings,
                "tdtm": {"positions": tdtm_positions, "scope": tdtm_scope, **plan.settings.get("tdtm", {})},
                "fp16": {"islands": fp16_islands, **plan.settings.get("fp16", {})}}
    if resolution or frames:
        settings["pin"] = {"resolution": parse_resolution(resolution) if resolution else None, "frames": frames}
    with progress_bar() as bar:
        tasks = {}

        def on_progress(name, i, n):
            if name not in tasks:
                tasks[name] = bar.add_task(f"pass {name}", total=n)
            bar.update(tasks[name], completed=i, total=n)

        report = optimize_bundle(bundle, out, names, settings, gates, force, gate_steps, on_progress)
    if as_json:
        print_json({"out": str(out), "passes": [r.to_dict() for r in report.records]})
        return
    for r in report.records:
        table = Table(title=f"pass {r.name} {r.settings if any(r.settings.values()) else ''}".strip())
        for col in ("graph", "nodes", "bytes", "check", "note"):
            table.add_column(col)
        for c in r.changes:
            check = f"max err {c.max_abs_err:.1e}" if c.max_abs_err is not None else ""
            table.add_row(c.graph, f"{c.nodes_before} -> {c.nodes_after}",
                          f"{human_bytes(c.bytes_before)} -> {human_bytes(c.bytes_after)}", check, c.note)
        console.print(table)
        for c in r.changes:
            if c.note.startswith("left unchanged"):
                err_console.print(f"[yellow]{r.name}: {c.graph} {c.note}[/]", highlight=False)
        if r.gate:
            gt = r.gate
            if "skipped" in gt:
                console.print(f"  quality gate skipped: {gt['skipped']}")
            else:
                verdict = "passed" if gt["passed"] else "FAILED (forced)"
                for at in gt.get("attempts", []):
                    console.print(f"  quality gate with {at['settings']}: mean SSIM {at['value']:.4f} < "
                                  f"{gt['threshold']} -> tried the next setting", highlight=False)
                right = ", ".join(f"{k} {v['before']} -> {v['after']}" for k, v in gt.get("adherence", {}).items())
                console.print(f"  quality gate ({gt['compared']}): mean SSIM {gt['value']:.4f} (min {gt['min']:.4f}), "
                              f"PSNR {gt['psnr_db']:.1f} dB, threshold {gt['threshold']}; prompts followed "
                              f"(of {len(gt['prompts'])}): {right} -> {verdict}")
    console.print(f"wrote {out}")
