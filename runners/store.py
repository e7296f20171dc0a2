"""Content-addressed store: every product is found by the hash of the description of what made it.

Why: a run that dies loses nothing, a rerun recomputes nothing, and two runs that need the same image share it, also
when they run as Slurm jobs on different nodes over one shared (NFS, Lustre) folder.

The object folders are the truth. Every product is a folder ``objects/<kind>/<key[:2]>/<key>/``, filled in ``tmp/``
and renamed into place in one step; a rename is atomic on local disks, NFS and Lustre alike, so a folder in
``objects/`` is complete or absent. A file product (images, artifacts) holds its files, ``spec.json`` and
``entry.json`` (its kind, its value, the size and sha256 of each file). Small JSON values (scores, prompt lists) are
written in batches, one folder per batch with ``values.jsonl``. Everything else can be rebuilt from the folders:
``python -m runners.store reindex``.

The index is not one shared SQLite file. SQLite's WAL mode needs memory shared between its processes, which network
filesystems do not have, and its rollback journal relies on POSIX ``fcntl`` locks, which are missing, node-local or
unreliable on many NFS and Lustre mounts; a lock that silently does not lock lets two writers corrupt the file.
Here no index file is ever written by two processes:

- each writer appends lines (``<key>\\t<json>``) to a segment of its own, ``index/<host>~<pid>.<start>~<n>.jsonl``,
  one ``write`` per batch; readers merge all segments, and a torn or not yet visible last line is just not read yet;
- segments whose writer is gone (its pid on this host has ended) or idle for hours (a writer idle for an hour starts
  a new segment, so an older one never grows again) are compacted into an SQLite file that is written in ``tmp/``,
  renamed into ``index/`` and then never changed, so readers open it with ``immutable=1``: no lock, no journal;
- ``index.sqlite``, the index of earlier versions, is only read, so an existing store works while processes of the
  old version still write to it; ``reindex`` moves its entries into folders.

Locks only save work. ``get_or_put_*`` takes a ``flock`` on ``locks/<key>.lock`` so that concurrent runs compute a
product once; on a filesystem without working ``flock`` the lock is skipped (with a warning), and the worst outcome is
a product computed twice: both copies are identical, the second rename is discarded. Before computing under the
lock, the product's folder is looked at directly, so a lagging index (NFS caches directory and file attributes for
seconds) does not cause a recomputation either.

Leftovers of killed writers (staging folders in ``tmp/``) carry host, pid and process start time in their name and are
swept at the next open on the same host once that process is gone; other hosts' after 24 hours. Files and folders are
created with the user's umask (group-readable under 002 and 022), never with ``mkstemp``'s 0600. Damaged products (a
file shorter than recorded, e.g. a truncated PNG) are found when looked up, removed, logged and rebuilt; a full disk or
an unwritable ``store.root`` is one ``HarnessError`` naming the cause and the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crt_bench.spec import HarnessError
from runners.spec import canonical_json, sha256_file

log = logging.getLogger(__name__)

KEY_LENGTH = 32  # hex characters of sha256 kept in keys: 128 bits, collision-free at any benchmark scale
FOREIGN_TMP_SECONDS = 24 * 3600  # leftovers of another host's writers, whose pid cannot be checked from here
SEGMENT_ROTATE_SECONDS = 3600  # a writer idle this long appends to a new segment...
SEGMENT_SEALED_SECONDS = 6 * 3600  # ...so a segment untouched this long never grows again
SEGMENT_MAX_BYTES = 64 << 20
COMPACT_MIN_SEGMENTS = 16  # finished segments that make an open compact them
MERGE_MAX_RUNS = 4  # compacted files beyond which a compaction merges them all into one
SEGMENT, SEALED_SEGMENT = ".jsonl", ".done.jsonl"  # a writer renames its segment to the second when it closes
LEGACY_INDEX = "index.sqlite"
ENTRY_FILE, SPEC_FILE, VALUES_FILE = "entry.json", "spec.json", "values.jsonl"
FILE_HASH_KIND = "_file_hash"  # kinds starting with "_" are caches, not products: not in folders, not counted
LEGACY_BATCH = 1000

_RUN_SCHEMA = ("CREATE TABLE entries (key TEXT PRIMARY KEY, kind TEXT NOT NULL, path TEXT, spec TEXT NOT NULL, "
               "value TEXT, files TEXT)")
_LINE = re.compile(rb"[0-9a-f]{%d}\t\{.*\}" % KEY_LENGTH)
_WRITER = re.compile(r"^(?P<host>[^~]+)~(?P<pid>\d+)(?:\.(?P<start>\d+))?~")
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_FULL = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST}
_SQLITE_CORRUPT = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
_UMASK_GUARD = threading.Lock()


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


@dataclass(frozen=True)
class Record:
    """One index entry: what a key names and where it lives (spec and value as canonical JSON text)."""

    kind: str
    path: str | None
    spec: str
    value: str | None
    files: dict[str, list[Any]] | None = None  # name -> [size, sha256]; None for values and pre-folder entries

    def line(self, key: str) -> bytes:
        body = {"kind": self.kind, "path": self.path, "spec": self.spec, "value": self.value, "files": self.files}
        return f"{key}\t{json.dumps(body, sort_keys=True, separators=(',', ':'))}\n".encode()

    @classmethod
    def parse(cls, line: bytes) -> tuple[str, Record]:
        key, body = line.rstrip(b"\n").split(b"\t", 1)
        data = json.loads(body)
        return key.decode(), cls(data["kind"], data["path"], data["spec"], data["value"], data["files"])

    def row(self, key: str) -> tuple[Any, ...]:
        return key, self.kind, self.path, self.spec, self.value, None if self.files is None else json.dumps(self.files)


@dataclass
class IndexReport:
    """What a reindex found: entries by origin, and what it repaired."""

    files: int = 0
    values: int = 0
    migrated: int = 0
    damaged: list[str] = field(default_factory=list)
    orphans: int = 0

    def line(self) -> str:
        return (f"indexed {self.files} file products and {self.values} values from the object folders "
                f"({self.migrated} moved from {LEGACY_INDEX}); damaged and removed: {len(self.damaged)}; folders "
                f"without an entry (rebuilt when next needed): {self.orphans}")


@dataclass
class _Segment:
    offset: int = 0  # end of the last complete line read
    warned: bool = False


# -- the writer's identity, for sweeping what it leaves behind ------------------------------------------------------


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot: with the pid, it names one process even after pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def writer_id() -> str:
    pid = os.getpid()
    start = _start_time(pid)
    return f"{_host()}~{pid}" + (f".{start}" if start else "")


def writer_gone(name: str) -> bool | None:
    """Whether the writer named at the start of ``name`` has ended: True/False on its host, None elsewhere."""
    match = _WRITER.match(name)
    if match is None or match["host"] != _host():
        return None
    pid = int(match["pid"])
    if Path("/proc/self/stat").exists():
        start = _start_time(pid)
        return start is None or (match["start"] is not None and start != match["start"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _seal(index: Path, own: list[str | None], pid: int) -> None:
    """Rename a writer's segment to its finished name, so that the next open may compact it."""
    name, own[0] = own[0], None
    if name is not None and os.getpid() == pid:
        with contextlib.suppress(OSError):
            os.rename(index / name, index / (name[:-len(SEGMENT)] + SEALED_SEGMENT))


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask alone must set it to read it)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_GUARD:
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def write_error(error: OSError, where: str, fix: str) -> Exception:
    """One line naming what failed, why and what to do; OSErrors not about space or rights are returned unchanged."""
    reason = error.strerror or str(error)
    if error.errno in _FULL:
        return HarnessError(f"{where}: no space left ({reason}); free space on that disk or {fix}")
    if error.errno in _DENIED:
        return HarnessError(f"{where} is not writable ({reason}: {error.filename or where}); fix its permissions "
                              f"or {fix}")
    return error


# -- files of an object folder ------------------------------------------------------------------------------------


def _manifest(folder: Path) -> dict[str, list[Any]]:
    return {p.relative_to(folder).as_posix(): [p.stat().st_size, sha256_file(p)]
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ENTRY_FILE}


def _problem(folder: Path, files: dict[str, list[Any]], hashes: bool = False) -> str | None:
    """What is wrong with a folder against its manifest ("missing" when the folder is gone), or None."""
    if not folder.is_dir():
        return "missing"
    for name, (size, digest) in files.items():
        try:
            actual = (folder / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} of its {size} bytes"
        if hashes and sha256_file(folder / name) != digest:
            return f"{name} does not match its sha256"
    return None


def _read_entry(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / ENTRY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


class Store:
    """A directory of products: folders as the truth, per-writer index segments; safe for concurrent writers."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"
        self.index = self.root / "index"
        self.repaired: list[str] = []  # damaged products found and removed by this handle (they get rebuilt)
        try:
            for folder in (self.objects, self.tmp, self.locks, self.index):
                folder.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(prefix=f"{writer_id()}~probe", dir=self.tmp)
            os.close(handle)
            os.unlink(probe)
        except OSError as error:
            raise self._error(error) from None
        self._lock = threading.RLock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._key_locks_guard = threading.Lock()
        self._reset_process_state()
        self._sweep_tmp()
        self._refresh()
        if len(self._sealed_segments()) >= COMPACT_MIN_SEGMENTS:
            try:
                self.compact()
            except (OSError, sqlite3.Error) as error:  # upkeep only: the segments still serve as they are
                log.warning("store: compacting the index of %s failed (%s); going on without", self.root, error)

    def _reset_process_state(self) -> None:
        """Handles, memo and segment of this process; a forked child starts its own (SQLite must not cross a fork)."""
        self._pid = os.getpid()
        self._segments: dict[str, _Segment] = {}
        self._memo: dict[str, tuple[str, int, int]] = {}  # key -> (segment, offset, length)
        self._fds: dict[str, int] = {}
        self._runs: dict[str, sqlite3.Connection] = {}
        self._legacy: sqlite3.Connection | None = None
        self._legacy_checked = False
        self._own: list[str | None] = [None]  # this writer's current segment, shared with its finalizer
        self._sealer = weakref.finalize(self, _seal, self.index, self._own, self._pid)
        self._own_size = 0
        self._own_last = 0.0
        self._needs_reindex = False
        self._warned_no_locks = False

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            self._abandoned = (self._runs, self._legacy, self._fds)  # the parent's; never closed from the child
            self._reset_process_state()

    def _error(self, error: OSError) -> Exception:
        return write_error(error, f"store.root={self.root}", "pass store.root=<a writable folder with room>")

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            raised = self._error(error)
            if raised is error:
                raise
            raise raised from None

    def close(self) -> None:
        """Mark this writer's segment finished (also done when the handle is collected or the process exits)."""
        with self._lock:
            self._sealer()
            self._own = [None]
            self._sealer = weakref.finalize(self, _seal, self.index, self._own, self._pid)
            for connection in self._runs.values():
                connection.close()
            if self._legacy is not None:
                self._legacy.close()
            for fd in self._fds.values():
                os.close(fd)
            self._runs, self._legacy, self._fds = {}, None, {}
            self._legacy_checked = False

    # -- reading the index -----------------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Read what other writers appended since the last look, and pick up new compacted files."""
        with self._lock:
            self._check_fork()
            for _ in range(5):
                names = set(os.listdir(self.index))
                for gone in set(self._runs) - names:
                    self._runs.pop(gone).close()
                vanished = set(self._segments) - names
                if vanished:
                    self._forget_segments(vanished)
                for name in sorted(names):
                    if name.endswith(".sqlite") and name not in self._runs:
                        self._runs[name] = _open_run(self.index / name)
                complete = True
                for name in sorted(n for n in names if n.endswith(SEGMENT)):
                    if not self._read_segment(name):
                        complete = False  # compacted away while listing: its lines are in a file listed next time
                if complete:
                    return

    def _forget_segments(self, names: set[str]) -> None:
        for name in names:
            self._segments.pop(name, None)
            fd = self._fds.pop(name, None)
            if fd is not None:
                os.close(fd)
        self._memo = {k: v for k, v in self._memo.items() if v[0] not in names}

    def _read_segment(self, name: str) -> bool:
        state = self._segments.setdefault(name, _Segment())
        try:
            with open(self.index / name, "rb") as handle:
                handle.seek(state.offset)
                data = handle.read()
        except FileNotFoundError:
            self._forget_segments({name})
            return False
        sealed = None
        offset = state.offset
        pieces = data.split(b"\n")
        if pieces[-1] and self._is_sealed(name):  # a closed segment has no line still being written
            pieces.append(b"")
        for raw in pieces[:-1]:  # the last piece has no newline yet: a line still being written
            line = raw + b"\n"
            if _LINE.fullmatch(raw):
                self._memo[raw[:KEY_LENGTH].decode()] = (name, offset, len(line))
                offset += len(line)
                continue
            if b"\0" in raw:
                sealed = self._is_sealed(name) if sealed is None else sealed
                if not sealed:
                    break  # NFS can show a range of zeros until another client's write arrives: read it later
            if not state.warned:
                state.warned = True
                self._needs_reindex = True  # its entries would look missing and be computed again
                log.warning("store: index segment %s has an unreadable line at byte %d; rebuilding the index from "
                            "the object folders", name, offset)
            offset += len(line)
        state.offset = offset
        return True

    def _segment_record(self, key: str) -> Record | None:
        where = self._memo.get(key)
        if where is None:
            return None
        name, offset, length = where
        try:
            fd = self._fds.get(name)
            if fd is None:
                fd = self._fds[name] = os.open(self.index / name, os.O_RDONLY)
            line = os.pread(fd, length, offset)
            found, record = Record.parse(line)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, UnicodeDecodeError):
            log.warning("store: index line of %s in %s is unreadable; ignored", key, name)
            return None
        return record if found == key else None

    def _query_runs(self, keys: list[str]) -> dict[str, Record]:
        found: dict[str, Record] = {}
        for name in sorted(self._runs, reverse=True):  # newest first
            todo = [k for k in keys if k not in found]
            if not todo:
                break
            try:
                for start in range(0, len(todo), 500):
                    chunk = todo[start:start + 500]
                    rows = self._runs[name].execute(
                        f"SELECT key, kind, path, spec, value, files FROM entries WHERE key IN "
                        f"({','.join('?' * len(chunk))})", chunk).fetchall()
                    for key, kind, path, spec, value, files in rows:
                        found[key] = Record(kind, path, spec, value, json.loads(files) if files else None)
            except sqlite3.DatabaseError as error:
                self._discard_run(name, error)
        return found

    def _discard_run(self, name: str, error: sqlite3.DatabaseError) -> None:
        """A compacted file that cannot be read: merged into a newer one by another process meanwhile (the next
        refresh lists that one), or damaged (disk damage, a hand edit): then set aside and rebuilt from folders."""
        if not (self.index / name).exists():
            self._runs.pop(name).close()
            return
        if not _corrupt(error):
            raise error
        log.warning("store: index file %s is unreadable (%s); moved aside, rebuilding the index from the object "
                    "folders", name, error)
        self._runs.pop(name).close()
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.index / name, self._tmp_name("corrupt-index"))
        self._needs_reindex = True

    def _legacy_db(self) -> sqlite3.Connection | None:
        if not self._legacy_checked:
            self._legacy_checked = True
            path = self.root / LEGACY_INDEX
            if path.is_file():
                self._legacy = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=60,
                                               check_same_thread=False)
        return self._legacy

    def _query_legacy(self, sql: str, args: Iterable[Any]) -> list[tuple[Any, ...]]:
        db = self._legacy_db()
        if db is None:
            return []
        try:
            return db.execute(sql, list(args)).fetchall()
        except sqlite3.DatabaseError as error:
            if "no such table" in str(error):
                return []  # created a moment ago by an older process that has not written its schema yet
            if not _corrupt(error):
                raise
            self._legacy = None
            db.close()
            aside = self.root / f"{LEGACY_INDEX}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.root / LEGACY_INDEX, aside)
            log.warning("store: %s is not a readable index (%s); moved to %s. Products it listed that have no %s "
                        "are rebuilt when next needed", self.root / LEGACY_INDEX, error, aside.name, ENTRY_FILE)
            return []

    def _legacy_records(self, keys: list[str]) -> dict[str, Record]:
        found: dict[str, Record] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            rows = self._query_legacy(f"SELECT key, kind, path, spec, value FROM entries WHERE key IN "
                                      f"({','.join('?' * len(chunk))})", chunk)
            found.update({key: Record(kind, path, spec, value) for key, kind, path, spec, value in rows})
        return found

    def _records(self, keys: list[str]) -> dict[str, Record]:
        """Index records of ``keys`` (segments, then compacted files, then the legacy index); refreshes on a miss."""
        with self._lock:
            self._check_fork()
            found = self._lookup(keys)
            missing = [k for k in keys if k not in found]
            if missing:
                self._refresh()
                found.update(self._lookup(missing))
            if self._needs_reindex:
                self._needs_reindex = False
                self.reindex()
                found.update(self._lookup([k for k in keys if k not in found]))
            return found

    def _lookup(self, keys: list[str]) -> dict[str, Record]:
        found: dict[str, Record] = {}
        for key in keys:
            record = self._segment_record(key)
            if record is not None:
                found[key] = record
        rest = [k for k in keys if k not in found]
        if rest:
            found.update(self._query_runs(rest))
            rest = [k for k in rest if k not in found]
        if rest:
            found.update(self._legacy_records(rest))
        return found

    def _entry(self, key: str, record: Record) -> Entry | None:
        """The entry if its files are all there; a damaged folder is removed and reported, so it gets rebuilt."""
        spec = json.loads(record.spec)
        value = None if record.value is None else json.loads(record.value)
        if record.path is None:
            return Entry(key, record.kind, None, spec, value)
        folder = self.root / record.path
        if record.files is None:  # written by an earlier version, without a manifest
            return Entry(key, record.kind, folder, spec, value) if folder.is_dir() else None
        problem = _problem(folder, record.files)
        if problem is not None:
            own = _read_entry(folder)  # rewritten since it was indexed? the folder's own manifest decides
            if own is not None and own.get("key") == key and _problem(folder, own["files"]) is None:
                return Entry(key, record.kind, folder, spec, own.get("value"))
            if problem != "missing":
                self._discard_damaged(record.kind, key, folder, problem)
            return None
        return Entry(key, record.kind, folder, spec, value)

    def _discard_damaged(self, kind: str, key: str, folder: Path, problem: str) -> None:
        log.warning("store: %s %s is damaged (%s); removed, it is rebuilt when next needed", kind, key, problem)
        self.repaired.append(f"{kind} {key}: {problem}")
        aside = self._tmp_name("damaged")
        with contextlib.suppress(FileNotFoundError):
            os.rename(folder, aside)
            shutil.rmtree(aside, ignore_errors=True)

    def get(self, key: str) -> Entry | None:
        record = self._records([key]).get(key)
        return None if record is None else self._entry(key, record)

    def has(self, key: str) -> bool:
        return self.get(key) is not None

    def get_many(self, keys: list[str]) -> dict[str, Entry]:
        """Entries present among ``keys`` (for reruns that look up thousands at once)."""
        records = self._records(list(dict.fromkeys(keys)))
        entries = {key: self._entry(key, record) for key, record in records.items()}
        return {key: entry for key, entry in entries.items() if entry is not None}

    def keys(self, kind: str | None = None) -> set[str]:
        """Every indexed key of ``kind`` (products only when None), from all index sources."""
        with self._lock:
            self._refresh()
            found: set[str] = set()
            for key in list(self._memo):
                record = self._segment_record(key)
                if record is not None and _kind_matches(record.kind, kind):
                    found.add(key)
            where, args = ("kind = ?", [kind]) if kind is not None else ("kind NOT LIKE '\\_%' ESCAPE '\\'", [])
            for name in list(self._runs):
                try:
                    found.update(r[0] for r in self._runs[name].execute(
                        f"SELECT key FROM entries WHERE {where}", args))
                except sqlite3.DatabaseError as error:
                    self._discard_run(name, error)
            found.update(r[0] for r in self._query_legacy(f"SELECT key FROM entries WHERE {where}", args))
            return found

    def count(self, kind: str | None = None) -> int:
        return len(self.keys(kind))

    # -- writing ---------------------------------------------------------------------------------------------

    def _tmp_name(self, what: str) -> Path:
        return self.tmp / f"{writer_id()}~{what}-{secrets.token_hex(6)}"

    def _staging(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{writer_id()}~", dir=self.tmp))

    def _append(self, items: list[tuple[str, Record]]) -> None:
        """Index lines in this writer's own segment: one write, so a reader sees whole lines or none of them."""
        if not items:
            return
        data = b"".join(record.line(key) for key, record in items)
        with self._lock:
            self._check_fork()
            now = time.monotonic()
            if (self._own[0] is None or now - self._own_last > SEGMENT_ROTATE_SECONDS
                    or self._own_size > SEGMENT_MAX_BYTES):
                _seal(self.index, self._own, self._pid)
                self._own[0] = f"{writer_id()}~{time.time_ns():x}{secrets.token_hex(3)}{SEGMENT}"
                self._own_size = 0
                self._segments[self._own[0]] = _Segment()
            name = self._own[0]
            try:
                fd = os.open(self.index / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
            except BaseException:
                _seal(self.index, self._own, self._pid)  # a torn line stays last there; the next write starts anew
                raise
            offset = self._own_size
            for key, record in items:
                length = len(record.line(key))
                self._memo[key] = (name, offset, length)
                offset += length
            self._own_size = self._segments[name].offset = offset
            self._own_last = now

    def _place(self, staging: Path, rel: str, key: str) -> dict[str, Any] | None:
        """Rename a filled staging folder into place; if a complete folder is already there, keep that one."""
        final = self.root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staging, 0o777 & ~current_umask())
        for _ in range(5):
            try:
                os.rename(staging, final)
                return None
            except OSError as error:
                if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            existing = _read_entry(final)
            if existing is not None and existing.get("key") == key and _problem(final, existing["files"]) is None:
                shutil.rmtree(staging, ignore_errors=True)
                return existing  # a concurrent writer of the same key won; same content
            aside = self._tmp_name("replaced")  # an orphan, damaged or pre-manifest folder
            with contextlib.suppress(FileNotFoundError):
                os.rename(final, aside)
                shutil.rmtree(aside, ignore_errors=True)
        raise OSError(errno.EEXIST, f"could not place {rel}", str(final))

    def put_value(self, kind: str, spec: Any, value: Any) -> str:
        """Store a small JSON value (a batch of one): its folder is renamed into place, so it is all there or not."""
        return self.put_values(kind, [(spec, value)])[0]

    def put_values(self, kind: str, items: list[tuple[Any, Any]]) -> list[str]:
        """Many (spec, value) pairs as one folder: scoring thousands of images stays fast."""
        rows = [(key_of(spec), canonical_json(spec), canonical_json(value)) for spec, value in items]
        if not rows:
            return []
        keys = [key for key, _, _ in rows]
        batch = _batch_key(kind, keys)
        with self._writing():
            staging = self._staging()
            try:
                (staging / VALUES_FILE).write_text("".join(
                    f'{{"key":"{key}","spec":{spec},"value":{value}}}\n' for key, spec, value in rows))
                _write_entry_files(staging, batch, kind, {"product": "values", "kind": kind, "keys": keys}, None,
                                   {"values": len(rows)})
                self._place(staging, _rel(kind, batch), batch)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            self._append([(key, Record(kind, None, spec, value)) for key, spec, value in rows])
        return keys

    def put_files(self, kind: str, spec: Any, write: Callable[[Path], Any]) -> str:
        """Store a directory of files: ``write(folder)`` fills a temporary folder that is renamed into place.

        Whatever ``write`` returns (JSON-serialisable or None) is indexed as the entry's value.
        """
        key = key_of(spec)
        rel = _rel(kind, key)
        with self._writing():
            staging = self._staging()
            try:
                value = write(staging)
                files = _write_entry_files(staging, key, kind, spec, value)
                existing = self._place(staging, rel, key)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            if existing is not None:
                value, files = existing.get("value"), existing["files"]
            self._append([(key, Record(kind, rel, canonical_json(spec),
                                       None if value is None else canonical_json(value), files))])
        return key

    # -- compute once ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive per key, across threads (a lock each) and processes (``flock``, where the filesystem has it)."""
        with self._key_locks_guard:
            thread_lock = self._key_locks.setdefault(key, threading.Lock())
        with thread_lock, self._file_lock(self.locks / f"{key}.lock", blocking=True):
            yield

    @contextlib.contextmanager
    def _file_lock(self, path: Path, blocking: bool) -> Iterator[bool]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        except OSError as error:
            raise self._error(error) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                held = True
            except BlockingIOError:
                held = False
            except OSError as error:
                if error.errno not in _NO_LOCKS:
                    raise
                if not self._warned_no_locks:
                    self._warned_no_locks = True
                    log.warning("store: %s has no working flock (%s); going on without cross-process locks (a "
                                "product may be computed twice, never corrupted)", self.root, error.strerror)
                held = True
            yield held
        finally:
            os.close(fd)  # releases the flock

    def get_or_put_value(self, kind: str, spec: Any, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """The value for ``spec``, computing it at most once; returns (value, computed_now)."""
        key = key_of(spec)
        entry = self.get(key)
        if entry is not None:
            return entry.value, False
        with self.lock(key):
            entry = self.get(key) or self._adopt_values(kind, _batch_key(kind, [key]), key)
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
            entry = self.get(key) or self._adopt_files(kind, key)
            if entry is not None:
                return entry, False
            self.put_files(kind, spec, write)
            entry = self.get(key)
            assert entry is not None
            return entry, True

    def _adopt_files(self, kind: str, key: str) -> Entry | None:
        """A complete folder the index does not list yet (another node's write, a killed writer's last one)."""
        folder = self.root / _rel(kind, key)
        own = _read_entry(folder)
        if own is None or own.get("key") != key or _problem(folder, own["files"]) is not None:
            return None
        with contextlib.suppress(OSError):
            spec = (folder / SPEC_FILE).read_text()
            value = own.get("value")
            self._append([(key, Record(kind, _rel(kind, key), spec, None if value is None else canonical_json(value),
                                       own["files"]))])
            return self.get(key)
        return None

    def _adopt_values(self, kind: str, batch: str, key: str) -> Entry | None:
        records = _values_in(self.root / _rel(kind, batch), kind)
        if key not in records:
            return None
        self._append(list(records.items()))
        return self._entry(key, records[key])

    # -- file hashes -----------------------------------------------------------------------------------------

    def file_sha256(self, path: str | Path) -> str:
        """sha256 of a file, remembered by (real path, size, mtime) so multi-GB weights are hashed once."""
        real = Path(path).resolve()
        stat = real.stat()
        spec = {"file": str(real), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        key = key_of(spec)
        record = self._records([key]).get(key)
        if record is not None and record.value:
            return json.loads(record.value)
        with self._lock:
            rows = self._query_legacy("SELECT size, mtime_ns, sha256 FROM file_hashes WHERE path = ?", [str(real)])
        if rows and rows[0][0] == stat.st_size and rows[0][1] == stat.st_mtime_ns:
            return rows[0][2]
        digest = sha256_file(real)
        with self._writing():
            self._append([(key, Record(FILE_HASH_KIND, None, canonical_json(spec), canonical_json(digest)))])
        return digest

    # -- upkeep ----------------------------------------------------------------------------------------------

    def _sweep_tmp(self) -> None:
        """Remove staging leftovers of writers that have ended (same host), or that are a day old (other hosts)."""
        now = time.time()
        for leftover in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                gone = writer_gone(leftover.name)
                if gone or (gone is None and now - leftover.lstat().st_mtime > FOREIGN_TMP_SECONDS):
                    shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

    def _is_sealed(self, name: str) -> bool:
        """A segment that will never grow again: its writer closed it or has ended, or it has been idle longer than
        a writer ever waits before starting a new segment."""
        if name.endswith(SEALED_SEGMENT) or writer_gone(name):
            return True
        try:
            return time.time() - (self.index / name).stat().st_mtime > SEGMENT_SEALED_SECONDS
        except FileNotFoundError:
            return False

    def _sealed_segments(self) -> list[str]:
        return [n for n in sorted(os.listdir(self.index)) if n.endswith(SEGMENT) and self._is_sealed(n)]

    def compact(self, merge_runs: bool = False) -> int:
        """Fold finished segments (and, past MERGE_MAX_RUNS, the compacted files) into one new immutable file."""
        with self._file_lock(self.locks / "index-compact.lock", blocking=False) as held:
            if not held:
                return 0  # another process is compacting
            with self._lock:
                self._refresh()
                sealed = self._sealed_segments()
                runs = sorted(self._runs) if merge_runs or len(self._runs) >= MERGE_MAX_RUNS else []
                if not sealed and len(runs) < 2:
                    return 0
                records: dict[str, Record] = {}
                for name in runs:
                    records.update(_run_records(self._runs[name]))
                for name in sealed:
                    records.update(_segment_records(self.index / name))
                with self._writing():
                    self._write_run(records)
                self._drop(runs, sealed)
                return len(sealed)

    def _write_run(self, records: dict[str, Record]) -> None:
        staging = self._tmp_name("run")
        db = sqlite3.connect(staging)
        try:
            db.execute("PRAGMA journal_mode=OFF")
            db.execute(_RUN_SCHEMA)
            db.executemany("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?)",
                           (record.row(key) for key, record in records.items()))
            db.commit()
        finally:
            db.close()
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(staging, 0o666 & ~current_umask())
        os.rename(staging, self.index / f"run-{time.time_ns():020d}-{secrets.token_hex(3)}.sqlite")

    def _drop(self, runs: list[str], segments: list[str]) -> None:
        """Delete index files whose records a newer compacted file now holds (it was renamed in first)."""
        for name in runs:
            connection = self._runs.pop(name, None)
            if connection is not None:
                connection.close()
        self._forget_segments(set(segments))
        for name in [*runs, *segments]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.index / name)
        self._refresh()

    def reindex(self) -> IndexReport:
        """Rebuild the index from the object folders; entries of the legacy index.sqlite are moved into folders.

        Safe while others write: only finished segments and compacted files that existed before the scan are
        replaced (their records all point at folders the scan sees); live writers' segments stay.
        """
        report = IndexReport()
        with self._file_lock(self.locks / "index-compact.lock", blocking=True), self._lock, self._writing():
            self._refresh()
            runs, sealed = sorted(self._runs), self._sealed_segments()
            caches = {k: r for name in runs for k, r in _run_records(self._runs[name]).items()
                      if r.kind.startswith("_")}
            for name in sealed:
                caches.update({k: r for k, r in _segment_records(self.index / name).items() if r.kind.startswith("_")})
            legacy = {key: Record(kind, path, spec, value) for key, kind, path, spec, value in
                      self._query_legacy("SELECT key, kind, path, spec, value FROM entries", [])}
            records: dict[str, Record] = dict(caches)
            for folder in _object_folders(self.objects):
                self._index_folder(folder, legacy, records, report)
            by_kind: dict[str, list[tuple[str, Record]]] = {}
            for key, record in legacy.items():
                if record.path is None and key not in records:
                    by_kind.setdefault(record.kind, []).append((key, record))
            for kind, items in by_kind.items():
                for start in range(0, len(items), LEGACY_BATCH):
                    records.update(self._migrate_values(kind, items[start:start + LEGACY_BATCH]))
                    report.migrated += len(items[start:start + LEGACY_BATCH])
                    report.values += len(items[start:start + LEGACY_BATCH])
            self._write_run(records)
            self._drop(runs, sealed)
        log.info("store: %s", report.line())
        return report

    def _index_folder(self, folder: Path, legacy: dict[str, Record], records: dict[str, Record],
                      report: IndexReport) -> None:
        kind, rel = folder.parent.parent.name, folder.relative_to(self.root).as_posix()
        own = _read_entry(folder)
        if own is not None and own.get("key") == folder.name:
            problem = _problem(folder, own["files"])
            if problem is not None:
                self._discard_damaged(kind, folder.name, folder, problem)
                report.damaged.append(f"{kind} {folder.name}: {problem}")
            elif (folder / VALUES_FILE).is_file():
                values = _values_in(folder, kind)
                records.update(values)
                report.values += len(values)
            else:
                value = own.get("value")
                records[folder.name] = Record(kind, rel, (folder / SPEC_FILE).read_text(),
                                              None if value is None else canonical_json(value), own["files"])
                report.files += 1
            return
        old = legacy.get(folder.name)
        if old is not None and old.path == rel and (folder / SPEC_FILE).is_file():
            files = _manifest(folder)  # the folder as it is now becomes its manifest
            entry = {"key": folder.name, "kind": kind, "value": None if old.value is None else json.loads(old.value),
                     "files": files}
            partial = self._tmp_name("entry")
            partial.write_text(canonical_json(entry))
            with contextlib.suppress(FileNotFoundError):
                os.replace(partial, folder / ENTRY_FILE)
                records[folder.name] = Record(kind, rel, old.spec, old.value, files)
                report.files += 1
                report.migrated += 1
                return
            partial.unlink(missing_ok=True)
        report.orphans += 1

    def _migrate_values(self, kind: str, items: list[tuple[str, Record]]) -> dict[str, Record]:
        keys = [key for key, _ in items]
        batch = _batch_key(kind, keys)
        staging = self._staging()
        try:
            (staging / VALUES_FILE).write_text("".join(
                f'{{"key":"{key}","spec":{r.spec},"value":{r.value or "null"}}}\n' for key, r in items))
            _write_entry_files(staging, batch, kind, {"product": "values", "kind": kind, "keys": keys}, None,
                               {"values": len(items)})
            self._place(staging, _rel(kind, batch), batch)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return dict(items)

    def verify(self) -> list[str]:
        """Check every file against its recorded sha256 (``get`` checks sizes only); damaged products are removed."""
        damaged: list[str] = []
        for folder in _object_folders(self.objects):
            own = _read_entry(folder)
            if own is None or own.get("key") != folder.name:
                continue
            problem = _problem(folder, own["files"], hashes=True)
            if problem is not None:
                kind = folder.parent.parent.name
                self._discard_damaged(kind, folder.name, folder, problem)
                damaged.append(f"{kind} {folder.name}: {problem}")
        return damaged


# -- helpers of the folder layout ---------------------------------------------------------------------------------


def _rel(kind: str, key: str) -> str:
    return f"objects/{kind}/{key[:2]}/{key}"


def _batch_key(kind: str, keys: list[str]) -> str:
    return key_of({"product": "values", "kind": kind, "keys": keys})


def _kind_matches(kind: str, wanted: str | None) -> bool:
    return kind == wanted if wanted is not None else not kind.startswith("_")


def _write_entry_files(staging: Path, key: str, kind: str, spec: Any, value: Any,
                       extra: dict[str, Any] | None = None) -> dict[str, list[Any]]:
    (staging / SPEC_FILE).write_text(canonical_json(spec))
    files = _manifest(staging)
    (staging / ENTRY_FILE).write_text(canonical_json({"key": key, "kind": kind, "value": value, "files": files,
                                                      **(extra or {})}))
    return files


def _values_in(folder: Path, kind: str) -> dict[str, Record]:
    """The values of a batch folder, if it is complete."""
    own = _read_entry(folder)
    if own is None or own.get("key") != folder.name or _problem(folder, own["files"]) is not None:
        return {}
    records: dict[str, Record] = {}
    with contextlib.suppress(OSError):
        for line in (folder / VALUES_FILE).read_text().splitlines():
            item = json.loads(line)
            records[item["key"]] = Record(kind, None, canonical_json(item["spec"]), canonical_json(item["value"]))
    return records


def _object_folders(objects: Path) -> Iterator[Path]:
    for kind in sorted(p for p in objects.iterdir() if p.is_dir()):
        for prefix in sorted(p for p in kind.iterdir() if p.is_dir()):
            yield from sorted(p for p in prefix.iterdir() if p.is_dir())


def _open_run(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.as_uri()}?immutable=1", uri=True, check_same_thread=False)


def _run_records(connection: sqlite3.Connection) -> dict[str, Record]:
    return {key: Record(kind, path, spec, value, json.loads(files) if files else None)
            for key, kind, path, spec, value, files in
            connection.execute("SELECT key, kind, path, spec, value, files FROM entries")}


def _segment_records(path: Path) -> dict[str, Record]:
    records: dict[str, Record] = {}
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as handle:
        for raw in handle.read().split(b"\n")[:-1]:
            if _LINE.fullmatch(raw):
                with contextlib.suppress(ValueError, KeyError):
                    key, record = Record.parse(raw)
                    records[key] = record
    return records


def _corrupt(error: sqlite3.DatabaseError) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    return code in _SQLITE_CORRUPT or (code is None and not isinstance(error, sqlite3.OperationalError))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file outside the store (results, leaderboard) so that readers never see half of it.

    The file gets the mode a plain ``open`` would give under the user's umask (mkstemp alone leaves 0600, which a
    group sharing one results folder cannot read).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as error:
        raise _file_error(error, path) from None
    try:
        with os.fdopen(handle, "wb") as out:
            os.fchmod(out.fileno(), 0o666 & ~current_umask())
            out.write(data)
        os.replace(tmp_name, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(error, OSError):
            raise _file_error(error, path) from None
        raise


def _file_error(error: OSError, path: Path) -> Exception:
    return write_error(error, str(path.parent), f"write to another folder (results.dir=..., or the option naming "
                                                f"{path.name})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.store", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["reindex", "verify", "compact"],
                        help="reindex: rebuild the index from the object folders; verify: check every file's sha256 "
                             "and remove damaged products (rebuilt on the next run); compact: fold finished index "
                             "segments into one file")
    parser.add_argument("root", nargs="?", default="store", help="the store folder (default: store)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        store = Store(args.root)
        if args.command == "reindex":
            print(store.reindex().line())
        elif args.command == "verify":
            damaged = store.verify()
            print(f"verified: {len(damaged)} damaged products removed" + "".join(f"\n  {d}" for d in damaged))
        else:
            print(f"compacted {store.compact(merge_runs=True)} segments")
    except HarnessError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
