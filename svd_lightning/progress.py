"""Progress that shows up in log files, not only on terminals.

tqdm redraws one line with carriage returns: piped to a file, a 40-minute run shows nothing useful
until it ends. When stderr is not a terminal we print a plain line (count, rate, ETA) at most every
``SVD_PROGRESS_SECONDS`` seconds (default 30) instead; on a terminal tqdm is used as usual. Lightning's own
progress bar in that form is :class:`svd_lightning.callbacks.progress.LogProgressBar`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def interval_seconds() -> float:
    """``SVD_PROGRESS_SECONDS`` (default 30; 0: every update), else an error naming the variable."""
    text = os.environ.get("SVD_PROGRESS_SECONDS", "30")
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise ValueError(f"SVD_PROGRESS_SECONDS must be a number of seconds ≥ 0, got {text!r} "
                         "(unset it for the default of 30)")
    return value


def stderr_is_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def progress_line(desc: str, done: int, total: int | None, elapsed: float, unit: str = "it") -> str:
    """``desc: 40/163 batch (24.5%) | 1.23 batch/s | elapsed 0:32 | ETA 1:40``."""
    rate = done / elapsed if elapsed > 0 else 0.0
    count = f"{done}/{total} {unit} ({100 * done / total:.1f}%)" if total else f"{done} {unit}"
    line = f"{desc}: {count} | {rate:.3g} {unit}/s | elapsed {_clock(elapsed)}"
    if total and rate > 0:
        line += f" | ETA {_clock((total - done) / rate)}"
    return line


class PlainProgress:
    """Counts work and prints :func:`progress_line` every ``interval`` seconds and at the end."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", interval: float | None = None,
                 enabled: bool = True, stream=None):
        self.desc, self.total, self.unit, self.enabled = desc, total, unit, enabled
        self.interval = interval_seconds() if interval is None else interval
        self.stream = stream
        self.done = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            self.emit()

    def emit(self) -> None:
        print(progress_line(self.desc, self.done, self.total, time.monotonic() - self.start, self.unit),
              file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.done:
            self.emit()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(desc: str, total: int | None = None, unit: str = "it", enabled: bool = True):
    """tqdm on a terminal, :class:`PlainProgress` lines otherwise; both have ``update``/``close``."""
    if stderr_is_terminal():
        return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not enabled)
    return PlainProgress(desc, total, unit, enabled=enabled)


def track(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it", enabled: bool = True) -> Iterator[T]:
    """Iterate with :func:`progress_bar`; an item counts as done once the loop body has run."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with progress_bar(desc, total, unit, enabled) as bar:
        for item in iterable:
            yield item
            bar.update()
