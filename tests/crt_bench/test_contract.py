"""The public contract: one module a plug-in imports, the same objects the harness uses, and plug-ins that never
reach into the orchestration layer (``runners``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import attacks.base
import crt.base
import crt_bench
import crt_bench.spec
import metrics.judges.base
import runners.models
import runners.spec

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_PACKAGES = ("crt", "attacks", "metrics", "crt_bench")
ORCHESTRATION = "runners"


def imported_modules(source: str) -> set[str]:
    """Every absolute module an ``import``/``from ... import`` names, at any depth (function-level imports too),
    plus string arguments of ``importlib.import_module`` / ``__import__``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if callee in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def imports_orchestration(source: str) -> list[str]:
    return sorted(m for m in imported_modules(source) if m == ORCHESTRATION or m.startswith(ORCHESTRATION + "."))


def test_the_scanner_finds_every_form_of_import():
    source = ("import runners.store\nfrom runners import registry\n"
              "def f():\n    from runners.models import HarnessError\n"
              "    return importlib.import_module('runners.stages')\n"
              "import runnersx\nfrom crt_bench.spec import Access\n")
    assert imports_orchestration(source) == ["runners", "runners.models", "runners.stages", "runners.store"]
    assert imports_orchestration("from crt_bench import CRT\nimport crt.base\n") == []


@pytest.mark.parametrize("package", PLUGIN_PACKAGES)
def test_no_plugin_module_imports_runners(package: str):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules under {package}/"
    offenders = {str(f.relative_to(ROOT)): found for f in files if (found := imports_orchestration(f.read_text()))}
    assert offenders == {}


def test_every_public_name_resolves_to_the_object_the_harness_uses():
    homes = {"crt.base": crt.base, "attacks.base": attacks.base, "metrics.judges.base": metrics.judges.base}
    for name in crt_bench.__all__:
        value = getattr(crt_bench, name)
        home = homes.get(crt_bench._LAZY.get(name, ""), crt_bench.spec if hasattr(crt_bench.spec, name) else crt_bench)
        assert value is getattr(home, name), name
    assert set(crt_bench.__all__) == {"ENTRY_POINT_GROUP"} | set(crt_bench._LAZY) | set(runners.spec.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        crt_bench.Nope  # noqa: B018


def test_the_old_homes_still_export_the_same_objects():
    for name in runners.spec.__all__:
        assert getattr(runners.spec, name) is getattr(crt_bench.spec, name), name
    assert runners.models.HarnessError is crt_bench.HarnessError
    assert runners.models.SCHEDULERS is crt_bench.SCHEDULERS
    assert issubclass(runners.models.ModelUnavailable, crt_bench.HarnessError)


def test_the_contract_module_is_light_until_a_base_class_is_asked_for():
    probe = ("import sys, crt_bench; light = 'torch' not in sys.modules and 'crt.base' not in sys.modules; "
             "crt_bench.CRT; print(light, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "True"]
