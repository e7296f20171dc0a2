"""Where the shared vocabulary used to live; kept so that existing imports go on working.

The definitions moved to :mod:`crt_bench.spec`, a module outside the orchestration layer, because plug-ins
(``crt/``, ``attacks/``, ``metrics/``, third-party packages) must not import ``runners``. New code imports
:mod:`crt_bench` (the whole contract) or :mod:`crt_bench.spec` (the plain data only).
"""

from __future__ import annotations

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

__all__ = ["SCHEDULERS", "Access", "ConceptSpec", "Family", "GenerationSettings", "HarnessError", "PromptItem",
           "canonical_json", "content_hash", "sha256_file"]
