"""Text-to-video on ONNX Runtime: the embeddable pipeline. No torch.

    from sorakit.runtime import Pipeline, save_video

    pipe = Pipeline.from_bundle("bundle/", device="cpu", memory_budget="2GB")
    result = pipe("a red circle moving right", steps=30, cfg=7.0, seed=0, lpl="15", tdtm_steps=10)
    save_video(result.frames, "out.mp4")
    print(result.timings)

Every graph call goes through one CI-DL scheduler (``scheduler.py``); the sampler is numpy
(``sampler.py``) and matches the torch reference step for step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sorakit.bundle.io import Bundle
from sorakit.bundle.manifest import GraphEntry
from sorakit.errors import BudgetError, SorakitError
from sorakit.memory import available_memory, rss_bytes
from sorakit.presets import ModelPreset, check_geometry, decode_chunks
from sorakit.profiles import DeviceProfile, get_profile
from sorakit.runtime import validate
from sorakit.runtime.plan import ExecutionPlan, make_plan
from sorakit.runtime.sampler import (
    LPL,
    SampleReport,
    first_guided_step,
    initial_noise,
    rflow_sample,
    timestep_schedule,
    to_uint8_video,
)
from sorakit.runtime.scheduler import BlockScheduler, SchedulerStats, minimum_budget
from sorakit.runtime.session import ORT, SessionFactory, SessionOptions, plan_providers
from sorakit.runtime.step_cache import StepCache
from sorakit.tokenizer import PromptTokenizer
from sorakit.units import human_bytes

log = logging.getLogger(__name__)


@dataclass
class Progress:
    stage: str  # "text", "denoise", "decode"
    index: int  # finished units of the stage
    total: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Timings:
    text_encoder: float = 0.0
    transformer: float = 0.0
    transformer_steps: list[float] = field(default_factory=list)
    vae: float = 0.0
    total: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class GenerationResult:
    frames: np.ndarray  # [F, H, W, 3] uint8, the first prompt's video
    videos: np.ndarray  # [n, F, H, W, 3] uint8
    video_float: np.ndarray  # [n, 3, F, H, W] decoder output
    latents: np.ndarray  # [n, C, T, h, w] final latent
    timings: Timings
    sampling: SampleReport
    memory: SchedulerStats
    notes: list[str] = field(default_factory=list)  # truncation, unknown words, fallbacks


def leap_vs_guidance(lpl: LPL, ts: np.ndarray, guidance_max_t: float | None, cfg: float) -> str | None:
    """A note when a fixed LPL leap sits badly against the guidance interval, else None."""
    if lpl.mode != "fixed" or guidance_max_t is None or cfg == 1:
        return None
    first = first_guided_step(ts, guidance_max_t)
    if first == 0:
        return None
    if lpl.leap_at < first:
        return (f"LPL leaps at step {lpl.leap_at}, before guidance starts (step {first}, t <= {guidance_max_t:g}): "
                "this video is sampled without CFG")
    if lpl.leap_at - first < 2:
        return (f"LPL leaps at step {lpl.leap_at}, {lpl.leap_at - first} step(s) after guidance starts (step {first}); "
                "the CFG velocity has not settled there, so the leap is poor: leap later or use --lpl dynamic")
    return None


class Pipeline:
    """A loaded bundle ready to generate. Build it with ``Pipeline.from_bundle``."""

    def __init__(
        self,
        bundle: Bundle,
        device: str | DeviceProfile = "cpu",
        memory_budget: str | int | None = None,
        strict: bool = False,
        threads: int | None = None,
        prefetch: bool = True,
        verify: bool = True,
        precision: str | None = None,
        force_budget: bool = False,
    ):
        self.bundle = bundle
        m = bundle.manifest
        self.manifest = m
        self.preset = ModelPreset.from_dict(m.preset)
        self.profile = get_profile(device) if isinstance(device, str) else device
        self.providers = plan_providers(self.profile, strict)
        threads = self.profile.threads if threads is None else threads
        # one CPU arena for every session: the blocks that run one after another reuse the same
        # activation memory instead of mapping fresh pages at every run (a real-size int8
        # transformer call: 5.0 s, against 6.3-7.7 s with activations allocated per run); the
        # scheduler shrinks it when a phase ends
        self.factory = SessionFactory(self.providers, SessionOptions(threads=threads, strict=strict, arena="shared"))
        missing = [c for c in ("text_encoder", "transformer", "vae") if c not in m.components]
        if missing:
            raise SorakitError(f"bundle {bundle.root} lacks components {missing}; export them to generate video")
        # the budget is for the whole process: what it holds already (interpreter, libraries) is
        # subtracted, the rest is for the graphs' sessions
        self.budget = self._budget(memory_budget, force_budget)
        self.block_budget = None
        if self.budget is not None:
            base = rss_bytes()
            self.block_budget = self.budget - base
            if self.block_budget <= 0:
                need = base + minimum_budget(bundle, m.all_graphs())
                raise BudgetError(f"memory budget {human_bytes(self.budget)} is below what this process already uses "
                                  f"({human_bytes(base)}) before loading any graph; the smallest workable budget "
                                  f"is about {human_bytes(need)}")
        te = m.components["text_encoder"].graphs
        dynamic_text = not all(isinstance(d, int) for d in te[0].inputs[0].shape)
        self.plan: ExecutionPlan = make_plan(bundle, self.providers, self.block_budget,
                                             steps=int(m.sampler.get("num_steps", self.preset.sampler.num_steps)),
                                             precision=precision, text_tokens=32 if dynamic_text else None)
        self.te_graphs = [self.plan.graph("text_encoder", g) for g in te]
        self.tr = {r: m.components["transformer"].by_role(r) for r in ("prologue", "block", "epilogue")}
        self.vae_temporal = [self.plan.graph("vae", g) for g in m.components["vae"].by_role("temporal")]
        self.vae_spatial = [self.plan.graph("vae", g) for g in m.components["vae"].by_role("spatial")]
        engines = {}
        for comp, c in m.components.items():
            for g in c.graphs:
                for e in [g, *g.variants.values()]:
                    engines[e.name] = self.plan.choice(comp).engine
        self.scheduler = BlockScheduler(bundle, self.factory, self.block_budget, prefetch,
                                        engine_of=lambda g: engines.get(g.name, ORT))
        if verify:
            bundle.verify_all()
        self.scheduler.check_budget(self.te_graphs + self._step_chain(False) + self.vae_temporal + self.vae_spatial,
                                    base=0 if self.budget is None else self.budget - self.block_budget)
        tok = m.tokenizer
        self.tokenizer = PromptTokenizer(bundle.path(tok["file"]), tok["max_length"], tok["pad_id"], tok["eos_id"])
        self.null_caption = bundle.load_array(m.null_caption["file"], m.null_caption.get("shape"))
        emb = m.components["text_encoder"].info.get("embedding_file")
        self.embedding = np.load(bundle.path(emb), mmap_mode="r") if emb else None
        self.dynamic_text = dynamic_text
        y_spec = next((t for t in self.tr["prologue"][0].inputs if t.name == "y"), None)
        # pass caption_tokens: the transformer reads the prompt's tokens only (set False to feed
        # it the padded caption, e.g. to measure what the pass saves)
        self.dynamic_captions = y_spec is not None and not isinstance(y_spec.shape[1], int)

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        device: str | DeviceProfile = "cpu",
        memory_budget: str | int | None = None,
        strict: bool = False,
        threads: int | None = None,
        prefetch: bool = True,
        verify: bool = True,
        precision: str | None = None,
        force_budget: bool = False,
    ) -> Pipeline:
        """Open a bundle directory; checksums are verified before any work unless ``verify=False``.

        ``device`` names a profile (cpu, cpu-bf16, iphone-15-pro, mac, android); ``memory_budget``
        is the process's memory, bytes or a string like "2GB" or "40%" (of available memory),
        default the profile's; "unlimited" sets no limit of its own (graphs stay resident while
        physical memory holds them; when it does not, a finished phase's graphs go first); a
        budget above physical memory needs ``force_budget``. ``precision`` forces one (fp32, int8, bf16) instead of the
        execution plan's choice per component. Every argument is checked first
        (``sorakit.runtime.validate``).
        """
        path, device, memory_budget, strict, threads, prefetch, verify, precision = validate.open_args(
            path, device, memory_budget, strict, threads, prefetch, verify, force_budget, precision)
        return cls(Bundle.open(path, verify="lazy"), device, memory_budget, strict, threads, prefetch, verify,
                   precision, True)

    def _budget(self, spec: str | int | None, force: bool = False) -> int | None:
        spec = validate.memory_budget(spec, force)
        if spec is None:
            return self.profile.budget_bytes(available_memory())
        return None if spec == "unlimited" else spec

    # -- geometry -------------------------------------------------------------------------------
    def _geometry(self, height, width, num_frames) -> tuple[int, int, int]:
        geo = self.manifest.geometry
        height = height or geo.get("height") or self.preset.resolution[0]
        width = width or geo.get("width") or self.preset.resolution[1]
        num_frames = num_frames or geo.get("num_frames") or self.preset.num_frames
        check_geometry(self.preset, num_frames, height, width)
        if self.manifest.static and (height, width, num_frames) != (geo["height"], geo["width"], geo["num_frames"]):
            raise SorakitError(
                f"this bundle was exported with static shapes for {geo['height']}x{geo['width']}, "
                f"{geo['num_frames']} frames; it cannot run {height}x{width}, {num_frames} frames",
                hint="export a bundle for that size (sorakit export --resolution HxW --frames N) or a --dynamic one",
            )
        return height, width, num_frames

    # -- text -----------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> y [n, L, D] (T5 output) and mask [n, L]."""
        suffix = self.manifest.tokenizer.get("prompt_suffix", "")
        batch = self.tokenizer([p + suffix for p in prompts])
        for p, cut, unk in zip(prompts, batch.truncated, batch.unknown):
            if cut:
                notes.append(f"prompt truncated to {self.tokenizer.max_length} tokens: {p[:60]!r}...")
            if unk:
                notes.append(f"{unk} token(s) of {p[:60]!r} are unknown to the tokenizer")
        outs = []
        for i in range(len(prompts)):
            ids, mask = batch.ids[i : i + 1], batch.mask[i : i + 1]
            # graphs with a dynamic token axis run on the prompt's tokens only: padding is masked
            # out of attention, so the prompt's outputs are the same, and the padded rows are
            # masked out of the transformer's cross-attention (zeros here)
            n = max(1, int(mask.sum())) if self.dynamic_text else ids.shape[1]
            ctx: dict[str, np.ndarray] = {"input_ids": ids[:, :n], "attention_mask": mask[:, :n]}
            if self.embedding is not None:
                ctx["inputs_embeds"] = np.ascontiguousarray(self.embedding[ids[:, :n]], dtype=np.float32)
            self.scheduler.run_chain(self.te_graphs, ctx, then=self._after_text())
            text = ctx["text"]
            if text.shape[1] < ids.shape[1]:
                text = np.concatenate([text, np.zeros((1, ids.shape[1] - n, text.shape[2]), text.dtype)], axis=1)
            outs.append(text)
        return np.concatenate(outs), batch.mask

    def _after_text(self) -> GraphEntry | None:
        return self._step_chain(False)[0]

    # -- transformer ----------------------------------------------------------------------------
    def _blocks(self, tdtm: bool) -> list[GraphEntry]:
        if tdtm:
            missing = [g.name for g in self.tr["block"] if "tdtm" not in g.variants]
            if missing:
                raise SorakitError(
                    f"tdtm_steps > 0 needs the bundle's TDTM variants, which {missing[0]} lacks",
                    hint="add them with: sorakit optimize BUNDLE --passes tdtm --out BUNDLE2",
                )
        return [self._tr(g, "tdtm" if tdtm else "") for g in self.tr["block"]]

    def _tr(self, g: GraphEntry, variant: str = "") -> GraphEntry:
        """A transformer graph as the plan runs it (the int8 variant, say), falling back to the
        graph itself where the precision pass left it alone (prologue, epilogue)."""
        key = "+".join(x for x in (variant, self.plan.choice("transformer").tag) if x)
        if not key or key in g.variants:
            return self.plan.graph("transformer", g, variant)
        return g.variants[variant] if variant else g

    def _step_chain(self, tdtm: bool) -> list[GraphEntry]:
        return [self._tr(g) for g in self.tr["prologue"]] + self._blocks(tdtm) + [self._tr(g) for g in self.tr["epilogue"]]

    def _velocity(self, y: np.ndarray, y_mask: np.ndarray, height: int, width: int, tdtm_steps: int,
                  num_calls: int, on_step: Callable[[int, float], None], cache: StepCache | None = None,
                  no_cache_steps: frozenset[int] = frozenset()):
        null = np.broadcast_to(self.null_caption[None], (1, *self.null_caption.shape)).astype(np.float32)
        batch_dim = self.tr["prologue"][0].inputs[0].shape[0]
        pairs = isinstance(batch_dim, int)  # static graphs take one prompt (a CFG pair) per call
        captions_dynamic = self.dynamic_captions
        fps = np.array([float(self.preset.sampler.fps)], dtype=np.float32)
        hw = np.array([float(height)], dtype=np.float32), np.array([float(width)], dtype=np.float32)
        phase: list[bool | None] = [None]  # the TDTM phase residency was last planned for

        def run(z_pair: np.ndarray, t_pair: np.ndarray, idx: np.ndarray, step: int) -> np.ndarray:
            k = len(idx)
            if len(z_pair) == k:  # prompt only (an unguided step)
                y_in, mask_in = y[idx], y_mask[idx]
            else:
                y_in = np.concatenate([y[idx], np.repeat(null, k, 0)])
                mask_in = np.concatenate([y_mask[idx], y_mask[idx]])
            if captions_dynamic:  # the caption cut to the longest prompt: padding has no weight
                n = max(1, int(mask_in.sum(axis=1).max()))
                y_in, mask_in = y_in[:, :n], mask_in[:, :n]
            ctx = {
                "x": np.ascontiguousarray(z_pair, dtype=np.float32),
                "timestep": t_pair.astype(np.float32),
                "y": y_in.astype(np.float32),
                "y_mask": mask_in.astype(np.int64),
                "fps": fps,
                "height": hw[0],
                "width": hw[1],
            }
            chain = self._step_chain(step < tdtm_steps)
            nxt = self._step_chain(step + 1 < tdtm_steps)[0] if step + 1 < num_calls else self.vae_temporal[0]
            if cache is None:
                self.scheduler.run_chain(chain, ctx, then=nxt)
                return ctx["velocity"]
            n_pro, n_epi = len(self.tr["prologue"]), len(self.tr["epilogue"])
            pro, blocks, epi = chain[:n_pro], chain[n_pro:-n_epi], chain[-n_epi:]
            self.scheduler.run_chain(pro, ctx, then=blocks[0])
            key = (tuple(int(i) for i in idx), len(z_pair), step < tdtm_steps)
            residual = cache.decide(key, ctx["tokens"], ctx["t_mlp"], step not in no_cache_steps)
            if residual is not None:
                ctx["tokens"] = ctx["tokens"] + residual
                self.scheduler.run_chain(epi, ctx, then=nxt)
            else:
                tokens_in = ctx["tokens"]
                self.scheduler.run_chain(blocks + epi, ctx, then=nxt)
                cache.store(key, tokens_in, ctx["tokens"])
            return ctx["velocity"]

        def velocity(z_in: np.ndarray, t: np.ndarray, step: int, active: np.ndarray) -> np.ndarray:
            t0 = time.perf_counter()
            if phase[0] != (step < tdtm_steps):  # residency is planned once per phase, not per step
                phase[0] = step < tdtm_steps
                self._plan_denoise(len(active), step, num_calls, tdtm_steps)
            k = len(active)
            if not pairs:
                out = run(z_in, t, active, step)  # batch 2k (CFG) or k (prompt only)
            elif len(z_in) == k:  # static CFG-pair graphs: run the pair, keep the prompt half
                out = np.concatenate([run(z_in[[j, j]], t[[j, j]], active[j : j + 1], step)[:1] for j in range(k)])
            else:
                outs = [run(z_in[[j, k + j]], t[[j, k + j]], active[j : j + 1], step) for j in range(k)]
                out = np.concatenate([o[:1] for o in outs] + [o[1:] for o in outs])
            on_step(step, time.perf_counter() - t0)
            return out

        return velocity

    def _uses(self, n: int) -> int:
        """Calls of each transformer graph per step for n prompts (static graphs: one per prompt)."""
        return n if isinstance(self.tr["prologue"][0].inputs[0].shape[0], int) else 1

    def _plan_text(self, n_prompts: int) -> None:
        usage = {g.name: n_prompts for g in self.te_graphs}
        self.scheduler.set_usage(usage, self.te_graphs + self._step_chain(False), active=self.te_graphs)

    def _plan_denoise(self, n_active: int, step: int, num_calls: int, tdtm_steps: int) -> None:
        """Residency for the rest of the denoising from ``step``: how often each graph still runs."""
        calls = self._uses(n_active)
        left = max(0, num_calls - step)
        tdtm_left = max(0, min(tdtm_steps, num_calls) - step)
        usage: dict[str, int] = {}
        for g in self._step_chain(False):
            usage[g.name] = (left - tdtm_left) * calls
        if tdtm_left:
            for g in self._step_chain(True):
                usage[g.name] = usage.get(g.name, 0) + tdtm_left * calls
        chain = self._step_chain(tdtm_left > 0)
        order = chain + (self._step_chain(False) if tdtm_left else []) + self.vae_temporal + self.vae_spatial
        self.scheduler.set_usage(usage, order, active=chain)

    def _plan_decode(self, n_prompts: int, num_frames: int) -> None:
        vae = self.vae_temporal + self.vae_spatial
        t_uses, s_uses = self._vae_calls(num_frames)
        usage = {g.name: n_prompts * (t_uses if g in self.vae_temporal else s_uses) for g in vae}
        self.scheduler.set_usage(usage, vae, active=vae)

    # -- VAE ------------------------------------------------------------------------------------
    def _vae_calls(self, num_frames: int | None = None) -> tuple[int, int]:
        """(temporal chain calls, spatial chain calls) per video."""
        info = self.manifest.components["vae"].info
        num_frames = num_frames or self.manifest.geometry.get("num_frames") or self.preset.num_frames
        chunks = decode_chunks(num_frames, info["micro_frame_size"], info["time_downsample"])
        spatial_in = self.vae_spatial[0].inputs[0].shape[0]
        batch = spatial_in if isinstance(spatial_in, int) else info.get("spatial_batch", 4)
        return len(chunks), -(-num_frames // batch)

    def decode(self, z: np.ndarray, num_frames: int, on_progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Latent [n, C, T, h, w] -> video [n, 3, F, H, W]."""
        info = self.manifest.components["vae"].info
        chunks = decode_chunks(num_frames, info["micro_frame_size"], info["time_downsample"])
        spatial_in = self.vae_spatial[0].inputs[0].shape[0]
        batch = spatial_in if isinstance(spatial_in, int) else info.get("spatial_batch", 4)
        n_batches = -(-num_frames // batch)
        total, done = len(z) * (len(chunks) + n_batches), 0
        videos = []
        for s in range(len(z)):
            parts, start = [], 0
            for zt, nf in chunks:
                ctx = {"z": np.ascontiguousarray(z[s : s + 1, :, start : start + zt])}
                self.scheduler.run_chain(self.vae_temporal, ctx, then=self.vae_temporal[0])
                parts.append(ctx["latent_frames"][:, :, -nf:])  # dynamic graphs leave the front padding
                start += zt
                done += 1
                if on_progress:
                    on_progress(done, total)
            frames = np.concatenate(parts, axis=2)[0].transpose(1, 0, 2, 3)  # [F, C, h, w]
            images = []
            for b in range(0, num_frames, batch):
                chunk = frames[b : b + batch]
                real = len(chunk)
                if real < batch:  # static batch: pad with copies of the last frame, drop them after
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - real, 0)])
                ctx = {"frames": np.ascontiguousarray(chunk, dtype=np.float32)}
                last = s == len(z) - 1 and b + batch >= num_frames
                self.scheduler.run_chain(self.vae_spatial, ctx, then=None if last else self.vae_spatial[0])
                images.append(ctx["video"][:real])
                done += 1
                if on_progress:
                    on_progress(done, total)
            videos.append(np.concatenate(images).transpose(1, 0, 2, 3))  # [3, F, H, W]
        return np.stack(videos)

    # -- the call -------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str],
        *,
        steps: int | None = None,
        cfg: float | None = None,
        cfg_max_t: float | None = None,
        seed: int = 0,
        lpl: str | LPL | None = None,
        tdtm_steps: int = 0,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        noise: np.ndarray | None = None,
        callback: Callable[[Progress], None] | None = None,
        step_cache: float | None = None,
    ) -> GenerationResult:
        """Generate one video per prompt.

        ``steps``/``cfg`` default to the bundle's sampler settings (30, 7.0 for Open-Sora).
        ``cfg_max_t``: the guidance interval, CFG only at timesteps <= it (the prompt's velocity
        alone above); None: the bundle's setting (400 for the shipped model, every step for
        Open-Sora); 1000 or more: every step.
        ``lpl``: None/"off", "15" (15 steps then a leap), "dynamic[:start=14,tol=1e-3,patience=3]".
        ``tdtm_steps``: the first m steps use the TDTM block variants (needs ``sorakit optimize
        --passes tdtm``). ``noise`` overrides the seeded initial latent. ``step_cache``: reuse
        the blocks' residual while the accumulated relative change of their modulated input
        stays below this (``step_cache.py``; e.g. 0.1); None or 0: every step runs the blocks.
        """
        a = validate.generation_args(self, prompt, steps=steps, cfg=cfg, cfg_max_t=cfg_max_t, seed=seed, lpl=lpl,
                                     tdtm_steps=tdtm_steps, height=height, width=width, num_frames=num_frames,
                                     noise=noise, callback=callback, step_cache=step_cache)
        prompts, steps, cfg, cfg_max_t, seed, lpl, tdtm_steps = (a.prompts, a.steps, a.cfg, a.cfg_max_t, a.seed, a.lpl,
                                                                 a.tdtm_steps)
        height, width, num_frames, noise, callback = a.height, a.width, a.num_frames, a.noise, a.callback
        step_cache = a.step_cache
        sampler = self.preset.sampler
        notes = list(self.providers.fallbacks)
        timings = Timings()
        t_start = time.perf_counter()
        self.scheduler.begin()
        try:
            def emit(stage, i, total, **info):
                if callback:
                    callback(Progress(stage, i, total, info))

            # 1. text
            self._plan_text(len(prompts))
            emit("text", 0, len(prompts))
            t0 = time.perf_counter()
            y, mask = self.encode_prompts(prompts, notes)
            timings.text_encoder = time.perf_counter() - t0
            emit("text", len(prompts), len(prompts))

            # 2. denoise
            shape = (len(prompts), self.preset.stdit.in_channels, *self.preset.latent_size(num_frames, height, width))
            z = initial_noise(seed, shape) if noise is None else noise
            ts = timestep_schedule(sampler, steps, height, width, shape[2])
            note = leap_vs_guidance(lpl, ts, cfg_max_t, cfg)
            if note:
                notes.append(note)

            def on_step(step, seconds):
                timings.transformer_steps.append(seconds)

            num_calls = lpl.leap_at + 1 if lpl.mode == "fixed" else steps
            cache = StepCache(float(step_cache)) if step_cache else None
            # the last call, and a fixed leap's call, must see the model itself
            no_cache = frozenset({num_calls - 1, steps - 1})
            vel = self._velocity(y, mask, height, width, tdtm_steps, num_calls, on_step, cache, no_cache)
            t0 = time.perf_counter()
            emit("denoise", 0, steps)
            z, report = rflow_sample(vel, z, ts, cfg, lpl, sampler.num_timesteps,
                                     on_step=lambda i, r: emit("denoise", i + 1, steps, calls=r.model_calls),
                                     guidance_max_t=cfg_max_t)
            timings.transformer = time.perf_counter() - t0
            if cache is not None:
                report.cached_steps = cache.skipped
            emit("denoise", steps, steps, calls=report.model_calls)

            # 3. decode
            t0 = time.perf_counter()
            self._plan_decode(len(prompts), num_frames)
            video = self.decode(z, num_frames, lambda i, n: emit("decode", i, n))
            timings.vae = time.perf_counter() - t0
        except BaseException:
            self.scheduler.cancel_prefetch()
            raise
        memory = self.scheduler.end()
        timings.total = time.perf_counter() - t_start
        videos = to_uint8_video(video)
        return GenerationResult(videos[0], videos, video, z, timings, report, memory, notes)

    def close(self) -> None:
        self.scheduler.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
