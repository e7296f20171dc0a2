"""The public contract of crt-bench: what a CRT, an attack or a judge implements, and the data they exchange.

Import plug-in code from here, never from ``runners`` (the orchestration layer, free to change)::

    from crt_bench import CRT, Artifact, DefendedModel, Family, FitContext, Access, PromptItem

The plain data (:class:`PromptItem`, :class:`Access`, :class:`Family`, :class:`ConceptSpec`,
:class:`GenerationSettings`, :func:`canonical_json`, :class:`HarnessError`...) lives in :mod:`crt_bench.spec`,
which imports nothing heavy; the base classes live next to the plug-ins that use them (``crt.base``,
``attacks.base``, ``metrics.judges.base``) and are re-exported here on first access, so that ``import crt_bench``
stays cheap and those modules can import :mod:`crt_bench.spec` without an import cycle.

Plug-ins from another package
-----------------------------
A package of yours adds CRTs, attacks, judges or concepts by shipping their YAML files in a *config package*
laid out like ``conf/`` (``crt/<name>.yaml``, ``attack/<name>.yaml``, ``judge/<name>.yaml``,
``concept/<name>.yaml``, ...) and naming that package in the ``crt_bench.conf`` entry-point group::

    # pyproject.toml of your package
    [project.entry-points."crt_bench.conf"]
    my_crts = "my_crts.conf"            # an importable package (with an __init__.py) holding crt/ attack/ ...

    [tool.setuptools.package-data]
    "my_crts.conf" = ["*/*.yaml"]       # ship the YAML files in the wheel

    # my_crts/conf/crt/my_crt.yaml: the same keys as a built-in option
    name: my_crt
    handler: my_crts.method.MyCRT       # a crt_bench.CRT subclass (an Attack subclass for attack/, ...)
    params: {strength: 1.0}

Once the package is installed, ``python run.py crt=my_crt`` runs it and ``runners.registry.available("crt")`` lists
it: the harness appends every such config package to Hydra's search path, after its own ``conf/``, so a built-in
option keeps its name when a plug-in ships a file with the same one. Why an entry point and not a
``hydra_plugins`` package of your own: one line of metadata, no Hydra plug-in class to write, and the same
declaration tells the registry (and the catalogue) which options are installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from crt_bench.spec import (
    SCHEDULERS,
    Access,
    ConceptSpec,
    Family,
    GenerationSettings,
    HarnessError,
    PromptItem,
    canonical_json,
    content_hash,
    sha256_file,
)

if TYPE_CHECKING:
    from attacks.base import (
        MODES,
        AdversarialPrompt,
        Attack,
        AttackContext,
        AttackCost,
        IncompatibleAttack,
        require_context,
        search_each,
    )
    from crt.base import CRT, OPEN_WEIGHTS, Artifact, DefendedModel, FitContext, ImageFilter, UNetEdit
    from metrics.judges.base import Judge, JudgeUnavailable, JudgeVerdict

ENTRY_POINT_GROUP = "crt_bench.conf"

__all__ = [
    # crt_bench.spec: plain data
    "SCHEDULERS", "Access", "ConceptSpec", "Family", "GenerationSettings", "HarnessError", "PromptItem",
    "canonical_json", "content_hash", "sha256_file",
    # crt.base: the CRT contract
    "CRT", "OPEN_WEIGHTS", "Artifact", "DefendedModel", "FitContext", "ImageFilter", "UNetEdit",
    # attacks.base: the attack contract
    "MODES", "AdversarialPrompt", "Attack", "AttackContext", "AttackCost", "IncompatibleAttack", "require_context",
    "search_each",
    # metrics.judges.base: the judge contract
    "Judge", "JudgeUnavailable", "JudgeVerdict",
    "ENTRY_POINT_GROUP",
]

_LAZY: dict[str, str] = {
    **dict.fromkeys(["CRT", "OPEN_WEIGHTS", "Artifact", "DefendedModel", "FitContext", "ImageFilter", "UNetEdit"],
                    "crt.base"),
    **dict.fromkeys(["MODES", "AdversarialPrompt", "Attack", "AttackContext", "AttackCost", "IncompatibleAttack",
                     "require_context", "search_each"], "attacks.base"),
    **dict.fromkeys(["Judge", "JudgeUnavailable", "JudgeVerdict"], "metrics.judges.base"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'crt_bench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
