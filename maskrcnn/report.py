"""A browsable report of a segmentation output: one static HTML page (no server, no
JavaScript) with the summary, plots (:mod:`maskrcnn.plots`), drawn images with their
instance tables, the review queue, and the error rows.

:class:`Report` is a sink like those of :mod:`maskrcnn.export`: it counts every row, draws
the first few (or, with a review queue, the queued ones), keeps the first error rows, and
writes ``index.html`` beside its pictures and plots when closed.
"""

from __future__ import annotations

import contextlib
import html
import urllib.parse
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from maskrcnn import export, masks, output, plots, storage
from maskrcnn.keypoints import KeypointSpec
from maskrcnn.review import Queued

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: left; vertical-align: top; }
td.n { text-align: right; }
figure { display: inline-block; margin: 0 1.5em 1.5em 0; vertical-align: top; }
figure img { max-width: 640px; display: block; }
img.plot { display: block; max-width: 100%; margin: .5em 0 1.5em; }
figcaption { font-family: monospace; word-break: break-all; max-width: 640px; }
"""


class Report(contextlib.AbstractContextManager):
    def __init__(
        self,
        directory: str,
        source: str,
        *,
        pictures: int = 24,
        root: str | None = None,
        min_score: float = 0.0,
        max_errors: int = 1000,
        max_side: int = 640,
        keypoints: KeypointSpec | None = None,
        queue: list[Queued] | None = None,
    ):
        self.directory, self.source, self.root, self.min_score = directory, source, root, min_score
        self.queue = queue
        self.rank = {q.uri: q.rank for q in queue or []}
        self.max_errors = max_errors
        self.pictures = export.Pictures(
            pictures,
            storage.join(directory, "pictures"),
            root=root,
            max_side=max_side,
            min_score=min_score,
            keypoints=keypoints,
        )
        self.images, self.instances, self.errors, self.classes = 0, 0, Counter(), Counter()
        self.error_rows: list[tuple[str, str]] = []
        self.figures: dict[int, str] = {}  # by rank in the queue, or in the order drawn
        self.pictured: dict[str, str] = {}  # URI -> picture name
        self.scores: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(plots.BINS, np.int64))
        self.per_image: Counter = Counter()

    def add(self, row: dict[str, Any]) -> None:
        self.images += 1
        if row["error"]:
            self.errors[output.error_kind(row["error"])] += 1
            if len(self.error_rows) < self.max_errors:
                self.error_rows.append((export.printable(row["uri"]), export.printable(row["error"])))
            return
        kept = [i for i in row["instances"] if i["score"] >= self.min_score]
        self.instances += len(kept)
        self.classes.update(i["category"] for i in kept)
        self.per_image[min(len(kept), plots.MAX_COUNT)] += 1
        for i in kept:
            self.scores[i["category"]][plots.score_bin(i["score"])] += 1
        if self.queue is not None and row["uri"] not in self.rank:
            return
        name = self.pictures.add(row)
        if name:
            self.pictured[row["uri"]] = name
            self.figures[self.rank.get(row["uri"], len(self.figures))] = self._figure(row, kept, name)

    def _figure(self, row: dict[str, Any], kept: list[dict], name: str) -> str:
        """The HTML of the picture :class:`maskrcnn.export.Pictures` has just drawn as ``name``,
        and its instances. The link is percent-encoded, so ``#``, ``?`` and ``%`` in a name are
        part of the file's name, not a fragment or a query."""
        rows = [
            (
                i["category"],
                f"{i['score']:.3f}",
                ", ".join(f"{v:.0f}" for v in i["bbox"]),
                f"{masks.area(i['mask']):.0f}" if i.get("mask") else "none",
            )
            for i in sorted(kept, key=lambda i: -i["score"])
        ]
        table = _table(("category", "score", "box x, y, w, h", "mask area"), rows)
        uri = export.printable(row["uri"])
        return (
            f'<figure><img src="{html.escape(urllib.parse.quote("pictures/" + name))}" alt="{html.escape(uri)}">'
            f"<figcaption>{html.escape(uri)}</figcaption>{table}</figure>"
        )

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            storage.write_bytes(storage.join(self.directory, "scores.png"), plots.scores(dict(self.scores)))
            storage.write_bytes(
                storage.join(self.directory, "instances.png"), plots.instances_per_image(self.per_image)
            )
            if self.errors:
                storage.write_bytes(storage.join(self.directory, "errors.png"), plots.errors(self.errors))
            storage.write_text(storage.join(self.directory, "index.html"), self.page())

    def page(self) -> str:
        summary = [("images", self.images), ("instances", self.instances), ("error rows", sum(self.errors.values()))]
        parts = [
            f"<h1>Segmentation report</h1><p><code>{html.escape(self.source)}</code></p>",
            "<h2>Summary</h2>" + _table(("", "count"), summary),
            "<h3>Errors by kind</h3>" + _table(("kind", "rows"), sorted(self.errors.items())),
            "<h3>Instances by category</h3>" + _table(("category", "instances"), self.classes.most_common()),
            "<h2>Plots</h2>"
            + _plot("scores.png", "instance scores by class")
            + _plot("instances.png", "instances per image")
            + (_plot("errors.png", "error rows by kind") if self.errors else ""),
            self._queue() if self.queue is not None else self._pictures(),
            "<h2>Errors</h2>" + _table(("URI", "reason"), self.error_rows) + self._more_errors(),
        ]
        body = "\n".join(parts)
        return (
            '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>Segmentation report: {html.escape(self.source)}</title><style>{STYLE}</style></head>"
            f"<body>\n{body}\n</body></html>\n"
        )

    def _pictures(self) -> str:
        above = f" scoring at least {self.min_score}" if self.min_score else ""
        intro = f"<h2>Pictures</h2><p>The first {len(self.figures)} images with instances{above}.</p>"
        return intro + "".join(self.figures[k] for k in sorted(self.figures))

    def _queue(self) -> str:
        rows = [(q.rank, export.printable(q.uri), q.counted, f"{q.mean_score:.3f}") for q in self.queue or []]
        intro = (
            f"<h2>Review queue</h2><p>{len(rows)} images, most worth a look first; the outputs "
            "written beside this report hold these images only.</p>"
        )
        table = _table(("rank", "URI", "instances counted", "their mean score"), rows)
        return intro + table + "<h3>Queued pictures</h3>" + "".join(self.figures[k] for k in sorted(self.figures))

    def _more_errors(self) -> str:
        more = sum(self.errors.values()) - len(self.error_rows)
        return f"<p>… and {more} more error rows, not listed.</p>" if more > 0 else ""


def _plot(name: str, alt: str) -> str:
    return f'<img class="plot" src="{name}" alt="{html.escape(alt)}">'


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    css = ' class="n"' if isinstance(value, (int, float)) else ""
    return f"<td{css}>{html.escape(str(value))}</td>"
