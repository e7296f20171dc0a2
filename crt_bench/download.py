"""Pinned downloads for plug-ins: a file named by its sha256, fetched once into a cache and verified on every use.

Why here: plug-ins (``crt/``, ``attacks/``, ``metrics/``) must not import ``runners/``, and every weight file a
plug-in downloads needs the same steps: a user's local copy first, then the cache, then the pinned URL, the bytes
checked against the pinned sha256 before anything reads them, and one actionable line (:class:`DownloadUnavailable`,
a :class:`HarnessError`) when the file cannot be had, e.g. offline. ``runners.concepts.SourceFetcher``,
``metrics.judges.q16.fetch_q16_prompts`` and ``metrics.judges.nudenet.fetch_detector`` predate this module and still
carry their own copies of these steps.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from crt_bench.spec import HarnessError, sha256_file


class DownloadUnavailable(HarnessError):
    """A pinned file that could not be found, downloaded or verified; the message says how to supply it."""


@dataclass(frozen=True)
class PinnedFile:
    """A published file: where it is (a URL at a fixed commit), what its bytes hash to, what to call it."""

    name: str  # what the file is, for messages ("Unsafe Diffusion head 'sexual'")
    url: str
    sha256: str
    filename: str  # its name in the cache folder


def default_cache_dir(subdir: str) -> Path:
    """``$CRT_BENCH_CACHE/<subdir>`` (default ``~/.cache/crt-bench/<subdir>``), where downloads are kept."""
    return Path(os.environ.get("CRT_BENCH_CACHE", Path.home() / ".cache" / "crt-bench")) / subdir


def verified(path: Path, pinned: PinnedFile, where: str) -> Path:
    """``path`` when its sha256 is the pinned one; refuses it otherwise."""
    got = sha256_file(path)
    if got != pinned.sha256:
        raise DownloadUnavailable(f"{pinned.name} {where} has sha256 {got}, expected {pinned.sha256}: refusing to "
                                  f"use it")
    return path


def fetch_pinned(pinned: PinnedFile, cache_dir: str | Path, local_path: str | Path | None = None,
                 hint: str = "", timeout_s: float = 60.0) -> Path:
    """The verified file: ``local_path`` when given (never copied), else the cached copy, else downloaded from the
    pinned URL into ``cache_dir`` (a temporary file renamed into place once its sha256 matches).

    ``hint`` completes the failure line with how to pass a local copy (e.g. ``pass crt.params.weights=/folder``)."""
    if local_path is not None:
        path = Path(local_path).expanduser()
        if not path.is_file():
            raise DownloadUnavailable(f"{pinned.name}: no file at {path}")
        return verified(path, pinned, f"at {path}")
    target = Path(cache_dir) / pinned.filename
    if target.is_file() and sha256_file(target) == pinned.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with urllib.request.urlopen(pinned.url, timeout=timeout_s) as response:  # noqa: S310 - pinned https URL
            partial.write_bytes(response.read())
    except (urllib.error.URLError, OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        reason = getattr(error, "reason", error)
        raise DownloadUnavailable(
            f"{pinned.name} could not be downloaded from {pinned.url} ({reason}); put the file (sha256 "
            f"{pinned.sha256}) at {target}" + (f", or {hint}" if hint else "")) from None
    try:
        verified(partial, pinned, f"downloaded from {pinned.url}")
    except DownloadUnavailable:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    return target
