"""Benchmarks at the real Open-Sora 1.2 scale (STDiT3-XL/2, deterministic random weights).

    python -m benchmarks.real_scale --out docs/benchmarks [--work /tmp/sorakit-real] [--frames 68 --resolution 64x128]

Measures, on this machine, each in its own process so peak RSS is its own:
1. the streaming export of the 4.84 GB transformer (peak RSS, time);
2. one denoising step (CFG batch of 2): torch eager fp32, ORT fp32, ORT int8, ORT fp32 with
   the TDTM blocks (20 latent frames);
3. CI-DL: the same step under a budget of 40 % of the transformer's bytes vs all resident;
4. achieved GFLOP/s per block against the measured fp32 MatMul throughput of ORT and torch.
Writes real-scale.json and real-scale.md (+ a PNG) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def run(cmd: list[str], env=None) -> tuple[str, float, int]:
    """Run a command; return stdout, seconds and the child's peak RSS (bytes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return res.stdout, dt, peak if peak > before * 1024 else -1


def child(mode: str, **kw) -> dict:
    out, _, _ = run([sys.executable, "-m", "benchmarks.real_scale", "--child", mode, "--args", json.dumps(kw)])
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# children (one measurement each)
# ---------------------------------------------------------------------------------------------
def _chain_inputs(manifest, seed=0):
    from sorakit.graph_passes.pipeline import sample_inputs

    pro = manifest.components["transformer"].graphs[0]
    feeds = sample_inputs(pro, manifest, seed=seed)
    L = feeds["y_mask"].shape[1]
    feeds["y_mask"][:] = 0
    feeds["y_mask"][:, : min(40, L)] = 1  # a 40-token prompt
    return feeds, L


def child_ort(bundle: str, threads: int, budget: int | None = None, tdtm: bool = False, steps: int = 2) -> dict:
    from sorakit.bundle.io import Bundle
    from sorakit.memory import PeakRSS, rss_bytes
    from sorakit.profiles import get_profile
    from sorakit.runtime.scheduler import BlockScheduler
    from sorakit.runtime.session import SessionFactory, SessionOptions, plan_providers

    b = Bundle.open(bundle, verify="none")
    m = b.manifest
    graphs = m.components["transformer"].graphs
    chain = [graphs[0]] + [g.variants["tdtm"] if tdtm else g for g in graphs[1:-1]] + [graphs[-1]]
    factory = SessionFactory(plan_providers(get_profile("cpu")), SessionOptions(threads=threads))
    base = rss_bytes()
    sched = BlockScheduler(b, factory, budget, prefetch=True)
    feeds, _ = _chain_inputs(m)
    times, per_graph = [], {}
    sched.begin()
    for step in range(steps):
        sched.set_usage({g.name: steps - step for g in chain}, chain)
        ctx = dict(feeds)
        t0 = time.perf_counter()
        for i, g in enumerate(chain):
            t1 = time.perf_counter()
            sched.run(g, ctx, chain[(i + 1) % len(chain)])
            per_graph.setdefault(g.name, []).append(time.perf_counter() - t1)
        times.append(time.perf_counter() - t0)
        if step == 0:
            peak = PeakRSS()
            peak.reset()
    stats = sched.end()
    return {"step_seconds": times, "steady_step_seconds": times[-1], "peak_rss_bytes": peak.peak(),
            "base_rss_bytes": base, "loads": stats.loads, "load_exposed_s": stats.load_exposed,
            "load_hidden_s": stats.load_hidden, "resident": len(sched.resident),
            "graph_seconds": {k: v[-1] for k, v in per_graph.items()},
            "graph_flops": {g.name: g.flops for g in chain}}


def child_torch(threads: int, resolution: list[int], frames: int, preset: str = "opensora-v1.2", steps: int = 2) -> dict:
    import torch

    from sorakit.export import models
    from sorakit.memory import PeakRSS, rss_bytes
    from sorakit.presets import get_preset

    torch.set_num_threads(threads)
    preset = get_preset(preset)
    base = rss_bytes()
    model = models.randomized("transformer", preset, seed=0)
    h, w = resolution
    T, lh, lw = preset.latent_size(frames, h, w)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, T, lh, lw, generator=g)
    L, Cy = preset.stdit.model_max_length, preset.stdit.caption_channels
    y = torch.randn(2, 1, L, Cy, generator=g)
    mask = torch.zeros(1, L, dtype=torch.int64)
    mask[:, : min(40, L)] = 1
    times = []
    with torch.no_grad():
        for step in range(steps):
            t0 = time.perf_counter()
            model(x, torch.tensor([700.0, 700.0]), y, mask, None, torch.tensor([24.0]), torch.tensor([float(h)]),
                  torch.tensor([float(w)]))
            times.append(time.perf_counter() - t0)
            if step == 0:
                peak = PeakRSS()
                peak.reset()
    return {"step_seconds": times, "steady_step_seconds": times[-1], "peak_rss_bytes": peak.peak(),
            "base_rss_bytes": base, "threads": torch.get_num_threads()}


def child_matmul(threads: int) -> dict:
    """fp32 MatMul throughput of ORT and torch on a transformer-shaped product."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    M, K, N = 1440, 1152, 4608
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K), dtype=np.float32)
    w = rng.standard_normal((K, N), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [M, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(model.SerializeToString(), so)
    s.run(None, {"a": a})
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        s.run(None, {"a": a})
    ort_gflops = 2 * M * K * N * reps / (time.perf_counter() - t0) / 1e9
    torch.set_num_threads(threads)
    ta, tw = torch.from_numpy(a), torch.from_numpy(w)
    ta @ tw
    t0 = time.perf_counter()
    for _ in range(reps):
        ta @ tw
    torch_gflops = 2 * M * K * N * reps / (time.perf_counter() - t0) / 1e9
    return {"shape": [M, K, N], "ort_fp32_gflops": ort_gflops, "torch_fp32_gflops": torch_gflops}


CHILDREN = {"ort": child_ort, "torch": child_torch, "matmul": child_matmul}


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/sorakit-real-scale"))
    ap.add_argument("--resolution", default="64x128")
    ap.add_argument("--frames", type=int, default=68)  # 20 latent frames, as the TDTM target asks
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--preset", default="opensora-v1.2")
    ap.add_argument("--child")
    ap.add_argument("--args", default="{}")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(CHILDREN[a.child](**json.loads(a.args))))
        return
    h, w = (int(v) for v in a.resolution.split("x"))
    a.work.mkdir(parents=True, exist_ok=True)
    fp32 = a.work / f"{a.preset}-{h}x{w}-{a.frames}f"
    res: dict = {"preset": a.preset, "resolution": [h, w], "frames": a.frames, "threads": a.threads}
    cmd = [sys.executable, "-m", "sorakit", "export", "--preset", a.preset, "--random-weights",
           "--components", "transformer", "--resolution", f"{h}x{w}", "--frames", str(a.frames), "--out", str(fp32)]
    export_record = a.work / f"{fp32.name}.export.json"  # kept, so a re-run reuses bundle and figure
    if not (fp32 / "manifest.json").is_file():
        print("exporting the opensora-v1.2 transformer (streamed, verified per graph)...", flush=True)
        _, secs, peak = run(cmd + ["--json"])
        export_record.write_text(json.dumps({"seconds": secs, "peak_rss_bytes": peak, "command": " ".join(cmd[2:])}))
    if export_record.is_file():
        res["export"] = json.loads(export_record.read_text())
    from sorakit.bundle.io import Bundle
    from sorakit.graph_passes.pipeline import optimize_bundle

    m = Bundle.open(fp32).manifest
    res["latent"] = m.geometry["latent"]
    tr_bytes = sum(m.files[f]["bytes"] for g in m.components["transformer"].graphs for f in g.files())
    res["transformer_bytes"] = tr_bytes
    variants = {}
    for name, passes, settings in (("tdtm", ["tdtm"], {}), ("tdtm-block", ["tdtm"], {"tdtm": {"scope": "block"}}),
                                   ("int8", ["int8"], {})):
        target = a.work / f"{fp32.name}-{name}"
        if not (target / "manifest.json").is_file():
            print(f"optimize {name}...", flush=True)
            optimize_bundle(fp32, target, passes, settings=settings, gates={p: None for p in passes})
        variants[name] = target
    print("matmul throughput...", flush=True)
    res["matmul"] = child("matmul", threads=a.threads)
    print("torch eager step...", flush=True)
    res["torch_fp32"] = child("torch", threads=a.threads, resolution=[h, w], frames=a.frames, preset=a.preset)
    print("ORT fp32 step...", flush=True)
    res["ort_fp32"] = child("ort", bundle=str(fp32), threads=a.threads)
    print("ORT int8 step...", flush=True)
    res["ort_int8"] = child("ort", bundle=str(variants["int8"]), threads=a.threads)
    print("ORT TDTM step...", flush=True)
    res["ort_fp32_tdtm"] = child("ort", bundle=str(variants["tdtm"]), threads=a.threads, tdtm=True)
    print("ORT TDTM (scope block) step...", flush=True)
    res["ort_fp32_tdtm_block"] = child("ort", bundle=str(variants["tdtm-block"]), threads=a.threads, tdtm=True)
    budget = int(0.4 * tr_bytes)
    print("CI-DL step...", flush=True)
    res["ort_fp32_cidl"] = child("ort", bundle=str(fp32), threads=a.threads, budget=budget, steps=3)
    res["cidl_budget_bytes"] = budget
    report(res, a.out)


def report(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    t, o, i8, td, ci = (res[k] for k in ("torch_fp32", "ort_fp32", "ort_int8", "ort_fp32_tdtm", "ort_fp32_cidl"))
    tb = res["ort_fp32_tdtm_block"]
    flops = o["graph_flops"]
    blocks = [k for k in flops if ".block." in k]
    step_flops = sum(flops.values())
    peak_mm = res["matmul"]["ort_fp32_gflops"]
    block_gflops = {k: flops[k] / o["graph_seconds"][k] / 1e9 for k in blocks}
    res["derived"] = {
        "ort_fp32_vs_torch": t["steady_step_seconds"] / o["steady_step_seconds"],
        "ort_int8_vs_torch": t["steady_step_seconds"] / i8["steady_step_seconds"],
        "tdtm_speedup": o["steady_step_seconds"] / td["steady_step_seconds"],
        "tdtm_block_speedup": o["steady_step_seconds"] / tb["steady_step_seconds"],
        # the most a merged step can gain: FLOPs of a plain step over FLOPs of a merged one
        "tdtm_flop_ceiling": step_flops / sum(td["graph_flops"].values()),
        "tdtm_block_flop_ceiling": step_flops / sum(tb["graph_flops"].values()),
        "cidl_time_ratio": ci["steady_step_seconds"] / o["steady_step_seconds"],
        "cidl_peak_over_budget": (ci["peak_rss_bytes"] - ci["base_rss_bytes"]) / res["cidl_budget_bytes"],
        "step_tflop": step_flops / 1e12,
        "torch_gflops": step_flops / t["steady_step_seconds"] / 1e9,
        "ort_gflops": step_flops / o["steady_step_seconds"] / 1e9,
        "block_gflops_median": float(np.median(list(block_gflops.values()))),
        "block_vs_ort_matmul": float(np.median(list(block_gflops.values()))) / peak_mm,
    }
    (out / "real-scale.json").write_text(json.dumps(res, indent=1))
    d = res["derived"]
    mb = 1e6
    lines = [
        f"Resolution {res['resolution'][0]}x{res['resolution'][1]}, {res['frames']} frames "
        f"(latent {res['latent']}), batch 2 (CFG), {res['threads']} threads; one step = "
        f"{d['step_tflop']:.2f} TFLOP.", "",
        "| measurement | seconds per step | peak RSS above start, MB | ratio |",
        "|---|---:|---:|---|",
        f"| torch eager fp32 | {t['steady_step_seconds']:.2f} | {(t['peak_rss_bytes'] - t['base_rss_bytes']) / mb:.0f} | 1.00 |",
        f"| ORT fp32, all resident | {o['steady_step_seconds']:.2f} | {(o['peak_rss_bytes'] - o['base_rss_bytes']) / mb:.0f} | "
        f"{d['ort_fp32_vs_torch']:.2f}x torch |",
        f"| ORT int8 (QInt8 MatMul) | {i8['steady_step_seconds']:.2f} | {(i8['peak_rss_bytes'] - i8['base_rss_bytes']) / mb:.0f} | "
        f"{d['ort_int8_vs_torch']:.2f}x torch |",
        f"| ORT fp32, TDTM blocks | {td['steady_step_seconds']:.2f} | {(td['peak_rss_bytes'] - td['base_rss_bytes']) / mb:.0f} | "
        f"{d['tdtm_speedup']:.2f}x plain ORT (FLOP ceiling {d['tdtm_flop_ceiling']:.2f}x) |",
        f"| ORT fp32, TDTM blocks, scope block (MLPs merged too) | {tb['steady_step_seconds']:.2f} | "
        f"{(tb['peak_rss_bytes'] - tb['base_rss_bytes']) / mb:.0f} | "
        f"{d['tdtm_block_speedup']:.2f}x plain ORT (FLOP ceiling {d['tdtm_block_flop_ceiling']:.2f}x) |",
        f"| ORT fp32, CI-DL budget {res['cidl_budget_bytes'] / mb:.0f} MB (40 %) | {ci['steady_step_seconds']:.2f} | "
        f"{(ci['peak_rss_bytes'] - ci['base_rss_bytes']) / mb:.0f} | {d['cidl_time_ratio']:.2f}x the time of all resident, "
        f"peak {d['cidl_peak_over_budget']:.2f}x budget |",
        "",
        f"fp32 MatMul throughput ({'x'.join(map(str, res['matmul']['shape']))}): ORT {res['matmul']['ort_fp32_gflops']:.0f} "
        f"GFLOP/s, torch {res['matmul']['torch_fp32_gflops']:.0f} GFLOP/s. Transformer blocks in ORT fp32: median "
        f"{d['block_gflops_median']:.0f} GFLOP/s = {d['block_vs_ort_matmul']:.0%} of ORT's MatMul; whole step "
        f"{d['ort_gflops']:.0f} GFLOP/s (torch {d['torch_gflops']:.0f}).",
    ]
    if "export" in res:
        e = res["export"]
        lines += ["", f"Streaming export of the transformer ({res['transformer_bytes'] / 1e9:.2f} GB of graphs): "
                  f"{e['seconds'] / 60:.1f} min, peak RSS {e['peak_rss_bytes'] / 1e9:.2f} GB (`{e['command']}`)."]
    (out / "real-scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
