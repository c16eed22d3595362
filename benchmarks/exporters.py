"""torch's two ONNX exporters on sorakit's block graphs: TorchScript (the default) vs dynamo.

    python -m benchmarks.exporters --out docs/benchmarks [--targets tiny-block,...] [--repeats 1]

For each target (one piece, deterministic random weights in every tensor) and each exporter, in
a process of its own: the time of ``export_graph`` (trace/export, the TDTM boundary marks, the
save with external data), the peak RSS during it (above the RSS before it, and absolute), the
graph's size (``.onnx`` + ``.data``), its node count as exported and after ``prune``, whether
the TDTM boundaries could be marked (blocks), and the parity of ONNX Runtime against the torch
module on seeded inputs (max abs error). The targets: a block pair and a T5 layer of the tiny
and shapes presets, one real-size STDiT3 block pair (Open-Sora 1.2, 144x256, 17 frames) and one
T5-XXL layer (300 tokens); never a whole real model.

Writes exporters.json, exporters.md and exporters.png into --out. Take the timings on an idle
machine (the repository's CPU_RESERVED convention).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

EXPORTERS = ("torchscript", "dynamo")
# name -> (preset, component, piece, (height, width, frames))
TARGETS = {
    "tiny-block": ("tiny", "transformer", "transformer.block.00", None),
    "tiny-t5-layer": ("tiny", "text_encoder", "text_encoder.layer.00", None),
    "shapes-block": ("shapes", "transformer", "transformer.block.00", None),
    "shapes-t5-layer": ("shapes", "text_encoder", "text_encoder.layer.00", None),
    "stdit3-block": ("opensora-v1.2", "transformer", "transformer.block.00", (144, 256, 17)),
    "t5-xxl-layer": ("opensora-v1.2", "text_encoder", "text_encoder.layer.00", (144, 256, 17)),
}


def _inputs(spec, seed: int = 0) -> tuple:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for io in spec.inputs:
        if io.name == "y_bias":
            a = torch.zeros(*io.shape)
            a[..., io.shape[-1] // 2:] = -1e4
        elif io.name == "position_bias":
            a = torch.randn(*io.shape, generator=g)
            a[..., io.shape[-1] // 2:] = torch.finfo(torch.float32).min  # padded keys, as the embed graph writes
        else:
            a = torch.randn(*io.shape, generator=g)
        out.append(a)
    return tuple(out)


def _warm_up(exporter: str, where: Path) -> float:
    """Export a two-layer MLP once: what the first export of a process pays on top (imports,
    registries), which a bundle export pays once for all its graphs."""
    import contextlib
    import io
    import warnings

    import torch

    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8)).eval()
    t0 = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(mlp, (torch.randn(2, 8),), str(where / "warm.onnx"), dynamo=exporter == "dynamo",
                          opset_version=18)
    return time.perf_counter() - t0


def child(target: str, exporter: str, work: str) -> dict:
    import onnx
    import torch

    from sorakit.export.exporter import ExportSettings, WeightSource, build_piece, compare, export_graph, ort_session
    from sorakit.export.pieces import text_encoder_plan, transformer_plan
    from sorakit.graph_passes.prune import prune_model
    from sorakit.graph_passes.tdtm import boundaries
    from sorakit.memory import PeakRSS, rss_bytes
    from sorakit.presets import get_preset

    preset_name, comp, piece, geo_override = TARGETS[target]
    preset = get_preset(preset_name)
    h, w, n = geo_override or (preset.resolution[0], preset.resolution[1], preset.num_frames)
    geo = ExportSettings(preset, h, w, n, components=(comp,)).geometry()
    plan = transformer_plan(preset, geo) if comp == "transformer" else text_encoder_plan(preset, geo)
    spec = next(s for s in plan if s.name == piece)
    module = build_piece(spec, WeightSource(comp, preset, None, seed=0), "random weights")
    params = sum(p.numel() for p in module.parameters())
    args = _inputs(spec)
    with torch.no_grad():
        ref = module(*args)
    ref = ref if isinstance(ref, tuple) else (ref,)
    path = Path(work) / target / exporter / Path(spec.rel_file).name
    path.parent.mkdir(parents=True, exist_ok=True)
    warm = _warm_up(exporter, path.parent)  # the exporter's one-time start-up, paid once per export run
    base = rss_bytes()
    peak = PeakRSS()
    peak.reset()
    t0 = time.perf_counter()
    error = None
    try:
        export_graph(module, spec, args, path, 18, exporter)
    except Exception as e:  # noqa: BLE001 - a failed export is a result
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    seconds = time.perf_counter() - t0
    peak_rss = peak.peak()
    res = {"target": target, "exporter": exporter, "preset": preset_name, "piece": piece, "geometry": [h, w, n],
           "params": params, "seconds": seconds, "peak_rss_bytes": peak_rss, "base_rss_bytes": base,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "error": error,
           "warm_up_seconds": warm}
    if error:
        return res
    model = onnx.load(str(path), load_external_data=False)
    res["onnx_bytes"] = path.stat().st_size
    res["data_bytes"] = Path(str(path) + ".data").stat().st_size
    res["nodes"] = len(model.graph.node)
    res["nodes_after_prune"] = len(prune_model(model).graph.node)
    res["ops"] = sorted({nd.op_type for nd in model.graph.node})
    res["tdtm_boundaries"] = len(boundaries(model)) if spec.role == "block" else None
    del module
    sess = ort_session(path)
    got = sess.run([o.name for o in spec.outputs], {i.name: a.numpy() for i, a in zip(spec.inputs, args)})
    errs = [compare(r.numpy(), g) for r, g in zip(ref, got)]
    res["max_abs_err"] = max(e for e, _ in errs)
    res["psnr_db"] = min(p for _, p in errs)
    res["ref_max_abs"] = max(float(r.abs().max()) for r in ref)
    return res


def child_bundle(preset_name: str, exporter: str, work: str) -> dict:
    """A whole bundle of a small preset, verified (what the tests and ``export.ship`` pay)."""
    import shutil

    from sorakit.export.exporter import ExportSettings, export_bundle
    from sorakit.memory import PeakRSS, rss_bytes
    from sorakit.presets import get_preset

    p = get_preset(preset_name)
    out = Path(work) / f"bundle-{preset_name}-{exporter}"
    shutil.rmtree(out, ignore_errors=True)
    base = rss_bytes()
    peak = PeakRSS()
    peak.reset()
    t0 = time.perf_counter()
    r = export_bundle(ExportSettings(p, p.resolution[0], p.resolution[1], p.num_frames, exporter=exporter), out)
    return {"bundle": preset_name, "exporter": exporter, "seconds": time.perf_counter() - t0,
            "peak_rss_bytes": peak.peak(), "base_rss_bytes": base, "graphs": len(r.pieces),
            "max_abs_err": max(x.max_abs_err for x in r.pieces), "end_to_end": r.end_to_end}


def run_child(target: str, exporter: str, work: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.exporters", "--child", json.dumps([target, exporter, str(work)])]
    if target.startswith("bundle:"):
        cmd[-1] = json.dumps([target.split(":", 1)[1], exporter, str(work)])
        cmd[-2] = "--bundle-child"
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def report(rows: list[dict], out: Path, bundles: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "exporters.json").write_text(json.dumps({"graphs": rows, "bundles": bundles}, indent=1))
    mb = 1e6
    lines = [
        f"torch {rows[0]['torch']}, opset 18, {rows[0]['threads']} threads; one piece per row with deterministic random "
        "weights; time and peak RSS of `export_graph` (export, TDTM marks, save with external data), in a process of "
        "its own, after a first small export that pays the exporter's start-up (its time in brackets); parity: ONNX "
        "Runtime against the torch module on seeded inputs.", "",
        "| graph | params | exporter | seconds (exporter start-up) | peak RSS above start, MB | "
        "graph MB (.onnx + .data) | nodes | nodes after prune | TDTM marks | max abs err |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['target']} | {r['params'] / 1e6:.1f} M | {r['exporter']} | {r['seconds']:.1f} | "
                         f"{(r['peak_rss_bytes'] - r['base_rss_bytes']) / mb:.0f} | failed: {r['error']} | | | | |")
            continue
        marks = "-" if r["tdtm_boundaries"] is None else str(r["tdtm_boundaries"])
        lines.append(
            f"| {r['target']} | {r['params'] / 1e6:.1f} M | {r['exporter']} | {r['seconds']:.1f} "
            f"({r['warm_up_seconds']:.1f}) | {(r['peak_rss_bytes'] - r['base_rss_bytes']) / mb:.0f} | "
            f"{r['onnx_bytes'] / mb:.2f} + {r['data_bytes'] / mb:.1f} | {r['nodes']} | {r['nodes_after_prune']} | "
            f"{marks} | {r['max_abs_err']:.1e} |")
    if bundles:
        lines += ["", "Whole bundles of the small presets (every graph exported and verified, the chain and a 2-step "
                  "generation checked end to end), one process each:", "",
                  "| bundle | exporter | graphs | seconds | peak RSS above start, MB | max abs err (graphs) | "
                  "end to end max abs err |", "|---|---|---:|---:|---:|---:|---:|"]
        for b in bundles:
            e2e = b["end_to_end"]["max_abs_err"] if b.get("end_to_end") else float("nan")
            lines.append(f"| {b['bundle']} | {b['exporter']} | {b['graphs']} | {b['seconds']:.0f} | "
                         f"{(b['peak_rss_bytes'] - b['base_rss_bytes']) / mb:.0f} | {b['max_abs_err']:.1e} | {e2e:.1e} |")
    (out / "exporters.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    targets = list(dict.fromkeys(r["target"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "seconds", "export time, s"),
                           (axes[1], "rss", "peak RSS above start, MB")):
        for k, exp in enumerate(EXPORTERS):
            vals = []
            for t in targets:
                r = next((x for x in rows if x["target"] == t and x["exporter"] == exp), None)
                if r is None:
                    vals.append(0)
                elif key == "seconds":
                    vals.append(r["seconds"])
                else:
                    vals.append((r["peak_rss_bytes"] - r["base_rss_bytes"]) / mb)
            ax.bar([i + 0.4 * k for i in range(len(targets))], vals, width=0.4, label=exp)
        ax.set_xticks([i + 0.2 for i in range(len(targets))], targets, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("torch.onnx exporters on sorakit's block graphs")
    fig.tight_layout()
    fig.savefig(out / "exporters.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/sorakit-exporters"))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--bundles", default="tiny,shapes", help="whole bundles to export with each exporter")
    ap.add_argument("--child")
    ap.add_argument("--bundle-child")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(*json.loads(a.child))))
        return
    if a.bundle_child:
        print(json.dumps(child_bundle(*json.loads(a.bundle_child))))
        return
    bundles = []
    for name in filter(None, a.bundles.split(",")):
        for exp in EXPORTERS:
            print(f"bundle {name}: {exp}...", flush=True, file=sys.stderr)
            bundles.append(run_child(f"bundle:{name}", exp, a.work))
    rows = []
    for target in a.targets.split(","):
        if target not in TARGETS:
            raise SystemExit(f"unknown target {target!r}; one of {', '.join(TARGETS)}")
        for exp in EXPORTERS:
            print(f"{target}: {exp}...", flush=True, file=sys.stderr)
            rows.append(run_child(target, exp, a.work))
    report(rows, a.out, bundles)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
