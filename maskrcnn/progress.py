"""Progress lines, the same for every job: done/total, rate, elapsed time and ETA."""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def clock(seconds: float) -> str:
    """``75`` -> ``1:15``; ``3725`` -> ``1:02:05``."""
    seconds = int(max(0.0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Counts work done and prints one line at most every ``every`` seconds, and always
    when the total is reached. The ETA assumes the rate so far; with no total (a listing
    still running) the line gives the count and the rate only. ``find_total``, when given,
    is asked before each line until it answers (e.g. once a listing has finished)."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        unit: str = "images",
        every: float = 10.0,
        find_total: Callable[[], int | None] | None = None,
    ):
        self.label, self.total, self.unit, self.every, self.find_total = label, total, unit, every, find_total
        self.done, self.start, self.last, self.printed = 0, time.perf_counter(), float("-inf"), -1

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def rate(self) -> float:
        return self.done / max(self.elapsed, 1e-9)

    def add(self, n: int, note: str = "", *, quiet: bool = False) -> None:
        """Count ``n`` more; print a line when one is due, unless ``quiet`` (the caller prints
        its own lines, with :meth:`timing`)."""
        self.done += n
        if quiet:
            return
        if time.perf_counter() - self.last >= self.every or (self.total is not None and self.done >= self.total):
            self._print(note)

    def each(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, counting one as each is taken."""
        for item in items:
            yield item
            self.add(1)

    def finish(self, note: str = "") -> None:
        """The closing line, unless the last line already gave this count."""
        if self.printed != self.done:
            self._print(note)

    def _print(self, note: str) -> None:
        if self.find_total:
            found = self.find_total()
            if found is not None:
                self.total, self.find_total = found, None
        self.last, self.printed = time.perf_counter(), self.done
        sys.stdout.write(f"[{self.label}] {self.line(note)}\n")
        sys.stdout.flush()

    def line(self, note: str = "") -> str:
        """``120/500 images (24%), 3.10 images/s, elapsed 0:38, ETA 2:02`` plus ``note``."""
        if self.total:
            count = f"{self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            count = f"{self.done} {self.unit}"
        return f"{count}, {self.rate():.2f} {self.unit}/s, {self.timing()}{', ' + note if note else ''}"

    def timing(self) -> str:
        """``elapsed 0:38, ETA 2:02`` (``ETA ?`` until there is a rate to go by)."""
        text = f"elapsed {clock(self.elapsed)}"
        if self.total:
            text += f", ETA {clock((self.total - self.done) / self.rate()) if self.done else '?'}"
        return text
