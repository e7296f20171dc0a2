"""Every judge named in conf/ is one metrics/ knows, and the NudeNet presets build for real."""

from pathlib import Path

import pytest
import yaml

from metrics.judges import JUDGES, NudeNetJudge, build_judge

CONF = Path(__file__).resolve().parents[2] / "conf"


def judge_cfgs():
    for path in sorted((CONF / "judge").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        if "name" in cfg:
            yield path.name, {k: v for k, v in cfg.items() if k != "from_concept"}
    for path in sorted((CONF / "concept").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        cfg = raw.get("judge") or raw.get("concept", {}).get("judge")
        if cfg:
            yield path.name, cfg


@pytest.mark.parametrize(("source", "cfg"), list(judge_cfgs()))
def test_configured_judges_are_known(source, cfg):
    assert cfg["name"] in JUDGES, source
    if cfg["name"] == "nudenet":
        judge = build_judge(cfg)
        assert isinstance(judge, NudeNetJudge) and judge.identity["id"].startswith("nudenet-")
