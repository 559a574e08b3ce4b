"""The functions of the training dataset's Ray Data tasks, in a module that imports no torch.

Ray pickles a dataset's functions by reference, and every process that unpickles the
dataset imports their module: Ray Train's controller, its dataset manager and the split
coordinator, as well as the data tasks. A function of :mod:`maskrcnn.data` would make each
of them import torch and torchvision first (seconds a process, at every training start);
these import them only in the data tasks, where the work needs them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class LoadExample:
    """Fetch, decode and shrink one record to the largest training scale
    (:func:`maskrcnn.data.load_example` with :func:`maskrcnn.transforms.resize_transform`, which
    leaves smaller images as they are): the training dataset's map function."""

    size: int
    max_size: int

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        from maskrcnn import data

        return data.load_example(record, transform=_transform(self.size, self.max_size))


@functools.lru_cache(maxsize=4)
def _transform(size: int, max_size: int):
    from maskrcnn import transforms

    return transforms.resize_transform(size, max_size, shrink_only=True)


def shuffle_window(table: pa.Table, seed: int) -> pa.Table:
    """One window of cleaned records, the dropped ones left out, in an order seeded by the
    seed and the window itself (its first image id and its size), so the same blocks give
    the same order on every run."""
    table = table.filter(pc.equal(table.column("drops"), "")).drop_columns(["drops"])
    if table.num_rows == 0:
        return table
    rng = np.random.default_rng([seed, int(table.column("image_id")[0].as_py()), table.num_rows])
    return table.take(pa.array(rng.permutation(table.num_rows)))
