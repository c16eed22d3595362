"""One measured generation in a process of its own (clean peak RSS), driven by `sorakit bench`.

    python -m sorakit.evaluation.row '{"bundle": ..., "prompt": ..., "steps": 30, ...}'

Prints one JSON line with timings, memory and sampler facts, and saves the frames (.npy) to
``spec["frames_out"]`` so the parent can compare rows. A warm-up generation comes first
(sessions, page cache), then the measured one.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def run_row(spec: dict) -> dict:
    from sorakit.memory import PeakRSS, rss_bytes
    from sorakit.runtime.pipeline import Pipeline

    base = rss_bytes()
    budget = spec.get("memory_budget", "unlimited")  # None: the device profile's budget
    if spec.get("graph_budget"):  # memory for the graphs, on top of what the process holds now
        budget = base + int(spec["graph_budget"])
    t_open = time.perf_counter()
    pipe = Pipeline.from_bundle(spec["bundle"], memory_budget=budget, device=spec.get("device", "cpu"),
                                threads=spec.get("threads"), prefetch=spec.get("prefetch", True),
                                precision=spec.get("precision"), verify=spec.get("verify", True))
    open_s = time.perf_counter() - t_open
    if spec.get("text_tokens") is False:  # run a dynamic text encoder at the full padded length
        pipe.dynamic_text = False
    if spec.get("caption_tokens") is False:  # feed a dynamic transformer the padded caption
        pipe.dynamic_captions = False
    kw = dict(steps=spec["steps"], cfg=spec.get("cfg"), seed=spec.get("seed", 0), lpl=spec.get("lpl"),
              tdtm_steps=spec.get("tdtm_steps", 0))
    if spec.get("step_cache"):
        kw["step_cache"] = spec["step_cache"]
    if spec.get("warmup", True):  # load every graph the measured run uses (plain and TDTM blocks)
        pipe(spec["prompt"], **{**kw, "steps": min(2, spec["steps"]), "lpl": None,
                                "tdtm_steps": min(1, kw["tdtm_steps"])})
    peak = PeakRSS()
    peak.reset()
    t0 = time.perf_counter()
    r = pipe(spec["prompt"], **kw)
    wall = time.perf_counter() - t0
    if spec.get("frames_out"):
        np.save(spec["frames_out"], r.frames)
    steps = r.timings.transformer_steps
    return {
        "name": spec.get("name", ""),
        "seconds": {"text_encoder": r.timings.text_encoder, "transformer": r.timings.transformer,
                    "transformer_per_call": float(np.mean(steps)) if steps else 0.0, "vae": r.timings.vae,
                    # e2e rows start cold: opening the bundle (checks, plan) counts as part of the video
                    "total": wall + (open_s if spec.get("count_open") else 0.0), "open": open_s},
        "plan": pipe.plan.to_dict(),
        "notes": r.notes,
        "transformer_calls": r.sampling.model_calls,
        "transformer_evaluations": r.sampling.model_calls - getattr(r.sampling, "cached_steps", 0),
        "peak_rss_bytes": peak.peak(),
        "base_rss_bytes": base,
        "loads": r.memory.loads,
        "bytes_loaded": r.memory.bytes_loaded,
        "load_exposed_s": r.memory.load_exposed,
        "load_hidden_s": r.memory.load_hidden,
        "resident_graphs": len(r.memory.resident),
        "budget_bytes": pipe.budget,
    }


if __name__ == "__main__":
    print(json.dumps(run_row(json.loads(sys.argv[1]))))
