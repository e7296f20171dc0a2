"""The end-of-run summary on committed results JSONs, and the HTML report: grids from per-image rows or from keys
recomputed out of the JSON (checked against a real run's rows file), unsafe thumbnails blurred, hidden or shown,
relative links only, and the page as headless Chromium renders it (skipped without /usr/bin/chromium)."""

from __future__ import annotations

import glob
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from run import execute
from runners.generate import IMAGE_FILE, png_bytes
from runners.leaderboard import EFFECTIVENESS, JUDGE, UTILITY
from runners.models import HarnessError, PipelineCache
from runners.report import (
    ConceptImages,
    Thumbnails,
    concept_grids,
    image_rows,
    is_unsafe,
    main,
    recomputed_rows,
    summarize_results,
    write_report,
)
from runners.store import Store
from tests.runners.conftest import ROOT, compose_config, plugin

CHROMIUM = Path("/usr/bin/chromium")
HEADER_BLUE = (31, 78, 121)  # table.leaderboard th
CELL_GOLD = (242, 193, 78)  # table.grid td.cell
IMAGE_MAGENTA = (255, 0, 255)  # the fixture's images of the safe concept


# -- the summary --------------------------------------------------------------------------------------------------


def _committed(pattern: str) -> list[Path]:
    paths = sorted(Path(p) for p in glob.glob(str(ROOT / "results" / "runs" / pattern)))
    assert paths, pattern
    return paths


def _estimate(m: dict) -> str:
    lo, hi = m["ci"]
    tail = f"{m['count']}/{m['n']}" if m.get("count") is not None else f"n={m['n']}"
    return f"{m['value']:.3f} [{lo:.3f}, {hi:.3f}]  {tail}"


def _line(text: str, label: str) -> str:
    found = [line for line in text.splitlines() if label in line]
    assert len(found) == 1, (label, text)
    return found[0]


def test_summary_of_a_committed_attacked_run_with_its_worst_case(tmp_path: Path):
    for path in _committed("mini__world_cross__espresso__*.json"):
        (tmp_path / "runs").mkdir(exist_ok=True)
        shutil.copy(path, tmp_path / "runs" / path.name)
    chosen = next(p for p in (tmp_path / "runs").glob("*__ringabell__*.json"))
    doc = json.loads(chosen.read_text())
    text = summarize_results(chosen, tmp_path / "store", None, "images generated: 0, reused: 96")

    m = doc["metrics"]
    assert text.splitlines()[0] == "world_cross · espresso · ringabell (transfer) · model mini"
    assert _line(text, "judge rate, unacceptable ↓").endswith(_estimate(m[JUDGE]))
    assert _line(text, "CLIP accuracy, unacceptable ↓").endswith(_estimate(m[EFFECTIVENESS]))
    assert _line(text, "NCS, acceptable ↑").endswith(_estimate(m[UTILITY]))
    assert _line(text, "pre-ASR, ringabell ↓").endswith(_estimate(m["robustness/pre_asr/ringabell"]))
    assert _line(text, "post-ASR, ringabell ↓").endswith(_estimate(m["robustness/post_asr/ringabell"]))

    # the worst case by hand: a target counts when any attacked run of this CRT gets it through
    attacked = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    attacked = [d for d in attacked if d["labels"]["attack"] != "none" and d["attack"].get("targets")]
    n = len(attacked[0]["attack"]["targets"])
    through = sum(any(d["attack"]["targets"][i]["post"] for d in attacked) for i in range(n))
    assert _line(text, "any attack (worst case) ↓").endswith(f"  {through}/{n}")
    assert through > m["robustness/post_asr/ringabell"]["count"]
    over = _line(text, "worst case over").split(": ", 1)[1].split(", ")
    assert sorted(over) == sorted(d["labels"]["attack"] for d in attacked)

    assert _line(text, "results:").endswith(str(chosen)) or chosen.name in _line(text, "results:")
    assert _line(text, "store:").endswith("(images generated: 0, reused: 96)")
    assert "not rebuilt" in _line(text, "leaderboard:")
    assert "95% intervals: clopper-pearson (judge rate, pre-ASR, post-ASR); " in text
    numbers = text.split("\n  95% intervals:")[0].splitlines()
    assert len(numbers) == 8 and max(len(line) for line in numbers) < 120  # not the 36-column row of before


def test_summary_of_an_unattacked_run_shows_its_asr_and_no_attack_lines(tmp_path: Path):
    path = _committed("mini__world_redcross__uce__none__*.json")[-1]
    (tmp_path / "runs").mkdir()
    shutil.copy(path, tmp_path / "runs" / path.name)
    (tmp_path / "leaderboard.md").write_text("# Leaderboard\n")
    doc = json.loads(path.read_text())
    text = summarize_results(tmp_path / "runs" / path.name, leaderboard=tmp_path / "leaderboard.md")
    assert _line(text, "ASR, no attack ↓").endswith(_estimate(doc["metrics"]["robustness/pre_asr/none"]))
    assert "pre-ASR" not in text and "post-ASR" not in text and "store:" not in text
    assert "warning: CLIP accuracy is not meaningful" in text  # the red-cross pair fails the zero-shot bar
    assert _line(text, "leaderboard:").endswith("leaderboard.md")


# -- unsafe concepts --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("concept", "unsafe"), [("nudity", True), ("violence", True), ("i2p", True),
                                                 ("vangogh", False), ("church", False), ("world_nudity", False),
                                                 ("world_violence", False)])
def test_unsafe_concepts_follow_their_judge(concept: str, unsafe: bool):
    assert is_unsafe(compose_config([f"concept={concept}"])["concept"]) is unsafe


def test_an_explicit_unsafe_key_wins():
    assert is_unsafe({"judge": {"name": "world"}, "unsafe": True})
    assert not is_unsafe({"judge": {"name": "nudenet"}, "unsafe": False})


# -- thumbnails -------------------------------------------------------------------------------------------------


def _put_image(store: Store, name: str, image: Image.Image) -> str:
    def write(folder: Path) -> dict:
        (folder / IMAGE_FILE).write_bytes(png_bytes(image))
        return {}

    return store.put_files("image", {"product": "image", "test": name}, write)


def _checkerboard(size: int = 32) -> Image.Image:
    cells = (np.indices((size, size)).sum(axis=0) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([cells] * 3, axis=-1))


def _roughness(image: Image.Image) -> float:
    """Mean absolute difference between horizontal neighbours: what a blur removes."""
    a = np.asarray(image.convert("L"), dtype=float)
    return float(np.abs(np.diff(a, axis=1)).mean())


def test_thumbnails_are_blurred_hidden_or_shown(tmp_path: Path):
    store = Store(tmp_path / "store")
    key = _put_image(store, "checker", _checkerboard())
    folder = tmp_path / "img"

    shown, note = Thumbnails(store, folder, "show").get(key, unsafe=True)
    assert note == "" and np.array_equal(np.asarray(Image.open(folder / shown)), np.asarray(_checkerboard()))
    blurred, note = Thumbnails(store, folder, "blur").get(key, unsafe=True)
    assert blurred != shown and "blurred" in note
    assert _roughness(Image.open(folder / blurred)) < 0.1 * _roughness(_checkerboard())
    hidden, note = Thumbnails(store, folder, "hide").get(key, unsafe=True)
    assert hidden is None and note.startswith("hidden")
    safe, _ = Thumbnails(store, folder, "hide").get(key, unsafe=False)  # a safe concept is shown under any policy
    assert safe == shown
    assert Thumbnails(store, folder, "show").get("0" * 32, unsafe=False) == (None, "not in the store")

    big = _put_image(store, "big", Image.new("RGB", (512, 300), (10, 200, 30)))
    name, _ = Thumbnails(store, folder, "show", size=128).get(big, unsafe=False)
    assert Image.open(folder / name).size == (128, 75)
    Thumbnails(store, folder, "hide").clear()
    assert not list(folder.glob("*.png"))


# -- a synthetic results folder: two concepts, CRTs x attacks, rows files naming stored images -----------------------


PROMPTS = [f"a shape number {i}" for i in range(4)]
ACCEPTABLE = [f"a harmless thing {i}" for i in range(4)]


def _metric(value: float, **extra) -> dict:
    return {"value": value, "ci": [max(value - 0.1, 0.0), min(value + 0.1, 1.0)], "n": 4, "alpha": 0.05,
            "ci_method": "clopper-pearson", **extra}


def _document(concept: str, judge: str, crt: str, attack: str, rows: bool) -> dict:
    stem = f"mini__{concept}__{crt}__{attack}__0123456789"
    metrics = {JUDGE: _metric(0.25, count=1), EFFECTIVENESS: _metric(0.3),
               UTILITY: _metric(0.95, higher_is_better=True),
               f"robustness/post_asr/{attack}": _metric(0.5, count=2, group="robustness")}
    return {"schema_version": 2, "created": "2026-01-01T00:00:00", "run_key": stem,
            "labels": {"model": "mini", "concept": concept, "crt": crt, "attack": attack, "attack_name": attack,
                       "attack_mode": "transfer"},
            "config": {"concept": {"key": concept, "judge": {"name": judge}}, "seed": 0},
            "concept": {"key": concept, "c_u": "x", "c_a": "y", "prompt_sets": "f" * 32},
            "attack": {"target_set": "unacceptable", "targets": []}, "metrics": metrics,
            "rows": f"runs/{stem}.parquet" if rows else None}


def _rows(store: Store, concept: str, crt: str, attack: str, colour: tuple[int, int, int]) -> pd.DataFrame:
    """Unattacked images of both sets and adversarial ones, all stored but the last prompt's unattacked image."""
    records = []
    for system, set_name, prompts in (("defended", "unacceptable", PROMPTS), ("defended", "acceptable", ACCEPTABLE),
                                      ("adversarial", "unacceptable", PROMPTS if attack != "none" else [])):
        for seed, prompt in enumerate(prompts):
            name = f"{concept}/{crt}/{attack}/{system}/{set_name}/{seed}"
            stored = not (system == "defended" and set_name == "unacceptable" and seed == 3)
            key = _put_image(store, name, Image.new("RGB", (32, 32), colour)) if stored else "e" * 32
            records.append({"system": system, "set": set_name, "prompt": prompt, "seed": seed, "image_index": 0,
                            "adversarial_text": f"adv {seed}" if system == "adversarial" else None,
                            "image_key": key, "delivered_key": key, "flagged": None,
                            "judge_positive": seed % 2 == 0})
    return pd.DataFrame(records)


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Path, Path]:
    """results/ and store/: world_shapes (safe) with none/esd x none/ringabell, esd without a ringabell run... and
    nudity (unsafe, NudeNet) with one run; the run none x ringabell has no rows file."""
    results, store = tmp_path / "results", Store(tmp_path / "store")
    (results / "runs").mkdir(parents=True)
    plan = [("world_shapes", "world", "none", "none", True), ("world_shapes", "world", "none", "ringabell", False),
            ("world_shapes", "world", "esd", "none", True), ("world_shapes", "world", "uce", "ringabell", True),
            ("nudity", "nudenet", "esd", "none", True)]
    for concept, judge, crt, attack, has_rows in plan:
        doc = _document(concept, judge, crt, attack, has_rows)
        (results / "runs" / f"{doc['run_key']}.json").write_text(json.dumps(doc))
        if has_rows:
            colour = IMAGE_MAGENTA if concept.startswith("world") else (200, 150, 120)
            _rows(store, concept, crt, attack, colour).to_parquet(results / doc["rows"])
    return results, tmp_path / "store"


def test_grids_show_the_same_prompts_under_every_crt_and_attack(synthetic, tmp_path: Path):
    results, store_root = synthetic
    store = Store(store_root)
    docs = [json.loads(p.read_text()) for p in (results / "runs").glob("mini__world_shapes__*.json")]
    runs = {(d["labels"]["crt"], d["labels"]["attack"]): d for d in docs}
    images = ConceptImages(runs, {k: image_rows(d, results, store) for k, d in runs.items()})
    grids = concept_grids(images, Thumbnails(store, tmp_path / "img", "blur"), unsafe=False, count=3)

    assert [g.title for g in grids] == ["unacceptable prompts, no attack", "unacceptable prompts under ringabell",
                                        "acceptable prompts (utility), no attack"]
    unattacked, attacked, acceptable = grids
    assert unattacked.prompts == attacked.prompts == [(p, i) for i, p in enumerate(PROMPTS[:3])]
    assert acceptable.prompts == [(p, i) for i, p in enumerate(ACCEPTABLE[:3])]
    assert list(unattacked.rows) == ["none", "esd", "uce"]  # the undefended reference first
    assert all(cell.image for row in unattacked.rows.values() for cell in row)  # each CRT's run with rows
    assert [c.positive for c in unattacked.rows["esd"]] == [True, False, True]
    assert [c.note for c in attacked.rows["esd"]] == ["not run"] * 3
    assert all(c.note.startswith("no image keys") for c in attacked.rows["none"])  # no rows file, no prompt sets
    assert [c.text for c in attacked.rows["uce"]] == ["adv 0", "adv 1", "adv 2"]
    assert len({c.image for row in attacked.rows.values() for c in row if c.image}) == 3


def _parse(page: str) -> dict[str, list]:
    """The report's tables as the browser (or the source) has them: per table class, its cells."""

    class Tables(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables: dict[str, list] = {}
            self.current: str | None = None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "table":
                self.current = attrs.get("class")
                self.tables.setdefault(self.current, [])
            elif tag in ("td", "img") and self.current:
                self.tables[self.current].append((tag, attrs))

        def handle_endtag(self, tag):
            if tag == "table":
                self.current = None

    parser = Tables()
    parser.feed(page)
    return parser.tables


def test_report_pages_link_relative_files_and_keep_unsafe_images_blurred_or_hidden(synthetic, tmp_path: Path):
    results, store_root = synthetic
    out = tmp_path / "report"
    pages = write_report(results, out, store_root)
    assert sorted(p.name for p in pages) == ["index.html", "nudity.html", "world_shapes.html"]
    for page in pages:
        text = page.read_text()
        assert str(tmp_path) not in text  # relative links only: the folder can be moved
        for link in re.findall(r'(?:src|href)="([^"]+)"', text):
            assert (out / link).resolve().is_file(), (page.name, link)
    world = _parse((out / "world_shapes.html").read_text())
    assert len(world["leaderboard"]) == 3 * 6  # none, esd, uce x (CRT, judge, CLIP acc, NCS, ASR none, ringabell)
    cells = world["grid"]
    assert sum(tag == "img" for tag, _ in cells) == 3 * 3 + 4 + 3 * 4  # unattacked 3 CRTs, uce attacked, acc.
    assert not any("blur" in attrs.get("src", "") for tag, attrs in cells if tag == "img")  # world: safe
    assert "not in the store" in (out / "world_shapes.html").read_text()  # the last prompt's image (report.prompts)

    nudity = _parse((out / "nudity.html").read_text())["grid"]
    sources = [attrs["src"] for tag, attrs in nudity if tag == "img"]
    assert sources and all(src.endswith("-blur.png") for src in sources)
    write_report(results, out, store_root, settings=_settings("hide"))
    hidden = (out / "nudity.html").read_text()
    assert "<img" not in hidden.split("images (same prompts")[1] and "hidden: unsafe concept" in hidden
    assert not list((out / "img").glob("*-blur.png"))  # the blurred files of the earlier report are gone


def _settings(policy: str):
    from runners.report import ReportSettings

    return ReportSettings(unsafe_images=policy)


def test_a_bad_policy_is_one_error_line(synthetic, tmp_path: Path, capsys):
    results, store_root = synthetic
    with pytest.raises(HarnessError, match="report.unsafe_images='peek'; choose one of blur, hide, show"):
        write_report(results, tmp_path / "out", store_root, settings=_settings("peek"))
    assert main([str(results), "report.unsafe_images=peek", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == "error: report.unsafe_images='peek'; choose one of blur, hide, show"
    assert main([str(results), "report.unsafe_images=show", "report.prompts=2", "--out", str(tmp_path / "out"),
                 "--store", str(store_root)]) == 0
    page = (tmp_path / "out" / "nudity.html").read_text()
    assert "-blur.png" not in page and page.count("seed 1</th>") >= 1 and "seed 2</th>" not in page


# -- keys recomputed from a results JSON, against a real run's rows file ------------------------------------------


def test_recomputed_keys_match_the_rows_file_of_a_real_run(tiny_config):
    cfg = plugin(tiny_config(prompts=2), "crt", "tests.runners.fakes.FakeEditCRT", "fake_edit", shift=0.3)
    plugin(cfg, "attack", "tests.runners.fakes.SuffixAttack", "suffix", suffix="crimson")
    outputs = execute(cfg, pipelines=PipelineCache())["outputs"]
    document = json.loads(Path(outputs["results"]).read_text())
    store = Store(cfg["store"]["root"])
    written = pd.read_parquet(outputs["rows"])
    recomputed = recomputed_rows(document, store)
    columns = ["system", "set", "prompt", "seed", "image_index", "adversarial_text", "image_key"]
    kept = written[written["system"] != "base"][columns]  # the report shows the defended system's images
    assert len(recomputed) == len(kept) == 2 * 3 + 2
    assert sorted(map(tuple, recomputed[columns].fillna("").astype(str).values)) == sorted(
        map(tuple, kept.fillna("").astype(str).values))
    Path(outputs["rows"]).unlink()
    rows, source = image_rows(document, Path(cfg["results"]["dir"]), store)
    assert source == "keys recomputed from the results JSON" and set(rows["image_key"]) == set(kept["image_key"])


# -- the page in a browser ----------------------------------------------------------------------------------------


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120)


def _near(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 6) -> int:
    return int((np.abs(pixels.astype(int) - np.array(colour)).max(axis=-1) <= tolerance).sum())


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                    "(apt-get install -y chromium)")
def test_the_report_renders_tables_and_grids_in_headless_chromium(synthetic, tmp_path: Path):
    results, store_root = synthetic
    out = tmp_path / "report"
    write_report(results, out, store_root)
    page = (out / "world_shapes.html").as_uri()
    dom = _chromium("--dump-dom", page, profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    tables = _parse(dom.stdout)
    assert len(tables["leaderboard"]) == 18 and sum(tag == "img" for tag, _ in tables["grid"]) == 25

    shot = tmp_path / "shot.png"
    run = _chromium(f"--screenshot={shot}", "--window-size=1200,2400", "--hide-scrollbars", page,
                    profile=tmp_path / "profile")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.std() > 20  # not a blank page
    assert _near(pixels, HEADER_BLUE) > 2000  # the leaderboard's header row
    assert _near(pixels, CELL_GOLD) > 1000  # grid cells around the thumbnails
    assert _near(pixels, IMAGE_MAGENTA) > 25 * 80 * 80  # the 25 thumbnails, drawn at 96 px
