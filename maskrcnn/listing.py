"""The segmentation job's input, streamed: a directory or bucket prefix listed page by page,
or a Parquet/CSV/text manifest, cut in listing order into parts of ``rows_per_file``
(part k becomes the output's ``part-{k:06d}.parquet``).

:class:`Listing` is that stream as a Ray Data source. Its one read task lists the input and
yields rows as it goes, so output starts before a listing of millions of keys ends and the
driver never holds the keys; parts already written are skipped once the listing is shown
to cut them the same way, which is what makes resuming safe.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from maskrcnn import output, storage
from maskrcnn.errors import UserError
from maskrcnn.runtime import on_this_node

MANIFEST_SUFFIXES = (".parquet", ".csv", ".txt")
KEYS = pa.schema([("part", pa.int64()), ("index", pa.int64()), ("part_rows", pa.int64())])
# Rows per block. Ray Data merges a task's output into blocks of up to the dataset's
# context.target_max_block_size bytes before passing it on; the segmentation pipeline lowers
# that to BLOCK_BYTES so that listing blocks leave as they are made (the output starts at
# once) and each decode task takes a few batches of images.
BLOCK_ROWS = 64
BLOCK_BYTES = 1 << 12


class ListingError(UserError):
    """An input that cannot be listed as given, or that changed since a resumed run began."""


def is_empty(uri: str, extensions: tuple[str, ...] | None) -> bool:
    """Whether the input holds no image, from its first page (one LIST request, or a
    manifest's first batch): the job checks this before any actor starts, not by listing it all."""
    return next(input_uris(uri, extensions, None), None) is None


def input_uris(uri: str, extensions: tuple[str, ...] | None, limit: int | None) -> Iterator[str]:
    """The input's URIs in listing order: a manifest's rows, or the files under a directory
    or prefix with one of ``extensions`` (None keeps every file)."""
    if uri.lower().endswith(MANIFEST_SUFFIXES):
        if not storage.exists(uri):
            raise ListingError(f"manifest not found: {uri}")
        uris = _manifest(uri)
    else:
        if not storage.is_s3(uri):
            storage.check_readable_dir(uri)
        uris = storage.iter_files(uri, extensions)
    return itertools.islice(uris, limit) if limit else uris


def _manifest(uri: str) -> Iterator[str]:
    """Stream the ``uri`` column (or the first column) of a Parquet, CSV or text manifest."""
    fs, path = storage.filesystem(uri)
    if uri.lower().endswith(".parquet"):
        pf = pq.ParquetFile(fs.open_input_file(path))
        column = "uri" if "uri" in pf.schema_arrow.names else pf.schema_arrow.names[0]
        batches = pf.iter_batches(columns=[column])
    else:
        text = uri.lower().endswith(".txt")
        batches = pacsv.open_csv(
            fs.open_input_stream(path),
            read_options=pacsv.ReadOptions(column_names=["uri"] if text else None),
            parse_options=pacsv.ParseOptions(delimiter="\t" if text else ",", quote_char=False if text else '"'),
        )
    for batch in batches:
        col = batch.column("uri") if "uri" in batch.schema.names else batch.column(0)
        yield from (storage.absolute(u.strip()) for u in col.to_pylist() if u and u.strip())


def parts(uris: Iterator[str], rows_per_file: int) -> Iterator[tuple[int, list[str]]]:
    """``(k, the URIs of part k)`` in listing order."""
    for k in itertools.count():
        chunk = list(itertools.islice(uris, rows_per_file))
        if not chunk:
            return
        yield k, chunk


def start_tally() -> Any:
    """A :class:`Tally` actor on the driver's own node (:func:`maskrcnn.runtime.on_this_node`)."""
    return Tally.options(**on_this_node()).remote()


@ray.remote(num_cpus=0)
class Tally:
    """Where the listing task reports what it listed, when it ends, for the driver to ask:
    ``{"images": N, "part_files": K}``, or None before the end."""

    def __init__(self) -> None:
        self.listed: dict[str, int] | None = None

    def set(self, images: int, part_files: int) -> None:
        self.listed = {"images": images, "part_files": part_files}

    def get(self) -> dict[str, int] | None:
        return self.listed


def reporter(tally: Any) -> Callable[[int, int], None]:
    """What the listing task calls when it ends: tell ``tally`` (a :class:`Tally`), and wait
    until it has been told, so the driver never asks too early."""
    return functools.partial(_tell, tally)


def _tell(tally: Any, images: int, part_files: int) -> None:
    ray.get(tally.set.remote(images, part_files))


class Uris(Datasource):
    """The input's URIs as a Ray Data source of ``uri`` rows, from one read task that lists
    it (what :mod:`maskrcnn.incremental` joins against the labels already written)."""

    def __init__(
        self, input: str, extensions: tuple[str, ...] | None, report: Callable[[int, int], None] | None = None
    ):
        super().__init__()
        self.input, self.extensions, self.report = input, extensions, report

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        return [
            ReadTask(self._blocks, BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None))
        ]

    def _blocks(self) -> Iterator[pa.Table]:
        uris, listed = input_uris(self.input, self.extensions, None), 0
        while chunk := list(itertools.islice(uris, 16 * BLOCK_ROWS)):
            listed += len(chunk)
            yield pa.table({"uri": chunk})
        if self.report is not None:
            self.report(listed, 0)


class Listing(Uris):
    """The input as a Ray Data source of ``(part, index, part_rows, uri)`` rows.

    ``written`` maps each part already in the output to its footer (see
    :func:`maskrcnn.output.footer`); those parts are checked and skipped. When the
    listing ends it calls ``report(images, part_files)`` (see :func:`reporter`)."""

    def __init__(
        self,
        input: str,
        extensions: tuple[str, ...] | None,
        limit: int | None,
        rows_per_file: int,
        output: str,
        written: dict[int, dict],
        report: Callable[[int, int], None],
    ):
        super().__init__(input, extensions, report)
        self.limit, self.rows_per_file, self.output = limit, rows_per_file, output
        self.written = {k: (f["rows"], f["first_uri"], f["last_uri"]) for k, f in written.items()}

    def _blocks(self) -> Iterator[pa.Table]:
        """Blocks of BLOCK_ROWS rows, which may span parts, so that small part files do not
        make small tasks."""
        count = listed = 0
        block: dict[str, list] = {name: [] for name in [*KEYS.names, "uri"]}
        for k, chunk in parts(input_uris(self.input, self.extensions, self.limit), self.rows_per_file):
            count, listed = count + 1, listed + len(chunk)
            if k in self.written:
                if self.written[k] != (len(chunk), chunk[0], chunk[-1]):
                    raise self._changed(k)
                continue
            for i, uri in enumerate(chunk):
                for name, value in zip(block, (k, i, len(chunk), uri)):
                    block[name].append(value)
                if len(block["uri"]) == BLOCK_ROWS:
                    yield pa.table(block)
                    block = {name: [] for name in block}
        if block["uri"]:
            yield pa.table(block)
        beyond = sorted(k for k in self.written if k >= count)
        if beyond:
            raise self._changed(beyond[0])
        self.report(listed, count)

    def _changed(self, part: int) -> ListingError:
        return ListingError(
            f"the input listing changed since {output.part_uri(self.output, part)} was written "
            "(files added or removed); resume needs the same input: pass --incremental to label only the new "
            "images, as a run of their own, or --overwrite, or a new --output"
        )
