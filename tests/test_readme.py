"""The README's generated tables are what the catalogue and the committed runs generate now: a plug-in added or
changed, or runs committed, without regenerating them fails."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runners.catalog import build_catalog, crt_table_markdown, support_markdown
from runners.readme_tables import readme_tables, write_readme

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "results"


def block(name: str) -> str:
    found = re.search(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", README.read_text(), re.S)
    assert found, f"README has no {name} block"
    return found.group(1).strip()


@pytest.fixture(scope="module")
def catalog():
    return build_catalog()


def test_the_crt_table_is_generated(catalog):
    assert block("crt-table") == "\n".join(crt_table_markdown(catalog)), "run: python -m runners.readme_tables"


def test_the_support_matrix_is_generated(catalog):
    assert block("support-matrix") == "\n".join(support_markdown(catalog)[4:]).strip(), \
        "run: python -m runners.readme_tables"


def test_the_result_tables_are_generated():
    assert block("result-tables") == "\n".join(readme_tables(RESULTS)).strip(), "run: python -m runners.readme_tables"


if __name__ == "__main__":
    write_readme(README, RESULTS)
