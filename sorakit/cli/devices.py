"""`sorakit devices`, `sorakit audit`, `sorakit package` and `sorakit export-coreml`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from sorakit.cli._common import BundleArg, JsonOpt, console, err_console, print_json, progress_bar
from sorakit.errors import SorakitError
from sorakit.units import human_bytes

DeviceReq = Annotated[str, typer.Option("--device", help="Device profile: cpu, iphone-15-pro, mac, android (or a .toml)")]


def devices(as_json: JsonOpt = False) -> None:
    """List the device profiles: budget, execution providers, shapes, precision, optimize passes."""
    from sorakit.profiles import all_profiles

    profiles = all_profiles()
    if as_json:
        print_json([p.to_dict() for p in profiles])
        return
    table = Table(title="device profiles (sorakit/devices/profiles/*.toml)")
    for col in ("device", "memory budget", "execution providers", "shapes", "precision", "threads", "optimize passes"):
        table.add_column(col)
    for p in profiles:
        eps = "\n".join(
            p_.name.replace("ExecutionProvider", "")
            + (" (" + ", ".join(f"{k}={v}" for k, v in p_.options.items() if k != "ModelCacheDirectory") + ")"
               if p_.options else "")
            for p_ in p.providers)
        table.add_row(p.name, p.memory_budget + (" of available" if p.memory_budget.endswith("%") else ""), eps,
                      "static" if p.static_shapes else "dynamic", p.precision, str(p.threads or "all"),
                      ", ".join(p.passes) or "-")
    console.print(table)


def audit(
    bundle: BundleArg,
    device: DeviceReq = "iphone-15-pro",
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 if any node of any graph would fall back")] = False,
    graphs: Annotated[list[str] | None, typer.Option("--graph", help="Only graphs whose name starts with (or "
                                                                       "matches the glob) this; repeatable")] = None,
    nodes: Annotated[bool, typer.Option("--nodes", help="List every fallback node with its reasons")] = False,
    optimize: Annotated[bool, typer.Option(help="Apply ORT's basic optimizations first (what runs before "
                                                 "partitioning)")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Which nodes of each graph the device's execution provider would take, which fall back to the CPU and why."""
    from sorakit.devices.audit import REASONS, audit_bundle

    with progress_bar(transient=True) as bar:
        task = bar.add_task("audit", total=None)

        def on_progress(name, i, n):
            bar.update(task, total=n, completed=i, description=f"audit {name}")

        report = audit_bundle(bundle, device, only=graphs, optimize=optimize, progress=on_progress)
    if as_json:
        print_json(report.to_dict())
    else:
        _print_audit(report, nodes, REASONS)
    if strict and not report.clean:
        err_console.print(f"[bold red]strict:[/] {len(report.dirty())} graph(s) would not run wholly on "
                          f"{report.provider} ({report.fallback_nodes} node(s) on the CPU)", highlight=False)
        raise typer.Exit(code=1)


def _print_audit(report, nodes: bool, reasons: dict[str, str]) -> None:
    fmt = f" ({report.model_format})" if report.model_format else ""
    title = f"{report.bundle} on {report.device}: {report.provider}{fmt}"
    table = Table(title=title)
    for col in ("graph", "nodes", "on EP", "on CPU", "partitions", "fallback ops", "reasons", ""):
        table.add_column(col, justify="right" if col in ("nodes", "on EP", "on CPU", "partitions") else "left",
                         no_wrap=col in ("graph", ""))
    for g in report.graphs:
        ops = ", ".join(f"{k}×{v}" for k, v in sorted(g.fallback_ops().items()))
        why = ", ".join(f"{k}×{v}" for k, v in sorted(g.reason_counts().items()))
        mark = "[green]clean[/]" if g.clean else "[red]fallback[/]"
        table.add_row(g.graph, str(g.nodes), str(g.nodes_on_ep), str(g.nodes - g.nodes_on_ep), str(g.partitions),
                      ops or "-", why or "-", mark)
    console.print(table)
    clean = sum(g.clean for g in report.graphs)
    console.print(f"{clean}/{len(report.graphs)} graphs clean (one partition, every node on {report.provider}); "
                  f"{report.fallback_nodes} node(s) fall back to the CPU"
                  + (f"; op list: {report.op_list}" if report.op_list else ""), highlight=False)
    used = sorted({r.code for g in report.graphs for f in g.fallbacks for r in f.reasons})
    if used:
        console.print("[bold]reasons[/]")
        for code in used:
            console.print(f"  {code}: {reasons[code]}", highlight=False)
    if nodes:
        for g in report.dirty():
            console.print(f"[bold]{g.graph}[/]")
            for f in g.fallbacks:
                console.print(escape(f"  {f.node} ({f.op}): " + "; ".join(r.detail for r in f.reasons)),
                              highlight=False)
    hints: dict[str, list[str]] = {}
    for g in report.graphs:
        for h in g.hints:
            hints.setdefault(h, []).append(g.graph)
    if hints:
        console.print("[bold]how to fix[/]")
        for h, names in hints.items():
            where = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more"
            console.print(escape(f"  [{where}] {h}"), highlight=False)
    notes: dict[str, int] = {}
    for g in report.graphs:
        for n in g.notes:
            notes[n] = notes.get(n, 0) + 1
    for n, count in notes.items():
        console.print(f"[dim]note ({count} graph{'s' if count > 1 else ''}): {escape(n)}[/]", highlight=False)
    unchecked = sorted({op for g in report.graphs for op in g.unchecked})
    if unchecked:
        console.print(f"[dim]not checked (op-specific limits the audit does not model): {', '.join(unchecked)}[/]")


def package(
    bundle: BundleArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Package directory to write")],
    device: DeviceReq = "iphone-15-pro",
    style: Annotated[str, typer.Option(help="ORT format optimization style: auto (runtime for Core ML/NNAPI "
                                            "devices, fixed for CPU), fixed or runtime")] = "auto",
    strict: Annotated[bool, typer.Option("--strict", help="Refuse if any graph would not run wholly on the "
                                                          "device's EP")] = False,
    verify: Annotated[bool, typer.Option(help="Check every .ort against its .onnx on identical inputs")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Convert a bundle to an ORT Mobile package: .ort graphs, one operator config, an app manifest."""
    from sorakit.devices.package import package_bundle

    with progress_bar(transient=True) as bar:
        tasks: dict[str, int] = {}

        def on_progress(stage, i, n):
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=n)
            bar.update(tasks[stage], completed=i, total=n)

        report = package_bundle(bundle, device, out, style=style, verify=verify, strict=strict, progress=on_progress)
    m = report.manifest
    if as_json:
        print_json({"out": str(out), "device": report.device, "style": report.style, "seconds": report.seconds,
                    "sizes": m["sizes"], "verification": m["verification"], "audit": m["audit"],
                    "graphs": [g.__dict__ for g in report.graphs]})
        return
    table = Table(title=f"package {out} for {report.device} ({report.style} style)")
    for col in ("graph", ".onnx + data", ".ort", ".ort vs .onnx", "EP partitions", ""):
        table.add_column(col, justify="right" if col not in ("graph", "") else "left", no_wrap=col in ("graph", ""))
    for g in report.graphs:
        ver = "-" if g.exact is None else ("identical" if g.exact else f"{g.max_abs_err:.1e}")
        parts = "-" if g.audit is None else str(g.audit["partitions"])
        mark = "" if g.audit is None else ("[green]clean[/]" if g.audit["clean"] else "[yellow]CPU fallback[/]")
        table.add_row(("  " if g.variant_of else "") + g.name, human_bytes(g.onnx_bytes), human_bytes(g.ort_bytes),
                      ver, parts, mark)
    console.print(table)
    s = m["sizes"]
    console.print(
        f"package {human_bytes(s['package_bytes'])} (graphs {human_bytes(s['graphs_bytes'])}); bundle graphs "
        f"{human_bytes(s['bundle_bytes'])}"
        + (f"; {human_bytes(s['duplicated_by_variants'])} of weights duplicated by variants" if
           s["duplicated_by_variants"] else "")
        + f"; largest graph {m['memory']['largest_graph']['name']} {human_bytes(m['memory']['largest_graph']['bytes'])}",
        highlight=False)
    console.print(f"{len(m['required_operators'])} operator lines in required_operators.config; reduced build: "
                  f"{m['ort_format']['reduced_build']}", highlight=False)
    if m["audit"] and m["audit"]["clean_graphs"] < m["audit"]["graphs"]:
        console.print(f"[yellow]{m['audit']['graphs'] - m['audit']['clean_graphs']} graph(s) would partly run on the "
                      f"CPU: see sorakit audit {bundle} --device {report.device}[/]")


def export_coreml(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the .mlpackage files and their manifest")],
    like: Annotated[Path | None, typer.Option(help="A bundle whose preset, geometry, granularity and graph list to "
                                                   "follow (and whose graph specs the packages must match)")] = None,
    preset: Annotated[str | None, typer.Option(help="Model preset (default: the --like bundle's)")] = None,
    transformer: Annotated[Path | None, typer.Option(help="STDiT3 checkpoint directory or file")] = None,
    vae: Annotated[Path | None, typer.Option(help="VAE checkpoint directory or file")] = None,
    text_encoder: Annotated[Path | None, typer.Option(help="T5 encoder checkpoint directory")] = None,
    random_weights: Annotated[bool, typer.Option(help="Deterministic random weights instead of checkpoints")] = False,
    seed: Annotated[int, typer.Option(help="Seed of --random-weights")] = 0,
    resolution: Annotated[str | None, typer.Option(help="HEIGHTxWIDTH (default: the bundle's or preset's)")] = None,
    frames: Annotated[int | None, typer.Option(help="Frame count (default: the bundle's or preset's)")] = None,
    components: Annotated[str | None, typer.Option(help="Comma-separated subset of text_encoder,transformer,vae")] = None,
    granularity: Annotated[str | None, typer.Option(help="Transformer graphs: pair, single or N pairs")] = None,
    precision: Annotated[str, typer.Option(help="fp16 (default, ML Program) or fp32")] = "fp16",
    target: Annotated[str, typer.Option(help="Minimum deployment target: iOS17, iOS18, macOS14, macOS15")] = "iOS17",
    t5_embedding_outside: Annotated[bool | None, typer.Option(help="T5 graph takes inputs_embeds (default: the "
                                                                   "bundle's setting)")] = None,
    graphs: Annotated[list[str] | None, typer.Option("--graph", help="Only graphs whose name starts with this; "
                                                                       "repeatable")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Core ML path: one ML Program .mlpackage per block, converted from the torch pieces (needs coremltools)."""
    try:
        from sorakit.export.coreml import CoreMLSettings
        from sorakit.export.coreml import export_coreml as run
    except ImportError as e:
        raise SorakitError(f"the Core ML path needs torch and coremltools ({e.name} is missing)",
                           hint="pip install 'sorakit[export,coreml]'") from None
    from sorakit.cli._common import parse_resolution

    given = {"transformer": transformer, "vae": vae, "text_encoder": text_encoder}
    if random_weights and any(given.values()):
        raise SorakitError("--random-weights cannot be combined with checkpoint paths")
    settings = CoreMLSettings(
        like=like, preset=preset, resolution=parse_resolution(resolution) if resolution else None,
        num_frames=frames, components=tuple(c.strip() for c in components.split(",") if c.strip())
        if components else None, granularity=granularity, precision=precision, target=target, seed=seed,
        random_weights=random_weights, checkpoints={k: v for k, v in given.items() if v is not None},
        t5_lookup_outside=t5_embedding_outside, only=tuple(graphs) if graphs else None,
    )
    with progress_bar() as bar:
        tasks: dict[str, int] = {}

        def on_progress(component, i, n, _result=None):
            if component not in tasks:
                tasks[component] = bar.add_task(component, total=n)
            bar.update(tasks[component], completed=i)

        report = run(settings, out, progress=on_progress)
    if as_json:
        print_json(report.to_dict())
        return
    table = Table(title=f"Core ML packages in {out} ({report.precision}, {report.target})")
    for col in ("graph", "package", "converted via", "spec vs bundle", "seconds"):
        table.add_column(col, no_wrap=col == "graph")
    for p in report.pieces:
        table.add_row(p.name, p.file, p.method, p.spec_check, f"{p.seconds:.1f}")
    console.print(table)
    console.print(report.numeric_note, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("devices")(devices)
    app.command("audit")(audit)
    app.command("package")(package)
    app.command("export-coreml")(export_coreml)
