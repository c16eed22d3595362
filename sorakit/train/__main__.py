"""``python -m sorakit.train --out DIR [--seed 0] [--minutes M]``: train the shapes model."""

from __future__ import annotations

import argparse
import dataclasses

from sorakit.train.recipe import RecipeConfig, run, tiny_config, tiny_shapes_preset


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sorakit.train", description=__doc__)
    ap.add_argument("--out", required=True, help="output directory (weights, tokenizer.json, training.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock cap on the DiT stage")
    ap.add_argument("--dit-steps", type=int, default=None)
    ap.add_argument("--num-clips", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="toy model, a handful of steps (smoke test)")
    args = ap.parse_args(argv)
    cfg = tiny_config() if args.tiny else RecipeConfig()
    changes = {"seed": args.seed}
    for name in ("minutes", "dit_steps", "num_clips", "threads"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    cfg = dataclasses.replace(cfg, **changes)
    run(args.out, cfg, tiny_shapes_preset() if args.tiny else None)


if __name__ == "__main__":
    main()
