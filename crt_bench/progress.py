"""Progress of the long loops: a fit's steps, an attack's targets, with a rate and the current loss or fitness.

Why a bar the runner opens and the loop only reports to: a plug-in then needs neither ``progress=false`` nor tqdm.
The runner opens one bar around a fit or an attack (:func:`bar`, disabled under ``progress=false``); the loop
inside calls :func:`step` once per unit the bar counts (a fit's optimiser step or epoch; an attack's target, which
:func:`attacks.base.search_each` counts) and :func:`show` with the numbers to watch (a search's loss or fitness).
Outside such a bar (a test, a notebook) both do nothing, so reporting never changes what a plug-in computes: pass
values already computed as Python numbers. Plug-ins call them as ``progress.step(...)`` after
``from crt_bench import progress`` (``step`` is often a loop variable).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

REFRESH_S = 0.5  # the least time between two redraws for new values alone


@dataclass
class Progress:
    """One bar, made on first use: a fit that reports nothing (a closed form) shows none."""

    desc: str
    unit: str = "step"
    total: int | None = None
    enabled: bool = True
    values: dict[str, Any] = field(default_factory=dict)
    _bar: Any = None
    _drawn: float = 0.0

    def _ensure(self) -> Any:
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, dynamic_ncols=True)
        return self._bar

    @property
    def n(self) -> int:
        return 0 if self._bar is None else int(self._bar.n)

    def step(self, n: int = 1, total: int | None = None, **values: Any) -> None:
        """Count ``n`` more units (of ``total``, when the loop knows it first) and show ``values``."""
        if not self.enabled:
            return
        drawn = self._ensure()
        if total is not None and drawn.total != total:
            drawn.total = total
        self.values.update(values)
        if self.values:
            drawn.set_postfix(self.values, refresh=False)
        drawn.update(n)

    def show(self, **values: Any) -> None:
        """Show ``values`` (the current loss of a search inside a step), redrawn at most every REFRESH_S."""
        if not self.enabled:
            return
        drawn = self._ensure()
        self.values.update(values)
        drawn.set_postfix(self.values, refresh=False)
        now = time.monotonic()
        if now - self._drawn >= REFRESH_S:
            self._drawn = now
            drawn.refresh()

    def reach(self, n: int) -> None:
        """Count up to ``n`` units: what the runner knows is done when the loop did not count it."""
        if self.enabled and n > self.n:
            self.step(n - self.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


_ACTIVE: ContextVar[Progress | None] = ContextVar("crt_bench_progress", default=None)


@contextmanager
def bar(desc: str, total: int | None = None, unit: str = "step", enabled: bool = True) -> Iterator[Progress]:
    """The bar that :func:`step` and :func:`show` report to while the block runs; drawn at once when ``total`` is
    known, else at the first report."""
    opened = Progress(desc, unit, total, enabled)
    if enabled and total is not None:
        opened._ensure()
    token = _ACTIVE.set(opened)
    try:
        yield opened
    finally:
        _ACTIVE.reset(token)
        opened.close()


def step(n: int = 1, total: int | None = None, **values: Any) -> None:
    """Count ``n`` units of the bar the runner opened, if any, and show ``values`` beside it."""
    active = _ACTIVE.get()
    if active is not None:
        active.step(n, total, **values)


def show(**values: Any) -> None:
    """Show ``values`` beside the bar the runner opened, if any, without counting a unit."""
    active = _ACTIVE.get()
    if active is not None:
        active.show(**values)
