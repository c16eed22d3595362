"""Device profiles: data files (``sorakit/profiles/*.toml``) that drive providers, budgets and passes.

A profile says which execution providers to ask for (in order) with their options, the
default memory budget, the thread count, whether the device needs static shapes, its
precision, and which passes ``sorakit optimize --device NAME`` applies.

This module sits in the bottom layer (stdlib only), below both ``runtime`` and ``devices``.
Pass names are checked here for form only; ``sorakit.graph_passes.registry`` checks them
against the one pass registry (``check_profile``) wherever passes are applied.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sorakit.cache import default_cache_dir
from sorakit.errors import SorakitError
from sorakit.units import parse_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PROFILE_DIR = Path(__file__).resolve().parent
KNOWN_PROVIDERS = {
    "CPUExecutionProvider",
    "CoreMLExecutionProvider",
    "XnnpackExecutionProvider",
    "NnapiExecutionProvider",
    "CUDAExecutionProvider",
    "DmlExecutionProvider",
}
PRECISIONS = ("fp32", "fp16", "int8")
TOP_LEVEL_KEYS = {"name", "description", "providers", "memory_budget", "threads", "static_shapes", "precision",
                  "optimize_passes", "coreml"}
# values ORT's CoreML EP accepts (coreml_options.cc, ORT >= 1.20); an unknown key is rejected as a typo
COREML_OPTIONS = {
    "ModelFormat": {"MLProgram", "NeuralNetwork"},
    "MLComputeUnits": {"CPUOnly", "CPUAndNeuralEngine", "CPUAndGPU", "ALL"},
    "RequireStaticInputShapes": {"0", "1"},
    "EnableOnSubgraphs": {"0", "1"},
    "ModelCacheDirectory": None,  # any path; "{cache}" is replaced by the sorakit cache directory
    "SpecializationStrategy": {"Default", "FastPrediction"},
    "ProfileComputePlan": {"0", "1"},
    "AllowLowPrecisionAccumulationOnGPU": {"0", "1"},
}
COREML_KEYS = {"model_format": str, "max_dim": int, "max_rank": int}


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

    @property
    def passes(self) -> tuple[str, ...]:
        """The passes ``sorakit optimize --device NAME`` applies, in order."""
        return self.optimize_passes

    def provider(self, name: str) -> ProviderSpec | None:
        return next((p for p in self.providers if p.name == name), None)

    @property
    def compiling_provider(self) -> ProviderSpec | None:
        """The first provider that takes whole subgraphs (Core ML, NNAPI); None for CPU-only devices."""
        for p in self.providers:
            if p.name in ("CoreMLExecutionProvider", "NnapiExecutionProvider"):
                return p
        return None

    @property
    def coreml_model_format(self) -> str:
        p = self.provider("CoreMLExecutionProvider")
        default = p.options.get("ModelFormat", "NeuralNetwork") if p else "NeuralNetwork"
        return str(self.coreml.get("model_format", default))

    @property
    def requires_static_input_shapes(self) -> bool:
        """True when the device needs every shape fixed (the profile, or the CoreML EP option)."""
        p = self.provider("CoreMLExecutionProvider")
        return self.static_shapes or bool(p and p.options.get("RequireStaticInputShapes") == "1")

    @property
    def is_arm(self) -> bool:
        """Phones and Apple silicon: ARM code paths (no x86-only layouts in packaged models)."""
        return self.name != "cpu" and any(p.name != "CPUExecutionProvider" for p in self.providers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "memory_budget": self.memory_budget,
            "threads": self.threads,
            "static_shapes": self.static_shapes,
            "precision": self.precision,
            "optimize_passes": list(self.optimize_passes),
            "providers": [{"name": p.name, "options": dict(p.options)} for p in self.providers],
            "coreml": dict(self.coreml),
        }


def load_profile(path: str | Path) -> DeviceProfile:
    """Read and validate one profile file; every problem is a SorakitError naming the file and key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise SorakitError(f"cannot read device profile {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise SorakitError(f"device profile {path} is not valid TOML: {e}") from None
    where = f"device profile {path.name}"
    for key in ("name", "description", "providers", "memory_budget"):
        if key not in data:
            raise SorakitError(f"{where} lacks {key!r}")
    unknown = sorted(set(data) - TOP_LEVEL_KEYS)
    if unknown:
        raise SorakitError(f"{where}: unknown keys {unknown}; known: {sorted(TOP_LEVEL_KEYS)}")
    for key in ("name", "description"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise SorakitError(f"{where}: {key!r} must be a non-empty string")
    if not isinstance(data["providers"], list) or not data["providers"]:
        raise SorakitError(f"{where}: 'providers' must be a non-empty list of [[providers]] tables")
    providers = []
    for i, p in enumerate(data["providers"]):
        if not isinstance(p, dict):
            raise SorakitError(f"{where}: providers[{i}] is not a table")
        if p.get("name") not in KNOWN_PROVIDERS:
            raise SorakitError(f"{where}: unknown execution provider {p.get('name')!r}; known: {sorted(KNOWN_PROVIDERS)}")
        extra = sorted(set(p) - {"name", "options"})
        if extra:
            raise SorakitError(f"{where}: provider {p['name']} has unknown keys {extra} (only name and options)")
        options = p.get("options", {})
        if not isinstance(options, dict):
            raise SorakitError(f"{where}: options of {p['name']} must be a table")
        bad = [k for k, v in options.items() if isinstance(v, (dict, list))]
        if bad:
            raise SorakitError(f"{where}: options {bad} of {p['name']} must be strings, numbers or booleans")
        options = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in options.items()}
        if p["name"] == "CoreMLExecutionProvider":
            _check_coreml_options(options, where)
        providers.append(ProviderSpec(p["name"], options))
    if providers[-1].name != "CPUExecutionProvider":
        raise SorakitError(f"{where}: the last provider must be CPUExecutionProvider (ORT's fallback)")
    names = [p.name for p in providers]
    if len(set(names)) != len(names):
        raise SorakitError(f"{where}: a provider is listed twice ({names})")
    passes = data.get("optimize_passes", [])
    if not isinstance(passes, list) or not all(isinstance(x, str) for x in passes):
        raise SorakitError(f"{where}: 'optimize_passes' must be a list of pass names")
    bad = [x for x in passes if not x.isidentifier()]
    if bad:
        raise SorakitError(f"{where}: {bad} are not pass names")
    if len(set(passes)) != len(passes):
        raise SorakitError(f"{where}: a pass is listed twice in optimize_passes ({passes})")
    if not isinstance(data["memory_budget"], (str, int, float)) or isinstance(data["memory_budget"], bool):
        raise SorakitError(f"{where}: memory_budget must be a size such as \"3.3GB\" or \"75%\"")
    try:
        budget = parse_bytes(data["memory_budget"], available=10**12)
    except SorakitError as e:
        raise SorakitError(f"{where}: {e}") from None
    if budget <= 0:
        raise SorakitError(f"{where}: memory_budget must be positive")
    threads = data.get("threads", 0)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise SorakitError(f"{where}: threads must be a whole number >= 0 (0 = every core)")
    if not isinstance(data.get("static_shapes", False), bool):
        raise SorakitError(f"{where}: static_shapes must be true or false")
    if data.get("precision", "fp32") not in PRECISIONS:
        raise SorakitError(f"{where}: precision must be fp32, fp16 or int8")
    coreml = data.get("coreml", {})
    if not isinstance(coreml, dict):
        raise SorakitError(f"{where}: [coreml] must be a table")
    for k, v in coreml.items():
        if k not in COREML_KEYS:
            raise SorakitError(f"{where}: unknown [coreml] key {k!r}; known: {sorted(COREML_KEYS)}")
        if not isinstance(v, COREML_KEYS[k]) or isinstance(v, bool):
            raise SorakitError(f"{where}: [coreml] {k} must be a {COREML_KEYS[k].__name__}")
    if coreml and "CoreMLExecutionProvider" not in names:
        raise SorakitError(f"{where}: has a [coreml] table but no CoreMLExecutionProvider")
    if "model_format" in coreml and coreml["model_format"] not in COREML_OPTIONS["ModelFormat"]:
        raise SorakitError(f"{where}: [coreml] model_format must be MLProgram or NeuralNetwork")
    return DeviceProfile(
        name=data["name"],
        description=data["description"],
        providers=tuple(providers),
        memory_budget=str(data["memory_budget"]),
        threads=threads,
        static_shapes=bool(data.get("static_shapes", False)),
        precision=data.get("precision", "fp32"),
        optimize_passes=tuple(passes),
        coreml=dict(coreml),
    )


def _check_coreml_options(options: dict[str, str], where: str) -> None:
    for k, v in options.items():
        if k not in COREML_OPTIONS:
            raise SorakitError(f"{where}: unknown CoreML EP option {k!r}; known: {sorted(COREML_OPTIONS)}")
        allowed = COREML_OPTIONS[k]
        if allowed is not None and v not in allowed:
            raise SorakitError(f"{where}: CoreML EP option {k} = {v!r}; allowed: {sorted(allowed)}")


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def all_profiles() -> list[DeviceProfile]:
    return [get_profile(n) for n in list_profiles()]


def get_profile(name: str) -> DeviceProfile:
    """A shipped profile by name, or a profile file (``my-device.toml``)."""
    if name.endswith(".toml") and Path(name).is_file():
        return load_profile(name)
    path = PROFILE_DIR / f"{name}.toml"
    if not name or "/" in name or "\\" in name or not path.is_file():
        raise SorakitError(f"unknown device {name!r}; choose one of: {', '.join(list_profiles())}",
                           hint="or pass the path of a profile file ending in .toml")
    profile = load_profile(path)
    if profile.name != name:
        raise SorakitError(f"device profile {path.name} names itself {profile.name!r}")
    return profile
