"""The one registry of graph passes.

A pass registers itself with ``@register``. It declares on itself whether it is exact (verified
graph by graph against the graph it rewrites) or lossy (held to an end-to-end quality gate),
and a lossy pass must declare its default gate, or it cannot be registered. Device profiles
name passes; ``check_profile`` holds those names against this registry, and ``plan_passes``
turns a request (explicit names and/or a profile) into the passes still to apply to a bundle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sorakit.errors import SorakitError

if TYPE_CHECKING:
    from sorakit.bundle.manifest import Manifest
    from sorakit.graph_passes.base import GraphPass
    from sorakit.profiles import DeviceProfile

PASSES: dict[str, type[GraphPass]] = {}


def register(cls: type[GraphPass]) -> type[GraphPass]:
    """Class decorator: add a pass to the registry after checking its declarations."""
    name = getattr(cls, "name", "")
    if not name or not name.isidentifier():
        raise TypeError(f"{cls.__name__}: a pass needs a name that is an identifier, got {name!r}")
    if name in PASSES and PASSES[name] is not cls:
        raise TypeError(f"{cls.__name__}: pass name {name!r} is taken by {PASSES[name].__name__}")
    if cls.lossy:
        gate = cls.gate
        if gate is None or not 0 < gate <= 1:
            raise TypeError(f"{cls.__name__}: lossy pass {name!r} must declare its quality gate "
                            f"(a minimum SSIM in (0, 1]), got {gate!r}")
    elif cls.gate is not None:
        raise TypeError(f"{cls.__name__}: exact pass {name!r} is verified graph by graph and takes no quality gate")
    PASSES[name] = cls
    return cls


def _load() -> dict[str, type[GraphPass]]:
    import sorakit.graph_passes.coreml  # noqa: F401 - registers the Core ML passes
    import sorakit.graph_passes.fuse_gelu  # noqa: F401
    import sorakit.graph_passes.passes  # noqa: F401 - registers the built-in passes
    import sorakit.graph_passes.text_tokens  # noqa: F401

    return PASSES


def known() -> list[str]:
    return list(_load())


def get(name: str) -> type[GraphPass]:
    passes = _load()
    if name not in passes:
        raise SorakitError(f"unknown pass {name!r}; known passes: {', '.join(passes)}")
    return passes[name]


def parse_passes(spec: str | list[str]) -> list[str]:
    """'tdtm,prune' or a list -> names in canonical order; unknown or repeated names are refused."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    for n in names:
        get(n)
    if len(set(names)) != len(names):
        raise SorakitError(f"a pass is listed twice: {names}")
    return sorted(names, key=lambda n: PASSES[n].order)


def check_profile(profile: DeviceProfile) -> None:
    """Refuse a device profile that names a pass the registry does not have."""
    passes = _load()
    bad = [p for p in profile.optimize_passes if p not in passes]
    if bad:
        raise SorakitError(f"device profile {profile.name!r} names unknown passes {bad}; known: {', '.join(passes)}")


@dataclass
class PassPlan:
    apply: list[str]  # in canonical order
    already: list[str] = field(default_factory=list)  # the profile's passes the bundle carries already
    settings: dict[str, dict] = field(default_factory=dict)  # the profile's settings of the passes it applies


def plan_passes(manifest: Manifest, passes: str | list[str] | None = None,
                profile: DeviceProfile | None = None) -> PassPlan:
    """The passes to run on a bundle: the ones named, plus a profile's (and ``pin`` when the profile
    needs static shapes and the bundle is dynamic). A profile's passes that the bundle already
    carries are skipped and reported; a pass named explicitly is applied as asked (and a pass
    refuses to run twice)."""
    names = parse_passes(passes or [])
    applied = {p["name"] for p in manifest.passes}
    already: list[str] = []
    if profile is not None:
        check_profile(profile)
        for p in profile.optimize_passes:
            if p in applied:
                already.append(p)
            elif p not in names:
                names.append(p)
        if profile.static_shapes and not manifest.static and "pin" not in names:
            names.append("pin")
    if not names and not already:
        raise SorakitError("no passes given: use --passes NAME[,NAME...] or --device NAME")
    names = parse_passes(names)
    settings = {k: dict(v) for k, v in (profile.pass_settings.items() if profile else []) if k in names}
    return PassPlan(names, already, settings)
