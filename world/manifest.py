"""The sha256 manifest of the shipped world weights: ``python -m world.manifest`` writes it, tests verify it."""

from __future__ import annotations

import json
from pathlib import Path

from runners.spec import sha256_file
from world.train import WEIGHTS

MANIFEST = WEIGHTS / "MANIFEST.json"


def shipped_files(root: Path = WEIGHTS) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p != root / MANIFEST.name)


def build_manifest(root: Path = WEIGHTS) -> dict[str, dict]:
    return {str(p.relative_to(root)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in shipped_files(root)}


def verify(root: Path = WEIGHTS) -> list[str]:
    """Problems found: files that differ from, are missing from, or are not in the manifest."""
    expected = json.loads((root / MANIFEST.name).read_text())["files"]
    actual = build_manifest(root)
    problems = [f"missing: {name}" for name in expected if name not in actual]
    problems += [f"unlisted: {name}" for name in actual if name not in expected]
    problems += [f"sha256 differs: {name}" for name in expected
                 if name in actual and actual[name]["sha256"] != expected[name]["sha256"]]
    return problems


def write_manifest(root: Path = WEIGHTS) -> Path:
    files = build_manifest(root)
    total = sum(f["bytes"] for f in files.values())
    (root / MANIFEST.name).write_text(json.dumps({"total_bytes": total, "files": files}, indent=1, sort_keys=True))
    return root / MANIFEST.name


if __name__ == "__main__":
    print(write_manifest())
