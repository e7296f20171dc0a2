"""The store: one computation per key, atomic writes, concurrent writers, killed writers, and bad input."""

from __future__ import annotations

import errno
import gc
import io
import multiprocessing
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runners import store as store_module
from runners.spec import canonical_json
from runners.store import Store, atomic_write_bytes, key_of
from tests.runners.conftest import ROOT, full_disk_fdopen


def test_key_is_canonical_over_dict_order_and_changes_with_content():
    assert key_of({"a": 1, "b": [1, 2]}) == key_of({"b": [1, 2], "a": 1})
    assert key_of({"a": 1}) != key_of({"a": 2})
    assert len(key_of({"a": 1})) == store_module.KEY_LENGTH


def test_value_is_computed_once_when_asked_twice(tmp_path: Path):
    store = Store(tmp_path)
    calls = []
    first = store.get_or_put_value("score", {"x": 1}, lambda: calls.append(1) or {"v": 3})
    second = store.get_or_put_value("score", {"x": 1}, lambda: calls.append(1) or {"v": 4})
    assert first == ({"v": 3}, True)
    assert second == ({"v": 3}, False)
    assert calls == [1]


def test_value_is_computed_once_when_asked_by_threads_at_once(tmp_path: Path):
    store = Store(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        time.sleep(0.2)
        return 7

    threads = [threading.Thread(target=store.get_or_put_value, args=("score", {"k": 1}, compute)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]
    assert store.get(key_of({"k": 1})).value == 7


def _compute_in_process(root: str, log: str) -> None:
    def compute():
        with open(log, "a") as handle:
            handle.write("computed\n")
        time.sleep(0.5)
        return "v"

    Store(root).get_or_put_value("score", {"shared": True}, compute)


def test_value_is_computed_once_across_processes(tmp_path: Path):
    log = tmp_path / "log.txt"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_compute_in_process, args=(str(tmp_path / "s"), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text().count("computed") == 1


def test_files_are_written_once_and_readable(tmp_path: Path):
    store = Store(tmp_path)

    def write(folder: Path):
        (folder / "a.bin").write_bytes(b"abc")
        return {"size": 3}

    entry, made = store.get_or_put_files("artifact", {"k": "v"}, write)
    again, made_again = store.get_or_put_files("artifact", {"k": "v"}, pytest.fail)
    assert made and not made_again
    assert (again.path / "a.bin").read_bytes() == b"abc"
    assert again.value == {"size": 3}
    assert (again.path / "spec.json").is_file()


def test_interrupted_write_leaves_no_entry(tmp_path: Path):
    store = Store(tmp_path)

    def write(folder: Path):
        (folder / "half.png").write_bytes(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        store.put_files("image", {"k": 1}, write)
    assert not store.has(key_of({"k": 1}))
    assert store.count() == 0
    assert not any((tmp_path / "objects").rglob("half.png"))
    assert not any((tmp_path / "tmp").iterdir())
    entry, made = store.get_or_put_files("image", {"k": 1}, lambda folder: (folder / "ok.png").write_bytes(b"x"))
    assert made and (entry.path / "ok.png").is_file()


def test_files_without_index_row_are_not_an_entry_and_get_replaced(tmp_path: Path):
    """A crash between the rename and the index insert leaves an orphan folder: it must not count as stored."""
    store = Store(tmp_path)
    key = key_of({"k": 2})
    orphan = tmp_path / "objects" / "image" / key[:2] / key
    orphan.mkdir(parents=True)
    (orphan / "image.png").write_bytes(b"stale")
    assert not store.has(key)
    entry, made = store.get_or_put_files("image", {"k": 2}, lambda f: (f / "image.png").write_bytes(b"fresh"))
    assert made and (entry.path / "image.png").read_bytes() == b"fresh"


def test_missing_files_make_an_entry_missing(tmp_path: Path):
    store = Store(tmp_path)
    key = store.put_files("image", {"k": 3}, lambda f: (f / "image.png").write_bytes(b"x"))
    import shutil

    shutil.rmtree(store.get(key).path)
    assert not store.has(key)


def test_batch_values_and_lookup(tmp_path: Path):
    store = Store(tmp_path)
    keys = store.put_values("judgement", [({"i": i}, {"positive": i % 2 == 0}) for i in range(1200)])
    found = store.get_many(keys + ["0" * 32])
    assert len(found) == 1200
    assert found[keys[3]].value == {"positive": False}
    assert Store(tmp_path).count("judgement") == 1200  # another handle (process) sees the same index


def test_file_hash_is_remembered_until_the_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = Store(tmp_path / "s")
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"1" * 1000)
    calls = []
    real = store_module.sha256_file
    monkeypatch.setattr(store_module, "sha256_file", lambda p: calls.append(p) or real(p))
    first = store.file_sha256(weights)
    assert store.file_sha256(weights) == first and len(calls) == 1
    weights.write_bytes(b"2" * 1001)
    assert store.file_sha256(weights) != first and len(calls) == 2


def test_atomic_write_replaces_whole_file(tmp_path: Path):
    target = tmp_path / "out" / "leaderboard.md"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["leaderboard.md"]


# -- many writers, killed writers, shared filesystems ---------------------------------------------------------------

WRITERS, PER_WRITER, STRIDE = 4, 200, 100  # writer p makes products p*STRIDE .. p*STRIDE+199: neighbours overlap


def _blob(n: int) -> bytes:
    return f"product {n};".encode() * (n % 7 + 1)


def _write_products(root: str, writer: int, log_dir: str) -> None:
    store = Store(root)
    made = []
    for n in range(writer * STRIDE, writer * STRIDE + PER_WRITER):
        if n % 2 == 0:
            store.get_or_put_files("blob", {"n": n}, lambda f, n=n: made.append(n) or (f / "blob.bin").write_bytes(
                _blob(n)) and {"n": n})
        else:
            store.get_or_put_value("score", {"n": n}, lambda n=n: made.append(n) or {"n": n, "square": n * n})
    Path(log_dir, f"{writer}.txt").write_text(" ".join(map(str, made)))


def test_four_processes_writing_200_products_each_lose_nothing_and_duplicate_nothing(tmp_path: Path):
    root = tmp_path / "store"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_products, args=(str(root), p, str(tmp_path))) for p in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    expected = set(range((WRITERS - 1) * STRIDE + PER_WRITER))
    computed = [int(n) for p in range(WRITERS) for n in (tmp_path / f"{p}.txt").read_text().split()]
    assert sorted(computed) == sorted(expected)  # every product computed exactly once, by one of the writers

    store = Store(root)
    blobs = store.get_many([key_of({"n": n}) for n in expected if n % 2 == 0])
    scores = store.get_many([key_of({"n": n}) for n in expected if n % 2 == 1])
    assert len(blobs) == len(scores) == len(expected) // 2
    for entry in blobs.values():
        n = entry.spec["n"]
        assert (entry.path / "blob.bin").read_bytes() == _blob(n) and entry.value == {"n": n}
    assert all(entry.value == {"n": entry.spec["n"], "square": entry.spec["n"] ** 2} for entry in scores.values())
    assert len(list((root / "objects" / "blob").glob("*/*"))) == len(expected) // 2  # one folder per product
    assert not any((root / "tmp").iterdir())
    lines = [line for segment in (root / "index").glob("*.jsonl") for line in segment.read_bytes().splitlines()]
    assert len(lines) == len(expected)  # one index line per product: nothing indexed twice
    assert all(store_module._LINE.fullmatch(line) for line in lines)
    assert store.count("blob") == store.count("score") == len(expected) // 2

    index = store.reindex()  # the folders alone hold everything
    assert (index.files, index.values, index.damaged) == (len(expected) // 2, len(expected) // 2, [])
    assert Store(root).get_many(list(blobs) + list(scores)).keys() == blobs.keys() | scores.keys()


def _write_then_hang(root: str, started) -> None:
    def write(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"partial")
        started.set()
        time.sleep(60)

    Store(root).put_files("blob", {"killed": True}, write)


def test_leftovers_of_a_killed_writer_are_swept_when_it_is_gone_not_after_a_day(tmp_path: Path):
    root = tmp_path / "store"
    Store(root)
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    writer = ctx.Process(target=_write_then_hang, args=(str(root), started))
    writer.start()
    assert started.wait(30)
    (leftover,) = list((root / "tmp").iterdir())
    assert leftover.name.startswith(f"{store_module._host()}~{writer.pid}")  # host and pid are in the name
    assert (leftover / "half.bin").exists()
    Store(root)  # the writer is still running: its folder is kept
    assert leftover.exists()
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(10)
    mine = root / "tmp" / f"{store_module.writer_id()}~live"  # a writer that is still running
    mine.mkdir()
    foreign_recent = root / "tmp" / "otherhost~123.456~recent"
    foreign_old = root / "tmp" / "otherhost~124.456~old"
    foreign_recent.mkdir()
    foreign_old.mkdir()
    day_ago = time.time() - store_module.FOREIGN_TMP_SECONDS - 60
    os.utime(foreign_old, (day_ago, day_ago))

    store = Store(root)
    assert not leftover.exists()  # swept at once: its writer is gone
    assert mine.exists() and foreign_recent.exists()  # alive, or on a host whose pids cannot be checked from here
    assert not foreign_old.exists()
    assert not store.has(key_of({"killed": True}))


def _write_forever(root: str, writer: int) -> None:
    store = Store(root)
    for n in range(10**6):
        store.put_files("blob", {"w": writer, "n": n}, lambda f, n=n: (f / "blob.bin").write_bytes(_blob(n)) and n)
        store.put_values("score", [({"w": writer, "n": n, "i": i}, n * 10 + i) for i in range(3)])


@pytest.mark.parametrize("delay", [0.05, 0.15, 0.3])
def test_writers_killed_at_any_moment_leave_only_complete_products(tmp_path: Path, delay: float):
    root = tmp_path / "store"
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_write_forever, args=(str(root), w)) for w in range(2)]
    for w in writers:
        w.start()
    time.sleep(delay + 0.4)  # the first writes start after the fork and the store's open
    for w in writers:
        os.kill(w.pid, signal.SIGKILL)
        w.join(10)
    store = Store(root)  # sweeps the killed writers' staging folders
    assert not any((root / "tmp").iterdir())
    blobs, scores = store.keys("blob"), store.keys("score")
    assert blobs and scores
    for entry in store.get_many(sorted(blobs)).values():
        n = entry.spec["n"]
        assert (entry.path / "blob.bin").read_bytes() == _blob(n) and entry.value == n
    assert all(e.value == e.spec["n"] * 10 + e.spec["i"] for e in store.get_many(sorted(scores)).values())
    assert len(store.get_many(sorted(blobs))) == len(blobs) and not store.repaired
    report = store.reindex()  # the folders hold at least what the index listed (a folder may beat its index line)
    assert report.damaged == [] and report.files >= len(blobs) and report.values >= len(scores)
    assert store.keys("blob") >= blobs


def test_a_torn_index_line_is_read_only_once_it_is_whole(tmp_path: Path):
    store = Store(tmp_path)
    key = key_of({"k": "torn"})
    line = store_module.Record("score", None, canonical_json({"k": "torn"}), "7").line(key)
    segment = tmp_path / "index" / "otherhost~1.1~0.jsonl"
    segment.write_bytes(line[:20])  # another node's write, half visible
    assert store.get(key) is None
    with open(segment, "ab") as handle:
        handle.write(line[20:])
    assert store.get(key).value == 7


def test_finished_segments_are_compacted_into_one_immutable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "store"
    ctx = multiprocessing.get_context("fork")
    for writer in range(3):
        proc = ctx.Process(target=lambda w=writer: Store(root).put_values("score", [({"w": w, "i": i}, i)
                                                                                      for i in range(5)]))
        proc.start()
        proc.join(30)
    assert len(list((root / "index").glob("*.jsonl"))) == 3
    monkeypatch.setattr(store_module, "COMPACT_MIN_SEGMENTS", 3)
    store = Store(root)  # the three writers have ended: their segments are folded at open
    assert not list((root / "index").glob("*.jsonl"))
    (run,) = list((root / "index").glob("run-*.sqlite"))
    assert store.count("score") == 15 and store.get(key_of({"w": 2, "i": 4})).value == 4
    store.put_value("score", {"w": "live"}, 1)  # this writer is alive: its segment stays a segment
    assert store.compact() == 0 and len(list((root / "index").glob("*.jsonl"))) == 1
    assert Store(root).get(key_of({"w": "live"})).value == 1


def test_a_closed_or_collected_writer_marks_its_segment_done_for_any_host_to_compact(tmp_path: Path):
    first = Store(tmp_path)
    first.put_value("score", {"k": 1}, 1)
    first.close()
    second = Store(tmp_path)
    second.put_value("score", {"k": 2}, 2)
    del second  # a finished job's handle, collected
    gc.collect()
    # another node's finished job: its pid cannot be checked from here, its ".done" name says it is finished
    record = store_module.Record("score", None, canonical_json({"k": 3}), "3")
    (tmp_path / "index" / "othernode~77.9~1.done.jsonl").write_bytes(record.line(key_of({"k": 3})))
    done = sorted(p.name for p in (tmp_path / "index").glob("*.done.jsonl"))
    assert len(done) == 3 and not [p for p in (tmp_path / "index").glob("*.jsonl") if p.name not in done]
    store = Store(tmp_path)
    assert store.compact() == 3 and not list((tmp_path / "index").glob("*.jsonl"))
    assert [store.get(key_of({"k": k})).value for k in (1, 2, 3)] == [1, 2, 3]


def test_without_working_flock_products_are_still_made_once_per_process(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch, caplog):
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(store_module.fcntl, "flock", no_locks)
    store = Store(tmp_path)
    calls = []
    assert store.get_or_put_value("score", {"k": 1}, lambda: calls.append(1) or 5) == (5, True)
    assert store.get_or_put_value("score", {"k": 1}, lambda: calls.append(1) or 6) == (5, False)
    assert calls == [1]
    assert "no working flock" in caplog.text


def test_a_folder_the_index_does_not_list_yet_is_adopted_not_recomputed(tmp_path: Path):
    """Another node wrote it, but its index line is not visible here yet (NFS attribute caching)."""
    writer, reader = Store(tmp_path), Store(tmp_path)
    reader.get(key_of({"k": 1}))  # the reader has read the index before the write
    writer.put_files("blob", {"k": 1}, lambda f: (f / "a.bin").write_bytes(b"abc") and {"v": 1})
    writer.put_value("score", {"k": 2}, 9)
    for segment in (tmp_path / "index").glob("*.jsonl"):
        segment.unlink()  # as if the index lines were not visible
    reader._refresh()
    entry, made = reader.get_or_put_files("blob", {"k": 1}, pytest.fail)
    assert not made and (entry.path / "a.bin").read_bytes() == b"abc" and entry.value == {"v": 1}
    assert reader.get_or_put_value("score", {"k": 2}, pytest.fail) == (9, False)


# -- the index of earlier versions ---------------------------------------------------------------------------------

LEGACY_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, kind TEXT NOT NULL, path TEXT, spec TEXT NOT NULL,
    value TEXT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS file_hashes (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL);
"""


def _legacy_writer(root: Path) -> sqlite3.Connection:
    """A process of the previous version: SQLite in WAL mode, folders with spec.json only."""
    root.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(root / "index.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(LEGACY_SCHEMA)
    return db


def _legacy_put(db: sqlite3.Connection, root: Path, kind: str, spec: dict, value, files: dict | None = None) -> str:
    key = key_of(spec)
    rel = None
    if files is not None:
        rel = f"objects/{kind}/{key[:2]}/{key}"
        (root / rel).mkdir(parents=True)
        for name, data in files.items():
            (root / rel / name).write_bytes(data)
        (root / rel / "spec.json").write_text(canonical_json(spec))
    db.execute("INSERT INTO entries VALUES (?,?,?,?,?,?)",
               (key, kind, rel, canonical_json(spec), canonical_json(value), time.time()))
    return key


def test_a_store_of_the_previous_version_is_read_while_it_is_still_written_then_moved_into_folders(tmp_path: Path):
    root = tmp_path / "store"
    old = _legacy_writer(root)
    image = _legacy_put(old, root, "image", {"i": 1}, {"sha256": "x"}, {"image.png": b"png"})
    score = _legacy_put(old, root, "judgement", {"j": 1}, {"positive": True})
    store = Store(root)
    assert store.get(image).value == {"sha256": "x"} and (store.get(image).path / "image.png").read_bytes() == b"png"
    assert store.get(score).value == {"positive": True}
    later = _legacy_put(old, root, "judgement", {"j": 2}, {"positive": False})  # an old process writes on
    assert store.get(later).value == {"positive": False}
    assert store.count("judgement") == 2

    report = store.reindex()
    assert (report.files, report.values, report.migrated) == (1, 2, 3)
    old.close()
    (root / "index.sqlite").unlink()
    fresh = Store(root)  # the legacy index is gone: the folders alone hold all three
    assert fresh.get(image).value == {"sha256": "x"}
    assert fresh.get(score).value == {"positive": True} and fresh.get(later).value == {"positive": False}
    assert (fresh.get(image).path / "entry.json").is_file()


def test_the_file_hash_cache_of_the_previous_version_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "store"
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"1" * 10)
    stat = weights.stat()
    old = _legacy_writer(root)
    old.execute("INSERT INTO file_hashes VALUES (?,?,?,?)", (str(weights.resolve()), 10, stat.st_mtime_ns, "cafe"))
    monkeypatch.setattr(store_module, "sha256_file", pytest.fail)
    assert Store(root).file_sha256(weights) == "cafe"


# -- files are shared with a group ---------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o002, 0o022])
def test_files_follow_the_users_umask(tmp_path: Path, umask: int):
    previous = os.umask(umask)
    try:
        store = Store(tmp_path / "store")
        key = store.put_files("blob", {"k": 1}, lambda f: (f / "a.bin").write_bytes(b"a"))
        store.put_value("score", {"k": 2}, 3)
        atomic_write_bytes(tmp_path / "results" / "leaderboard.md", b"table")
        store.reindex()
    finally:
        os.umask(previous)
    folder = store.get(key).path
    dirs = [folder, *[p for p in (tmp_path / "store" / "objects").rglob("*") if p.is_dir()]]
    files = [folder / "a.bin", folder / "entry.json", tmp_path / "results" / "leaderboard.md",
             *(tmp_path / "store" / "index").iterdir()]
    assert {stat.S_IMODE(d.stat().st_mode) for d in dirs} == {0o777 & ~umask}
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o666 & ~umask}


# -- bad input: one clear line, or repaired and logged --------------------------------------------------------------


def _one_line_harness_error(raised: pytest.ExceptionInfo) -> str:
    from runners.models import HarnessError

    assert isinstance(raised.value, HarnessError)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_an_unwritable_store_root_is_one_error_naming_the_folder_and_the_fix(tmp_path: Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(Exception) as raised:
        Store(blocker / "store")
    message = _one_line_harness_error(raised)
    assert f"store.root={blocker / 'store'}" in message and "not writable" in message
    assert "pass store.root=" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_a_read_only_store_root_is_one_error(tmp_path: Path):
    Store(tmp_path / "store")
    for folder in [tmp_path / "store", *(tmp_path / "store").iterdir()]:
        folder.chmod(0o555)
    try:
        with pytest.raises(Exception) as raised:
            Store(tmp_path / "store")
    finally:
        for folder in [tmp_path / "store", *(tmp_path / "store").iterdir()]:
            folder.chmod(0o755)
    assert "not writable" in _one_line_harness_error(raised)


def test_run_py_with_an_unwritable_store_root_prints_one_error_line_and_exits_2(tmp_path: Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = subprocess.run([sys.executable, "run.py", f"store.root={blocker / 'store'}", "stop_after=prompts",
                             f"hydra.run.dir={tmp_path / 'outputs'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "store.root=" in errors[0] and "not writable" in errors[0]


def test_a_garbled_legacy_index_is_set_aside_and_logged_and_the_folders_still_serve(tmp_path: Path, caplog):
    store = Store(tmp_path)
    key = store.put_files("blob", {"k": 1}, lambda f: (f / "a.bin").write_bytes(b"abc"))
    value = store.put_value("score", {"k": 2}, 5)
    (tmp_path / "index.sqlite").write_bytes(b"this is not a database" * 100)
    fresh = Store(tmp_path)
    assert fresh.get(key_of({"k": 3})) is None  # a miss reaches the legacy index
    assert fresh.get(key).path.joinpath("a.bin").read_bytes() == b"abc" and fresh.get(value).value == 5
    assert "is not a readable index" in caplog.text
    assert not (tmp_path / "index.sqlite").exists() and list(tmp_path.glob("index.sqlite.corrupt-*"))


def test_a_garbled_index_file_is_rebuilt_from_the_folders(tmp_path: Path, caplog):
    store = Store(tmp_path)
    key = store.put_files("blob", {"k": 1}, lambda f: (f / "a.bin").write_bytes(b"abc") and {"v": 1})
    value = store.put_value("score", {"k": 2}, 5)
    store.reindex()
    (run,) = list((tmp_path / "index").glob("run-*.sqlite"))
    run.write_bytes(b"\x00garbage" * 500)
    for segment in (tmp_path / "index").glob("*.jsonl"):
        segment.write_bytes(b"not an index line\n")
    fresh = Store(tmp_path)
    assert fresh.get(key).value == {"v": 1} and fresh.get(value).value == 5
    assert "is unreadable" in caplog.text and "rebuilding the index" in caplog.text


def _png(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_truncated_png_is_found_removed_logged_and_rebuilt(tmp_path: Path, caplog):
    from PIL import Image

    store = Store(tmp_path)
    key = store.put_files("image", {"i": 1}, lambda f: (f / "image.png").write_bytes(_png((200, 10, 10))))
    store.put_value("judgement", {"image": key}, {"positive": True})  # its score is cached
    png = store.get(key).path / "image.png"
    png.write_bytes(png.read_bytes()[:40])
    assert store.get_many([key]) == {}  # what a run asks first: the image counts as missing
    assert "image" in caplog.text and "is damaged (image.png has 40 of its" in caplog.text
    assert store.repaired and key in store.repaired[0]
    entry, made = store.get_or_put_files("image", {"i": 1}, lambda f: (f / "image.png").write_bytes(
        _png((200, 10, 10))))
    assert made
    with Image.open(entry.path / "image.png") as image:
        assert image.convert("RGB").getpixel((0, 0)) == (200, 10, 10)


def test_verify_finds_a_damaged_file_of_the_same_size(tmp_path: Path):
    store = Store(tmp_path)
    key = store.put_files("image", {"i": 1}, lambda f: (f / "image.png").write_bytes(_png((1, 2, 3))))
    png = store.get(key).path / "image.png"
    data = bytearray(png.read_bytes())
    data[-20] ^= 0xFF
    png.write_bytes(bytes(data))
    assert store.get(key) is not None  # sizes match: only a full check sees it
    (damaged,) = store.verify()
    assert key in damaged and "sha256" in damaged and store.get(key) is None


def test_a_truncated_png_in_a_run_is_regenerated_and_reported(tiny_config, caplog):
    from run import execute
    from runners.models import PipelineCache

    cfg = tiny_config()
    execute(cfg, pipelines=PipelineCache())
    (png, *_) = sorted(Path(cfg["store"]["root"]).glob("objects/image/*/*/image.png"))
    png.write_bytes(png.read_bytes()[:100])
    again = execute(cfg, pipelines=PipelineCache())
    assert again["counters"].images_generated == 1  # that image only; its scores stay cached
    assert again["counters"].scores_computed == 0
    assert "is damaged (image.png has 100 of its" in caplog.text
    assert png.stat().st_size > 100


def test_a_full_disk_while_writing_a_product_is_one_error_and_stores_nothing(tmp_path: Path):
    store = Store(tmp_path)

    def write(folder: Path) -> None:
        (folder / "image.png").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "image.png"))

    with pytest.raises(Exception) as raised:
        store.put_files("image", {"i": 1}, write)
    message = _one_line_harness_error(raised)
    assert "no space left" in message and f"store.root={tmp_path}" in message and "free space" in message
    assert not any((tmp_path / "tmp").iterdir()) and not store.has(key_of({"i": 1}))
    assert not list((tmp_path / "objects").rglob("image.png"))


def test_a_full_disk_while_indexing_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = Store(tmp_path)
    real_write = os.write

    def full(fd: int, data) -> int:
        if os.fstat(fd).st_size > 0 or len(data) > 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(store_module.os, "write", full)
    with pytest.raises(Exception) as raised:
        store.put_values("judgement", [({"i": i}, i) for i in range(3)])
    assert "no space left" in _one_line_harness_error(raised)
    monkeypatch.setattr(store_module.os, "write", real_write)
    assert not any((tmp_path / "tmp").iterdir())
    assert Store(tmp_path).reindex().values == 3  # the values' folder was complete: the index is rebuilt from it


def test_a_full_disk_while_writing_results_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(store_module.os, "fdopen", full_disk_fdopen(os.fdopen))
    target = tmp_path / "results" / "leaderboard.md"
    with pytest.raises(Exception) as raised:
        atomic_write_bytes(target, b"table")
    message = _one_line_harness_error(raised)
    assert "no space left" in message and str(target.parent) in message
    assert list(target.parent.iterdir()) == []


def test_the_reindex_command_rebuilds_a_lost_index_and_reports_a_bad_root(tmp_path: Path, capsys):
    import shutil

    store = Store(tmp_path / "store")
    key = store.put_files("blob", {"k": 1}, lambda f: (f / "a.bin").write_bytes(b"abc") and {"v": 1})
    value = store.put_value("score", {"k": 2}, 5)
    store.close()
    shutil.rmtree(tmp_path / "store" / "index")
    assert Store(tmp_path / "store").get(key) is None
    assert store_module.main(["reindex", str(tmp_path / "store")]) == 0
    assert "indexed 1 file products and 1 values" in capsys.readouterr().out
    fresh = Store(tmp_path / "store")
    assert fresh.get(key).value == {"v": 1} and fresh.get(value).value == 5
    (tmp_path / "a_file").write_text("")
    assert store_module.main(["verify", str(tmp_path / "a_file" / "store")]) == 2
    (error,) = capsys.readouterr().err.splitlines()
    assert error.startswith("error: store.root=") and "not writable" in error


def test_a_closed_segment_garbled_without_line_breaks_triggers_a_rebuild(tmp_path: Path, caplog):
    store = Store(tmp_path)
    key = store.put_files("blob", {"k": 1}, lambda f: (f / "a.bin").write_bytes(b"abc") and {"v": 1})
    store.close()
    (segment,) = (tmp_path / "index").glob("*.done.jsonl")
    segment.write_bytes(b"garbage without a line break" * 8)  # closed: no line can still be on its way
    assert Store(tmp_path).get(key).value == {"v": 1}
    assert "rebuilding the index from the object folders" in caplog.text
