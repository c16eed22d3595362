"""`sorakit bench`: the paper's Table 1 (latency per component) and Table 5 (ablation), measured.

Every row is one generation (after a warm-up) in a fresh process, so its peak RSS is its
own; speedups are ratios within this one run. Rows:

* torch eager fp32 — the reference pipeline (baseline of the "everything" target);
* ORT fp32 — the runtime, every block resident;
* +LPL — the leap after 15 of 30 steps (16 transformer calls);
* +TDTM — merged blocks for the first 15 steps;
* +CI-DL — a memory budget of 40 % of the transformer's bytes, blocks streamed;
* +int8 — dynamically quantised MatMul weights;
* all — LPL + TDTM + CI-DL + int8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sorakit.bundle.io import Bundle
from sorakit.errors import SorakitError
from sorakit.evaluation.common import WorkDir, variant_bundle
from sorakit.metrics import psnr, video_ssim


@dataclass
class BenchSettings:
    prompt: str = "a red circle moving right on a black background"
    steps: int = 30
    seed: int = 0
    threads: int | None = None
    leap_at: int | None = None  # default: half the steps (the paper's 15 of 30)
    tdtm_steps: int | None = None  # default: half the steps
    budget_fraction: float = 0.4
    torch_row: bool = True  # include the torch eager row when the bundle's weights can be rebuilt in torch
    rows: list[str] = field(default_factory=lambda: ["torch", "ort", "lpl", "tdtm", "cidl", "int8", "all"])
    # every row runs once per round (a fresh process each time); a row keeps its fastest round, so
    # a slow spell of a shared machine cannot land on one row only
    rounds: int = 3


ROW_TITLES = {
    "torch": "torch eager fp32",
    "ort": "ORT fp32 (all resident)",
    "lpl": "+LPL",
    "tdtm": "+TDTM",
    "cidl": "+CI-DL",
    "int8": "+int8",
    "all": "all (LPL+TDTM+CI-DL+int8/bf16+text tokens+step cache)",
}


BUDGET_SLACK = 2 * 10**6


def _subprocess(module: str, spec: dict) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], capture_output=True, text=True, env=env)
    if res.returncode != 0:  # the row's own error (the last line of its traceback), not the traceback
        lines = [line.strip() for line in res.stderr.splitlines() if line.strip()]
        detail = lines[-1] if lines else f"exit code {res.returncode}"
        detail = detail.removeprefix("sorakit.errors.")
        raise SorakitError(f"bench row {spec.get('name')!r} failed: {detail}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def torch_spec(bundle: Bundle) -> dict | None:
    """How the torch row rebuilds a bundle's model: from its checkpoints, the shipped model's
    safetensors, or the same random weights; None when it cannot (e.g. mixed sources)."""
    m = bundle.manifest
    weights = {c: str(w) for c, w in m.export.get("weights", {}).items()}
    if set(weights) != {"text_encoder", "transformer", "vae"}:
        return None
    kinds = {w.split(":")[0] if w.startswith(("random:", "shipped:")) else "path" for w in weights.values()}
    if kinds == {"random"}:
        seeds = {w.split(":", 1)[1] for w in weights.values()}
        return {"preset": m.preset["name"], "seed_weights": int(seeds.pop())} if len(seeds) == 1 else None
    if kinds == {"shipped"}:
        from sorakit.runtime.default_model import SHIPPED

        weights = {c: str(SHIPPED / c) for c in weights}
    elif kinds != {"path"}:
        return None
    return {"preset": m.preset["name"], "checkpoints": weights, "tokenizer": str(bundle.path(m.tokenizer["file"]))}


def run_bench(bundle: str | Path, settings: BenchSettings, work: Path | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    from sorakit.runtime.scheduler import minimum_budget

    bundle = Path(bundle)
    opened = Bundle.open(bundle)
    m = opened.manifest
    spec_torch = torch_spec(opened) if settings.torch_row else None
    if settings.torch_row and spec_torch is None and progress:
        progress("no torch row: the bundle's weights cannot be rebuilt in torch")
    wd = WorkDir(work)
    work = wd.path
    applied = [p["name"] for p in m.passes]
    from sorakit.evaluation.best import BEST

    bundles = {"fp32": bundle, "tdtm": variant_bundle(bundle, work, ["tdtm"], progress, applied),
               "tdtm_int8": variant_bundle(bundle, work, ["tdtm", "int8"], progress, applied),
               "best": variant_bundle(bundle, work, BEST["passes"], progress, applied,
                                      settings=BEST["pass_settings"])}
    transformer_bytes = sum(m.files[f]["bytes"] for g in m.components["transformer"].graphs for f in g.files())
    budget = int(settings.budget_fraction * transformer_bytes)
    minimum = minimum_budget(opened, m.all_graphs())
    budget_note = ""
    if budget < minimum:  # e.g. a model whose VAE blocks outweigh 40 % of its transformer
        budget = minimum + BUDGET_SLACK  # slack: the process's own memory moves a little while it opens the bundle
        budget_note = (f"{settings.budget_fraction:.0%} of the transformer is below the smallest workable budget; "
                       f"raised to {budget / 1e6:.1f} MB (the smallest plus {BUDGET_SLACK / 1e6:.0f} MB)")
    s = settings
    s.leap_at = s.steps // 2 if s.leap_at is None else s.leap_at
    s.tdtm_steps = s.steps // 2 if s.tdtm_steps is None else s.tdtm_steps
    common = {"prompt": s.prompt, "steps": s.steps, "seed": s.seed, "threads": s.threads}
    specs = {
        "ort": {"bundle": str(bundles["fp32"])},
        "lpl": {"bundle": str(bundles["fp32"]), "lpl": str(s.leap_at)},
        "tdtm": {"bundle": str(bundles["tdtm"]), "tdtm_steps": s.tdtm_steps},
        "cidl": {"bundle": str(bundles["fp32"]), "graph_budget": budget},
        "int8": {"bundle": str(bundles["tdtm_int8"])},
        # every technique at once, as sorakit runs them by default: CI-DL at the device's budget
        # (it streams only what does not fit), the plan's engine and precision per component
        "all": {"bundle": str(bundles["best"]), "device": BEST["device"],
                # the best settings' leap where it fits the run's steps, else the bench's own
                "lpl": BEST["lpl"] if BEST["lpl"].isdigit() and int(BEST["lpl"]) < s.steps else str(s.leap_at),
                "tdtm_steps": min(s.tdtm_steps, BEST["tdtm_steps"]), "step_cache": BEST["step_cache"],
                "memory_budget": None},
    }
    rows: dict[str, dict] = {}
    for rnd in range(s.rounds):
        for key in s.rows:
            frames = str(work / f"frames_{key}.npy")
            if key == "torch":
                if spec_torch is None:
                    continue
                spec = {**common, **spec_torch, "name": ROW_TITLES[key]}
                module = "sorakit.export.bench_torch"
            else:
                spec = {**common, **specs[key], "name": ROW_TITLES[key]}
                module = "sorakit.evaluation.row"
            if rnd == 0:  # the runs are deterministic: the frames of the first round serve
                spec["frames_out"] = frames
            if progress:
                progress(f"row {ROW_TITLES[key]} (round {rnd + 1}/{s.rounds})")
            r = _subprocess(module, spec)
            if key not in rows:
                rows[key] = {**r, "frames_file": frames, "rounds_total_s": [r["seconds"]["total"]]}
                continue
            kept = rows[key]
            kept["rounds_total_s"].append(r["seconds"]["total"])
            peak = max(kept["peak_rss_bytes"], r["peak_rss_bytes"])  # memory: the worst round
            if r["seconds"]["total"] < kept["seconds"]["total"]:
                kept.update({k: v for k, v in r.items() if k != "name"})
            kept["peak_rss_bytes"] = peak
    ref = np.load(rows["ort"]["frames_file"]) if "ort" in rows else None
    base_t = rows.get("torch", {}).get("seconds", {})
    base_o = rows.get("ort", {}).get("seconds", {})
    for r in rows.values():
        frames = np.load(r.pop("frames_file"))
        if ref is not None:
            r["ssim_vs_ort_fp32"] = video_ssim(ref, frames)
            r["psnr_vs_ort_fp32"] = psnr(ref, frames)
        sec = r["seconds"]
        if base_t:
            r["speedup_vs_torch"] = base_t["total"] / sec["total"]
            r["transformer_speedup_vs_torch"] = base_t["transformer"] / sec["transformer"]
        if base_o:
            r["speedup_vs_ort"] = base_o["total"] / sec["total"]
            r["transformer_speedup_vs_ort"] = base_o["transformer"] / sec["transformer"]
    result = {
        "bundle": str(bundle),
        "preset": m.preset["name"],
        "geometry": m.geometry,
        "settings": dict(s.__dict__),
        "memory_budget_bytes": budget,
        "memory_budget_note": budget_note,
        "transformer_bytes": transformer_bytes,
        "rows": {ROW_TITLES[k]: v for k, v in rows.items()},
    }
    wd.cleanup()
    return result
