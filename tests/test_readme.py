"""The README's generated tables are what the catalogue and the committed runs generate now: a plug-in added or
changed, or runs committed, without regenerating them fails."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runners.readme_tables import readme_blocks, write_readme

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "results"


def block(name: str) -> str:
    found = re.search(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", README.read_text(), re.S)
    assert found, f"README has no {name} block"
    return found.group(1).strip()


@pytest.fixture(scope="module")
def generated() -> dict[str, list[str]]:
    """What ``python -m runners.readme_tables`` writes, by block."""
    return readme_blocks(RESULTS)


@pytest.mark.parametrize("name", ["crt-table", "support-matrix", "result-tables"])
def test_the_block_is_generated(generated, name):
    assert block(name) == "\n".join(generated[name]).strip(), "run: python -m runners.readme_tables"


if __name__ == "__main__":
    write_readme(README, RESULTS)
