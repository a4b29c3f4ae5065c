"""No silent skips: what this machine can run, the tests run.

Every place a test can skip (`pytest.skip`, `pytest.importorskip`, `pytest.mark.skip`, `pytest.mark.skipif` in
tests/*.py, found by reading the source) is registered in SKIPS with the one capability it stands for, and each
capability has a probe here, written apart from the tests' own conditions. Then:
- a new skip that is not registered fails (say which capability it needs);
- a skip that runs at import (a module-level importorskip, or `pytestmark`) skips every test of its module, so it
  is allowed only in a module that tests nothing but that capability (WHOLE_MODULE): test_serve.py once skipped
  its torchrun calibration tests whenever tritonclient was missing;
- for every capability this machine has, the tests' own skip conditions say "run": skipif markers are evaluated,
  modules with an import-time skip are imported, helpers that skip (library_models.soft_moe_pytorch, ...) are
  called. Skips written inline in a test body are registered but cannot be evaluated without running the test.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import FIXTURES, SHARED_FIXTURES, importable

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SKIP_CALLS = {"pytest.skip", "pytest.importorskip", "pytest.mark.skip", "pytest.mark.skipif"}
RUN_AT_IMPORT = {"pytest.skip", "pytest.importorskip"}  # executed where they stand; the marks are applied later




def _serving_environment() -> bool:
    configured = os.environ.get("MOE_PRUNE_SERVE_PYTHON")
    if configured == "":
        return False  # switched off on purpose (.ci/run runs the live test in its own step): not silent
    return Path(configured or ROOT / ".venv-serve" / "bin" / "python").exists()


def _soft_moe() -> bool:
    spec = importlib.util.find_spec("soft_moe")
    return bool(spec and spec.submodule_search_locations and
                any((Path(p) / "soft_moe.py").is_file() for p in spec.submodule_search_locations))


def _fashion_mnist() -> bool:
    folder = Path("/usr/share/datasets/fashion-mnist")
    return all((folder / f"{split}-{part}-idx{n}-ubyte.gz").is_file()
               for split in ("train", "t10k") for part, n in (("images", 3), ("labels", 1)))


# What the machine has: probes of their own, not the tests' conditions.
PROBES: dict[str, Callable[[], bool]] = {
    "cuda": lambda: torch.cuda.is_available(),
    "no-gpu": lambda: not torch.cuda.is_available(),
    "triton": lambda: importable("triton"),
    "tritonclient": lambda: importable("tritonclient.grpc") and importable("tritonclient.http"),
    "gloo": lambda: torch.distributed.is_available() and torch.distributed.is_gloo_available(),
    "console-script": lambda: (Path(sys.executable).parent / "moe-prune").is_file(),
    "soft-moe": _soft_moe,
    "soft-moe-pytorch": lambda: importable("soft_moe_pytorch"),
    "pytorch-lightning": lambda: importable("pytorch_lightning"),
    "fashion-mnist": _fashion_mnist,
    "serving-environment": _serving_environment,
    "shared-fixtures": lambda: SHARED_FIXTURES.is_dir(),
    "wheel-build": lambda: importable("setuptools") and importable("wheel"),
}

# Every place in tests/ that can skip: (file, scope) -> capability. The scope is the top-level function or class
# holding it, the name a module-level marker is assigned to, or "<module>" for a skip that runs at import.
SKIPS = {
    ("conftest.py", "pytest_collection_modifyitems"): "cuda",  # tests marked gpu
    ("library_models.py", "soft_moe_layer_module"): "soft-moe",
    ("library_models.py", "soft_moe_pytorch"): "soft-moe-pytorch",
    ("library_models.py", "lightning_checkpoint"): "pytorch-lightning",
    ("test_checkpoint.py", "test_fixtures_match_the_shared_copy"): "shared-fixtures",
    ("test_cli.py", "test_bench_without_a_gpu_says_so"): "no-gpu",
    ("test_data.py", "needs_debian"): "fashion-mnist",
    ("test_grouped_experts.py", "<module>"): "triton",
    ("test_heal.py", "needs_cli"): "console-script",
    ("test_kernels.py", "<module>"): "triton",
    ("test_package.py", "test_wheel_ships_kernels_and_assets"): "wheel-build",
    ("test_package.py", "test_console_script_runs"): "console-script",
    ("test_reliability.py", "needs_cli"): "console-script",
    ("test_reliability.py", "test_the_console_script_prints_one_line"): "console-script",
    ("test_serve.py", "needs_tritonclient"): "tritonclient",
    ("test_serve.py", "needs_gloo"): "gloo",
    ("test_serve.py", "needs_cli"): "console-script",
    ("test_serve_live.py", "serving_python"): "serving-environment",
    ("test_serve_live.py", "<module>"): "tritonclient",
    ("test_sparse_per_input.py", "test_layer_through_the_grouped_kernel_equals_torch"): "triton",
}
# Modules that test one capability and nothing else: the only ones that may skip as a whole.
WHOLE_MODULE = {"test_kernels.py": "triton", "test_grouped_experts.py": "triton", "test_serve_live.py": "tritonclient"}


@dataclass(frozen=True)
class Site:
    file: str
    scope: str
    call: str  # "pytest.importorskip", ...
    line: int


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def skip_sites(source: str, file: str) -> list[Site]:
    """Every skip in a test file's source, with the scope that holds it."""
    sites = []
    for stmt in ast.parse(source).body:
        for node in ast.walk(stmt):
            call = _dotted(node) if isinstance(node, ast.Attribute) else None
            if call not in SKIP_CALLS:
                continue
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                scope = stmt.name
            elif call in RUN_AT_IMPORT:
                scope = "<module>"
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                target = stmt.targets[0] if isinstance(stmt, ast.Assign) else stmt.target
                scope = target.id if isinstance(target, ast.Name) else "<module>"
            else:
                scope = "<module>"
            sites.append(Site(file, scope, call, node.lineno))
    return sites


def all_sites() -> list[Site]:
    return [s for path in sorted(TESTS.glob("*.py")) if path.name != Path(__file__).name
            for s in skip_sites(path.read_text(), path.name)]


def whole_module_problems(sites: list[Site]) -> list[str]:
    """Skips that take a whole module down, outside the modules that are about that capability alone."""
    problems = []
    for s in sites:
        if s.scope in ("<module>", "pytestmark"):
            capability = SKIPS.get((s.file, s.scope))
            if WHOLE_MODULE.get(s.file) is None or WHOLE_MODULE[s.file] != capability:
                problems.append(f"{s.file}:{s.line}: {s.call} at import skips every test of the module; gate only "
                                "the tests that need it (a skipif marker), or list the module in WHOLE_MODULE")
    return problems


def gate_says_skip(module: types.ModuleType | None, file: str, scope: str) -> str | None:
    """Why the tests' own condition at (file, scope) skips on this machine, or None when it says run (or cannot be
    evaluated without running a test: a skip inline in a test body, a helper that takes arguments)."""
    if module is None:  # the import itself skipped
        return f"importing {file} skips"
    if scope == "<module>":
        return None
    obj = getattr(module, scope, None)
    if isinstance(obj, pytest.MarkDecorator) and obj.name in ("skip", "skipif"):
        condition = obj.mark.args[0] if obj.mark.args else obj.mark.kwargs.get("condition", True)
        if obj.name == "skip" or not isinstance(condition, bool) or condition:
            return f"{file}: {scope} skips: {obj.mark.kwargs.get('reason', '')}"
        return None
    required = [p for p in inspect.signature(obj).parameters.values() if p.default is p.empty] \
        if inspect.isfunction(obj) else None
    if required == [] and not scope.startswith("test_"):  # a helper the tests call: call it too
        try:
            obj()
        except pytest.skip.Exception as e:
            return f"{file}: {scope}() skips: {e}"
    return None


def import_test_module(file: str) -> types.ModuleType | None:
    try:
        return importlib.import_module(Path(file).stem)
    except pytest.skip.Exception:
        return None


# -- the checks ---------------------------------------------------------------------------------------------------


def test_every_skip_is_registered_with_its_capability():
    found = {(s.file, s.scope): s for s in all_sites()}
    unknown = [f"{s.file}:{s.line} ({s.scope})" for key, s in found.items() if key not in SKIPS]
    assert not unknown, f"skips with no capability in SKIPS (add each, with a probe in PROBES): {unknown}"
    stale = [key for key in SKIPS if key not in found]
    assert not stale, f"SKIPS lists skips that are gone: {stale}"
    assert set(SKIPS.values()) <= set(PROBES) and set(WHOLE_MODULE.values()) <= set(PROBES)


def test_whole_module_skips_only_where_the_module_is_that_capability():
    assert whole_module_problems(all_sites()) == []


def test_skip_conditions_say_run_for_what_this_machine_has():
    has = {name: probe() for name, probe in PROBES.items()}
    wrong = []
    for (file, scope), capability in sorted(SKIPS.items()):
        if has[capability]:
            reason = gate_says_skip(import_test_module(file), file, scope)
            if reason:
                wrong.append(f"{reason} although this machine has {capability}")
    assert not wrong, wrong


def test_the_fixtures_never_skip():
    """The parity fixtures ship in tests/fixtures: no condition on them, and they are there."""
    assert all((FIXTURES / name / "model.safetensors").is_file() for name in ("bwconrad_vit_mnist", "lucidrains_layer"))
    for path in sorted(TESTS.glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and _dotted(node.func) in SKIP_CALLS and node.args:
                condition = ast.unparse(node.args[0])
                assert "FIXTURES" not in condition or "SHARED_FIXTURES" in condition, \
                    f"{path.name}:{node.lineno} skips on the in-repository fixtures: {condition}"


# -- the checks can fail ------------------------------------------------------------------------------------------

OLD_SERVE = '''
import pytest
pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is needed to parse configs")

def test_two_process_calibration_equals_one_process(tmp_path):
    ...
'''


def test_the_check_catches_a_module_skipped_for_another_capability(monkeypatch):
    """test_serve.py as it was: a module-level importorskip of tritonclient took the torchrun tests down with it."""
    monkeypatch.setitem(SKIPS, ("test_serve.py", "<module>"), "tritonclient")
    sites = skip_sites(OLD_SERVE, "test_serve.py")
    assert [(s.scope, s.call) for s in sites] == [("<module>", "pytest.importorskip")]
    assert len(whole_module_problems(sites)) == 1


@pytest.mark.parametrize("source, skips", [
    ("import pytest\nneeds_gloo = pytest.mark.skipif(True, reason='no gloo')\n", True),  # a wrong condition
    ("import pytest\nneeds_gloo = pytest.mark.skipif(not True, reason='no gloo')\n", False),
    ("import pytest\nneeds_gloo = pytest.mark.skip(reason='later')\n", True),
    ("import pytest\ndef soft_moe_pytorch():\n    return pytest.importorskip('no_such_module_here')\n", True),
    ("import pytest\npytest.importorskip('no_such_module_here')\n", True),
])
def test_the_check_catches_a_wrong_condition(source, skips):
    module = types.ModuleType("fake_tests")
    try:
        exec(compile(source, "fake_tests.py", "exec"), module.__dict__)
    except pytest.skip.Exception:
        module = None
    scope = next(s.scope for s in skip_sites(source, "fake_tests.py"))
    assert (gate_says_skip(module, "fake_tests.py", scope) is not None) == skips
