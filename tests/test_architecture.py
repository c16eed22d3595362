"""The architecture, checked mechanically: the layer order of the README, the one pass registry."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from sorakit.errors import SorakitError

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sorakit"
# import name -> distribution-independent name used in the README table
ALIASES = {"onnx_ir": "onnx_ir", "PIL": "PIL"}


def layer_of(module: str) -> str:
    """sorakit.runtime.pipeline -> runtime; sorakit.errors, sorakit.bundle.io -> base."""
    parts = module.split(".")
    if parts[:2] == ["sorakit", "__main__"]:
        return "cli"
    if len(parts) >= 2 and (PKG / parts[1]).is_dir() and parts[1] not in ("bundle", "profiles", "assets"):
        return parts[1]
    return "base"


def readme_layers() -> dict[str, tuple[list[str], list[str]]]:
    """The README's layout table: layer -> (sorakit layers it imports, packages it imports)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout"):]
    section = section[: section.index("\n## ", 5)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        name = re.match(r"`(?:sorakit/)?([a-z_]+)`", cells[0]).group(1)
        layers = re.findall(r"`([a-z_]+)`", cells[2])
        packages = re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cells[3])
        rows[name] = (layers, packages)
    return rows


def actual_imports() -> dict[str, dict[str, set[str]]]:
    """layer -> {"layers": {...}, "packages": {...}} -> the files that import them."""
    out: dict[str, dict[str, dict[str, set[str]]]] = {}
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for f in PKG.rglob("*.py"):
        module = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        src = layer_of(module)
        found = out.setdefault(src, {"layers": {}, "packages": {}})
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against the importing module
                    names = [".".join(module.split(".")[: -node.level] + ([node.module] if node.module else []))]
                else:
                    names = [node.module]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                if top in stdlib:
                    continue
                if top == "sorakit":
                    dst = layer_of(n)
                    if dst != src:
                        found["layers"].setdefault(dst, set()).add(f.name)
                else:
                    found["packages"].setdefault(ALIASES.get(top, top), set()).add(f.name)
    return out


def test_readme_layer_table_is_a_strict_order():
    rows = readme_layers()
    assert list(rows)[:2] == ["base", "runtime"], "the table lists the layers bottom-up, base first"
    seen: list[str] = []
    for name, (layers, _) in rows.items():
        above = [x for x in layers if x not in seen]
        assert not above, f"layer {name} may import {above}, which the table lists after it (a cycle)"
        seen.append(name)
    assert set(rows) == {layer_of(f"sorakit.{p.name}") for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"
                         } | {"base", "cli"}, "every package of sorakit/ has a row"


def test_imports_follow_the_readme_layer_table():
    rows = readme_layers()
    problems = []
    for name, found in actual_imports().items():
        layers, packages = rows[name]
        for dst, files in found["layers"].items():
            if dst not in layers:
                problems.append(f"{name} imports layer {dst} ({', '.join(sorted(files))}); the table allows {layers}")
        for pkg, files in found["packages"].items():
            if pkg not in packages:
                problems.append(f"{name} imports {pkg} ({', '.join(sorted(files))}); the table allows {packages}")
        # the table is true: it names nothing the layer does not import
        unused = [x for x in layers if x not in found["layers"]] + [p for p in packages if p not in found["packages"]]
        if unused:
            problems.append(f"the table says {name} imports {unused}, which it does not")
    assert not problems, "\n".join(problems)


def test_runtime_and_devices_keep_torch_out_even_in_type_hints():
    for layer in ("runtime", "devices", "graph_passes"):
        for f in (PKG / layer).rglob("*.py"):
            text = f.read_text()
            for banned in ("torch", "transformers", "diffusers", "coremltools", "optimum"):
                assert not re.search(rf"^\s*(import|from)\s+{banned}\b", text, re.M), f"{f} imports {banned}"


# ---------------------------------------------------------------------------------------------
# the one pass registry
# ---------------------------------------------------------------------------------------------
def test_every_registered_pass_declares_its_kind_and_gate():
    from sorakit.graph_passes import registry

    names = registry.known()
    assert {"pin", "tdtm", "prune", "simplify", "fp16", "int8"} <= set(names)
    for n in names:
        cls = registry.get(n)
        assert cls.name == n
        assert (cls.gate is not None) == cls.lossy, n
        if cls.lossy:
            assert 0 < cls.gate <= 1


def test_a_lossy_pass_without_a_gate_cannot_be_registered():
    from sorakit.graph_passes.base import GraphPass
    from sorakit.graph_passes.registry import PASSES, register

    class Ungated(GraphPass):
        name = "ungated_test_pass"
        lossy = True

    with pytest.raises(TypeError, match="lossy pass 'ungated_test_pass' must declare its quality gate"):
        register(Ungated)

    class GatedExact(GraphPass):
        name = "gated_exact_test_pass"
        gate = 0.9

    with pytest.raises(TypeError, match="exact pass 'gated_exact_test_pass' .* takes no quality gate"):
        register(GatedExact)

    class Taken(GraphPass):
        name = "int8"
        lossy = True
        gate = 0.5

    with pytest.raises(TypeError, match="pass name 'int8' is taken"):
        register(Taken)
    assert "ungated_test_pass" not in PASSES and "gated_exact_test_pass" not in PASSES


def test_profiles_are_checked_against_the_registry(tmp_path):
    from sorakit.graph_passes.registry import check_profile
    from sorakit.profiles import all_profiles, load_profile

    for p in all_profiles():
        check_profile(p)  # every shipped profile names registered passes
    path = tmp_path / "x.toml"
    path.write_text('name = "x"\ndescription = "d"\nmemory_budget = "1GB"\noptimize_passes = ["prune", "turbo"]\n'
                    '[[providers]]\nname = "CPUExecutionProvider"\n')
    with pytest.raises(SorakitError, match=r"names unknown passes \['turbo'\]"):
        check_profile(load_profile(path))


def test_profile_passes_skip_what_the_bundle_carries(tiny_bundle):
    from sorakit.bundle.io import Bundle
    from sorakit.graph_passes.registry import plan_passes
    from sorakit.profiles import get_profile

    m = Bundle.open(tiny_bundle[0]).manifest
    m.passes = [{"name": "tdtm"}]
    plan = plan_passes(m, None, get_profile("iphone-15-pro"))
    assert plan.already == ["tdtm"] and plan.apply == ["prune", "fp16"]
    assert plan_passes(m, "int8").apply == ["int8"]
    with pytest.raises(SorakitError, match="unknown pass 'turbo'"):
        plan_passes(m, "turbo")
