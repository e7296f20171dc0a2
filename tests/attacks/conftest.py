"""The attack tests share the CRT tests' pipelines and concept (see tests/crt/conftest.py)."""

from tests.crt.conftest import concept, sd14, tiny, world  # noqa: F401
