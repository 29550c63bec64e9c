"""The layout's rules, checked on the source: no import cycle between edgekd's units (a top-level
module, or a subpackage as a whole), counting imports inside functions too; the device folder (what
`pip install edgekd` must run: check, generate) imports nothing above it and no toolchain library at
module level; the road's stages import only those before them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "edgekd"
TOOLCHAIN = {"torch", "transformers", "optimum", "onnx", "accelerate", "safetensors", "matplotlib", "gguf"}


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _unit(module: str) -> str:
    return ".".join(module.split(".")[:2])  # edgekd.cli, edgekd.distill, ...


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_no_import_cycle_between_units():
    edges: dict[str, set[str]] = {}
    for module, path in _modules().items():
        for name in _imports(path):
            if name.startswith("edgekd.") and _unit(name) != _unit(module):
                edges.setdefault(_unit(module), set()).add(_unit(name))

    def reaches(a: str, b: str, seen: frozenset = frozenset()) -> bool:
        return any(c == b or (c not in seen and reaches(c, b, seen | {c})) for c in edges.get(a, ()))

    cycles = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if reaches(b, a)})
    assert not cycles, f"import cycles between {cycles}"


# The road, bottom to top: a unit imports only units on its own floor or below (the CLI, on top, all).
FLOORS = [{"edgekd.device"}, {"edgekd.models", "edgekd.quant"}, {"edgekd.distill"}, {"edgekd.export"},
          {"edgekd.validate"}, {"edgekd.search"}, {"edgekd.pipeline"}]


def _toolchain_at_module_level(path: Path) -> set[str]:
    return {n for n in _imports(path, top_level_only=True) if n.split(".")[0] in TOOLCHAIN}


def _edgekd_imports(path: Path) -> set[str]:
    return {n for n in _imports(path) if n == "edgekd" or n.startswith("edgekd.")}


def test_the_device_folder_imports_nothing_above_it():
    """What `pip install edgekd` (no toolchain) runs lives in edgekd/device/: it imports nothing of
    edgekd outside the folder (inside functions too) and no toolchain library at module level."""
    device = {m: p for m, p in _modules().items() if _unit(m) == "edgekd.device"}
    assert len(device) > 10, sorted(device)
    for name, path in device.items():
        above = {n for n in _edgekd_imports(path) if _unit(n) != "edgekd.device"}
        assert not above, f"{name} imports {above}: the device folder imports nothing above it"
        heavy = _toolchain_at_module_level(path)
        assert not heavy, f"{name} imports {heavy} at module level: `pip install edgekd` (no torch) could not run it"


def test_the_road_reads_bottom_to_top():
    """device, then models and quant, distill, export, validate, search, pipeline: no arrow from a
    floor to one above it, so each stage of the road can be read knowing only those below."""
    floor = {unit: i for i, units in enumerate(FLOORS) for unit in units}
    upward = []
    for module, path in _modules().items():
        if _unit(module) not in floor:
            continue  # the package root and the CLI sit on top
        for name in _edgekd_imports(path):
            if _unit(name) in floor and floor[_unit(name)] > floor[_unit(module)]:
                upward.append(f"{module} -> {name}")
    assert not upward, upward
    assert set(floor) >= {_unit(m) for m in _modules()} - {"edgekd", "edgekd.__main__", "edgekd.cli", "edgekd.cli_base", "edgekd.cli_bundle"}


def test_the_cli_and_the_profiles_load_without_the_toolchain():
    """`edgekd --help`, `edgekd check`, `edgekd generate` and `edgekd targets` run in the wheel
    without [toolchain]: the modules they load before a command asks for more stay light."""
    light = ["edgekd", "edgekd.cli", "edgekd.cli_base", "edgekd.cli_bundle", "edgekd.export", "edgekd.export.profile",
             *[m for m in _modules() if m.startswith("edgekd.export.steps")]]
    modules = _modules()
    for name in light:
        heavy = _toolchain_at_module_level(modules[name])
        assert not heavy, f"{name} imports {heavy} at module level: `pip install edgekd` (no torch) could not run it"


def test_the_package_version_is_said_once():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    from edgekd import __version__

    assert tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]["version"] == __version__


def test_every_name_imported_from_edgekd_exists():
    """A move inside edgekd/ updates every script that imports what moved (benchmarks/ and examples/
    have no test that runs them all); imports inside functions count too."""
    import importlib
    import importlib.util

    missing = []
    scripts = [*ROOT.rglob("*.py"), *(ROOT.parent / "benchmarks").glob("*.py"), *(ROOT.parent / "examples").rglob("*.py")]
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("edgekd")):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                submodule = hasattr(module, "__path__") and importlib.util.find_spec(f"{node.module}.{alias.name}") is not None
                if not hasattr(module, alias.name) and not submodule:
                    missing.append(f"{path.relative_to(ROOT.parent)}: {node.module}.{alias.name}")
    assert not missing, missing


def test_functions_and_modules_stay_short_enough_to_hold_in_the_head():
    """No function over 80 lines and no module over 450 in edgekd/ (issue 29): a longer one reads
    as a list of named stages instead."""
    long = []
    for path in ROOT.rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        if len(source.splitlines()) > 450:
            long.append(f"{path.relative_to(ROOT.parent)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(ROOT.parent)}: {node.name}() {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


def test_the_architecture_page_names_every_module():
    """docs/architecture.md is the plan of the house: every module is named in it, a room's modules in
    that room's paragraph (the one that opens "- **`room/`**")."""
    page = (ROOT.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    rooms = {p.split("`**", 1)[0]: p for p in page.split("\n- **`")[1:]}
    unnamed = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        text = rooms.get(rel.parts[0] + "/", "") if len(rel.parts) > 1 else page
        if not any(f"`{name}`" in text for name in (path.name, f"edgekd/{path.name}", "/".join(rel.parts))):
            unnamed.append(str(rel))
    assert not unnamed, f"docs/architecture.md does not name {sorted(unnamed)} in its room"
