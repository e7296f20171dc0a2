"""Content-addressed store: every product is found by the hash of the description of what made it.

Why: a run that dies loses nothing, a rerun recomputes nothing, and two runs that need the same image share it.
An entry is either a small JSON value kept in the SQLite index (scores, prompt lists, adversarial texts) or a
directory of files (PNG images, safetensors artifacts) renamed into place in one step. The index row is written
after the files are in place, so an interrupted write leaves no entry; leftovers in ``tmp/`` are swept on open.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runners.spec import canonical_json, sha256_file

KEY_LENGTH = 32  # hex characters of sha256 kept in keys: 128 bits, collision-free at any benchmark scale
STALE_TMP_SECONDS = 24 * 3600

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    path TEXT,
    spec TEXT NOT NULL,
    value TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_kind ON entries(kind);
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
"""


def key_of(spec: Any) -> str:
    """The content key of a product: sha256 of the canonical JSON of everything that made it."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:KEY_LENGTH]


@dataclass(frozen=True)
class Entry:
    key: str
    kind: str
    path: Path | None
    spec: dict[str, Any]
    value: Any


class Store:
    """A local directory of products with an SQLite index; safe for several processes writing at once."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"
        for folder in (self.objects, self.tmp, self.locks):
            folder.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._key_locks: dict[str, threading.Lock] = {}
        self._key_locks_guard = threading.Lock()
        with self._db() as db:
            db.executescript(_SCHEMA)
        self._sweep_tmp()

    # -- index -----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.root / "index.sqlite", timeout=60, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            self._local.connection = connection
        yield connection

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def get(self, key: str) -> Entry | None:
        with self._db() as db:
            row = db.execute("SELECT key, kind, path, spec, value FROM entries WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        path = self.root / row[2] if row[2] else None
        if path is not None and not path.is_dir():
            return None  # files removed by hand: treat as missing so the product is rebuilt
        return Entry(row[0], row[1], path, json.loads(row[3]), json.loads(row[4]) if row[4] is not None else None)

    def has(self, key: str) -> bool:
        return self.get(key) is not None

    def get_many(self, keys: list[str]) -> dict[str, Entry]:
        """Entries present among ``keys`` (one query per 500 keys, for reruns that look up thousands)."""
        found: dict[str, Entry] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):
            chunk = unique[start:start + 500]
            marks = ",".join("?" * len(chunk))
            with self._db() as db:
                rows = db.execute(f"SELECT key, kind, path, spec, value FROM entries WHERE key IN ({marks})",
                                  chunk).fetchall()
            for key, kind, rel, spec, value in rows:
                path = self.root / rel if rel else None
                if path is None or path.is_dir():
                    found[key] = Entry(key, kind, path, json.loads(spec), json.loads(value) if value else None)
        return found

    def count(self, kind: str | None = None) -> int:
        with self._db() as db:
            if kind is None:
                return db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
            return db.execute("SELECT COUNT(*) FROM entries WHERE kind = ?", (kind,)).fetchone()[0]

    def _insert(self, key: str, kind: str, rel_path: str | None, spec: Any, value: Any) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO entries (key, kind, path, spec, value, created) VALUES (?,?,?,?,?,?)",
                       (key, kind, rel_path, canonical_json(spec),
                        None if value is None else canonical_json(value), time.time()))

    # -- writes ----------------------------------------------------------------------------------------------

    def put_value(self, kind: str, spec: Any, value: Any) -> str:
        """Store a small JSON value; one SQLite transaction, so it is there entirely or not at all."""
        key = key_of(spec)
        self._insert(key, kind, None, spec, value)
        return key

    def put_values(self, kind: str, items: list[tuple[Any, Any]]) -> list[str]:
        """Many (spec, value) pairs in one transaction: scoring thousands of images stays fast."""
        rows = [(key_of(spec), kind, None, canonical_json(spec), canonical_json(value), time.time())
                for spec, value in items]
        with self._db() as db:
            db.execute("BEGIN")
            try:
                db.executemany("INSERT OR REPLACE INTO entries (key, kind, path, spec, value, created) "
                               "VALUES (?,?,?,?,?,?)", rows)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return [row[0] for row in rows]

    def put_files(self, kind: str, spec: Any, write: Callable[[Path], Any]) -> str:
        """Store a directory of files: ``write(folder)`` fills a temporary folder that is renamed into place.

        Whatever ``write`` returns (JSON-serialisable or None) is indexed as the entry's value.
        """
        key = key_of(spec)
        final = self.objects / kind / key[:2] / key
        staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=self.tmp))
        try:
            value = write(staging)
            (staging / "spec.json").write_text(canonical_json(spec))
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # an orphan from a crash between rename and index insert, or a concurrent writer
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(staging, final)
            except OSError:
                if not final.is_dir():
                    raise
                shutil.rmtree(staging, ignore_errors=True)  # a concurrent writer of the same key won; same content
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._insert(key, kind, str(final.relative_to(self.root)), spec, value)
        return key

    # -- compute once ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive per key, across threads (a lock each) and processes (``flock`` on a lock file)."""
        with self._key_locks_guard:
            thread_lock = self._key_locks.setdefault(key, threading.Lock())
        with thread_lock, open(self.locks / f"{key}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def get_or_put_value(self, kind: str, spec: Any, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """The value for ``spec``, computing it at most once; returns (value, computed_now)."""
        key = key_of(spec)
        entry = self.get(key)
        if entry is not None:
            return entry.value, False
        with self.lock(key):
            entry = self.get(key)
            if entry is not None:
                return entry.value, False
            value = compute()
            self.put_value(kind, spec, value)
            return value, True

    def get_or_put_files(self, kind: str, spec: Any, write: Callable[[Path], Any]) -> tuple[Entry, bool]:
        """The file entry for ``spec``, writing it at most once; ``write`` may return a JSON value to index."""
        key = key_of(spec)
        entry = self.get(key)
        if entry is not None:
            return entry, False
        with self.lock(key):
            entry = self.get(key)
            if entry is not None:
                return entry, False
            self.put_files(kind, spec, write)
            entry = self.get(key)
            assert entry is not None
            return entry, True

    # -- file hashes -----------------------------------------------------------------------------------------

    def file_sha256(self, path: str | Path) -> str:
        """sha256 of a file, remembered by (real path, size, mtime) so multi-GB weights are hashed once."""
        real = Path(path).resolve()
        stat = real.stat()
        with self._db() as db:
            row = db.execute("SELECT size, mtime_ns, sha256 FROM file_hashes WHERE path = ?", (str(real),)).fetchone()
        if row is not None and row[0] == stat.st_size and row[1] == stat.st_mtime_ns:
            return row[2]
        digest = sha256_file(real)
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO file_hashes (path, size, mtime_ns, sha256) VALUES (?,?,?,?)",
                       (str(real), stat.st_size, stat.st_mtime_ns, digest))
        return digest

    def _sweep_tmp(self) -> None:
        now = time.time()
        for leftover in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                if now - leftover.stat().st_mtime > STALE_TMP_SECONDS:
                    shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()



def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file outside the store (results, leaderboard) so that readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
