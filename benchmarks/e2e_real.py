"""End-to-end at real size: the whole Open-Sora 1.2 pipeline, torch against sorakit (Table 5).

    python -m benchmarks.e2e_real --bundle /data/os12-144x256-opt --out docs/benchmarks [--rows a,b] [--rounds 2]

One prompt, 144x256, 17 frames, 2 threads; text encoder, transformer and VAE. Every row runs in
a process of its own (its peak RSS is its own) and starts cold: its sessions are built (or its
torch modules made) inside the measurement. The rows that decide the targets -- ``torch-fp32``,
``torch-bf16`` and ``best-3.3GB`` -- run ``--rounds`` times in alternating rounds and keep
their fastest round; the other rows run once. ``--rows`` re-runs a subset and merges it into
an existing result.

The bundle must carry what the rows use: ``sorakit optimize BUNDLE --passes tdtm --tdtm-scope block
--device cpu-bf16 --out OPT`` adds the TDTM variants, the text encoder and the cross-attention on
the prompt's tokens, the fused GELUs and int8 variants beside the fp32 graphs; the ``openvino``
extra must be installed for the OpenVINO rows.

The torch rows are sorakit's torch reference (key-for-key Open-Sora 1.2) with the components
loaded in turn; making their random weights is timed apart and left out (``init_excluded``):
they are measured on computation only, which favours them. Writes ``e2e-real.json``,
``e2e-real.md`` and ``e2e-real.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from sorakit.evaluation.best import BEST, BUDGET

DECIDING = ("torch-fp32", "torch-bf16", "best-3.3GB")


def row_specs(bundle: str, prompt: str, steps: int, threads: int, leap: int, tdtm_steps: int, cache: float | None,
              tokenizer: str, preset: str, geometry: list[int]) -> dict[str, tuple[str, dict] | None]:
    """name -> (module, spec) of every row."""
    torch_row = {"in_turn": True, "preset": preset, "steps": steps, "prompt": prompt, "tokenizer": tokenizer,
                 "geometry": geometry, "threads": threads}
    base = {"bundle": bundle, "prompt": prompt, "steps": steps, "threads": threads, "warmup": False,
            "count_open": True, "device": "cpu", "precision": "fp32", "text_tokens": False,
            "caption_tokens": False}
    best = {**base, "device": "cpu-bf16", "precision": None, "text_tokens": True, "caption_tokens": True,
            "lpl": str(leap),
            "tdtm_steps": tdtm_steps, **({"step_cache": cache} if cache else {})}
    row = "sorakit.evaluation.row"
    return {
        "torch-fp32": ("sorakit.export.bench_torch", {**torch_row, "dtype": "fp32"}),
        "torch-bf16": ("sorakit.export.bench_torch", {**torch_row, "dtype": "bf16"}),
        "ort-fp32": (row, base),
        "+lpl": (row, {**base, "lpl": str(leap)}),
        "+tdtm": (row, {**base, "tdtm_steps": tdtm_steps}),
        "+int8": (row, {**base, "precision": "int8"}),
        "+text-tokens": (row, {**base, "text_tokens": True}),
        "+caption-tokens": (row, {**base, "caption_tokens": True}),
        "+openvino-bf16": (row, {**base, "device": "cpu-bf16", "precision": "bf16"}),
        "+step-cache": (row, {**base, "step_cache": cache}) if cache else None,
        "+ci-dl-3.3GB": (row, {**base, "memory_budget": BUDGET}),
        "best-unlimited": (row, best),
        "best-3.3GB": (row, {**best, "memory_budget": BUDGET}),
    }


def run_child(module: str, spec: dict) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(spec.get("threads") or 2)}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"row failed ({module}):\n{res.stderr[-4000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - t0
    return out


def schedule(names: list[str], rounds: int) -> list[str]:
    """Round 1 runs every row; later rounds repeat the deciding rows, alternating."""
    order = list(names)
    for _ in range(rounds - 1):
        order += [n for n in names if n in DECIDING]
    return order


def derive(rows: dict[str, dict]) -> dict:
    def sec(name, key="total"):
        return rows.get(name, {}).get("seconds", {}).get(key)

    out = {}
    best, t32, t16 = sec("best-3.3GB"), sec("torch-fp32"), sec("torch-bf16")
    if best and t32:
        out["speedup_vs_torch_fp32"] = t32 / best
        for comp in ("text_encoder", "vae"):
            if sec("best-3.3GB", comp):
                out[f"{comp}_speedup_vs_torch_fp32"] = sec("torch-fp32", comp) / sec("best-3.3GB", comp)
        if sec("best-3.3GB", "transformer_per_call"):
            out["transformer_per_call_speedup_vs_torch_fp32"] = (sec("torch-fp32", "transformer_per_call")
                                                                 / sec("best-3.3GB", "transformer_per_call"))
    if best and t16:
        out["speedup_vs_torch_bf16"] = t16 / best
    if sec("ort-fp32"):
        for name, r in rows.items():
            if name.startswith("+") or name.startswith("best"):
                r["speedup_vs_ort_fp32"] = sec("ort-fp32") / r["seconds"]["total"]
    for r in rows.values():
        if t32:
            r["speedup_vs_torch_fp32"] = t32 / r["seconds"]["total"]
    return out


def markdown(result: dict, command: str) -> str:
    rows = result["rows"]
    lines = [
        "# End to end at real size (Open-Sora 1.2: T5-XXL, STDiT3-XL/2, VAE; random weights)",
        "",
        f"`{command}`",
        "",
        f"{result['geometry']}, one prompt ({result['prompt']!r}), {result['steps']} steps, {result['threads']} threads. "
        "Rows in their own processes, cold; each row's rounds are in the `rounds` column (the deciding rows, "
        f"{', '.join(DECIDING)}, at least twice in alternating rounds; the fastest kept). The torch rows leave out "
        "making their weights (`init`).",
        "",
        "| row | text encoder s | transformer s | calls | s/call | VAE s | total s | vs torch fp32 | peak RSS GB | "
        "loaded GB | load exposed s | rounds | engines |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        s = r["seconds"]
        engines = ", ".join(f"{c.replace('_', ' ')}: {p['engine']} {p['precision']}"
                            for c, p in r.get("plan", {}).items()) or "torch " + name.split("-")[1]
        calls = r.get("transformer_calls", 0)
        evals = r.get("transformer_evaluations", calls)
        lines.append(
            f"| {name} | {s['text_encoder']:.1f} | {s['transformer']:.1f} | {evals}{'' if evals == calls else f' of {calls}'}"
            f" | {s['transformer_per_call']:.2f} | {s['vae']:.1f} | **{s['total']:.1f}** | "
            f"{r.get('speedup_vs_torch_fp32', float('nan')):.2f}x | {r['peak_rss_bytes'] / 1e9:.2f} | "
            f"{r.get('bytes_loaded', 0) / 1e9:.1f} | {r.get('load_exposed_s', 0):.1f} | "
            f"{len(r.get('rounds_total_s', [])) or 1} | {engines} |")
    d = result["derived"]
    lines += ["", "| ratio | value |", "|---|---|"]
    for k, v in d.items():
        lines.append(f"| {k} | {v:.2f}x |")
    lines.append(f"| best-3.3GB peak RSS / budget | {result['best_3_3gb_peak_rss_bytes'] / result['budget_bytes']:.2f} |"
                 if result.get("best_3_3gb_peak_rss_bytes") else "")
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = list(rows)
    parts = [("text_encoder", "text encoder", "#4c72b0"), ("transformer", "transformer", "#dd8452"),
             ("vae", "VAE", "#55a868")]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.5))
    left = [0.0] * len(names)
    for key, label, color in parts:
        vals = [rows[n]["seconds"][key] for n in names]
        ax.barh(names, vals, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, vals)]
    for i, n in enumerate(names):
        ax.text(left[i], i, f" {rows[n]['seconds']['total']:.0f} s", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (one prompt, end to end)")
    ax.set_title(f"Open-Sora 1.2 at {result['geometry']}: time per component")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, help="the real-size bundle (optimized as the docstring says)")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    ap.add_argument("--rows", default=None, help="comma-separated subset to (re-)run; merged into an existing result")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="with --rows: drop those rows' earlier rounds")
    ap.add_argument("--prompt", default="a red circle moving right")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--leap", type=int, default=int(BEST["lpl"]), help="LPL: steps before the leap")
    ap.add_argument("--tdtm-steps", type=int, default=BEST["tdtm_steps"])
    ap.add_argument("--step-cache", type=float, default=BEST["step_cache"],
                    help="step-cache threshold of the cache and best rows (0: no cache)")
    ap.add_argument("--name", default="e2e-real", help="file stem of the outputs")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    manifest = json.loads((Path(args.bundle) / "manifest.json").read_text())
    geo = manifest["geometry"]
    geometry = [geo["height"], geo["width"], geo["num_frames"]]
    tokenizer = str(Path(args.bundle) / manifest["tokenizer"]["file"])
    specs = {k: v for k, v in row_specs(args.bundle, args.prompt, args.steps, args.threads, args.leap,
                                        args.tdtm_steps, args.step_cache, tokenizer, manifest["preset"]["name"],
                                        geometry).items() if v is not None}
    names = list(specs) if args.rows is None else [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; rows: {', '.join(specs)}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    old = json.loads(path.read_text()) if args.rows and path.is_file() else {}
    # re-run rows add rounds to what the result holds (the fastest kept) unless --fresh drops it
    rows: dict[str, dict] = {k: v for k, v in old.get("rows", {}).items() if not (args.fresh and k in names)}

    def write() -> None:
        order = [n for n in specs if n in rows]
        ordered = {n: rows[n] for n in order}
        from sorakit.units import parse_bytes

        this = "python -m benchmarks.e2e_real " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        # a re-run of some rows merges into the result: every command that measured a row is kept
        earlier = old.get("commands") or ([old["command"]] if old.get("command") else [])
        result = {
            "command": this,
            "commands": [c for c in earlier if c != this] + [this] if args.rows else [this],
            "bundle": args.bundle, "geometry": f"{geometry[0]}x{geometry[1]}, {geometry[2]} frames",
            "prompt": args.prompt, "steps": args.steps, "threads": args.threads,
            "rounds": max([len(r.get("rounds_total_s", [])) for r in ordered.values()] or [args.rounds]),
            "budget_bytes": parse_bytes(BUDGET),
            "rows": ordered,
        }
        result["derived"] = derive(ordered)
        result.update({k: result["derived"][k] for k in ("speedup_vs_torch_fp32", "speedup_vs_torch_bf16")
                       if k in result["derived"]})
        if "best-3.3GB" in ordered:
            result["best_3_3gb_peak_rss_bytes"] = ordered["best-3.3GB"]["peak_rss_bytes"]
        path.write_text(json.dumps(result, indent=1))
        (args.out / f"{args.name}.md").write_text(markdown(result, "`, then `".join(result["commands"])))
        chart(result, args.out / f"{args.name}.png")

    rounds_s: dict[str, list[float]] = {k: list(v.get("rounds_total_s", [])) for k, v in rows.items()}
    failed: list[str] = []
    for i, name in enumerate(schedule(names, args.rounds)):
        module, spec = specs[name]
        print(f"[{i + 1}] {name} ...", flush=True)
        try:
            r = run_child(module, spec)
        except SystemExit as exc:  # one failed row does not cost the others
            print(f"    failed: {exc}", flush=True)
            failed.append(name)
            continue
        rounds_s.setdefault(name, []).append(r["seconds"]["total"])
        print(f"    {r['seconds']['total']:.1f} s (text {r['seconds']['text_encoder']:.1f}, transformer "
              f"{r['seconds']['transformer']:.1f}, VAE {r['seconds']['vae']:.1f}), peak {r['peak_rss_bytes'] / 1e9:.2f} GB",
              flush=True)
        peak = max(r["peak_rss_bytes"], rows.get(name, {}).get("peak_rss_bytes", 0))  # memory: the worst round
        if name not in rows or r["seconds"]["total"] < rows[name]["seconds"]["total"]:
            rows[name] = r
        rows[name]["peak_rss_bytes"] = peak
        rows[name]["rounds_total_s"] = rounds_s[name]
        write()  # after every row: a long run stopped midway keeps what it measured
    print(f"wrote {path}, {args.name}.md, {args.name}.png")
    if failed:
        print(f"failed rows: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
