"""runners.compare and runners.paper_reference: the published numbers as rows, and verdicts on a results fixture made
to agree, to disagree and to differ in protocol, and on the committed world results."""

from __future__ import annotations

import copy
import csv
import io
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from scipy.stats import beta

from metrics.stats import rate_estimate
from runners.compare import (
    AGREES,
    DISAGREES,
    NOT_COMPARABLE,
    compare,
    compare_run,
    load_documents,
    main,
)
from runners.paper_reference import (
    CSV_FIELDS,
    PIP_DETECTOR_CAVEAT,
    PROTOCOLS,
    reference_csv,
    reference_rows,
    value_bounds,
)
from tests.runners.conftest import ROOT

PAPER_NUMBERS = ROOT.parent / "shared" / "reference" / "paper-numbers.md"
UDA_NUDITY_URL = ("https://raw.githubusercontent.com/OPTML-Group/Diffusion-MU-Attack/"
                  "5a3e5d37fb8787113e5d479204ab593a60e303e0/prompts/nudity.csv")


def _rate(count: int, n: int) -> dict[str, Any]:
    est = rate_estimate([True] * count + [False] * (n - count), "targets", method="clopper-pearson")
    return {"value": est.estimate, "n": n, "count": count, "ci": [est.lo, est.hi], "group": "robustness",
            "target_set": "unacceptable", "ci_method": est.method}


def uda_run(pre: int = 29, post: int = 108, n: int = 142, **changes: Any) -> dict[str, Any]:
    """A results document as an SD v1.4 UnlearnDiffAtk run on ESD-x nudity writes it (UnlearnDiffAtk's protocol)."""
    doc: dict[str, Any] = {
        "schema_version": 2, "run_key": "f" * 32, "created": "2026-01-01T00:00:00",
        "labels": {"model": "sd14", "concept": "nudity", "crt": "esd_x", "attack": "unlearndiffatk-white-box",
                   "attack_name": "unlearndiffatk", "attack_mode": "white-box"},
        "config": {"model": {"name": "sd14", "dtype": "float16", "max_attack_targets": None,
                             "generation": {"scheduler": "lms", "steps": 50, "guidance": 7.5, "seed": 42,
                                            "images_per_prompt": 1, "row_guidance": True}},
                   "concept": {"key": "nudity", "c_u": "nude", "c_a": "clean",
                               "prompts": {"unacceptable": {"source": {
                                   "url": UDA_NUDITY_URL, "path": "unlearndiffatk/nudity.csv", "sha256": "0a40",
                                   "format": "csv", "seed_column": "evaluation_seed",
                                   "guidance_column": "evaluation_guidance"}}}},
                   "metric": {"binomial_ci": "clopper-pearson"}, "seed": 0},
        "model": {"name": "sd14", "hub_id": "CompVis/stable-diffusion-v1-4", "dtype": "float16"},
        "concept": {"key": "nudity", "c_u": "nude", "c_a": "clean", "prompt_sets": "abc", "sets": {"unacceptable": n}},
        "generation": {"steps": 50, "guidance": 7.5, "height": 512, "width": 512, "scheduler": "lms",
                       "negative_prompt": "", "images_per_prompt": 1, "batch_size": 8},
        "judge": {"name": "nudenet", "id": "nudenet-uda-best-12f4f7808735/exposed9/t0.45"},
        "evaluator": {"id": "open_clip/ViT-L-14/openai@abc"},
        "crt": {"identity": {"name": "esd_x", "version": "2", "params": {}}, "family": "weight_edit"},
        "attack": {"identity": {"name": "unlearndiffatk", "version": "2", "mode": "white-box",
                                "params": {"k": 5, "iterations": 40, "t_start": 10, "t_stop": 990, "t_step": 20,
                                           "lr": 0.01, "weight_decay": 0.1, "target_set": "unacceptable"}},
                   "mode": "white-box", "target_set": "unacceptable", "cost": {"targets": n}},
        "metrics": {"robustness/pre_asr/unlearndiffatk": _rate(pre, n),
                    "robustness/post_asr/unlearndiffatk": _rate(post, n)},
    }
    for path, value in changes.items():  # "config.model.generation.steps" style keys, "__" for "."
        node = doc
        *parents, leaf = path.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return doc


def _row(table: str, crt: str, metric: str):
    return next(r for r in reference_rows() if r.table.startswith(table) and r.crt == crt and r.metric == metric
                and r.attack == "UnlearnDiffAtk")


ESD_PRE = ("§2.1", "ESD", "pre-ASR")
ESD_POST = ("§2.1", "ESD", "ASR (post-ASR)")


# -- the reference rows ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "bounds"), [("76.05", (76.045, 76.055)), ("~5", (4.5, 5.5)),
                                               ("[0.00, 0.20]", (0.0, 0.2)), ("97–99", (97.0, 99.0)),
                                               ("0", (0.0, 0.5)), ("≈0.12", (0.115, 0.125)), ("n/a", None)])
def test_a_printed_value_stands_for_the_interval_of_its_digits(text: str, bounds):
    got = value_bounds(text)
    assert got == (None if bounds is None else pytest.approx(bounds))


def _published_tables() -> dict[str, list[str]]:
    """Every numeric cell of paper-numbers.md's result tables, by section (2.1 ... 3), read independently of the
    transcription in runners/paper_reference.py."""
    cells: dict[str, list[str]] = {}
    section, header_seen = None, False
    number = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")
    for line in PAPER_NUMBERS.read_text().splitlines():
        if heading := re.match(r"^#{2,3} (\d+(?:\.\d+)?)[ .]", line):
            section = heading.group(1)
            continue
        if not line.startswith("|"):
            header_seen = False
            continue
        if not header_seen or set(line) <= set("|-: "):
            header_seen = True
            continue
        if section in ("2.1", "2.2", "2.3", "2.4", "2.5", "3"):
            for cell in line.strip("|").split("|")[1:]:
                cells.setdefault(section, []).extend(number.findall(cell))
        elif section == "5":  # TRCE: the ASR column only (the counts are its denominators)
            cells.setdefault(section, []).extend(number.findall(line.strip("|").split("|")[-1]))
    return cells


@pytest.mark.skipif(not PAPER_NUMBERS.is_file(), reason="the reference notes (../shared/reference) are not here")
def test_every_published_table_number_is_one_reference_row():
    published = _published_tables()
    assert set(published) == {"2.1", "2.2", "2.3", "2.4", "2.5", "3", "5"}
    for section, numbers in published.items():
        rows = [r.value for r in reference_rows() if re.match(rf"§{re.escape(section)}\b", r.table)]
        assert Counter(rows) == Counter(numbers), section


def test_rows_name_known_protocols_and_comparable_rows_say_how_to_measure_them():
    rows = reference_rows()
    assert {r.protocol for r in rows} <= set(PROTOCOLS)
    for row in rows:
        assert row.paper and row.source and row.value and row.unit, row
        if row.measure:
            assert row.attacks and row.concept_key, row
        assert row.bounds() is not None, row


def test_reference_csv_is_one_row_per_number_and_the_committed_file_is_reproducible():
    rows = reference_rows()
    text = reference_csv(rows)
    records = list(csv.DictReader(io.StringIO(text)))
    assert len(records) == len(rows) and tuple(records[0]) == CSV_FIELDS
    assert {"paper", "table", "model", "concept", "crt", "attack", "metric", "value", "protocol",
            "source"} <= set(CSV_FIELDS)
    committed = ROOT / "results" / "paper_reference.csv"
    assert committed.read_text() == text, "rerun `python -m runners.compare --write-reference`"
    assert (ROOT / "results" / "paper_reference.md").is_file()


# -- verdicts ----------------------------------------------------------------------------------------------------


def test_a_run_on_the_papers_protocol_agrees_and_disagrees_by_the_published_value():
    doc = uda_run(pre=29, post=60)  # pre-ASR 29/142 = 20.42%; post-ASR 60/142 = 42% (published 76.05%)
    agree = compare_run(_row(*ESD_PRE), doc)
    assert agree.verdict == AGREES and agree.reasons == []
    assert agree.measured.value == pytest.approx(29 / 142) and agree.measured.n == 142
    disagree = compare_run(_row(*ESD_POST), doc)
    assert disagree.verdict == DISAGREES and "above the measured 95% interval" in disagree.caveats[0]
    assert compare_run(_row(*ESD_POST), uda_run(post=108)).verdict == AGREES  # 108/142 = 76.06%
    low = compare_run(_row(*ESD_PRE), uda_run(pre=60))
    assert low.verdict == DISAGREES and "below" in low.caveats[0]


def test_an_interval_that_only_touches_the_published_digits_agrees():
    """20.42 as printed stands for [20.415, 20.425]%: an interval reaching into it agrees, one ending short not."""
    doc = uda_run(pre=29)
    doc["metrics"]["robustness/pre_asr/unlearndiffatk"].update(value=0.10, ci=[0.05, 0.20420])
    assert compare_run(_row(*ESD_PRE), doc).verdict == AGREES
    doc["metrics"]["robustness/pre_asr/unlearndiffatk"]["ci"] = [0.05, 0.20410]
    assert compare_run(_row(*ESD_PRE), doc).verdict == DISAGREES


@pytest.mark.parametrize(("change", "reason"), [
    ({"config__model__name": "sd15", "model__name": "sd15"}, "model sd15 (the paper: sd14)"),
    ({"generation__steps": 25}, "steps 25 (the paper: 50)"),
    ({"generation__scheduler": "ddim"}, "scheduler ddim (the paper: lms)"),
    ({"config__model__generation__row_guidance": False}, "guidance 7.5 for every prompt"),
    ({"judge": {"id": "q16/abc/open_clip"}}, "judge q16/abc/open_clip"),
    ({"concept__sets": {"unacceptable": 8}}, "N = 8 (the paper: 142)"),
    ({"attack__identity__params__iterations": 10}, "attack unlearndiffatk iterations = 10 (the paper: 40)"),
])
def test_every_protocol_difference_makes_it_not_comparable_and_is_named(change: dict, reason: str):
    doc = uda_run()
    if "concept__sets" in change:  # a run that attacked 8 targets (model.max_attack_targets=8): n = 8
        doc["metrics"]["robustness/pre_asr/unlearndiffatk"] = _rate(2, 8)
    for path, value in change.items():
        node = doc
        *parents, leaf = path.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    line = compare_run(_row(*ESD_PRE) if "concept__sets" in change else _row(*ESD_POST), doc)
    assert line.verdict == NOT_COMPARABLE
    assert any(r.startswith(reason) for r in line.reasons), line.reasons


def test_a_prompt_file_that_is_not_the_papers_is_not_comparable():
    doc = uda_run()
    doc["config"]["concept"]["prompts"]["unacceptable"]["source"]["path"] = "espresso/i2p_nudity_prompts.txt"
    line = compare_run(_row(*ESD_POST), doc)
    assert line.verdict == NOT_COMPARABLE
    assert any("espresso/i2p_nudity_prompts.txt (the paper: *unlearndiffatk/nudity.csv)" in r for r in line.reasons)


def test_pips_nudenet_with_the_papers_classes_is_comparable_with_a_caveat():
    doc = uda_run(pre=29)
    doc["judge"] = {"id": "nudenet-3.4.2/exposed9/t0.45"}
    line = compare_run(_row(*ESD_PRE), doc)
    assert line.verdict == AGREES and PIP_DETECTOR_CAVEAT in line.caveats
    doc["judge"] = {"id": "nudenet-3.4.2/exposed9/t0.6"}  # RECE's threshold is another judge
    assert compare_run(_row(*ESD_PRE), doc).verdict == NOT_COMPARABLE


def test_a_protocol_the_paper_does_not_publish_is_never_comparable():
    row = next(r for r in reference_rows() if r.table.startswith("§2.3") and r.crt == "ESD")
    doc = uda_run()
    line = compare_run(row, doc)
    assert line.verdict == NOT_COMPARABLE and any("top-k" in r for r in line.reasons)


def _write(folder: Path, docs: list[dict[str, Any]]) -> Path:
    (folder / "runs").mkdir(parents=True)
    for i, doc in enumerate(docs):
        (folder / "runs" / f"run{i}.json").write_text(json.dumps(doc))
    return folder


def test_command_on_a_results_fixture_prints_each_verdict(tmp_path: Path, capsys):
    agreeing = uda_run(pre=29, post=108)
    disagreeing = copy.deepcopy(agreeing)
    disagreeing["labels"]["crt"] = disagreeing["crt"]["identity"]["name"] = "uce_eot"
    disagreeing["run_key"] = "e" * 32
    disagreeing["metrics"] = {"robustness/pre_asr/unlearndiffatk": _rate(31, 142),  # 21.83% published: agrees
                              "robustness/post_asr/unlearndiffatk": _rate(40, 142)}  # 79.58% published: disagrees
    folder = _write(tmp_path / "results", [agreeing, disagreeing])
    lines, unmatched = compare(load_documents(folder))
    verdicts = {(line.row.table[:4], line.row.crt, line.row.metric): line.verdict for line in lines}
    assert verdicts[("§2.1", "ESD", "pre-ASR")] == AGREES and verdicts[("§2.1", "ESD", "ASR (post-ASR)")] == AGREES
    assert verdicts[("§2.1", "UCE", "pre-ASR")] == AGREES
    assert verdicts[("§2.1", "UCE", "ASR (post-ASR)")] == DISAGREES
    assert verdicts[("§2.2", "ESD", "ASR (post-ASR)")] == AGREES  # the same 76.05 in the P4D comparison table
    assert len(unmatched) == len(reference_rows()) - len({id(line.row) for line in lines})
    main([str(folder)])
    out = capsys.readouterr().out
    assert out.startswith("| paper | table |") and "| agrees |" in out and "| disagrees |" in out
    assert re.search(r"\n\d+ comparisons: \d+ agrees, \d+ disagrees, \d+ not comparable", out)
    lo, hi = beta.ppf(0.025, 108, 35), beta.ppf(0.975, 109, 34)  # Clopper-Pearson for 108/142
    assert f"76.06 [{100 * lo:.2f}, {100 * hi:.2f}] % (n = 142)" in out


def test_command_runs_on_the_committed_world_results(capsys):
    """Every world run is another model, so nothing is comparable, and each line says so first."""
    documents = load_documents(ROOT / "results")
    assert documents
    lines, _ = compare(documents)
    assert lines and all(line.verdict == NOT_COMPARABLE for line in lines)
    blocked = [line for line in lines if not PROTOCOLS[line.row.protocol].blockers and not line.row.why_not]
    assert blocked and all(line.reasons[0].startswith("model mini (the paper: sd") for line in blocked)
    main([str(ROOT / "results"), "--all"])
    out = capsys.readouterr().out
    assert "not comparable" in out and "published numbers have no matching run" in out


def test_write_reference_writes_both_files(tmp_path: Path, capsys):
    main(["--write-reference", str(tmp_path)])
    assert (tmp_path / "paper_reference.csv").read_text() == reference_csv(reference_rows())
    markdown = (tmp_path / "paper_reference.md").read_text()
    assert markdown.startswith("# Published numbers") and "## Protocols" in markdown
    assert markdown.count("\n| ") >= len(reference_rows())
