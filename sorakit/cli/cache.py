"""`sorakit cache`: where the default model is cached, whether it is intact; clear it."""

from __future__ import annotations

from typing import Annotated

import typer

from sorakit.cli._common import JsonOpt, console, print_json
from sorakit.errors import SorakitError
from sorakit.units import human_bytes


def cache(
    verify: Annotated[bool, typer.Option("--verify", help="Hash every cached file against the shipped checksums")] = False,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the cached default model and the engines' compiled-graph "
                                                         "caches (all rebuilt on next use)")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show the default model's cache (SORAKIT_CACHE): its path and state, and the engines' compiled-graph
    caches; verify or clear them."""
    from sorakit.cache import clear_engine_caches, engine_caches
    from sorakit.runtime.default_model import bundles_dir, cache_state, clear_cache

    if verify and clear:
        raise SorakitError("--verify and --clear exclude each other; give one")
    if clear:
        gone = clear_cache()
        engines = clear_engine_caches()
        if as_json:
            print_json({"cleared": [str(p) for p in gone + engines], "cache": str(bundles_dir())})
        else:
            console.print(f"removed {len(gone)} item(s) from {bundles_dir()}" if gone else
                          f"nothing to remove in {bundles_dir()}", highlight=False)
            for d in engines:
                console.print(f"removed the compiled-graph cache {d}", highlight=False)
        return
    state = cache_state(verify=verify)
    engines = engine_caches()
    if as_json:
        print_json(state.to_dict() | {"engine_caches": {k: {"path": str(d), "bytes": n} for k, (d, n) in engines.items()}})
    else:
        if not state.exists:
            status = "not built yet (built on the first `sorakit generate` without --bundle)"
        elif state.problem is None:
            status = ("intact: every checksum verified" if state.verified
                      else "complete (sizes checked; --verify hashes every file)")
        else:
            status = f"damaged: {state.problem} (rebuilt on next use)"
        console.print(f"default model: {state.path}", highlight=False)
        console.print(f"state: {status}", highlight=False)
        if state.exists:
            console.print(f"size: {human_bytes(state.bytes)}", highlight=False)
        if state.stale:
            console.print(f"stale staging directories (removed on next build or --clear): "
                          f"{', '.join(str(p) for p in state.stale)}", highlight=False)
        if state.others:
            console.print(f"other cached models (other sorakit versions; --clear removes them): "
                          f"{', '.join(str(p) for p in state.others)}", highlight=False)
        for name, (d, n) in engines.items():
            console.print(f"{name} compiled graphs: {d}, {human_bytes(n)} (--clear removes them)", highlight=False)
    if verify and state.exists and state.problem is not None:
        raise SorakitError(f"the cached default model at {state.path} is damaged: {state.problem}",
                           hint="it is rebuilt on the next `sorakit generate`; or run `sorakit cache --clear`")
