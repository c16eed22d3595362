"""The execution plan: which engine and which weights' precision run each component.

A bundle may hold a component's graphs in several precisions (``sorakit optimize --passes
int8`` with ``variant = true`` keeps the fp32 graphs and adds int8 variants), and a device
profile may offer two engines (OpenVINO computing in bf16, and ONNX Runtime). The plan picks,
per component, the choice that should take the least time **within the memory budget**:

* the denoising phase (the transformer, run ``steps`` times) must fit the budget resident, so
  its weights are not streamed from disk at every step; the fastest choice that fits wins,
  and when none fits, the one with the smallest footprint (then the scheduler streams it);
* components run once per video (text encoder, VAE) are streamed anyway: the choice with the
  least load plus run time wins, provided its largest graph fits.

Without a budget, a choice whose graphs the machine's available memory cannot hold resident is
left out (OpenVINO's compiled bf16 T5-XXL would take ~45 GB).

Time and memory are estimated from the graphs' FLOPs and bytes with the factors below,
measured on a real-size STDiT3 block pair (118 GFLOP, 170 MB fp32) on the project's 2-core
AVX512-BF16 machine (``docs/benchmarks.md``, "engines"). The estimates only rank the
choices; the scheduler then measures each session's real cost and keeps the residency within
the budget from those measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sorakit.bundle.io import Bundle
from sorakit.bundle.manifest import GraphEntry
from sorakit.errors import SorakitError
from sorakit.memory import available_memory
from sorakit.profiles import OPENVINO
from sorakit.runtime.session import ORT, ProviderPlan

COMPONENTS = ("text_encoder", "transformer", "vae")


@dataclass(frozen=True)
class Cost:
    gflops: float  # sustained GFLOP/s of a big graph
    load_bytes_per_s: float  # session build (compile, prepack, page-in) per byte of weight file
    resident_factor: float  # process memory per byte of weight file once loaded and run
    load_fixed_s: float  # session build of any graph, however small
    call_fixed_s: float  # per call of any graph (dispatch, copies)


# (engine, compute precision) -> measured factors (2 threads; see the module docstring)
COSTS = {
    (OPENVINO, "bf16"): Cost(700, 0.5e9, 2.4, load_fixed_s=0.08, call_fixed_s=0.002),
    (OPENVINO, "f32"): Cost(210, 0.5e9, 2.4, load_fixed_s=0.08, call_fixed_s=0.002),
    (ORT, "int8"): Cost(460, 2e9, 1.4, load_fixed_s=0.01, call_fixed_s=0.0005),
    (ORT, "fp32"): Cost(175, 1e9, 1.1, load_fixed_s=0.01, call_fixed_s=0.0003),
}


@dataclass(frozen=True)
class Choice:
    engine: str  # "onnxruntime" or "OpenVINO"
    precision: str  # what computes: fp32, int8, bf16, f32 (OpenVINO's name), fp16
    tag: str = ""  # the graphs' variant tag: "" = the graphs themselves, "int8" = their int8 variants

    def label(self) -> str:
        return f"{self.engine} {self.precision}"


@dataclass
class ComponentPlan:
    choice: Choice
    seconds: float  # estimated load + run time per video
    resident_bytes: int  # estimated memory of all its graphs loaded
    reason: str


@dataclass
class ExecutionPlan:
    components: dict[str, ComponentPlan] = field(default_factory=dict)

    def choice(self, component: str) -> Choice:
        return self.components[component].choice

    def graph(self, component: str, g: GraphEntry, variant: str = "") -> GraphEntry:
        """The entry that runs for base graph ``g`` of a component, in a variant ("tdtm" or "")."""
        tag = self.choice(component).tag
        key = "+".join(x for x in (variant, tag) if x)
        if not key:
            return g
        if key not in g.variants:
            raise SorakitError(f"graph {g.name} has no {key!r} variant, which the plan needs")
        return g.variants[key]

    def engines(self) -> dict[str, str]:
        return {c: p.choice.label() for c, p in self.components.items()}

    def to_dict(self) -> dict:
        return {c: {"engine": p.choice.engine, "precision": p.choice.precision, "variant": p.choice.tag or None,
                    "estimated_seconds": round(p.seconds, 3), "estimated_resident_bytes": p.resident_bytes,
                    "reason": p.reason} for c, p in self.components.items()}


def _graph_precision(manifest, component: str) -> str:
    """The precision the component's own graphs were rewritten to by a replacing pass (fp32 if none)."""
    for rec in manifest.passes:
        if rec.get("name") in ("int8", "fp16") and not rec.get("settings", {}).get("variant"):
            comps = rec.get("settings", {}).get("components") or {"int8": ("transformer", "text_encoder"),
                                                                    "fp16": ("transformer", "vae")}[rec["name"]]
            if component in comps:
                return rec["name"]
    return "fp32"


def candidates(bundle: Bundle, component: str, providers: ProviderPlan, precision: str | None) -> list[Choice]:
    """Every way this installation can run a component's graphs, in the order tried on ties."""
    m = bundle.manifest
    graphs = m.components[component].graphs
    own = _graph_precision(m, component)
    out = []
    if providers.openvino is not None and own == "fp32":
        out.append(Choice(OPENVINO, providers.openvino.get("INFERENCE_PRECISION_HINT", "f32")))
    if any("int8" in g.variants for g in graphs):  # the pass leaves tiny graphs (prologue, epilogue) fp32
        out.append(Choice(ORT, "int8", "int8"))
    out.append(Choice(ORT, own))
    if precision is not None:
        wanted = [c for c in out if c.precision == precision or (precision == "fp32" and c.precision == "f32")]
        out = wanted or out  # a component without that precision keeps its own choice
    return out


def _estimate(bundle: Bundle, graphs: list[GraphEntry], choice: Choice, calls: dict[str, float],
              loads: dict[str, float]) -> tuple[float, int]:
    cost = COSTS.get((choice.engine, choice.precision)) or COSTS[(ORT, "fp32")]
    seconds, resident = 0.0, 0
    for g in graphs:
        e = g.variants.get(choice.tag, g) if choice.tag else g
        size = sum(bundle.manifest.files[f]["bytes"] for f in e.files() if f in bundle.manifest.files)
        seconds += loads.get(g.name, 1) * (cost.load_fixed_s + size / cost.load_bytes_per_s)
        seconds += calls.get(g.name, 1) * (cost.call_fixed_s + e.flops / (cost.gflops * 1e9))
        resident += int(size * cost.resident_factor)
    return seconds, resident


def make_plan(bundle: Bundle, providers: ProviderPlan, budget: int | None, steps: int = 30,
              precision: str | None = None, text_tokens: int | None = None) -> ExecutionPlan:
    """Choose engine and precision per component (see the module docstring).

    ``steps``: transformer calls per video; ``text_tokens``: the expected prompt length when the
    text encoder runs on the prompt's tokens only (its FLOPs scale down from the padded length).
    """
    m = bundle.manifest
    plan = ExecutionPlan()
    if precision is not None:
        have = {c.precision for comp in COMPONENTS if comp in m.components
                for c in candidates(bundle, comp, providers, None)}
        if precision not in have | ({"fp32"} if "f32" in have else set()):
            raise SorakitError(f"precision {precision!r} is not available for this bundle here "
                               f"(available: {', '.join(sorted(have))})",
                               hint="int8 needs the int8 pass (sorakit optimize --passes int8); bf16 needs OpenVINO "
                                    "(--device cpu-bf16, pip install 'sorakit[openvino]')")
    for comp in COMPONENTS:
        if comp not in m.components:
            continue
        graphs = m.components[comp].graphs
        calls = {g.name: float(steps if comp == "transformer" else 1) for g in graphs}
        if comp == "text_encoder" and text_tokens:
            scale = text_tokens / max(1, m.tokenizer.get("max_length", text_tokens))
            calls = {k: v * scale for k, v in calls.items()}
        options = []
        for choice in candidates(bundle, comp, providers, precision):
            resident_loads = {g.name: 1.0 for g in graphs}
            seconds, resident = _estimate(bundle, graphs, choice, calls, resident_loads)
            largest = max(_estimate(bundle, [g], choice, calls, resident_loads)[1] for g in graphs)
            options.append((choice, seconds, resident, largest))
        if budget is None:  # no budget: still nothing the machine cannot hold resident
            room = available_memory()
            options = [o for o in options if o[2] <= room] or [min(options, key=lambda o: o[2])]
        if comp == "transformer" and budget is not None:
            fitting = [o for o in options if o[2] <= budget]
            if fitting:
                best = min(fitting, key=lambda o: o[1])
                reason = "fastest choice whose graphs all fit the budget resident"
            else:
                best = min(options, key=lambda o: o[2])
                reason = "no choice fits the budget resident: the smallest one, streamed"
        else:
            fitting = [o for o in options if budget is None or o[3] <= budget] or options
            best = min(fitting, key=lambda o: o[1])
            reason = "fastest choice" + ("" if budget is None else " whose largest graph fits the budget")
        plan.components[comp] = ComponentPlan(best[0], best[1], best[2], reason)
    return plan
