"""The shape of the source, checked from the source: the rules of the house (README, CONTRIBUTING)."""
from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60


def source_modules() -> dict:
    """{dotted module name: path} for meft_fx/ and passes/ (installed as meft_fx.passes)."""
    out = {}
    for top, package in ((ROOT / "meft_fx", "meft_fx"), (ROOT / "passes", "meft_fx.passes")):
        for path in sorted(top.rglob("*.py")):
            parts = list(path.relative_to(top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = source_modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str, path: Path):
    """(imported module, imported names) for every import statement, in functions too."""
    base = name if _is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                mod = ".".join(anchor + ([mod] if mod else []))
            yield mod, [a.name for a in node.names]


def _resolve(mod: str, names: list) -> list:
    """The source modules an import statement loads (a `from pkg import submodule` loads the submodule)."""
    out = [mod] if mod in MODULES else []
    out += [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES]
    return out


def test_no_import_circle_among_the_package_modules():
    g = nx.DiGraph()
    for name, path in MODULES.items():
        g.add_node(name)
        for mod, names in _imports(name, path):
            for target in _resolve(mod, names):
                if target != name and not name.startswith(target + "."):  # a module's own package is mid-import
                    g.add_edge(name, target)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, cycles[:5]


def test_no_private_name_is_imported_across_modules():
    bad = []
    for name, path in MODULES.items():
        for mod, names in _imports(name, path):
            if mod.startswith("meft_fx"):
                bad += [f"{name}: from {mod} import {n}" for n in names if n.startswith("_") and n != "__version__"]
    assert not bad, bad


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in [*MODULES.values(), *sorted((ROOT / "examples").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_no_public_name_shadows_a_submodule_and_no_module_takes_a_stdlib_name():
    shadows = []
    for name in MODULES:
        if not _is_package(name):
            continue
        pkg = importlib.import_module(name)
        for info in pkgutil.iter_modules(pkg.__path__):
            sub = importlib.import_module(f"{name}.{info.name}")
            value = getattr(pkg, info.name)
            if value is not sub:
                shadows.append(f"{name}.{info.name} is {value!r}, not the submodule")
    assert not shadows, shadows
    taken = [n for n in MODULES if n.rpartition(".")[2] in sys.stdlib_module_names]
    assert not taken, taken


def test_public_api_and_star_import_keep_the_builtins():
    import meft_fx

    for verb in ("convert", "MEFTConfig", "explain", "save_adapters", "load_adapters", "adapter_config", "compile",
                 "graphs", "to_networkx", "draw", "debug_node", "ConversionError", "CaptureError",
                 "ReconstructionError", "AdapterMismatchError"):
        assert callable(getattr(meft_fx, verb)), verb
    ns: dict = {}
    exec("from meft_fx import *", ns)
    assert "compile" not in ns and "convert" in ns


def test_one_reversible_autograd_function_in_the_runtime():
    functions = []
    for name, path in MODULES.items():
        if not name.startswith("meft_fx.runtime"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("autograd.Function") for b in node.bases):
                functions.append(f"{name}.{node.name}")
    assert functions == ["meft_fx.runtime.function.ReversibleFunction"]


def test_runtime_imports_nothing_above_it():
    allowed = ("meft_fx.runtime", "meft_fx.errors")
    bad = [f"{name} imports {mod}" for name, path in MODULES.items() if name.startswith("meft_fx.runtime")
           for mod, names in _imports(name, path) if mod.startswith("meft_fx") and not mod.startswith(allowed)]
    assert not bad, bad


def test_passes_are_installed_under_the_package_only(tmp_path):
    code = "import importlib.util as u, meft_fx.passes as p; print(u.find_spec('passes') is None, p.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    found_none, where = out.stdout.split()
    assert found_none == "True" and Path(where).parent == ROOT / "passes"


@pytest.mark.parametrize("name", ["LICENSE"])
def test_repository_files(name):
    assert (ROOT / name).is_file()
