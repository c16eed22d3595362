"""`make bench`: every benchmark, then docs/benchmarks.md from their results.

    python -m benchmarks.run_all --out docs/benchmarks [--skip-real-scale] [--e2e-bundle DIR] [--only-doc]

1. `sorakit bench` on the shipped model (Table 1 and Table 5 rows, torch eager baseline);
2. `sorakit eval` on the shipped model (LPL, TDTM, fp16, int8, bf16, step cache, the best
   settings: quality; adherence; Figure 5);
3. `python -m benchmarks.real_scale` (the opensora-v1.2 transformer with random weights);
4. with `--e2e-bundle`, `python -m benchmarks.e2e_real` (the whole real-size pipeline, Table 5).
Each writes JSON, Markdown and PNGs into --out; this script then assembles docs/benchmarks.md
with the targets of issue 7 and whether each is met, from the numbers alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

TARGETS_NOTE = "Ratios are from one run on this machine; absolute times vary with load."


def sh(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


E2E_TARGETS = [  # (label, key in e2e-real.json "derived", threshold)
    ("best-3.3GB >= 5x faster end to end than torch eager fp32 (moonshot 10x)", "speedup_vs_torch_fp32", 5.0),
    ("best-3.3GB >= 2x faster end to end than torch eager bf16", "speedup_vs_torch_bf16", 2.0),
    ("text encoder >= 10x torch fp32", "text_encoder_speedup_vs_torch_fp32", 10.0),
    ("transformer per call >= 3x torch fp32", "transformer_per_call_speedup_vs_torch_fp32", 3.0),
    ("VAE >= 2x torch fp32", "vae_speedup_vs_torch_fp32", 2.0),
]


def e2e_targets(e2e: dict, ev: dict | None, bench: dict | None) -> list[str]:
    rows = []
    d = e2e["derived"]
    for label, key, thr in E2E_TARGETS:
        if key in d:
            rows.append(f"| {label} (real size) | {d[key]:.2f}x | {verdict(d[key] >= thr)} |")
    if e2e.get("best_3_3gb_peak_rss_bytes"):
        ratio = e2e["best_3_3gb_peak_rss_bytes"] / e2e["budget_bytes"]
        rows.append(f"| best-3.3GB peak RSS <= budget + 10 % | {e2e['best_3_3gb_peak_rss_bytes'] / 1e9:.2f} GB "
                    f"({ratio:.2f}x the budget) | {verdict(ratio <= 1.1)} |")
    best = (ev or {}).get("rows", {}).get("best")
    if best:
        rows.append(f"| the best settings on the shipped model: SSIM >= 0.85 against fp32 30 steps | SSIM "
                    f"{best['ssim']:.3f} | {verdict(best['ssim'] >= 0.85)} |")
    adh = (ev or {}).get("adherence") or {}
    if "best" in adh and "reference" in adh:
        worst = max(adh["reference"][k] - adh["best"][k] for k in ("colour_acc", "direction_acc"))
        rows.append(f"| ... and colour/direction adherence within 5 points of the reference | colour "
                    f"{adh['best']['colour_acc']:.0%} vs {adh['reference']['colour_acc']:.0%}, direction "
                    f"{adh['best']['direction_acc']:.0%} vs {adh['reference']['direction_acc']:.0%} | "
                    f"{verdict(worst <= 0.05)} |")
    if bench:
        allr = next((r for name, r in bench["rows"].items() if name.startswith("all")), None)
        if allr and "speedup_vs_ort" in allr:
            rows.append(f"| shipped model: every technique at once at least as fast as plain ORT fp32 | "
                        f"{allr['speedup_vs_ort']:.2f}x | {verdict(allr['speedup_vs_ort'] >= 1.0)} |")
    return rows


LEVERS = [  # (lever, e2e row, eval row or None for exact levers, what it changes)
    ("LPL (15 steps + leap)", "+lpl", "lpl 15"),
    ("TDTM (block scope)", "+tdtm", None),
    ("int8 (ORT dynamic, text encoder and transformer)", "+int8", "int8"),
    ("text encoder on the prompt's tokens", "+text-tokens", "exact"),
    ("OpenVINO bf16", "+openvino-bf16", "bf16"),
    ("step cache", "+step-cache", None),
    ("CI-DL at 3.3 GB (fp32, streamed)", "+ci-dl-3.3GB", "exact"),
    ("all, unlimited memory", "best-unlimited", "best"),
    ("all, 3.3 GB", "best-3.3GB", "best"),
]


def levers_table(e2e: dict, ev: dict | None) -> list[str]:
    rows = e2e["rows"]
    erows = (ev or {}).get("rows", {})
    base = rows.get("ort-fp32")
    out = ["| lever | real size: total vs ORT fp32 | transformer s/call | peak RSS GB | shipped model: SSIM vs fp32 |",
           "|---|---:|---:|---:|---:|"]
    for label, key, qual in LEVERS:
        r = rows.get(key)
        if r is None or base is None:
            continue
        if qual is None and key == "+tdtm":
            qual = next((k for k in erows if k.startswith("tdtm ")), None)
        if qual is None and key == "+step-cache":
            qual = next((k for k in erows if k.startswith("cache ")), None)
        q = "exact (1e-5)" if qual == "exact" else (f"{erows[qual]['ssim']:.3f} ({erows[qual]['name']})"
                                                    if qual in erows else "-")
        out.append(f"| {label} | {base['seconds']['total'] / r['seconds']['total']:.2f}x | "
                   f"{r['seconds']['transformer_per_call']:.2f} | {r['peak_rss_bytes'] / 1e9:.2f} | {q} |")
    return out


def targets(bench: dict | None, ev: dict | None, real: dict | None) -> list[str]:
    rows = ["| target | measured | verdict |", "|---|---|---|"]
    if real:
        d = real["derived"]
        rows.append(f"| ORT fp32 >= 0.95x torch eager fp32 per step (real scale) | {d['ort_fp32_vs_torch']:.2f}x | "
                    f"{verdict(d['ort_fp32_vs_torch'] >= 0.95)} |")
        rows.append(f"| ORT int8 >= 3x torch eager fp32 per step (real scale) | {d['ort_int8_vs_torch']:.2f}x | "
                    f"{verdict(d['ort_int8_vs_torch'] >= 3)} |")
        rows.append(f"| TDTM >= 1.3x faster merged steps at 20 latent frames (paper's placement: attentions) | "
                    f"{d['tdtm_speedup']:.2f}x (FLOP ceiling {d['tdtm_flop_ceiling']:.2f}x) | "
                    f"{verdict(d['tdtm_speedup'] >= 1.3)} |")
        if "tdtm_block_speedup" in d:
            rows.append(f"| the same with `--tdtm-scope block` (MLPs merged too) | {d['tdtm_block_speedup']:.2f}x "
                        f"(FLOP ceiling {d['tdtm_block_flop_ceiling']:.2f}x) | {verdict(d['tdtm_block_speedup'] >= 1.3)} |")
        rows.append(f"| CI-DL at 40 %: peak RSS <= budget + 10 % | {d['cidl_peak_over_budget']:.2f}x budget | "
                    f"{verdict(d['cidl_peak_over_budget'] <= 1.1)} |")
        rows.append(f"| CI-DL at 40 %: time <= 1.15x all resident | {d['cidl_time_ratio']:.2f}x | "
                    f"{verdict(d['cidl_time_ratio'] <= 1.15)} |")
        rows.append(f"| fp32 blocks >= 80 % of ORT's fp32 MatMul throughput | {d['block_vs_ort_matmul']:.0%} | "
                    f"{verdict(d['block_vs_ort_matmul'] >= 0.8)} |")
        if "export" in real:
            gb = real["export"]["peak_rss_bytes"] / 1e9
            rows.append(f"| streaming export of the 4.84 GB transformer <= 2 GB RSS | {gb:.2f} GB | {verdict(gb <= 2)} |")
    if ev:
        r = ev["rows"]
        lpl = r.get("lpl 15")
        if lpl:
            rows.append(f"| LPL >= 1.85x less transformer time at SSIM >= 0.90 (shipped model) | "
                        f"{lpl['transformer_speedup']:.2f}x at SSIM {lpl['ssim']:.3f} | "
                        f"{verdict(lpl['transformer_speedup'] >= 1.85 and lpl['ssim'] >= 0.90)} |")
        i8 = r.get("int8")
        if i8:
            rows.append(f"| int8 at SSIM >= 0.90 (shipped model) | SSIM {i8['ssim']:.3f} | {verdict(i8['ssim'] >= 0.90)} |")
        a = (ev.get("adherence") or {}).get("reference")
        if a:
            g = ev.get("cfg_max_t")
            where = f" at t <= {g:g}, the model's guidance interval" if g else ""
            rows.append(f"| adherence: colour >= 85 %, direction >= 75 % (24 prompts, 30 steps, CFG 7{where}; seed 0) | "
                        f"{a['colour_acc']:.0%} / {a['direction_acc']:.0%} | "
                        f"{verdict(a['colour_acc'] >= 0.85 and a['direction_acc'] >= 0.75)} |")
            every = (ev.get("adherence") or {}).get("cfg every step")
            if every and g:
                rows.append(f"| the same with CFG 7 at every step (Open-Sora's sampler) | "
                            f"{every['colour_acc']:.0%} / {every['direction_acc']:.0%} | "
                            f"{verdict(every['colour_acc'] >= 0.85 and every['direction_acc'] >= 0.75)} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    ap.add_argument("--skip-real-scale", action="store_true")
    ap.add_argument("--only-doc", action="store_true", help="rebuild docs/benchmarks.md from existing results")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sorakit-bench"))
    ap.add_argument("--e2e-bundle", type=Path, default=None,
                    help="the optimized real-size bundle for benchmarks.e2e_real (see its docstring)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "sorakit"]
    if not a.only_doc:
        sh(exe + ["bench", "--out", str(a.out), "--work", str(a.work / "bench")])
        sh(exe + ["eval", "--out", str(a.out), "--work", str(a.work / "eval")])
        if not a.skip_real_scale:
            sh([sys.executable, "-m", "benchmarks.real_scale", "--out", str(a.out), "--work", str(a.work / "real")])
        if a.e2e_bundle:
            sh([sys.executable, "-m", "benchmarks.e2e_real", "--bundle", str(a.e2e_bundle), "--out", str(a.out)])
    bench, ev, real, e2e = (load(a.out / f) for f in ("bench.json", "eval.json", "real-scale.json", "e2e-real.json"))
    machine = (bench or ev or {}).get("machine", {})
    parts = ["# Benchmarks", "",
             f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, onnxruntime "
             f"{machine.get('onnxruntime', '?')}, Python {machine.get('python', '?')}. {TARGETS_NOTE}", "",
             "Reproduce everything with `make bench` (= `python -m benchmarks.run_all --out docs/benchmarks`).", "",
             "## Targets", ""] + targets(bench, ev, real)
    # `sorakit eval --best` on the shipped model (the settings the best-* rows time), when run apart
    ev_best = load(a.out / "eval-best.json") or ev
    if e2e:
        parts += e2e_targets(e2e, ev_best, bench)
    parts += [""]
    if e2e:
        parts += ["## End to end at real size (`python -m benchmarks.e2e_real`)", "",
                  (a.out / "e2e-real.md").read_text().split("\n", 1)[1].lstrip("\n"), "", "![time per component](benchmarks/e2e-real.png)", "",
                  "## Levers: what each gave", "",
                  "Each lever added alone to the plain ONNX Runtime fp32 run (real size, one process each), and its "
                  "quality on the shipped model (`sorakit eval`, SSIM against the full 30-step fp32 video):", ""]
        parts += levers_table(e2e, ev_best) + [""]
        if ev_best is not ev:
            parts += ["Quality columns: `eval-best.md` (the best settings and each lever they combine, one run).", ""]
        levers_notes = a.out / "levers.md"
        if levers_notes.is_file():
            parts += [levers_notes.read_text(), ""]
    for title, name in (("Shipped model: latency and ablation (`sorakit bench`)", "bench.md"),
                        ("Shipped model: quality (`sorakit eval`)", "eval.md"),
                        ("Real scale: Open-Sora 1.2 transformer, random weights", "real-scale.md")):
        if (a.out / name).is_file():
            parts += [f"## {title}", "", (a.out / name).read_text()]
    notes = a.out / "notes.md"
    if notes.is_file():
        parts += ["## Where targets are missed, and why", "", notes.read_text()]
    Path("docs/benchmarks.md").write_text("\n".join(parts) + "\n")
    print("wrote docs/benchmarks.md")


if __name__ == "__main__":
    main()
