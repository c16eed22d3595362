"""Helpers shared by `sorakit bench` and `sorakit eval`."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from pathlib import Path


class WorkDir:
    """A working directory: the one given (kept, so variant bundles are reused), or a temporary one."""

    def __init__(self, work: Path | None):
        self._tmp = tempfile.TemporaryDirectory() if work is None else None
        self.path = Path(self._tmp.name) if self._tmp else Path(work)
        self.path.mkdir(parents=True, exist_ok=True)

    def cleanup(self) -> None:
        if self._tmp:
            self._tmp.cleanup()


def variant_key(bundle: Path) -> str:
    """What a variant bundle depends on: the source bundle's manifest (its graphs' hashes) and
    the graph-pass code. A variant made from another model or by other pass code is not reused."""
    import sorakit.graph_passes as gp

    h = hashlib.sha256((Path(bundle) / "manifest.json").read_bytes())
    for src in sorted(Path(gp.__file__).parent.glob("*.py")):
        h.update(src.name.encode() + src.read_bytes())
    return h.hexdigest()[:12]


def variant_bundle(bundle: Path, work: Path, passes: list[str], say: Callable[[str], None] | None = None,
                   applied: list[str] | None = None) -> Path:
    """``bundle`` with ``passes`` applied (ungated: bench and eval measure the effect themselves),
    made once into ``work`` and reused while the source bundle and the pass code are the same;
    passes the bundle already carries (``applied``, read from it when not given) are skipped."""
    from sorakit.graph_passes.pipeline import optimize_bundle

    if applied is None:
        from sorakit.bundle.io import Bundle

        applied = [p["name"] for p in Bundle.open(bundle).manifest.passes]
    todo = [p for p in passes if p not in applied]
    if not todo:
        return bundle
    target = work / f"{'_'.join(passes)}-{variant_key(bundle)}"
    if not (target / "manifest.json").is_file():
        if say:
            say(f"optimize {','.join(todo)}")
        optimize_bundle(bundle, target, todo, gates={p: None for p in todo})
    return target
