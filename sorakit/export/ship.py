"""Build the shipped model's bundle template: ``sorakit/assets/shapes/bundle``.

    python -m sorakit.export.ship            # after new weights were shipped (train.report --ship)
    python -m sorakit.export.ship --check    # exit 1 if the committed template is stale

The shipped safetensors are exported with torch and verified like any bundle, the TDTM
variants are added (so ``--tdtm-steps`` works out of the box), and the result is written
without its weight files: ``weights.json`` records, for every tensor of every weight file,
the safetensors tensor it holds (dtype and transposition). ``sorakit.runtime.default_model``
assembles the weight files from that with numpy alone and checks them against the manifest's
checksums, so a user's bundle is byte for byte this verified export. The builder assembles
the template once itself and compares before it writes anything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from sorakit.bundle.io import MANIFEST
from sorakit.errors import SorakitError
from sorakit.runtime.default_model import SHIPPED, TEMPLATE, WEIGHTS, assemble
from sorakit.tensorfile import read_tensors

COMPONENTS = ("text_encoder", "transformer", "vae")


def build_template(assets: Path = SHIPPED, out: Path = TEMPLATE, progress=None) -> dict:
    """Export ``assets`` (safetensors + tokenizer) to a bundle template in ``out``; returns a summary."""
    from sorakit.export.exporter import ExportSettings, export_bundle
    from sorakit.graph_passes.pipeline import optimize_bundle
    from sorakit.presets import get_preset

    preset = get_preset("shapes")
    h, w = preset.resolution
    with tempfile.TemporaryDirectory(prefix="sorakit-ship-") as tmp:
        plain, full = Path(tmp) / "plain", Path(tmp) / "bundle"
        export_bundle(ExportSettings(preset, h, w, preset.num_frames), plain,
                      {c: assets / c for c in COMPONENTS}, progress=progress,
                      tokenizer_source=assets / "tokenizer.json")
        optimize_bundle(plain, full, ["tdtm"], gates={"tdtm": None})
        manifest = json.loads((full / MANIFEST).read_text())
        # where the weights came from, independent of where this copy of sorakit is installed
        manifest["export"]["weights"] = {c: f"shipped:{c}" for c in COMPONENTS}
        (full / MANIFEST).write_text(json.dumps(manifest, indent=1))
        spec, raw = weight_map(full, manifest, assets)
        staged = Path(tmp) / "template"
        staged.mkdir()
        for rel in manifest["files"]:
            if rel not in spec["files"]:
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(full / rel, staged / rel)
        shutil.copyfile(full / MANIFEST, staged / MANIFEST)
        (staged / WEIGHTS).write_text(json.dumps(spec, indent=1))
        (staged / RAW).write_bytes(raw)
        # the proof: the template assembles to exactly the files just exported and verified
        got = assemble(staged, Path(tmp) / "assembled", assets)
        for rel in manifest["files"]:
            if (got / rel).read_bytes() != (full / rel).read_bytes():
                raise SorakitError(f"the template does not reproduce {rel}")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staged, out)
    sizes = {rel: rec["bytes"] for rel, rec in manifest["files"].items()}
    return {"files": len(sizes), "assembled": len(spec["files"]),
            "template_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
            "bundle_bytes": sum(sizes.values())}


def weight_map(bundle: Path, manifest: dict, assets: Path) -> dict:
    """For every external-data file: the tensors in it, each traced to a safetensors tensor."""
    sources = {c: assets / c / "model.safetensors" for c in COMPONENTS}
    by_numel: dict[int, list[tuple[str, str, np.ndarray]]] = {}
    for comp, path in sources.items():
        for key, t in read_tensors(path).items():
            by_numel.setdefault(int(t.size), []).append((comp, key, np.asarray(t)))
    data_files: dict[str, dict[int, dict]] = {}
    raw = bytearray()
    for rel in manifest["files"]:
        if not rel.endswith(".onnx"):
            continue
        model = onnx.load(str(bundle / rel), load_external_data=False)
        for init in model.graph.initializer:
            if init.data_location != onnx.TensorProto.EXTERNAL:
                continue
            ext = {kv.key: kv.value for kv in init.external_data}
            data_rel = (Path(rel).parent / ext["location"]).as_posix()
            offset, length = int(ext.get("offset", 0)), int(ext["length"])
            pieces = data_files.setdefault(data_rel, {})
            if offset in pieces:
                continue  # a variant sharing the base graph's tensor
            t = onnx.TensorProto()
            t.CopyFrom(init)
            onnx.external_data_helper.load_external_data_for_tensor(t, str((bundle / rel).parent))
            value = numpy_helper.to_array(t)
            pieces[offset] = {"offset": offset, "length": length, "dtype": str(value.dtype),
                              **_trace(value, by_numel, sources, raw)}
    files = {}
    for data_rel, pieces in data_files.items():
        files[data_rel] = {"bytes": manifest["files"][data_rel]["bytes"],
                           "pieces": [pieces[o] for o in sorted(pieces)]}
    return {"format": 1, "files": files, "computed_bytes": len(raw)}, bytes(raw)


RAW = "computed.bin"  # in the template: tensors the exporter computed (not in the safetensors)


def _trace(value: np.ndarray, by_numel, sources, raw: bytearray) -> dict:
    for comp, key, t in by_numel.get(int(value.size), []):
        cast = t.astype(value.dtype)
        candidates = [None, [1, 0]] if cast.ndim == 2 else [None]
        for perm in candidates:
            a = cast if perm is None else cast.transpose(perm)
            if a.shape == value.shape and np.array_equal(a, value):
                rel = f"{comp}/{sources[comp].name}"  # relative to the model's directory
                return {"source": rel, "key": key, **({"transpose": perm} if perm else {})}
    # a tensor the exporter computed from weights or sizes (e.g. a constant table): kept as bytes
    start = len(raw)
    raw += np.ascontiguousarray(value).tobytes()
    return {"source": RAW, "start": start}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sorakit.export.ship", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed template differs from a fresh build")
    args = ap.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp) / "bundle"
            build_template(SHIPPED, fresh)
            stale = [p.relative_to(fresh).as_posix() for p in fresh.rglob("*") if p.is_file()
                     and (not (TEMPLATE / p.relative_to(fresh)).is_file()
                          or (TEMPLATE / p.relative_to(fresh)).read_bytes() != p.read_bytes())]
        if stale:
            print(f"the shipped template is stale: {stale[:5]}; run python -m sorakit.export.ship", file=sys.stderr)
            return 1
        print("the shipped template is current")
        return 0
    summary = build_template()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
