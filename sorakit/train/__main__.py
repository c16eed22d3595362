"""``python -m sorakit.train --out DIR [--seed 0] [--minutes M]``: train the shapes model."""

from __future__ import annotations

import argparse
import dataclasses

# OpenMP's wait policy is left alone. OMP_WAIT_POLICY=PASSIVE (idle threads sleep) pays only when
# another busy process shares the cores (measured: DiT step 1.4 s instead of 17 s); on an idle
# 2-core machine it costs (DiT step 1.2 s instead of 0.9 s, frame encoding 2x slower).
from sorakit.presets import shapes_preset
from sorakit.train.config import RecipeConfig, tiny_config, tiny_shapes_preset
from sorakit.train.recipe import run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sorakit.train", description=__doc__)
    ap.add_argument("--out", required=True, help="output directory (weights, tokenizer.json, training.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock cap on the DiT stage")
    ap.add_argument("--dit-steps", type=int, default=None)
    ap.add_argument("--num-clips", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="toy model, a handful of steps (smoke test)")
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--vae-from", default=None, help="ablation: reuse this output directory's VAE, train only T5 + DiT")
    ap.add_argument("--dit-from", default=None, help="continue this output directory's T5 + DiT (use with --vae-from)")
    ap.add_argument("--decoder-steps", type=int, default=None, help="decoder fine-tune steps (0: keep the VAE as is)")
    ap.add_argument(
        "--whiten-floor", type=float, default=None, help="latent whitening floor in posterior variances (0: off)"
    )
    ap.add_argument("--eval-set", choices=("evaluation", "selection"), default=None,
                    help="prompts of the evaluations during training (selection: for trial runs that inform choices)")
    ap.add_argument("--spatial-from", default=None, help="resume: reuse this output directory's spatial VAE")
    ap.add_argument(
        "--transform-base",
        type=int,
        default=None,
        help="ablation: timestep-transform base side (e.g. 512 = Open-Sora's)",
    )
    args = ap.parse_args(argv)
    cfg = tiny_config() if args.tiny else RecipeConfig()
    changes = {"seed": args.seed}
    for name in ("minutes", "dit_steps", "num_clips", "threads", "eval_every", "decoder_steps", "eval_set"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.whiten_floor is not None:
        changes["latent_whiten_floor"] = args.whiten_floor
    cfg = dataclasses.replace(cfg, **changes)
    preset = tiny_shapes_preset() if args.tiny else shapes_preset()
    if args.transform_base:
        sampler = dataclasses.replace(preset.sampler, transform_base_resolution=args.transform_base**2)
        preset = dataclasses.replace(preset, sampler=sampler)
    run(args.out, cfg, preset, vae_from=args.vae_from, spatial_from=args.spatial_from, dit_from=args.dit_from)


if __name__ == "__main__":
    main()
