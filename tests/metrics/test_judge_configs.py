"""Every judge named in conf/ is one metrics/ knows, and the NudeNet presets build for real."""

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from metrics.judges import (
    JUDGES,
    NUDENET_DETECTOR_FILES,
    NUDENET_PRESETS,
    JudgeUnavailable,
    NudeNetJudge,
    build_judge,
)

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
def test_configured_judges_are_known(source, cfg, monkeypatch, tmp_path):
    assert cfg["name"] in JUDGES, source
    if cfg["name"] != "nudenet":
        return
    detector = NUDENET_PRESETS[cfg["preset"]].detector
    if detector != "pip":  # a downloaded detector file: offline (no cached copy) the judge says what to pass
        monkeypatch.setenv("CRT_BENCH_CACHE", str(tmp_path))
        spec = NUDENET_DETECTOR_FILES[detector]
        monkeypatch.setitem(NUDENET_DETECTOR_FILES, detector, replace(spec, url="http://127.0.0.1:9/best.onnx"))
        with pytest.raises(JudgeUnavailable, match=r"Offline, fetch that file elsewhere and pass weights="):
            build_judge(cfg)
        return
    judge = build_judge(cfg)
    assert isinstance(judge, NudeNetJudge) and judge.identity["id"].startswith("nudenet-")


def test_unlearndiffatk_detector_preset_is_offered_but_pip_stays_the_default():
    cfg = yaml.safe_load((CONF / "judge" / "nudenet_unlearndiffatk_detector.yaml").read_text())
    assert cfg["preset"] == "unlearndiffatk_detector" and {"weights", "weights_sha256"} <= set(cfg)
    assert NUDENET_PRESETS["unlearndiffatk_detector"].detector == "unlearndiffatk"
    assert yaml.safe_load((CONF / "judge" / "nudenet.yaml").read_text())["preset"] == "unlearndiffatk"
    assert NUDENET_PRESETS["unlearndiffatk"].detector == "pip"
    spec = NUDENET_DETECTOR_FILES["unlearndiffatk"]
    assert "5a3e5d37fb8787113e5d479204ab593a60e303e0/files/best.onnx" in spec.url
    assert len(spec.git_blob_sha1) == 40 and (spec.floor, spec.nms) == (0.5, 0.5)
