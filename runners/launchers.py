"""Hydra's submitit_local launcher with each job's CPU threads capped, so that jobs x threads <= cores
(``hydra/launcher=local``).

Why: submitit_local starts every job of a sweep at once, and torch gives each process all the cores by default;
two torch processes of 2 threads each on 2 cores ran 8x slower here than the same jobs one after the other. The
cap travels as ``OMP_NUM_THREADS`` (and ``MKL_NUM_THREADS``) in the jobs' environment, which torch and numpy read
when they start, so nothing inside a job changes; ``threads=N`` still sets torch's threads explicitly. Hydra's basic
launcher runs the jobs one after another in one process and needs no cap. With more jobs than cores each job gets
one thread and the jobs share the cores: submitit_local has no limit on how many jobs run at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as SubmititLocalLauncher

log = logging.getLogger(__name__)

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's or a Slurm allocation's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_job(jobs: int, cores: int, requested: str | None = None) -> int:
    """``cores // jobs``, at least 1; an ``OMP_NUM_THREADS`` the user set wins when it is smaller."""
    share = max(1, cores // max(1, jobs))
    if requested and requested.strip().isdigit() and int(requested) >= 1:
        return min(share, int(requested))
    return share


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` for the block (what processes started inside it inherit), then as before."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class ThreadCappedLocalLauncher(SubmititLocalLauncher):
    """submitit_local, each of the jobs started together given ``cores // jobs`` threads. Hydra takes launchers
    from the ``hydra_plugins`` namespace only: the preset names its subclass there
    (``hydra_plugins.crt_bench_launcher.LocalLauncher``)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        jobs, cores = len(job_overrides), available_cores()
        threads = threads_per_job(jobs, cores, os.environ.get("OMP_NUM_THREADS"))
        log.info("%d jobs at once on %d cores: %d thread(s) each", jobs, cores, threads)
        with environment({name: str(threads) for name in THREAD_VARIABLES}):
            return super().launch(job_overrides, initial_job_idx)
