"""A run with progress=true draws one bar per long step, each with a rate: the attack counts targets, generation,
the filter and the scorers count images; progress=false draws none."""

from __future__ import annotations

import re

from run import execute
from runners.models import PipelineCache
from tests.runners.conftest import plugin


def _finals(err: str) -> dict[str, str]:
    """The last state of every bar, by its description."""
    finals = {}
    for line in re.split(r"[\r\n]+", err):
        if ": " in line and "%|" in line:
            finals[line.split(": ", 1)[0]] = line
    return finals


def test_every_long_step_shows_a_bar_with_a_rate(tiny_config, capsys):
    cfg = plugin(tiny_config(prompts=2), "crt", "tests.runners.fakes.FakeEditCRT", "fake_edit", shift=0.2)
    plugin(cfg, "attack", "tests.runners.fakes.SuffixAttack", "suffix")
    cfg["progress"] = True
    execute(cfg, pipelines=PipelineCache())
    bars = _finals(capsys.readouterr().err)
    attack = bars["attack suffix"]
    assert "2/2" in attack and "target/s" in attack
    generated = [line for name, line in bars.items() if name.startswith("generate ")]
    assert generated and all("img/s" in line for line in generated)
    for scorer in ("judge", "embed"):
        assert "img/s" in bars[scorer], bars

    cfg = plugin(tiny_config(prompts=2), "crt", "tests.runners.fakes.FakeEditCRT", "fake_edit", shift=0.3)
    plugin(cfg, "attack", "tests.runners.fakes.SuffixAttack", "suffix")
    execute(cfg, pipelines=PipelineCache())  # tiny_config sets progress=false
    ours = ("fit ", "attack ", "generate ", "filter ", "judge", "embed")
    assert not [name for name in _finals(capsys.readouterr().err) if name.startswith(ours)]  # diffusers' own remain
