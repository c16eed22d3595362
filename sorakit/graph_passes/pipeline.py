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
import os
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
        link_or_copy(bundle.path(rel), dst)
    ws = Workspace(staging.dir)
    report = OptimizeReport(out)
    gates = {**{p.name: p.gate for p in objs if p.lossy}, **(gates or {})}
    try:
        for p in objs:
            candidates = p.candidates() if p.lossy else [p]
            if p.lossy and (gates.get(p.name) is None or not gateable(manifest)):
                candidates = candidates[-1:]  # no gate to choose with: the most cautious setting
            attempts: list[dict[str, Any]] = []
            for k, q in enumerate(candidates):
                last = k == len(candidates) - 1
                before = copy.deepcopy(manifest)
                files_before = {f for f in ws.root.rglob("*") if f.is_file()}
                record = _apply(q, ws, manifest, progress)
                if q.lossy:
                    if gates.get(q.name) is None:
                        record.gate = {"skipped": "not gated on request"}
                    else:
                        precision = q.name if q.settings().get("variant") else None  # run the variants it added
                        record.gate = run_gate(q.name, ws, before, manifest, gates[q.name], force, gate_steps,
                                               precision, raise_on_fail=last)
                        if not record.gate.get("passed", True) and not last:
                            # a stricter setting of the same pass is tried next: undo this attempt
                            attempts.append({"settings": q.settings(), **{k2: record.gate[k2] for k2 in
                                                                        ("value", "min", "psnr_db", "passed")}})
                            manifest = before
                            for f in {f for f in ws.root.rglob("*") if f.is_file()} - files_before:
                                f.unlink()
                            continue
                    if attempts:
                        record.gate["attempts"] = attempts
                manifest.passes.append(record.to_dict())
                report.records.append(record)
                break
        manifest.files = {rel: file_record(ws.path(rel)) for rel in manifest.referenced_files()}
        staging.commit(manifest)
    except BaseException:
        shutil.rmtree(staging.dir, ignore_errors=True)
        raise
    return report


def _apply(p, ws: Workspace, manifest: Manifest, progress: ProgressFn | None) -> PassRecord:
    """Run one pass over its targets; exact rewrites are verified graph by graph as they are made."""
    record = PassRecord(p.name, p.settings())
    targets = p.targets(manifest)
    for i, (comp, entry) in enumerate(targets):
        if progress:
            progress(p.name, i, len(targets))
        for change in p.rewrite(ws, manifest, comp, entry):
            if not p.lossy and change.replaced is not None:
                change.max_abs_err = verify_exact(ws, change.replaced, _find(manifest, change.graph),
                                                  manifest, p.name, getattr(p, "adapt_feeds", None))
            record.changes.append(change)
    if progress:
        progress(p.name, len(targets), len(targets))
    p.finish(manifest)
    return record


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a file of the input bundle into the new one (a copy across file systems).

    Passes never write into an existing file: they write new files (``Workspace.save``), so a
    link shares only what no pass changed; a real-size bundle is tens of GB. ONNX Runtime loads
    hard-linked external data; sorakit reads weights itself (``onnx_utils.load``) because onnx
    refuses them.
    """
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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


def verify_exact(ws: Workspace, old: GraphEntry, new: GraphEntry, manifest: Manifest, pass_name: str,
                 adapt: Callable | None = None) -> float:
    """Run the graph before and after a pass on the same seeded inputs; the outputs must agree.

    ``adapt(ws, manifest, old, new, feeds_old) -> feeds_new``: for a pass that changes a graph's
    inputs (e.g. the T5 lookup taken out of the graph), the new graph's inputs derived from the old one's.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if adapt is None:
        # symbolic dimensions of the new graph are checked at the old graph's sizes; the prompt's
        # token count (pass text_tokens, symbolic in both) at the length the encoder was exported for
        from sorakit.graph_passes.text_tokens import DIM as TOKENS

        known = {TOKENS: int(manifest.tokenizer.get("max_length", 0) or 0)}
        shapes = {t.name: [o if not isinstance(d, int) else d for d, o in zip(t.shape, old_t.shape)]
                  for t, old_t in zip(new.inputs, old.inputs)}
        shapes = {k: [known.get(d, d) if isinstance(d, str) else d for d in v] for k, v in shapes.items()}
        feeds = sample_inputs(new, manifest, shapes)
        feeds_old = feeds
    else:
        feeds_old = sample_inputs(old, manifest, {t.name: t.shape for t in old.inputs})
        feeds = adapt(ws, manifest, old, new, feeds_old)
    a = ort.InferenceSession(str(ws.path(old.file)), so, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(ws.path(new.file)), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in new.outputs]
    ra = a.run(names, {k: v for k, v in feeds_old.items() if k in {i.name for i in a.get_inputs()}})
    rb = b.run(names, {k: v for k, v in feeds.items() if k in {i.name for i in b.get_inputs()}})
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


GATE_COMPONENTS = ("text_encoder", "transformer", "vae")


def gateable(manifest: Manifest) -> bool:
    """Whether the end-to-end gate can run on this bundle (it generates videos: every component)."""
    return all(c in manifest.components for c in GATE_COMPONENTS)


def run_gate(name: str, ws: Workspace, before: Manifest, after: Manifest, threshold: float, force: bool,
             steps: int | None, precision: str | None = None, raise_on_fail: bool = True) -> dict[str, Any]:
    """End-to-end SSIM of videos from fixed prompts/seeds, before vs after the pass."""
    from sorakit.metrics import psnr, video_ssim
    from sorakit.runtime.pipeline import Pipeline

    missing = [c for c in GATE_COMPONENTS if c not in after.components]
    if missing:
        return {"skipped": f"the bundle lacks {missing}; no end-to-end gate", "threshold": threshold}
    steps = steps or int(after.sampler.get("num_steps", 30))
    pa = Pipeline(Bundle(ws.root, before, verify="none"), memory_budget="unlimited", verify=False)
    pb = Pipeline(Bundle(ws.root, after, verify="none"), memory_budget="unlimited", verify=False, precision=precision)
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
        if not force and raise_on_fail:
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
