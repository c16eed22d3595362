"""`sorakit optimize`: run passes over a bundle, verify each, write a new bundle atomically.

Exact passes (pin, prune, simplify) are checked graph by graph against the graph they
replace on seeded random inputs. Lossy passes (tdtm, fp16, int8) are held to a quality gate:
the runtime generates videos from fixed prompts and seeds with the bundle before and after
the pass (for tdtm: with and without the merged blocks for half the steps); the mean SSIM
must reach the pass's threshold, and no video may lose the colour, shape or direction of its
prompt (``sorakit.adherence``), or the pass is refused unless forced.
"""

from __future__ import annotations

import copy
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sorakit.bundle.io import Bundle, BundleStaging, file_record
from sorakit.bundle.manifest import GraphEntry, Manifest
from sorakit.errors import SorakitError, VerificationError
from sorakit.graph_passes.base import PassRecord, Workspace
from sorakit.graph_passes.registry import get, parse_passes

GATE_PROMPTS = ("a red circle moving right on a black background", "a blue square moving up on a white background")
EXACT_TOL = 1e-4  # relative to max(1, max |reference|)


@dataclass
class OptimizeReport:
    out: Path
    records: list[PassRecord] = field(default_factory=list)


ProgressFn = Callable[[str, int, int], None]


def optimize_bundle(
    src: str | Path,
    out: str | Path,
    passes: str | list[str],
    settings: dict[str, dict[str, Any]] | None = None,
    gates: dict[str, float | None] | None = None,
    force: bool = False,
    gate_steps: int | None = None,
    progress: ProgressFn | None = None,
) -> OptimizeReport:
    names = parse_passes(passes)
    if not names:
        raise SorakitError("no passes given; e.g. --passes tdtm,prune,int8")
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise SorakitError("--out must differ from the input bundle (the input is never modified)")
    bundle = Bundle.open(src, verify="full")
    manifest = copy.deepcopy(bundle.manifest)
    objs = [get(n)(**(settings or {}).get(n, {})) for n in names]
    state = copy.deepcopy(manifest)  # dry run of the checks, so nothing is written for a refused pipeline
    for p in objs:
        p.check(state)
        state.passes.append({"name": p.name})
        if p.name == "pin":
            state.geometry = {**state.geometry, "static": True}
    staging = BundleStaging(out)
    _fresh(staging.dir)
    for rel in manifest.files:
        dst = staging.dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle.path(rel), dst)  # a copy: onnx refuses hard-linked external data
    ws = Workspace(staging.dir)
    report = OptimizeReport(out)
    gates = {**{p.name: p.gate for p in objs if p.lossy}, **(gates or {})}
    try:
        for p in objs:
            before = copy.deepcopy(manifest)
            record = PassRecord(p.name, p.settings())
            targets = p.targets(manifest)
            for i, (comp, entry) in enumerate(targets):
                if progress:
                    progress(p.name, i, len(targets))
                for change in p.rewrite(ws, manifest, comp, entry):
                    if not p.lossy and change.replaced is not None:
                        change.max_abs_err = verify_exact(ws, change.replaced, _find(manifest, change.graph),
                                                          manifest, p.name)
                    record.changes.append(change)
            if progress:
                progress(p.name, len(targets), len(targets))
            p.finish(manifest)
            if p.lossy:
                if gates.get(p.name) is None:
                    record.gate = {"skipped": "not gated on request"}
                else:
                    record.gate = run_gate(p.name, ws, before, manifest, gates[p.name], force, gate_steps)
            manifest.passes.append(record.to_dict())
            report.records.append(record)
        manifest.files = {rel: file_record(ws.path(rel)) for rel in manifest.referenced_files()}
        staging.commit(manifest)
    except BaseException:
        shutil.rmtree(staging.dir, ignore_errors=True)
        raise
    return report


def _fresh(d: Path) -> None:
    for p in sorted(d.rglob("*"), reverse=True):
        if p.is_file() or p.is_symlink():
            p.unlink()
        else:
            p.rmdir()


def _find(manifest: Manifest, name: str) -> GraphEntry:
    return manifest.graph(name)


# ---------------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------------
def sample_inputs(entry: GraphEntry, manifest: Manifest, shapes: dict[str, list[int]] | None = None,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs that look like real ones (masks, ids, timesteps in range)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in entry.inputs:
        shape = (shapes or {}).get(t.name) or t.shape
        if not all(isinstance(d, int) for d in shape):
            raise SorakitError(f"cannot make inputs for {entry.name}: dynamic shape {shape} of {t.name}")
        if t.dtype == "int64":
            if "mask" in t.name:
                a = np.zeros(shape, np.int64)
                a[..., : max(1, shape[-1] // 2)] = 1
            else:
                vocab = manifest.preset.get("t5", {}).get("vocab_size", 100)
                a = rng.integers(3, max(4, min(vocab, 1000)), shape, dtype=np.int64)
        elif t.name == "timestep":
            a = np.full(shape, 600.0, np.float32)
        elif t.name == "fps":
            a = np.full(shape, 24.0, np.float32)
        elif t.name in ("height", "width"):
            a = np.full(shape, float(manifest.geometry.get(t.name) or 64), np.float32)
        elif t.name == "y_bias":
            a = np.zeros(shape, np.float32)
            a[..., shape[-1] // 2 :] = -1e4
        else:
            a = rng.standard_normal(shape, dtype=np.float32)
        feeds[t.name] = a
    return feeds


def verify_exact(ws: Workspace, old: GraphEntry, new: GraphEntry, manifest: Manifest, pass_name: str) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    shapes = {t.name: t.shape for t in new.inputs}
    feeds = sample_inputs(new, manifest, shapes)
    a = ort.InferenceSession(str(ws.path(old.file)), so, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(ws.path(new.file)), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in new.outputs]
    ra = a.run(names, {k: v for k, v in feeds.items() if k in {i.name for i in a.get_inputs()}})
    rb = b.run(names, feeds)
    err = 0.0
    for x, y in zip(ra, rb):
        if x.shape != y.shape:
            raise VerificationError(f"pass {pass_name!r} changed the output shape of {new.name}: {x.shape} -> {y.shape}")
        e = float(np.abs(x.astype(np.float64) - y).max()) if x.size else 0.0
        scale = max(1.0, float(np.abs(x).max()) if x.size else 1.0)
        if not math.isfinite(e) or e > EXACT_TOL * scale:
            raise VerificationError(f"pass {pass_name!r} changed the outputs of {new.name}: max abs error {e:.3g}")
        err = max(err, e)
    return err


def run_gate(name: str, ws: Workspace, before: Manifest, after: Manifest, threshold: float, force: bool,
             steps: int | None) -> dict[str, Any]:
    """End-to-end SSIM of videos from fixed prompts/seeds, before vs after the pass."""
    from sorakit.metrics import psnr, video_ssim
    from sorakit.runtime.pipeline import Pipeline

    missing = [c for c in ("text_encoder", "transformer", "vae") if c not in after.components]
    if missing:
        return {"skipped": f"the bundle lacks {missing}; no end-to-end gate", "threshold": threshold}
    steps = steps or int(after.sampler.get("num_steps", 30))
    pa = Pipeline(Bundle(ws.root, before, verify="none"), memory_budget="unlimited", verify=False)
    pb = Pipeline(Bundle(ws.root, after, verify="none"), memory_budget="unlimited", verify=False)
    ssims, psnrs, before_videos, after_videos = [], [], [], []
    for i, prompt in enumerate(GATE_PROMPTS):
        if name == "tdtm":
            ref = pb(prompt, seed=i, steps=steps)
            got = pb(prompt, seed=i, steps=steps, tdtm_steps=steps // 2)
        else:
            ref = pa(prompt, seed=i, steps=steps)
            got = pb(prompt, seed=i, steps=steps)
        ssims.append(video_ssim(ref.frames, got.frames))
        psnrs.append(psnr(ref.frames, got.frames))
        before_videos.append(ref.frames)
        after_videos.append(got.frames)
    pa.close()
    pb.close()
    mean = float(np.mean(ssims))
    adherence = adherence_counts(GATE_PROMPTS, before_videos, after_videos)
    lost = [k for k, (b, a) in adherence.items() if a < b]
    gate = {"metric": "ssim", "value": mean, "min": float(np.min(ssims)), "psnr_db": float(np.mean(psnrs)),
            "threshold": threshold, "prompts": list(GATE_PROMPTS), "steps": steps,
            "compared": "tdtm for half the steps vs none" if name == "tdtm" else "after vs before the pass",
            "adherence": {k: {"before": b, "after": a} for k, (b, a) in adherence.items()},
            "passed": mean >= threshold and not lost}
    if not gate["passed"]:
        if not force:
            why = [f"mean SSIM {mean:.3f} < {threshold} (PSNR {gate['psnr_db']:.1f} dB)"] if mean < threshold else []
            why += [f"{k} right in {adherence[k][1]} of {len(GATE_PROMPTS)} videos, {adherence[k][0]} before" for k in lost]
            raise VerificationError(
                f"pass {name!r} fails its quality gate on {len(GATE_PROMPTS)} fixed prompts: " + "; ".join(why),
                hint="use --force to apply it anyway, or --gate NAME=VALUE to change the SSIM threshold",
            )
        gate["forced"] = True
    return gate


def adherence_counts(prompts, before: list[np.ndarray], after: list[np.ndarray]) -> dict[str, tuple[int, int]]:
    """How many videos get each attribute of their prompt right (colour, shape, direction),
    before and after a pass; a lossy pass may not lose any (on models that get them right)."""
    from sorakit.adherence import score_video

    b = [score_video(v, p) for v, p in zip(before, prompts)]
    a = [score_video(v, p) for v, p in zip(after, prompts)]
    return {k: (sum(r[f"{k}_ok"] for r in b), sum(r[f"{k}_ok"] for r in a)) for k in ("colour", "shape", "direction")}
