"""Plug-ins from config: ``handler: package.module.Class`` plus ``params:`` builds a CRT, an attack or a judge.

Why: adding a CRT must be a module and a YAML file, nothing else; there is no list of names to keep in sync.
Judges and evaluators without a ``handler`` go through the metrics package's builders.

Options come from ``conf/`` and from installed packages: a package that names a config package (laid out like
``conf/``) in the ``crt_bench.conf`` entry-point group has it appended to Hydra's search path, after ``conf/``, by
:class:`InstalledConfigPackages`, a Hydra ``SearchPathPlugin`` registered when this module is imported (run.py and
the catalogue import it before Hydra composes). So ``crt=<name>`` selects a third-party CRT exactly as a built-in
one, and :func:`available` lists it; how a package declares one is in :mod:`crt_bench`'s docstring.
"""

from __future__ import annotations

import importlib
import logging
from importlib import resources
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin

from attacks.base import Attack
from crt.base import CRT
from crt_bench import ENTRY_POINT_GROUP
from crt_bench.spec import HarnessError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
log = logging.getLogger(__name__)


def installed_config_packages() -> dict[str, str]:
    """Entry-point name -> config package, for every installed package that declares one in ``crt_bench.conf``.

    A declared package that cannot be found (uninstalled, misspelt, no ``__init__.py``, which Hydra's ``pkg://``
    source needs) is left out with a warning, so one broken install does not stop every run."""
    packages = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found = (resources.files(point.module) / "__init__.py").is_file()
        except (ModuleNotFoundError, TypeError, ValueError):
            found = False
        if found:
            packages[point.name] = point.module
        else:
            log.warning("entry point %s = %r (group %s) names no importable package with an __init__.py; ignored",
                        point.name, point.value, ENTRY_POINT_GROUP)
    return packages


class InstalledConfigPackages(SearchPathPlugin):
    """Appends every installed plug-in config package to Hydra's search path (after ``conf/``: built-ins win)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for name, package in installed_config_packages().items():
            search_path.append(provider=f"{ENTRY_POINT_GROUP}:{name}", path=f"pkg://{package}")


Plugins.instance().register(InstalledConfigPackages)


def plugin_options(group: str) -> dict[str, str]:
    """Option name -> the config package that ships it, over the installed plug-in packages (first one wins, as in
    Hydra's search path)."""
    options: dict[str, str] = {}
    for package in installed_config_packages().values():
        folder = resources.files(package) / group
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.name.endswith(".yaml"):
                    options.setdefault(entry.name.removesuffix(".yaml"), package)
    return options


def option_file(group: str, name: str, conf_dir: Path = CONF_DIR) -> Path | resources.abc.Traversable:
    """The YAML file Hydra reads for ``group=name``: ``conf_dir``'s, else the installed plug-in package's (what
    the catalogue reads comments from)."""
    local = conf_dir / group / f"{name}.yaml"
    package = None if local.is_file() else plugin_options(group).get(name)
    return resources.files(package) / group / f"{name}.yaml" if package else local


def available(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The options of a config group, as Hydra sees them (file names without .yaml): ``conf_dir``'s and those of
    the installed plug-in packages."""
    return sorted({p.stem for p in (conf_dir / group).glob("*.yaml")} | set(plugin_options(group)))


def import_handler(path: str, what: str) -> Any:
    module_name, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise HarnessError(f"{what}: handler {path!r} cannot be imported ({error})") from None


def _params(cfg: dict[str, Any], model: str | None = None, concept: dict[str, Any] | None = None) -> dict[str, Any]:
    """``params``, updated by the block named after the model when there is one (e.g. ``mini:`` scales a CRT's
    iterations to the miniature world), then by the concept's ``plugin_params`` entry named after the plug-in (a
    paper's per-concept protocol, e.g. UnlearnDiffAtk's k = 3 for objects, the text ESD erases for nudity); the
    merged values are what the plug-in's identity records."""
    params = dict(cfg.get("params") or {})
    name = cfg.get("name")
    per_concept = ((concept or {}).get("plugin_params") or {}).get(name) if name else None
    for block, label in ((cfg.get(model) if model else None, f"the {model!r} block"),
                         (per_concept, f"concept {(concept or {}).get('key')!r}")):
        if isinstance(block, dict):
            unknown = set(block) - set(params)
            if unknown:
                raise HarnessError(f"{name!r}: {label} sets unknown params {sorted(unknown)}")
            params.update(block)
    return params


def build_crt(cfg: dict[str, Any], model: str | None = None, concept: dict[str, Any] | None = None) -> CRT:
    cls = import_handler(cfg["handler"], f"crt {cfg.get('name')!r}")
    if not (isinstance(cls, type) and issubclass(cls, CRT)):
        raise HarnessError(f"crt handler {cfg['handler']!r} is not a subclass of crt_bench.CRT")
    return cls(**_params(cfg, model, concept))


def build_attack(cfg: dict[str, Any], model: str | None = None, concept: dict[str, Any] | None = None) -> Attack:
    cls = import_handler(cfg["handler"], f"attack {cfg.get('name')!r}")
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise HarnessError(f"attack handler {cfg['handler']!r} is not a subclass of crt_bench.Attack")
    return cls(adaptive=bool(cfg.get("adaptive", False)), **_params(cfg, model, concept))


def build_judge(cfg: dict[str, Any]) -> Any:
    """A judge object with ``identity`` and ``judge(images) -> list[JudgeVerdict]``."""
    if cfg.get("handler"):
        return import_handler(cfg["handler"], "judge")(**_params(cfg))
    from metrics.judges import build_judge as metrics_build_judge

    return metrics_build_judge(dict(cfg))


def build_evaluator(cfg: dict[str, Any]) -> Any:
    """A CLIP evaluator with ``identity``, ``logit_scale``, ``encode_images`` and ``encode_texts``."""
    if cfg.get("handler"):
        return import_handler(cfg["handler"], "evaluator")(**_params(cfg))
    from metrics.evaluators import build_evaluator as metrics_build_evaluator

    return metrics_build_evaluator(dict(cfg))
