"""Measure a trained shapes model: adherence, velocity cosines, diagnostics and the docs' figures.

``python -m sorakit.train.report [--model DIR] [--img docs/img] [--json FILE]`` samples the 24
evaluation prompts (one batch, seed 0, 30 steps, CFG 7) with the torch reference pipeline,
scores them from the frames alone and prints the figures recorded in docs/training.md; with
``--img`` it also writes the velocity-cosine plot and a strip of sample frames.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sorakit.adherence import (
    ATTRIBUTES,
    EVAL_CFG,
    EVAL_PROMPTS,
    EVAL_SEED,
    EVAL_SEEDS,
    EVAL_STEPS,
    SELECTION_PROMPTS,
    SELECTION_SEEDS,
    STEADINESS,
    describe,
    score_set,
    seed_summary,
    target_misses,
)
from sorakit.export.models import TorchModels
from sorakit.export.reference import ReferencePipeline
from sorakit.presets import shapes_preset
from sorakit.train.figures import plot_velocity_cosine, sample_strip, update_doc

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "shapes"
# what training.json records of a measurement (seed 0), and of each prompt
SCORE_KEYS = ("colour_acc", "shape_acc", "direction_acc", "both_acc", "background_steady_acc", "shape_consistency")
PROMPT_KEYS = ("prompt", "colour", "shape", "direction", "colour_ok", "shape_ok", "direction_ok", "background_steady")


def load_shipped(model_dir: str | Path = SHIPPED_DIR) -> TorchModels:
    """The shipped shapes model (or another recipe output directory), loaded strictly."""
    d = Path(model_dir)
    return TorchModels.from_checkpoints(
        shapes_preset(), d / "transformer", d / "vae", d / "text_encoder", tokenizer_file=d / "tokenizer.json"
    )


def adherence(
    models: TorchModels, steps: int = EVAL_STEPS, cfg_scale: float = EVAL_CFG, seed: int = EVAL_SEED,
    prompts: tuple[str, ...] = EVAL_PROMPTS,
) -> tuple[dict, np.ndarray]:
    """The prompts sampled as one batch from ``seed`` and scored, and the videos."""
    prompts = list(prompts)
    res = ReferencePipeline(models)(prompts, seed=seed, steps=steps, cfg_scale=cfg_scale)
    return score_set(res.video, prompts), res.video


def with_sampler(models: TorchModels, **changes) -> TorchModels:
    """The same weights sampled with other sampler settings (diagnostics), e.g.
    ``transform_base_resolution=512**2`` or ``guidance_max_t=None`` (CFG at every step)."""
    preset = dataclasses.replace(models.preset, sampler=dataclasses.replace(models.preset.sampler, **changes))
    return dataclasses.replace(models, preset=preset)


def guidance_note(models: TorchModels) -> str:
    """How the evaluation guides these models: the CFG scale and, if set, the guidance interval."""
    g = models.preset.sampler.guidance_max_t
    return f"CFG {EVAL_CFG:g} at t ≤ {g:g}" if g is not None else f"CFG {EVAL_CFG:g}"


@torch.no_grad()
def direction_probe(models: TorchModels, seeds: int = 8, clips: int = 960) -> dict:
    """Does the prompt's direction change what the model predicts at t = 1000?

    At pure noise the model's x0 prediction (x_t + v) estimates E[x0 | prompt]. It is averaged
    over ``seeds`` noises for "a red circle moving D on a black background" (D = left, right,
    up, down) and compared with the mean latent of training clips with those attributes:
    norms of the left-right and up-down differences (model vs data), the cosine of the model's
    and the data's mean latent, and the T5 output's relative change per token position for a
    direction swap and a colour swap.
    """
    from sorakit.train.common import to_unit
    from sorakit.train.data import make_dataset

    pipe, p = ReferencePipeline(models), models.preset
    dirs = ("left", "right", "up", "down")
    videos, _, attrs = make_dataset(clips, 0)
    data = {}
    for d in dirs:
        idx = [i for i, a in enumerate(attrs) if a["direction"] == d and a["background"] == "black" and a["colour"] == "red"]
        data[d] = models.vae.encode(to_unit(videos[idx]).movedim(1, 2), sample=False).mean(0)
    y, mask = pipe.encode_prompts([f"a red circle moving {d} on a black background" for d in dirs])
    shape = (1, p.stdit.in_channels, *p.latent_size(p.num_frames, *p.resolution))
    H, W = p.resolution
    model = dict.fromkeys(dirs, 0.0)
    for seed in range(seeds):
        eps = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        v = models.transformer(
            eps.repeat(4, 1, 1, 1, 1), torch.full((4,), 1000.0), y, mask, None,
            torch.tensor([float(p.sampler.fps)]), torch.tensor([float(H)]), torch.tensor([float(W)]),
        )[:, : shape[1]]
        for i, d in enumerate(dirs):
            model[d] = model[d] + (eps[0] + v[i]) / seeds
    out = {}
    for a, b in (("left", "right"), ("up", "down")):
        out[f"{a}-{b}"] = {"data_norm": round(float((data[a] - data[b]).norm()), 2),
                           "model_norm": round(float((model[a] - model[b]).norm()), 2)}
    cos = torch.nn.functional.cosine_similarity(model["right"].flatten(), data["right"].flatten(), dim=0)
    out["mean_cosine_model_vs_data"] = round(float(cos), 3)
    t5, _ = pipe.encode_prompts(["a red circle moving left", "a red circle moving right", "a blue circle moving left"])
    t5 = t5[:, 0]

    def per_token(i, j):
        return [round(float((t5[i, k] - t5[j, k]).norm() / t5[i, k].norm()), 2) for k in range(6)]

    out["t5_change_direction_swap"] = per_token(0, 1)
    out["t5_change_colour_swap"] = per_token(0, 2)
    return out


def ship(
    run_dir: str | Path,
    measure: Callable[[Path], dict],
    checkpoint: str | None = None,
    dest: Path = SHIPPED_DIR,
    vae_dir: str | Path | None = None,
) -> dict:
    """Copy a recipe output (optionally one of its ``checkpoints/stepN``) into the package.

    ``vae_dir``: take the VAE from this directory (holding ``model.safetensors``) instead of
    the run's, e.g. one whose decoder was fine-tuned further (``finetune_decoder_dir``); only
    the decoder may differ, since the DiT was trained on the run's encoder's latents.

    ``training.json`` gets the run's settings, log and evaluations plus ``measured``, the
    adherence and diagnostics of the copied files (``measure``: the shipped files -> dict; the
    report's own measurement, so nothing is sampled twice). The copy is staged next to
    ``dest`` and renamed into place only once complete.
    """
    import shutil

    run_dir = Path(run_dir)
    dit_dir = run_dir / "checkpoints" / checkpoint if checkpoint else run_dir
    sources = {
        "transformer": dit_dir / "transformer",
        "text_encoder": dit_dir / "text_encoder",
        "vae": Path(vae_dir) if vae_dir else run_dir / "vae",
    }
    if vae_dir:
        check_same_encoder(run_dir / "vae" / "model.safetensors", sources["vae"] / "model.safetensors")
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, src in sources.items():
        (staging / name).mkdir()
        shutil.copy2(src / "model.safetensors", staging / name / "model.safetensors")
    shutil.copy2(run_dir / "tokenizer.json", staging / "tokenizer.json")
    measured = measure(staging)
    log = json.loads((run_dir / "training_log.json").read_text())
    record = json.loads((run_dir / "training.json").read_text()) if (run_dir / "training.json").is_file() else {}
    evals = [e for e in log["events"] if e["stage"] == "eval"]
    record |= {
        "recipe": "python -m sorakit.train --out DIR --seed SEED (see docs/training.md for this run's flags)",
        "config": log.get("config"),
        "stages": log.get("stages"),
        "shipped_from": {"run": run_dir.name, "checkpoint": checkpoint, "vae": str(vae_dir) if vae_dir else None},
        "dit_steps_done": int(checkpoint.removeprefix("step")) if checkpoint else log["stages"]["dit"]["steps_done"],
        "evals": evals,
        "loss": [(e["step"], round(e["loss"], 4)) for e in log["events"] if e["stage"] == "dit"],
        "file_bytes": {n: (staging / n / "model.safetensors").stat().st_size for n in ("transformer", "vae", "text_encoder")},
        "adherence": {
            "prompts": len(measured["per_prompt"]),
            "steps": EVAL_STEPS,
            "cfg_scale": EVAL_CFG,
            "guidance_max_t": measured.get("guidance_max_t"),
            "seed": EVAL_SEED,
            **{k: measured[k] for k in SCORE_KEYS if k in measured},
        },
        "measured": measured,
    }
    (staging / "training.json").write_text(json.dumps(record, indent=1))
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return record


def remeasure(measure: Callable[[Path], dict], dest: Path = SHIPPED_DIR) -> dict:
    """Measure the shipped files again (e.g. after a sampler default changed) and rewrite
    ``adherence`` and ``measured`` in their training.json; the run's record stays as it was,
    and the previous measurement is kept under ``measured_before``."""
    record = json.loads((dest / "training.json").read_text())
    measured = measure(dest)
    before = {k: v for k, v in record.get("measured", {}).items() if k != "per_prompt"}
    record |= {
        "adherence": record.get("adherence", {}) | {
            "guidance_max_t": measured.get("guidance_max_t"),
            **{k: measured[k] for k in SCORE_KEYS if k in measured},
        },
        "measured": measured,
        "measured_before": before,
    }
    tmp = dest / "training.json.partial"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(dest / "training.json")
    return record


def check_same_encoder(a: Path, b: Path) -> None:
    """Refuse a VAE whose encoder (or latent normalisation) differs from the run's: the DiT's
    latents would no longer be the ones this VAE decodes."""
    from safetensors.numpy import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    decoder = ("decoder.", "post_quant_conv.")
    for key in sorted(wa):
        if any(part in key for part in decoder):
            continue
        if key not in wb or wa[key].shape != wb[key].shape or not np.array_equal(wa[key], wb[key]):
            raise ValueError(f"{b}: {key} differs from the run's VAE; only decoder weights may change")


def scores_by_seed(models: TorchModels, seeds, say=print, prompts=EVAL_PROMPTS) -> tuple[list[dict], np.ndarray]:
    """The prompts scored per noise seed (every attribute) and the first seed's videos."""
    rows, first = [], None
    for seed in seeds:
        s, videos = adherence(models, seed=seed, prompts=prompts)
        first = videos if first is None else first
        rows.append({"seed": seed} | {k: s[k] for k, _, _ in ATTRIBUTES})
        say(f"  seed {seed}: " + ", ".join(f"{name} {s[k]:.1%}" for k, name, _ in ATTRIBUTES))
    return rows, first


@torch.no_grad()
def vae_roundtrip(vae_dir: Path, clips: int = 200, start: int = 10_000_000) -> dict:
    """The VAE alone: held-out clips of the data generator encoded (posterior mean), decoded,
    written to .mp4 and read back like generated videos, and scored; PSNR before the file."""
    import tempfile

    from sorakit.export.models import load
    from sorakit.runtime.sampler import to_uint8_video
    from sorakit.runtime.video import read_video, save_video
    from sorakit.train.common import psnr, to_unit
    from sorakit.train.data import make_dataset

    vae = load("vae", Path(vae_dir), shapes_preset()).float().eval()
    videos, captions, _ = make_dataset(clips, 0, start=start)
    decoded, errs = [], []
    for i in range(0, clips, 8):
        x = to_unit(videos[i : i + 8]).movedim(1, 2)
        rec = vae.decode(vae.encode(x, sample=False), videos.shape[1])
        errs.append(psnr(rec, x))
        decoded.append(to_uint8_video(rec.numpy()))
    with tempfile.TemporaryDirectory() as d:
        back = [read_video(save_video(v, Path(d) / f"{i}.mp4")) for i, v in enumerate(np.concatenate(decoded))]
    s = score_set(back, captions)
    out = {"clips": clips, "psnr": round(float(np.mean(errs)), 2), **{k: s[k] for k, _, _ in ATTRIBUTES}}
    print(f"VAE round trip of {clips} held-out clips through .mp4: PSNR {out['psnr']} dB, {describe(s)}")
    return out


def selection(model_dir: Path, guidance: list[float | None]) -> dict:
    """Scores on the selection prompts and seeds (for choices; never the evaluation set), per
    guidance interval (None: CFG at every step)."""
    models = load_shipped(model_dir)
    out = {}
    for g in guidance:
        print(f"selection set, seeds {SELECTION_SEEDS}, CFG {EVAL_CFG:g} at t <= {g or 1000:g}:")
        rows, _ = scores_by_seed(with_sampler(models, guidance_max_t=g), SELECTION_SEEDS, prompts=SELECTION_PROMPTS)
        out[str(g)] = seed_summary(rows)
        print("  mean: " + ", ".join(f"{k.removesuffix('_acc')} {v['mean']:.1%}" for k, v in out[str(g)].items()))
    return out


def measure(model_dir: Path, img: Path | None = None, diagnostics: bool = False, seeds: int = len(EVAL_SEEDS)) -> dict:
    """Adherence over noise seeds 0 .. seeds-1 (the model's sampler and, if it has a guidance
    interval, CFG at every step), velocity cosines, text sensitivity (and diagnostics, figures)."""
    from sorakit.train.dit import text_sensitivity, velocity_cosines

    models = load_shipped(model_dir)
    score, videos = adherence(models)
    print(f"adherence on {score['n']} prompts (30 steps, {guidance_note(models)}, seed 0):")
    print("  " + "  ".join(f"{name} {score[key]:.1%}" for key, name, _ in ATTRIBUTES))
    for key, what in STEADINESS:
        if score[key] is not None:
            print(f"  {what} {score[key]:.1%}")
    for r in score["per_prompt"]:
        mark = "".join(c if r[f"{k}_ok"] else "-" for c, k in (("C", "colour"), ("S", "shape"), ("D", "direction")))
        print(f"  [{mark}] {r['prompt']:<55} -> {r['colour']} {r['shape']}, {r['direction']}")
    out = {
        **{key: score[key] for key in SCORE_KEYS},
        **{key: score[key] for key, _ in STEADINESS},
        "per_prompt": [{k: r[k] for k in PROMPT_KEYS} for r in score["per_prompt"]],
        "guidance_max_t": models.preset.sampler.guidance_max_t,
    }
    print(f"over noise seeds 0-{seeds - 1} ({guidance_note(models)}):")
    out["by_seed"] = [{"seed": 0} | {k: score[k] for k, _, _ in ATTRIBUTES}]
    out["by_seed"] += scores_by_seed(models, range(1, seeds))[0]
    every_step = with_sampler(models, guidance_max_t=None)
    if models.preset.sampler.guidance_max_t is not None:
        print(f"over noise seeds 0-{seeds - 1}, CFG {EVAL_CFG:g} at every step:")
        out["by_seed_cfg_every_step"] = scores_by_seed(every_step, range(seeds))[0]
    out["summary"] = seed_summary(out["by_seed"])
    out["misses"] = target_misses(out["by_seed"], out.get("by_seed_cfg_every_step"))
    print("targets:", "all met" if not out["misses"] else "; ".join(out["misses"]))

    cos = velocity_cosines(models, list(EVAL_PROMPTS), EVAL_STEPS, EVAL_CFG, EVAL_SEED)
    out["velocity_cosine_mean"] = [round(float(c), 5) for c in cos.mean(axis=0)]
    cos_every = None
    if models.preset.sampler.guidance_max_t is not None:
        from sorakit.runtime.sampler import first_guided_step, timestep_schedule

        cos_every = velocity_cosines(every_step, list(EVAL_PROMPTS), EVAL_STEPS, EVAL_CFG, EVAL_SEED)
        sampler, (H, W) = models.preset.sampler, models.preset.resolution
        ts = timestep_schedule(sampler, EVAL_STEPS, H, W, models.preset.latent_size(models.preset.num_frames, H, W)[0])
        out["velocity_cosine_every_step_mean"] = [round(float(c), 5) for c in cos_every.mean(axis=0)]
        out["first_guided_step"] = first_guided_step(ts, sampler.guidance_max_t)
    out["text_sensitivity"] = text_sensitivity(models)
    print("text sensitivity (relative change of v between opposite directions) by t:", out["text_sensitivity"])
    if diagnostics:
        out["direction_probe"] = direction_probe(models)
        print("direction probe (model vs data at t = 1000):", out["direction_probe"])
        variants = [("cfg_1", models, 1.0)]
        variants += [(f"transform_base_{b}", with_sampler(models, transform_base_resolution=b * b), EVAL_CFG) for b in (512, 256)]
        for key, variant, scale in variants:
            s, _ = adherence(variant, cfg_scale=scale)
            out[key] = {k: s[k] for k, _, _ in ATTRIBUTES}
            print(f"{key}: " + ", ".join(f"{name} {s[k]:.1%}" for k, name, _ in ATTRIBUTES))
    if img:
        plot_velocity_cosine(
            cos, img / "velocity_cosine.png", f"shapes model, 30 steps, {guidance_note(models)}: cos(v_i, v_i+1)",
            cos_every, out.get("first_guided_step"),
        )
        pick = [0, 1, 2, 3, 9, 14]
        sample_strip(videos[pick], [EVAL_PROMPTS[i] for i in pick], img / "shapes_samples.png")
        print(f"wrote {img / 'velocity_cosine.png'} and {img / 'shapes_samples.png'}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sorakit.train.report", description=__doc__)
    ap.add_argument("--model", default=str(SHIPPED_DIR))
    ap.add_argument("--img", default=None, help="write velocity_cosine.png and shapes_samples.png here")
    ap.add_argument("--json", default=None, help="write the figures as JSON here")
    ap.add_argument("--diagnostics", action="store_true", help="also sample with Open-Sora's 512^2 transform base")
    ap.add_argument("--seeds", type=int, default=len(EVAL_SEEDS), help="score the prompts with noise seeds 0 .. N-1")
    ap.add_argument("--ship", default=None, metavar="RUN_DIR", help="copy this recipe output into the package, measured")
    ap.add_argument(
        "--remeasure", action="store_true", help="measure the shipped files again and rewrite their training.json figures"
    )
    ap.add_argument("--checkpoint", default=None, help="with --ship: ship RUN_DIR/checkpoints/CHECKPOINT's T5 + DiT")
    ap.add_argument("--vae", default=None, help="with --ship: the VAE from this directory (decoder fine-tuned further)")
    ap.add_argument(
        "--doc",
        default=None,
        help="rewrite the shipped model's figures block in this Markdown file from its training.json "
        "(alone: without sampling anything)",
    )
    ap.add_argument("--vae-roundtrip", default=None, metavar="VAE_DIR",
                    help="score the VAE alone: 200 held-out clips encoded, decoded, through .mp4")
    ap.add_argument("--selection", default=None, metavar="T,T,...",
                    help="score --model on the selection prompts and seeds for these guidance intervals (1000: every step)")
    args = ap.parse_args(argv)

    def write_doc() -> None:
        update_doc(Path(args.doc), json.loads((SHIPPED_DIR / "training.json").read_text()))

    if args.doc and not (args.ship or args.remeasure or args.json or args.img or args.diagnostics):
        write_doc()
        return
    torch.set_num_threads(2)
    img = Path(args.img) if args.img else None

    def run(model_dir: Path) -> dict:
        return measure(model_dir, img, args.diagnostics, args.seeds)

    if args.vae_roundtrip:
        out = vae_roundtrip(Path(args.vae_roundtrip))
    elif args.selection:
        guidance = [None if float(v) >= 1000 else float(v) for v in args.selection.split(",")]
        out = selection(Path(args.model), guidance)
    elif args.ship:
        out = ship(args.ship, run, args.checkpoint, vae_dir=args.vae)["measured"]
        print(f"shipped {args.ship} ({args.checkpoint or 'final'}) to {SHIPPED_DIR}")
    elif args.remeasure:
        out = remeasure(run)["measured"]
        print(f"re-measured {SHIPPED_DIR}")
    else:
        out = run(Path(args.model))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.doc:
        write_doc()


if __name__ == "__main__":
    main()
