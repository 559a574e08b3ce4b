"""The review queue: the N images of a segmentation output most worth a person's look.

:func:`select` reads the rows once, keeping only the N best so far (a heap: memory grows
with N, not with the output), and ranks them by :meth:`ReviewOptions.priority`. The ranking
is deterministic: equal priorities fall back to the URI, and every input has one row.
``jobs/export.py`` then writes only the queued images, in queue order, to its outputs.
"""

from __future__ import annotations

import argparse
import heapq
from dataclasses import dataclass
from typing import Any, Iterable

from maskrcnn.config import names, option

REVIEW = "review queue (every output gets only the queued images, in queue order)"
BY = ("uncertain", "crowded")


def score_range(text: str) -> tuple[float, float]:
    """``"0.3,0.7"`` -> ``(0.3, 0.7)``: 0 <= LOW < HIGH <= 1."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (two scores), got {text!r}") from None
    if not 0 <= low < high <= 1:
        raise argparse.ArgumentTypeError(f"expected 0 <= LOW < HIGH <= 1, got {text!r}")
    return low, high


@dataclass(kw_only=True)
class ReviewOptions:
    """Which images go to a person first (``jobs/export.py``'s review flags)."""

    review: int = option(
        "queue the N images most worth a person's look (see --review-by); the report lists them",
        0,
        group=REVIEW,
        metavar="N",
    )
    review_by: str = option(
        "uncertain: most instances scoring within --uncertain (then the lowest mean score); crowded: most instances",
        "uncertain",
        group=REVIEW,
        choices=BY,
    )
    uncertain: tuple[float, float] = option(
        "LOW,HIGH: the scores --review-by uncertain counts (LOW <= score < HIGH)",
        (0.3, 0.7),
        group=REVIEW,
        type=score_range,
        metavar="LOW,HIGH",
    )
    review_classes: list[str] | None = option(
        "count only these classes' instances, and queue only images that have one (comma-separated)",
        None,
        group=REVIEW,
        type=names,
        metavar="NAMES",
    )

    def __post_init__(self) -> None:
        if self.review < 0:
            raise ValueError(f"--review must be at least 0, got {self.review}")

    def counted(self, row: dict[str, Any], min_score: float) -> list[dict[str, Any]]:
        """The row's instances that the queue counts."""
        classes = set(self.review_classes or ())
        kept = [i for i in row["instances"] if i["score"] >= min_score and (not classes or i["category"] in classes)]
        if self.review_by == "uncertain":
            low, high = self.uncertain
            kept = [i for i in kept if low <= i["score"] < high]
        return kept

    def priority(self, row: dict[str, Any], min_score: float) -> tuple[tuple, int, float] | None:
        """A sort key (smaller first), the instances counted and their mean score; None when
        the row is not for review: an error row, or one with no counted instance."""
        if row["error"]:
            return None
        counted = self.counted(row, min_score)
        if not counted:
            return None
        mean = sum(i["score"] for i in counted) / len(counted)
        second = round(mean, 6) if self.review_by == "uncertain" else 0.0
        return (-len(counted), second, row["uri"]), len(counted), mean


@dataclass(frozen=True)
class Queued:
    """One image of the queue: its rank (1 first), URI, and what it was queued for."""

    rank: int
    uri: str
    counted: int  # instances counted (uncertain ones, or all, of --review-classes)
    mean_score: float  # their mean score


def select(rows: Iterable[dict[str, Any]], options: ReviewOptions, min_score: float = 0.0) -> list[Queued]:
    """The ``options.review`` rows with the smallest :meth:`ReviewOptions.priority`, ranked
    (``heapq.nsmallest`` holds N of them at a time)."""
    found = (options.priority(row, min_score) for row in rows)
    best = heapq.nsmallest(options.review, (f for f in found if f is not None), key=lambda f: f[0])
    return [Queued(rank, key[2], counted, mean) for rank, (key, counted, mean) in enumerate(best, 1)]
