"""A CRT from another installed package: a tiny package is pip-installed into a temporary folder and then listed,
composed, built and fitted by name (``crt=tiny_negative_prompt``) exactly like a built-in option."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from crt.none import NoCRT
from runners import registry
from tests.runners.conftest import CONF, ROOT, compose_config

PLUGIN_NAME = "tiny_negative_prompt"

# The package a third party would write: a CRT class importing only the public contract, its YAML in a config
# package, and one entry point. It also ships a `none` option, which must not shadow the built-in one.
PLUGIN_FILES = {
    "pyproject.toml": """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "tiny-crt-plugin"
version = "0.1.0"

[project.entry-points."crt_bench.conf"]
tiny = "tiny_crt_plugin.conf"

[tool.setuptools]
packages = ["tiny_crt_plugin", "tiny_crt_plugin.conf"]

[tool.setuptools.package-data]
"tiny_crt_plugin.conf" = ["*/*.yaml"]
""",
    "tiny_crt_plugin/__init__.py": "",
    "tiny_crt_plugin/conf/__init__.py": "",
    "tiny_crt_plugin/method.py": """\
from crt_bench import CRT, OPEN_WEIGHTS, Artifact, DefendedModel, Family, FitContext


class NegativePrompt(CRT):
    name = "tiny_negative_prompt"
    family = Family.GUIDANCE
    exposes = OPEN_WEIGHTS

    def fit(self, ctx: FitContext) -> Artifact:
        return Artifact(meta={"negative_prompt": ", ".join([ctx.concept.c_u] * int(self.params["repeat"]))})

    def apply(self, pipe, artifact: Artifact) -> DefendedModel:
        return DefendedModel(pipe=pipe, crt_name=self.name, negative_prompt=artifact.meta["negative_prompt"],
                             exposes=self.exposes)
""",
    f"tiny_crt_plugin/conf/crt/{PLUGIN_NAME}.yaml": f"""\
name: {PLUGIN_NAME}
handler: tiny_crt_plugin.method.NegativePrompt
params:
  repeat: 1
mini:
  repeat: 2
""",
    "tiny_crt_plugin/conf/crt/none.yaml": "name: none\nhandler: tiny_crt_plugin.method.NegativePrompt\nparams: {}\n",
}


@pytest.fixture(scope="module")
def plugin_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built and installed offline into a folder of its own (a few seconds)."""
    source = tmp_path_factory.mktemp("tiny_crt_plugin_src")
    for relative, text in PLUGIN_FILES.items():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_text(text)
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, capture_output=True,
                   timeout=120)
    return target


@pytest.fixture
def installed(plugin_target: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The package importable in this process for one test, then forgotten."""
    monkeypatch.syspath_prepend(str(plugin_target))
    yield plugin_target
    for name in [m for m in sys.modules if m == "tiny_crt_plugin" or m.startswith("tiny_crt_plugin.")]:
        del sys.modules[name]


def test_without_plugins_the_options_are_the_conf_files():
    assert registry.installed_config_packages() == {}
    assert registry.available("crt") == sorted(p.stem for p in (CONF / "crt").glob("*.yaml"))


def test_an_installed_plugin_crt_is_listed_composed_and_built_by_name(installed: Path):
    assert registry.installed_config_packages() == {"tiny": "tiny_crt_plugin.conf"}
    assert registry.plugin_options("crt") == {PLUGIN_NAME: "tiny_crt_plugin.conf", "none": "tiny_crt_plugin.conf"}
    builtins = sorted(p.stem for p in (CONF / "crt").glob("*.yaml"))
    assert registry.available("crt") == sorted([*builtins, PLUGIN_NAME])
    assert PLUGIN_NAME not in registry.available("attack")

    cfg = compose_config([f"crt={PLUGIN_NAME}", "attack=none"])
    assert cfg["crt"]["handler"] == "tiny_crt_plugin.method.NegativePrompt"
    crt = registry.build_crt(cfg["crt"], model="mini")
    assert type(crt).__module__ == "tiny_crt_plugin.method" and crt.params == {"repeat": 2}  # the mini block
    assert registry.build_crt(cfg["crt"]).params == {"repeat": 1}


def test_a_plugin_cannot_shadow_a_builtin_option(installed: Path):
    cfg = compose_config(["crt=none"])
    assert cfg["crt"]["handler"] == "crt.none.NoCRT"
    assert isinstance(registry.build_crt(cfg["crt"]), NoCRT)


def test_option_file_is_the_yaml_hydra_reads(installed: Path):
    plugin_file = registry.option_file("crt", PLUGIN_NAME)
    assert plugin_file.read_text() == PLUGIN_FILES[f"tiny_crt_plugin/conf/crt/{PLUGIN_NAME}.yaml"]
    assert str(plugin_file).startswith(str(installed))
    assert registry.option_file("crt", "none") == CONF / "crt" / "none.yaml"


def test_a_broken_entry_point_is_ignored_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture):
    dist_info = tmp_path / "broken_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[crt_bench.conf]\nbroken = no_such_package.conf\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="runners.registry"):
        assert registry.installed_config_packages() == {}
    assert "no_such_package.conf" in caplog.text
    assert registry.available("crt") == sorted(p.stem for p in (CONF / "crt").glob("*.yaml"))
    assert compose_config(["crt=none"])["crt"]["name"] == "none"


def test_run_py_fits_the_plugin_crt_by_name(plugin_target: Path, tmp_path: Path):
    """The real command line with the package on PYTHONPATH only: the fit runs the plug-in's class with its YAML's
    world budget and stores its artifact (about 15 s: imports and loading the world's pipeline)."""
    env = {**os.environ, "PYTHONPATH": str(plugin_target), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "run.py", f"crt={PLUGIN_NAME}", "attack=none", "concept=world_nudity", "model=mini",
         "stop_after=fit", "threads=1", "progress=false", f"store.root={tmp_path / 'store'}",
         f"results.dir={tmp_path / 'results'}", f"data.downloads={tmp_path / 'downloads'}",
         f"hydra.run.dir={tmp_path / 'outputs'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"fitting {PLUGIN_NAME} on world_nudity" in result.stderr + result.stdout
    c_u = yaml.safe_load((CONF / "concept" / "world_nudity.yaml").read_text())["c_u"]
    metas = [json.loads(p.read_text()) for p in (tmp_path / "store").rglob("meta.json")]
    assert metas == [{"negative_prompt": f"{c_u}, {c_u}"}]
    assert not (tmp_path / "results" / "runs").exists()
