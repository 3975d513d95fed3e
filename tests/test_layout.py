"""Layout rules a refactor must not break silently.

- Our own modules are imported plainly: a `pytest.importorskip("echocare_dist...")` or a
  try/except ImportError around an internal import turns a broken refactor into a skip or a
  fallback instead of a failure.
- Every module of the package imports.
- No import cycle among the package's modules (static, from the AST; lazy imports inside
  functions count too: a cycle is a design fault even when import order happens to work).
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "echocare_dist"
# Source folder -> dotted prefix; kernels/ is installed as echocare_dist.kernels (setup.py package_dir).
SOURCES = {REPO / "echocare_dist": PACKAGE, REPO / "kernels": f"{PACKAGE}.kernels"}
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (packages by their __init__)."""
    mods = {}
    for folder, prefix in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts and parts[-1] == "__main__":
                continue
            mods[".".join((prefix, *parts))] = path
    return mods


MODULES = package_modules()


def is_internal(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


# ------------------------------------------------------------------ plain internal imports
def internal_imports(nodes) -> list[ast.AST]:
    """Import statements of our package (absolute, or relative inside it) and
    importlib.import_module("echocare_dist...") calls among `nodes` and below."""
    found = []
    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, ast.Import) and any(is_internal(a.name) for a in node.names):
                found.append(node)
            elif isinstance(node, ast.ImportFrom) and (node.level > 0 or is_internal(node.module or "")):
                found.append(node)
            elif (isinstance(node, ast.Call) and _call_name(node) == "import_module" and node.args
                  and isinstance(node.args[0], ast.Constant) and is_internal(str(node.args[0].value))):
                found.append(node)
    return found


def _call_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _catches_import_errors(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    names = {t.attr if isinstance(t, ast.Attribute) else getattr(t, "id", "") for t in types}
    return bool(names & IMPORT_ERRORS)


def guarded_internal_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    bad = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and _call_name(node) == "importorskip" and node.args
                and isinstance(node.args[0], ast.Constant) and is_internal(str(node.args[0].value))):
            bad.append((node.lineno, f"importorskip({node.args[0].value!r})"))
        elif isinstance(node, ast.Try) and any(_catches_import_errors(h) for h in node.handlers):
            bad += [(imp.lineno, f"{ast.unparse(imp)!r} inside try/except ImportError")
                    for imp in internal_imports(node.body)]
    return [f"{where}:{line}: {what}" for line, what in sorted(bad)]


def _assert_plain(files: list[Path]) -> None:
    bad = [line for path in files for line in guarded_internal_imports(path)]
    assert not bad, "import our own modules plainly, so a broken refactor fails instead of skipping:\n" + "\n".join(bad)


def test_tests_import_our_modules_plainly():
    _assert_plain(sorted((REPO / "tests").rglob("*.py")))


def test_package_imports_its_modules_plainly():
    # An optional third-party dependency is guarded by importing *it*, then our module plainly.
    _assert_plain(sorted(MODULES.values()))


def test_the_guard_sees_both_forms(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import pytest\nmodels = pytest.importorskip('echocare_dist.models')\n"
                      "try:\n    from echocare_dist.synth import generate_dataset\nexcept ImportError:\n    pass\n"
                      "try:\n    import scipy\nexcept ImportError:\n    pass\n")
    bad = guarded_internal_imports(sample)
    assert len(bad) == 2 and "importorskip('echocare_dist.models')" in bad[0] and "generate_dataset" in bad[1], bad


# ------------------------------------------------------------------ every module imports
@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports(module):
    importlib.import_module(module)


# ------------------------------------------------------------------ no import cycles
def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body. `from X import y` points at
    X.y when that is a module, else at X. A module's implicit import of its parent packages is no edge."""
    graph = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    edges.add(candidate if candidate in mods else target)
        graph[name] = {e for e in edges if e in mods and e != name}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on deep import chains)."""
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def import_cycles(mods: dict[str, Path]) -> list[list[str]]:
    # A package __init__ that re-exports its children and is imported back by one of them is the
    # usual harmless pattern: a cycle needs two plain modules (the same rule as the shared tool).
    return [c for c in strongly_connected(import_graph(mods))
            if sum(1 for m in c if mods[m].name != "__init__.py") > 1]


def test_no_import_cycles():
    cycles = import_cycles(MODULES)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_check_finds_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import x\n")
    (pkg / "a.py").write_text("x = 1\ndef f():\n    from .b import y\n")
    (pkg / "b.py").write_text("from pkg import a\ny = 2\n")
    (pkg / "c.py").write_text("from . import a\n")
    mods = {"pkg": pkg / "__init__.py", **{f"pkg.{m}": pkg / f"{m}.py" for m in "abc"}}
    assert import_cycles(mods) == [["pkg.a", "pkg.b"]]
