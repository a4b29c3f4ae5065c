"""The package's shape, read from its source (ast, no imports): dependencies point one way along the flow.

- No import cycle between modules of moe_prune/ and kernels/ (function-level and TYPE_CHECKING imports count: a
  cycle hidden inside a function is still a cycle a reader must untangle).
- Each subpackage imports only the subpackages below it in the flow (LAYERS), as its __init__.py docstring says.
- No module over MAX_LINES lines; no `from x import _private` (or `x._private`) of another module's private name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500

# Each subpackage (or top-level module) and what it may import, lowest first: the flow of DESIGN.md. kernels sit
# beside core: they import core's torch references (routing.py, mlp.py); core launches them only inside functions
# that run on CUDA tensors. measurement.accuracy sits below compression, which reports accuracy before and after
# healing; it imports nothing from compression or onnx. Everything may import errors and version.
BASE = {"errors", "version"}
LAYERS = {
    "errors": set(),
    "version": set(),
    "core": BASE | {"kernels"},
    "kernels": BASE | {"core"},
    "data": BASE | {"core"},
    "selection": BASE | {"core", "kernels", "data"},
    "measurement.accuracy": BASE | {"core", "data", "selection"},
    "compression": BASE | {"core", "data", "selection", "measurement.accuracy"},
    "onnx": BASE | {"core", "data", "selection", "compression"},
    "measurement": BASE | {"core", "kernels", "data", "selection", "compression", "onnx", "measurement.accuracy"},
    "serving": BASE | {"core", "data", "onnx"},
    "flows": BASE | {"core", "data", "selection", "compression", "onnx", "measurement", "measurement.accuracy",
                     "serving"},
    "cli": BASE | {"core", "data", "selection", "compression", "onnx", "measurement", "measurement.accuracy",
                   "serving", "flows"},
    "": BASE,  # moe_prune/__init__.py: re-exports by name (importlib), imports only errors and version statically
}


def module_files() -> dict[str, Path]:
    """Module name -> file, for moe_prune/ and kernels/ (shipped as moe_prune.kernels)."""
    out = {}
    for top, package in (("moe_prune", "moe_prune"), ("kernels", "moe_prune.kernels")):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = module_files()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports(name: str) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import statement of a module, at any depth."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    here = name.split(".") if _is_package(name) else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [alias.name for alias in node.names]
            # `from package import module` imports that module
            subs = [n for n in names if f"{target}.{n}" in MODULES]
            found += [(f"{target}.{n}", [], node.lineno) for n in subs]
            rest = [n for n in names if n not in subs]
            if rest or not subs:
                found.append((target, rest, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    edges = {name: set() for name in MODULES}
    for name in MODULES:
        for target, _, _ in imports(name):
            if target in MODULES and target != name:
                edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer(name: str) -> str:
    parts = name.split(".")[1:]
    if ".".join(parts[:2]) in LAYERS:
        return ".".join(parts[:2])
    return parts[0] if parts else ""


def test_the_walker_sees_every_kind_of_import():
    """The checks below are only as good as this walker: function-level, relative, `from pkg import module`."""
    edges = graph()
    assert "moe_prune.core.layers" in edges["moe_prune.core.models.vit"]  # from ..layers import ... (relative, up)
    assert "moe_prune.core.checkpoint" in edges["moe_prune.cli.commands"]  # inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert len(MODULES) > 40


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles (each line: modules that import each other):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_subpackages_import_only_what_is_below_them_in_the_flow():
    wrong = []
    for name, targets in graph().items():
        src = layer(name)
        for target in sorted(targets):
            dst = layer(target)
            if dst != src and dst not in LAYERS[src]:
                wrong.append(f"{name} imports {target} ({src or 'moe_prune'} may import: "
                             f"{', '.join(sorted(LAYERS[src])) or 'nothing'})")
    assert not wrong, "\n".join(wrong)


def test_every_subpackage_says_its_job_and_what_it_may_import():
    for name, path in MODULES.items():
        if path.name != "__init__.py" or name in ("moe_prune",):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert len(doc) > 200 and "import" in doc, f"{path}: say the subpackage's job and what it may import"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_at_most_500_lines(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)}: {n} lines; split it by responsibility"


def test_no_module_uses_another_modules_private_names():
    wrong = []
    for name in MODULES:
        tree = ast.parse(MODULES[name].read_text())
        aliases = {}  # local name -> one of our modules, for `module._private` attribute uses
        for target, names, line in imports(name):
            if target in MODULES and target != name:
                wrong += [f"{name}:{line} takes {target}.{n}" for n in names
                          if n.startswith("_") and not n.startswith("__")]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in MODULES and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                wrong.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not wrong, "private names of another module (make them public where they are shared):\n" + "\n".join(wrong)
