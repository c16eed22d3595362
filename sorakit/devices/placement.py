"""Where ONNX Runtime really puts each node of a package's graphs, next to what the audit predicted.

The audit (``audit.py``) predicts offline which nodes the device's execution provider takes.
Only the device itself can confirm it: ORT records the assignment when a session is created
with ``session.record_ep_graph_assignment_info=1`` and returns it from
``InferenceSession.get_provider_graph_assignment_info()`` (one entry per subgraph an EP took,
with its nodes). ``sorakit placement PKG`` creates every graph's session the way the app does
(the package's providers, options and config entries, the ``.ort`` files with their embedded
weights) and compares.

On Linux the Core ML EP does not exist in onnxruntime, so for an Apple package this check runs
on a Mac (Apple silicon, onnxruntime's macOS wheel, which includes the Core ML EP); on an iPhone
the app sets the same config entry (docs/ios-app.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from sorakit.devices.package import load_package
from sorakit.errors import SorakitError
from sorakit.profiles import get_profile

RECORD = "session.record_ep_graph_assignment_info"


@dataclass
class Placement:
    graph: str
    file: str
    nodes: dict[str, int] = field(default_factory=dict)  # EP -> nodes it runs
    subgraphs: dict[str, int] = field(default_factory=dict)  # EP -> subgraphs (partitions) it took
    predicted: dict[str, Any] | None = None  # the package manifest's audit placement

    @property
    def matches(self) -> bool | None:
        if not self.predicted:
            return None
        want = self.predicted["nodes"]
        ep = next((k for k in want if k != "CPUExecutionProvider"), None)
        if ep is None:
            return set(self.nodes) <= {"CPUExecutionProvider"}
        return self.nodes.get(ep, 0) == want.get(ep, 0) and self.subgraphs.get(ep, 0) == self.predicted["partitions"]

    def to_dict(self) -> dict[str, Any]:
        return {"graph": self.graph, "file": self.file, "nodes": self.nodes, "subgraphs": self.subgraphs,
                "predicted": self.predicted, "matches": self.matches}


def _graphs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for comp in manifest["components"].values():
        for g in comp["graphs"]:
            out.append(g)
            out.extend(g.get("variants", {}).values())
    return out


def check_placement(package: str | Path, only: list[str] | None = None, cache_dir: str | Path | None = None
                    ) -> list[Placement]:
    """Create each graph's session as the app would and report where ORT assigned its nodes."""
    root = Path(package)
    manifest = load_package(root)
    profile = get_profile(manifest["device"]["name"])
    available = ort.get_available_providers()
    missing = [p.name for p in profile.providers if p.name not in available]
    if missing:
        raise SorakitError(
            f"this onnxruntime ({ort.__version__}) has no {', '.join(missing)}, which device "
            f"{profile.name!r} uses (available: {', '.join(available)}); the placement can only be checked where "
            "that provider exists: for Core ML on a Mac with Apple silicon (pip install onnxruntime on macOS) or "
            "in the iOS app (docs/ios-app.md, section 10)")
    session = manifest["session"]
    results = []
    for g in _graphs(manifest):
        if only and not any(g["name"].startswith(p) for p in only):
            continue
        so = ort.SessionOptions()
        so.log_severity_level = 3
        for k, v in session["config_entries"].items():
            so.add_session_config_entry(k, v)
        so.add_session_config_entry(RECORD, "1")
        s = ort.InferenceSession(str(root / g["file"]), so, providers=profile.provider_options(cache_dir))
        p = Placement(g["name"], g["file"], predicted=(g.get("audit") or {}).get("placement"))
        for sub in s.get_provider_graph_assignment_info():
            n = len(sub.get_nodes())
            p.nodes[sub.ep_name] = p.nodes.get(sub.ep_name, 0) + n
            p.subgraphs[sub.ep_name] = p.subgraphs.get(sub.ep_name, 0) + 1
        results.append(p)
        del s
    return results


__all__ = ["check_placement", "Placement", "RECORD"]
