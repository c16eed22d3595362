"""Where ONNX Runtime really puts each node of a package's graphs, next to what the audit predicted.

The audit (``audit.py``) predicts offline which nodes the device's execution provider takes.
Only the device itself can confirm it: ORT records the assignment when a session is created
with ``session.record_ep_graph_assignment_info=1`` and returns it from
``InferenceSession.get_provider_graph_assignment_info()`` (one entry per subgraph an EP took,
with its nodes).

``sorakit placement`` creates every graph's session with the device's providers and compares:

* a **bundle** (``--device NAME``): each ``.onnx`` with its weights read into the model (what a
  package holds: ORT's Core ML EP skips nodes whose weights are external), against the audit;
* a **package**: each ``.ort`` the way the app loads it (the package's providers, options and
  config entries), against the package manifest's placement. onnxruntime 1.31.1 records no
  assignment for ORT-format files on the CPU EP; a graph with no record says so.

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
    predicted: dict[str, Any] | None = None  # the audit's placement (package manifest, or audited now)
    note: str = ""

    @property
    def matches(self) -> bool | None:
        if not self.predicted or not self.nodes:
            return None
        want = self.predicted["nodes"]
        ep = next((k for k in want if k != "CPUExecutionProvider"), None)
        if ep is None:
            return set(self.nodes) <= {"CPUExecutionProvider"}
        return self.nodes.get(ep, 0) == want.get(ep, 0) and self.subgraphs.get(ep, 0) == self.predicted["partitions"]

    def to_dict(self) -> dict[str, Any]:
        return {"graph": self.graph, "file": self.file, "nodes": self.nodes, "subgraphs": self.subgraphs,
                "predicted": self.predicted, "matches": self.matches, "note": self.note}


def _graphs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for comp in manifest["components"].values():
        for g in comp["graphs"]:
            out.append(g)
            out.extend(g.get("variants", {}).values())
    return out


def _require(profile) -> None:
    available = ort.get_available_providers()
    missing = [p.name for p in profile.providers if p.name not in available]
    if missing:
        raise SorakitError(
            f"this onnxruntime ({ort.__version__}) has no {', '.join(missing)}, which device "
            f"{profile.name!r} uses (available: {', '.join(available)}); the placement can only be checked where "
            "that provider exists: for Core ML on a Mac with Apple silicon (pip install onnxruntime on macOS) or "
            "in the iOS app (docs/ios-app.md, section 10)")


def _record(p: Placement, s: ort.InferenceSession) -> Placement:
    for sub in s.get_provider_graph_assignment_info():
        n = len(sub.get_nodes())
        p.nodes[sub.ep_name] = p.nodes.get(sub.ep_name, 0) + n
        p.subgraphs[sub.ep_name] = p.subgraphs.get(sub.ep_name, 0) + 1
    if not p.nodes:
        p.note = f"onnxruntime {ort.__version__} recorded no assignment for this graph"
    return p


def _options(entries: dict[str, str]) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for k, v in entries.items():
        so.add_session_config_entry(k, v)
    so.add_session_config_entry(RECORD, "1")
    return so


def check_placement(path: str | Path, device: str | None = None, only: list[str] | None = None,
                    cache_dir: str | Path | None = None) -> list[Placement]:
    """Create each graph's session with the device's providers and report where ORT assigned its nodes.

    ``path``: a package (its device is the package's) or a bundle (``device`` needed)."""
    root = Path(path)
    if (root / "package.json").is_file():
        return _check_package(root, only, cache_dir)
    if device is None:
        raise SorakitError(f"{root} is a bundle: name the device (--device iphone-15-pro)")
    return _check_bundle(root, device, only, cache_dir)


def _check_package(root: Path, only, cache_dir) -> list[Placement]:
    manifest = load_package(root)
    profile = get_profile(manifest["device"]["name"])
    _require(profile)
    results = []
    for g in _graphs(manifest):
        if only and not any(g["name"].startswith(p) for p in only):
            continue
        s = ort.InferenceSession(str(root / g["file"]), _options(manifest["session"]["config_entries"]),
                                 providers=profile.provider_options(cache_dir))
        results.append(_record(Placement(g["name"], g["file"], predicted=(g.get("audit") or {}).get("placement")), s))
        del s
    return results


def _check_bundle(root: Path, device: str, only, cache_dir) -> list[Placement]:
    from sorakit.bundle.io import Bundle
    from sorakit.devices.audit import audit_model
    from sorakit.devices.package import placement

    profile = get_profile(device)
    _require(profile)
    b = Bundle.open(root, verify="lazy")
    results = []
    for g in b.manifest.all_graphs():
        if only and not any(g.name.startswith(p) for p in only):
            continue
        b.verify_graph_files(g)
        model = load_with_weights(b.path(g.file))
        predicted = placement(audit_model(b.path(g.file), profile, name=g.name, role=g.role))
        s = ort.InferenceSession(model.SerializeToString(), _options({}), providers=profile.provider_options(cache_dir))
        results.append(_record(Placement(g.name, g.file, predicted=predicted), s))
        del s, model
    return results


def load_with_weights(path: Path):
    """A graph with its external weights read into the model (as a package's .ort holds them)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {kv.key: kv.value for kv in init.external_data}
            target = (path.parent / info["location"]).resolve()
            if not target.is_relative_to(path.parent.resolve()):
                raise SorakitError(f"{path.name}: external data {info['location']!r} leaves the graph's directory")
            with open(target, "rb") as f:
                f.seek(int(info.get("offset", 0)))
                init.raw_data = f.read(int(info["length"]) if "length" in info else -1)
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
    if model.ByteSize() >= 2**31:
        raise SorakitError(f"{path.name} is over 2 GiB with its weights inside; check its package instead")
    return model


__all__ = ["check_placement", "Placement", "RECORD", "load_with_weights"]
