"""Device profiles: data files (``profiles/*.toml``) that drive providers, budgets and passes.

A profile says which execution providers to ask for (in order) with their options, the
default memory budget, the thread count, whether the device needs static shapes, its
precision, and which passes ``sorakit optimize --device NAME`` applies. No torch here.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sorakit.errors import SorakitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
KNOWN_PROVIDERS = {
    "CPUExecutionProvider",
    "CoreMLExecutionProvider",
    "XnnpackExecutionProvider",
    "NnapiExecutionProvider",
    "CUDAExecutionProvider",
    "DmlExecutionProvider",
}
KNOWN_PASSES = {"tdtm", "prune", "simplify", "fp16", "int8", "pin"}


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    providers: tuple[ProviderSpec, ...]
    memory_budget: str  # "3.3GB", "75%" (of available memory) ...
    threads: int = 0
    static_shapes: bool = False
    precision: str = "fp32"
    optimize_passes: tuple[str, ...] = ()
    coreml: dict[str, Any] = field(default_factory=dict)

    @property
    def uses_coreml(self) -> bool:
        return any(p.name == "CoreMLExecutionProvider" for p in self.providers)

    def provider_options(self, cache_dir: str | Path | None = None) -> list[tuple[str, dict[str, str]]]:
        cache = str(cache_dir or default_cache_dir())
        return [(p.name, {k: v.replace("{cache}", cache) for k, v in p.options.items()}) for p in self.providers]

    def budget_bytes(self, available: int | None = None) -> int:
        return parse_bytes(self.memory_budget, available)


def default_cache_dir() -> Path:
    base = os.environ.get("SORAKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sorakit"
    )
    return Path(base)


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 10**12, "tb": 10**12}


def parse_bytes(spec: str | int | float, available: int | None = None) -> int:
    """'2GB', '512MiB', '1.5e9', 3000000000 or '40%' (of ``available``) -> bytes."""
    if isinstance(spec, (int, float)):
        return int(spec)
    s = spec.strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)(%|[a-z]*)", s)
    if not m or m.group(2) not in _UNITS and m.group(2) != "%":
        raise SorakitError(f"cannot read memory size {spec!r}; use e.g. 2GB, 512MiB or 40%")
    value, unit = float(m.group(1)), m.group(2)
    if unit == "%":
        if available is None:
            from sorakit.runtime.memory import available_memory

            available = available_memory()
        return int(available * value / 100)
    return int(value * _UNITS[unit])


def _load(path: Path) -> DeviceProfile:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SorakitError(f"device profile {path} is not valid TOML: {e}") from None
    where = f"device profile {path.name}"
    for key in ("name", "description", "providers", "memory_budget"):
        if key not in data:
            raise SorakitError(f"{where} lacks {key!r}")
    providers = []
    for p in data["providers"]:
        if p.get("name") not in KNOWN_PROVIDERS:
            raise SorakitError(f"{where}: unknown execution provider {p.get('name')!r}")
        providers.append(ProviderSpec(p["name"], {k: str(v) for k, v in p.get("options", {}).items()}))
    if providers[-1].name != "CPUExecutionProvider":
        raise SorakitError(f"{where}: the last provider must be CPUExecutionProvider (ORT's fallback)")
    passes = tuple(data.get("optimize_passes", ()))
    bad = [p for p in passes if p not in KNOWN_PASSES]
    if bad:
        raise SorakitError(f"{where}: unknown passes {bad}; known: {sorted(KNOWN_PASSES)}")
    parse_bytes(data["memory_budget"], available=1)  # validates the syntax
    if data.get("precision", "fp32") not in ("fp32", "fp16", "int8"):
        raise SorakitError(f"{where}: precision must be fp32, fp16 or int8")
    return DeviceProfile(
        name=data["name"],
        description=data["description"],
        providers=tuple(providers),
        memory_budget=str(data["memory_budget"]),
        threads=int(data.get("threads", 0)),
        static_shapes=bool(data.get("static_shapes", False)),
        precision=data.get("precision", "fp32"),
        optimize_passes=passes,
        coreml=dict(data.get("coreml", {})),
    )


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def get_profile(name: str) -> DeviceProfile:
    path = PROFILE_DIR / f"{name}.toml"
    if not path.is_file():
        raise SorakitError(f"unknown device {name!r}; choose one of: {', '.join(list_profiles())}")
    profile = _load(path)
    if profile.name != name:
        raise SorakitError(f"device profile {path.name} names itself {profile.name!r}")
    return profile
