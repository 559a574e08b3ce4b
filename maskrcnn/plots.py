"""The report's plots, as PNG bytes (matplotlib, drawn off-screen): score histograms per
class, instances per image, and error rows by kind. Each takes counts, never rows, so the
report that feeds them holds a few numbers per class however large the output is."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np

BINS = 20  # score histogram bins over [0, 1]
MAX_CLASSES = 12  # score panels: the classes with the most instances
MAX_COUNT = 50  # instances per image: images with more are counted in the last bar


def score_bin(score: float) -> int:
    return min(int(score * BINS), BINS - 1)


def scores(histograms: dict[str, np.ndarray]) -> bytes:
    """One small histogram of instance scores per class (``histograms``: class -> counts per bin)."""
    plt = _pyplot()
    top = sorted(histograms, key=lambda c: (-histograms[c].sum(), c))[:MAX_CLASSES]
    columns = min(4, max(len(top), 1))
    rows = max(1, -(-len(top) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows), squeeze=False, sharex=True)
    edges = np.linspace(0, 1, BINS + 1)
    for ax in axes.flat[len(top) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, top):
        counts = histograms[name]
        ax.bar(edges[:-1], counts, width=1 / BINS, align="edge", color="#3b75af", edgecolor="white", linewidth=0.5)
        ax.set_title(f"{_plain(name)} ({int(counts.sum())})", fontsize=10)
        ax.set_xlim(0, 1)
        ax.yaxis.set_major_locator(_whole())
        ax.tick_params(labelsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("score", fontsize=9)
    if not top:
        axes[0, 0].text(0.5, 0.5, "no instances", ha="center", va="center")
    fig.suptitle("Instance scores by class", fontsize=11)
    return _png(fig)


def instances_per_image(counts: Counter) -> bytes:
    """How many images have 0, 1, 2, ... instances (``counts``: instances -> images)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 2.8))
    xs = list(range(0, MAX_COUNT + 1))
    ax.bar(xs, [counts.get(x, 0) for x in xs], width=0.8, color="#3b75af")
    capped = f" ({MAX_COUNT}: {MAX_COUNT} or more)" if counts.get(MAX_COUNT) else ""
    ax.set_xlabel(f"instances in the image{capped}", fontsize=9)
    ax.set_ylabel("images", fontsize=9)
    ax.yaxis.set_major_locator(_whole())
    ax.set_xlim(-0.8, max([x for x in xs if counts.get(x)] or [1]) + 0.8)
    ax.set_title("Instances per image", fontsize=11)
    return _png(fig)


def errors(kinds: Counter) -> bytes:
    """Error rows by kind, as horizontal bars."""
    plt = _pyplot()
    items = sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))
    fig, ax = plt.subplots(figsize=(6.4, 0.4 * len(items) + 1.2))
    ax.barh([_plain(k) for k, _ in items][::-1], [v for _, v in items][::-1], color="#c0504d")
    ax.set_xlabel("rows", fontsize=9)
    ax.xaxis.set_major_locator(_whole())
    ax.set_title("Error rows by kind", fontsize=11)
    return _png(fig)


def _whole():
    """Ticks at whole numbers only: the axes count images, instances and rows."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _plain(text: str) -> str:
    """``text`` as matplotlib shows it literally: a ``$`` would start mathtext."""
    return text.replace("$", r"\$")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    _pyplot().close(fig)
    return buffer.getvalue()
