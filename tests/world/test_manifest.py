import pytest

from world.manifest import MANIFEST, verify


@pytest.mark.skipif(not MANIFEST.exists(), reason="world weights not yet shipped (run `make world`)")
def test_shipped_world_weights_match_their_manifest():
    assert verify() == []


@pytest.mark.skipif(not MANIFEST.exists(), reason="world weights not yet shipped (run `make world`)")
def test_shipped_weights_fit_the_size_budget():
    import json

    assert json.loads(MANIFEST.read_text())["total_bytes"] <= 50 * 2**20
