"""The store: one computation per key, atomic writes, an index that survives processes."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from runners import store as store_module
from runners.store import Store, atomic_write_bytes, key_of


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
