"""The layout's rules, checked on the source: no import cycle between edgekd's units (a top-level
module, or a subpackage as a whole), counting imports inside functions too; the runtime side
(what `pip install edgekd` must run: check, generate) imports no toolchain library at module level."""

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


def test_the_runtime_side_imports_no_toolchain_at_module_level():
    runtime_side = ["edgekd.cli", "edgekd.cli_base", "edgekd.cli_bundle", "edgekd.sampling", "edgekd.outputs", "edgekd.check", "edgekd.runtime", "edgekd.session", "edgekd.prepared", "edgekd.bundle", "edgekd.targets", "edgekd.tasks",
                    "edgekd.stats", "edgekd.config", "edgekd.io", "edgekd.paths", "edgekd.errors", "edgekd.export",
                    "edgekd.export.golden", "edgekd.validate", "edgekd.validate.fidelity", "edgekd.validate.gates",
                    "edgekd.validate.speed", "edgekd.validate.data", "edgekd.templates", "edgekd.metrics",
                    # a profile loads (edgekd targets) with its steps' settings: their modules stay light
                    "edgekd.export.profile", *[m for m in _modules() if m.startswith("edgekd.export.steps")]]
    modules = _modules()
    for name in runtime_side:
        heavy = {n for n in _imports(modules[name], top_level_only=True) if n.split(".")[0] in TOOLCHAIN}
        assert not heavy, f"{name} imports {heavy} at module level: `pip install edgekd` (no torch) could not run it"


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
