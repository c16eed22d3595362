"""The runtime on real ONNX Runtime sessions: no torch, parity, LPL, TDTM plumbing, CI-DL, bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import copy_bundle

from sorakit.errors import BudgetError, BundleError, ProviderError, SorakitError
from sorakit.memory import rss_bytes
from sorakit.runtime import Pipeline

BLOCK_TORCH = textwrap.dedent("""
    import sys, importlib.abc
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split('.')[0] in ('torch', 'transformers', 'diffusers', 'coremltools', 'optimum'):
                raise ImportError('blocked in this test: ' + name)
    sys.meta_path.insert(0, _Block())
""")


def test_runtime_runs_without_torch(tiny_bundle, tmp_path):
    out = tmp_path / "v.mp4"
    script = BLOCK_TORCH + textwrap.dedent(f"""
        from sorakit.runtime import Pipeline, save_video
        import sorakit.profiles, sorakit.bundle, sorakit.graph_passes.flops, sorakit.cli.main
        try:
            import torch
            raise SystemExit('torch imported')
        except ImportError:
            pass
        pipe = Pipeline.from_bundle({str(tiny_bundle[0])!r})
        r = pipe('a red circle moving right', steps=2)
        save_video(r.frames, {str(out)!r})
        bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'diffusers')]
        assert not bad, bad
        print('ok', r.frames.shape)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ok (17, 64, 64, 3)" in res.stdout
    assert out.stat().st_size > 1000


def test_matches_torch_reference(tiny_bundle, tiny_models):
    from sorakit.export.reference import ReferencePipeline

    pipe = Pipeline.from_bundle(tiny_bundle[0])
    got = pipe("a blue square moving up", seed=5, steps=4, cfg=7.0)
    ref = ReferencePipeline(tiny_models)("a blue square moving up", seed=5, steps=4, cfg_scale=7.0)
    assert np.abs(got.latents - ref.latents).max() < 1e-3
    assert np.abs(got.video_float - ref.video_float).max() < 1e-3
    assert np.abs(got.frames.astype(int) - ref.video[0].astype(int)).max() <= 1
    assert got.frames.std() > 1  # not blank


def test_guidance_interval_matches_torch_reference(tiny_bundle, tiny_models):
    """cfg_max_t: CFG only at t <= it, the same in the runtime and in the torch reference."""
    import dataclasses

    from sorakit.export.reference import ReferencePipeline

    pipe = Pipeline.from_bundle(tiny_bundle[0])
    prompt = "a green diamond moving left"
    full = pipe(prompt, seed=3, steps=6, cfg=7.0)
    ts = full.sampling.timesteps
    max_t = (ts[1] + ts[2]) / 2  # the first two steps unguided
    got = pipe(prompt, seed=3, steps=6, cfg=7.0, cfg_max_t=max_t)
    assert full.sampling.cfg_scales == [7.0] * 6
    assert got.sampling.cfg_scales == [1.0, 1.0] + [7.0] * 4
    assert np.abs(got.latents - full.latents).max() > 1e-2
    preset = tiny_models.preset
    preset = dataclasses.replace(preset, sampler=dataclasses.replace(preset.sampler, guidance_max_t=max_t))
    ref = ReferencePipeline(dataclasses.replace(tiny_models, preset=preset))(prompt, seed=3, steps=6, cfg_scale=7.0)
    assert np.abs(got.latents - ref.latents).max() < 1e-3
    assert np.abs(got.frames.astype(int) - ref.video[0].astype(int)).max() <= 1
    with pytest.raises(SorakitError, match="cfg_max_t must be a positive timestep"):
        pipe(prompt, steps=2, cfg_max_t=0)
    # a fixed leap at or right after the start of guidance is flagged, a later one is not
    notes = {n: pipe(prompt, seed=3, steps=6, cfg_max_t=max_t, lpl=n).notes for n in ("1", "2", "4")}
    assert any("before guidance starts (step 2" in x for x in notes["1"]), notes
    assert any("0 step(s) after guidance starts" in x for x in notes["2"]), notes
    assert not any("guidance starts" in x for x in notes["4"]), notes


def test_dynamic_bundle_generates_and_skips_the_null_half_outside_the_interval(tmp_path, tiny_models):
    """A dynamic-shape bundle end to end: at unguided steps the transformer runs on the prompt
    half only (batch 1 instead of 2), and the video still matches the torch reference."""
    import dataclasses

    from sorakit.export.exporter import ExportSettings, export_bundle
    from sorakit.export.reference import ReferencePipeline

    out = tmp_path / "dyn"
    export_bundle(ExportSettings(tiny_models.preset, 64, 64, 17, static=False, verify=False), out)
    pipe = Pipeline.from_bundle(out)
    batches = []
    prologue = pipe.tr["prologue"][0]
    run_graph = pipe.scheduler.run_chain

    def spy(chain, ctx, then=None):
        if chain and chain[0] is prologue:
            batches.append(len(ctx["x"]))
        return run_graph(chain, ctx, then=then)

    pipe.scheduler.run_chain = spy
    prompt = "a red circle moving right"
    full = pipe(prompt, seed=2, steps=5, cfg=7.0)
    ts = full.sampling.timesteps
    max_t = (ts[1] + ts[2]) / 2
    batches.clear()
    got = pipe(prompt, seed=2, steps=5, cfg=7.0, cfg_max_t=max_t)
    assert batches == [1, 1, 2, 2, 2]
    preset = dataclasses.replace(
        tiny_models.preset, sampler=dataclasses.replace(tiny_models.preset.sampler, guidance_max_t=max_t)
    )
    ref = ReferencePipeline(dataclasses.replace(tiny_models, preset=preset))(prompt, seed=2, steps=5, cfg_scale=7.0)
    assert np.abs(got.latents - ref.latents).max() < 1e-3
    assert np.abs(got.frames.astype(int) - ref.video[0].astype(int)).max() <= 1
    assert np.abs(got.latents - full.latents).max() > 1e-2


def test_deterministic_and_seeded(tiny_bundle):
    pipe = Pipeline.from_bundle(tiny_bundle[0])
    a = pipe("a red circle", seed=1, steps=3)
    b = pipe("a red circle", seed=1, steps=3)
    c = pipe("a red circle", seed=2, steps=3)
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)


def test_lpl_fixed_calls_transformer_n_plus_one_times(tiny_bundle):
    pipe = Pipeline.from_bundle(tiny_bundle[0])
    full = pipe("a red circle", seed=0, steps=8)
    leap = pipe("a red circle", seed=0, steps=8, lpl="3")
    assert len(full.timings.transformer_steps) == 8 and full.sampling.model_calls == 8
    assert len(leap.timings.transformer_steps) == 4 and leap.sampling.model_calls == 4
    assert leap.sampling.leap_step == [3]
    assert not np.array_equal(full.latents, leap.latents)


def test_lpl_dynamic_and_batch_of_prompts(tiny_bundle):
    pipe = Pipeline.from_bundle(tiny_bundle[0])
    r = pipe(["a red circle", "a green square"], seed=0, steps=12, lpl="dynamic:start=2,tol=0.5,patience=1")
    assert r.videos.shape[0] == 2
    assert all(s is not None and s >= 2 for s in r.sampling.leap_step)
    assert r.sampling.model_calls < 12
    assert r.memory.prefetch_cancelled >= 0


def test_tdtm_steps_need_tdtm_variants(tiny_bundle):
    pipe = Pipeline.from_bundle(tiny_bundle[0])
    with pytest.raises(SorakitError, match="TDTM variants"):
        pipe("a red circle", steps=4, tdtm_steps=2)


def test_budget_below_model_streams_with_same_output(shapes_random_bundle):
    from sorakit.bundle.io import Bundle

    m = Bundle.open(shapes_random_bundle).manifest
    transformer_bytes = sum(m.files[f]["bytes"] for g in m.components["transformer"].graphs for f in g.files())
    total = sum(r["bytes"] for r in m.files.values())
    resident = Pipeline.from_bundle(shapes_random_bundle, memory_budget="unlimited")
    want = resident("a red circle moving right", seed=3, steps=4)
    budget = int(0.6 * transformer_bytes)
    assert budget < total
    # the budget is the process's memory: what it holds already comes on top of the graphs' share
    pipe = Pipeline.from_bundle(shapes_random_bundle, memory_budget=rss_bytes() + budget)
    got = pipe("a red circle moving right", seed=3, steps=4)
    # streamed sessions skip weight prepacking, a different GEMM path: equal up to float rounding
    assert np.abs(got.frames.astype(int) - want.frames.astype(int)).max() <= 1
    assert np.abs(got.latents - want.latents).max() < 1e-4
    mem = got.memory
    n_graphs = len(m.all_graphs())
    assert mem.loads > n_graphs  # blocks were streamed, some more than once
    assert len(mem.resident) < n_graphs
    # the stated margin: peak RSS above the process's baseline stays within budget + 10 % + 30 MB
    # (ONNX Runtime's per-session bookkeeping and thread pools are not model memory)
    assert mem.peak_rss - mem.base_rss <= 1.1 * budget + 30e6, (mem.peak_rss - mem.base_rss, budget)


def test_unlimited_releases_a_finished_phase_when_the_machine_cannot_hold_everything(shapes_random_bundle, monkeypatch):
    """No budget is not more memory than the machine has: on a machine whose memory holds the
    transformer and the VAE but not the text encoder beside them, an "unlimited" run releases
    the text encoder once the prompt is encoded (the real-size fp32 T5 is 19 GB) and computes
    the same video; with room for everything, everything stays resident across calls."""
    from sorakit.runtime import scheduler as sched_mod

    pipe = Pipeline.from_bundle(shapes_random_bundle, memory_budget="unlimited")
    want = pipe("a red circle moving right", seed=3, steps=4)
    s = pipe.scheduler
    te = [g.name for g in pipe.te_graphs]
    chain = [g.name for g in pipe._step_chain(False)]
    vae = [g.name for g in pipe.vae_temporal + pipe.vae_spatial]
    assert set(te + chain + vae) <= set(s.sessions)  # room for everything: all resident
    cost = {n: s.costs[n].estimate for n in te + chain + vae}
    working = max(s.working_estimate(g) for g in pipe._step_chain(False))  # the denoising phase's
    # room for the denoising and decoding graphs, not for any text-encoder graph beside them
    limit = sum(cost[n] for n in chain + vae) + working + min(cost[n] for n in te) // 2
    assert sum(cost.values()) + working > limit

    def available():  # a machine with `limit` for our graphs: what the sessions hold is taken
        return int(limit / s.ROOM_SHARE) - sum(s.costs[n].estimate for n in s.sessions)

    monkeypatch.setattr(sched_mod, "available_memory", available)
    seen: dict[str, set] = {}
    planned: dict[str, set] = {}

    def watch(p):
        seen.setdefault(f"{p.stage}{p.index}", set(s.sessions))
        planned.setdefault(f"{p.stage}{p.index}", set(s.resident))

    got = pipe("a red circle moving right", seed=3, steps=4, callback=watch)
    assert set(te) <= seen["text1"]  # loaded for the prompt, then released for the denoising:
    assert not set(te) & seen["denoise1"], "the text encoder stayed resident beside the transformer"
    assert set(chain) <= seen["denoise1"] and set(chain) <= planned["denoise1"]  # no streaming
    assert not set(te) & set(s.sessions)
    # a graph reloaded as a streamed session skips weight prepacking (another GEMM path): equal up
    # to float rounding, as in the budget test above
    assert np.abs(got.frames.astype(int) - want.frames.astype(int)).max() <= 1
    assert np.abs(got.latents - want.latents).max() < 1e-4
    again = pipe("a red circle moving right", seed=3, steps=4)  # the text encoder loads again
    assert again.memory.loads >= len(te)
    assert np.abs(again.frames.astype(int) - want.frames.astype(int)).max() <= 1


def test_repeated_generations_do_not_grow_rss(shapes_random_bundle):
    """Ten generations after three warm-up ones: streamed sessions give their memory back."""
    import gc

    pipe = Pipeline.from_bundle(shapes_random_bundle, memory_budget=rss_bytes() + 25_000_000)
    for i in range(3):
        pipe("a red circle moving right", seed=i, steps=1)
    sizes = []
    for i in range(10):
        pipe("a red circle moving right", seed=i, steps=1)
        gc.collect()
        sizes.append(rss_bytes())
    growth = max(sizes) - sizes[0]
    assert growth < 8e6, [round(s / 1e6, 1) for s in sizes]


def test_prefetch_error_surfaces_in_caller(shapes_random_bundle, tmp_path):
    from sorakit.bundle.io import Bundle

    b = copy_bundle(shapes_random_bundle, tmp_path / "b")
    m = Bundle.open(b).manifest
    transformer_bytes = sum(m.files[f]["bytes"] for g in m.components["transformer"].graphs for f in g.files())
    pipe = Pipeline.from_bundle(b, memory_budget=rss_bytes() + int(0.6 * transformer_bytes), verify=False)
    target = b / "transformer" / "block_02.onnx"

    def corrupt_after_first_step(p):
        if p.stage == "denoise" and p.index == 1:
            target.write_bytes(b"not an onnx model")

    with pytest.raises(Exception, match="block_02|[Pp]rotobuf|INVALID|parse"):
        pipe("a red circle", steps=4, callback=corrupt_after_first_step)
    assert pipe.scheduler.stats.prefetches >= 1
    assert pipe.scheduler._pending is None  # nothing left running after the failure


def test_bad_input(tiny_bundle, tmp_path):
    pipe = Pipeline.from_bundle(tiny_bundle[0])
    with pytest.raises(SorakitError, match="prompt is empty"):
        pipe("   ")
    r = pipe("a red circle moving right across a very long and winding road", steps=1)
    assert any("truncated" in n for n in r.notes)
    with pytest.raises(SorakitError, match="static shapes for 64x64, 17 frames"):
        pipe("a red circle", height=128, width=128)
    with pytest.raises(SorakitError, match="leap_at"):
        pipe("a red circle", steps=4, lpl="9")
    with pytest.raises(BudgetError, match="smallest workable budget is about"):
        Pipeline.from_bundle(tiny_bundle[0], memory_budget="1MB")
    with pytest.raises(SorakitError, match="unknown device 'toaster'"):
        Pipeline.from_bundle(tiny_bundle[0], device="toaster")
    with pytest.raises(ProviderError, match="CoreMLExecutionProvider is not available"):
        Pipeline.from_bundle(tiny_bundle[0], device="iphone-15-pro", strict=True)
    b = copy_bundle(tiny_bundle[0], tmp_path / "b")
    p = b / "vae" / "temporal_level0.onnx.data"
    data = bytearray(p.read_bytes())
    data[10] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="vae/temporal_level0.onnx.data is corrupt"):
        Pipeline.from_bundle(b)


def test_cpu_fallback_is_reported(tiny_bundle):
    pipe = Pipeline.from_bundle(tiny_bundle[0], device="iphone-15-pro")
    r = pipe("a red circle", steps=1)
    assert any("CoreMLExecutionProvider is not available" in n for n in r.notes)


def _big_intermediate_graph(path, n: int) -> None:
    """x [n] -> sum(x * 2): the product is an n-float intermediate that comes from the arena."""
    import onnx
    from onnx import TensorProto, helper

    two = helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])
    g = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"]), helper.make_node("ReduceSum", ["y"], ["z"], keepdims=0)],
        "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [])], initializer=[two])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def test_shared_arena_keeps_activations_between_runs_and_hands_them_back_on_shrink(tmp_path):
    """The pipeline's sessions share one CPU arena: a run's activation memory stays for the next
    session (no fresh pages at every run), and a run with the shrink options returns it."""
    from sorakit.profiles import get_profile
    from sorakit.runtime.session import SessionFactory, SessionOptions, plan_providers, shrink_arena_options

    n = 48 << 20  # 192 MB intermediate
    path = tmp_path / "big.onnx"
    _big_intermediate_graph(path, n)
    factory = SessionFactory(plan_providers(get_profile("cpu")), SessionOptions(threads=1, arena="shared"))
    opts = factory.options().ort_options
    assert opts.get_session_config_entry("session.use_env_allocators") == "1"
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    a, b = factory.create(path, factory.options()), factory.create(path, factory.options())
    x = np.ones(n, dtype=np.float32)
    a.run(None, {"x": x})
    held = rss_bytes()
    b.run(None, {"x": x})  # the second session reuses the arena's memory
    assert rss_bytes() - held < (n * 4) // 4, "the second session did not reuse the shared arena"
    (z,) = b.run(None, {"x": x}, shrink_arena_options())
    assert float(z) == 2.0 * n
    assert held - rss_bytes() > (n * 4) // 2, "the shrink options did not hand the arena's memory back"


def test_arena_is_shrunk_once_per_phase_and_one_shot_graphs_skip_prepacking(tiny_bundle, monkeypatch):
    """A generation shrinks the shared arena when the text encoder, the denoising and the
    decoding end (and nowhere else); graphs that run once in the call are built without weight
    prepacking, graphs that run at every step with it; the frames equal a run without the arena."""
    from sorakit.runtime import scheduler as sched_mod

    shrinks = []
    real = sched_mod.shrink_arena_options

    def counting():
        shrinks.append(1)
        return real()

    monkeypatch.setattr(sched_mod, "shrink_arena_options", counting)
    pipe = Pipeline.from_bundle(tiny_bundle[0])
    assert pipe.factory.defaults.arena == "shared"
    got = pipe("a red circle", seed=1, steps=3)
    assert len(shrinks) == 3  # text encoder, denoising, decoding
    s = pipe.scheduler
    once = [g for g in pipe.vae_temporal if s.usage.get(g.name) == 1]  # one chunk: runs once
    assert once
    for g in once:
        assert s.load_options(g).ort_options.get_session_config_entry("session.disable_prepacking") == "1"
    pipe._plan_denoise(1, 0, 3, 0)
    block = pipe._step_chain(False)[1]
    opts = s.load_options(block)
    assert opts is None or opts.ort_options.get_session_config_entry("session.disable_prepacking") != "1"
    plain = Pipeline.from_bundle(tiny_bundle[0])
    plain.factory.defaults.arena = "off"
    want = plain("a red circle", seed=1, steps=3)
    np.testing.assert_array_equal(got.latents, want.latents)
