"""The segmentation output: Parquet part files, one row per input image.

The input listing is cut, in order, into parts of R rows (``--rows-per-file``): part k is
inputs k*R .. (k+1)*R-1 and is written as ``part-{k:06d}.parquet``, whole and atomically.
Each part file's footer holds the schema version and a few facts about its rows
(:func:`footer`), so resuming and summarising never need to read the rows.

The same files are the training-data form (:mod:`maskrcnn.labels`): predictions (``model``
set, instances with scores) are pseudo-labels, and ground truth converted from COCO
(:mod:`maskrcnn.convert`) has ``model`` null. Beside the part files, ``_categories.json``
holds the categories as COCO writes them (ids, names, keypoint names and skeleton), so
nothing scans the rows to learn them, and the **orientation** of the rows' coordinates
(``width``, ``height``, boxes, masks, keypoints): :data:`DISPLAYED`, the picture with its EXIF
orientation applied (the segmentation job labels what a person sees), or :data:`STORED`, the
pixels as the file stores them (ground truth converted from COCO, whose sizes and coordinates
are the stored pixels). Training and validation decode each image in its source's orientation.
A ``_categories.json`` written before it said so has no ``orientation``; its rows are read by
:func:`maskrcnn.labels.row_orientation` (``model`` set: displayed; null: stored).

Every file of an output is named here: the parts, ``_job.json`` (what made them),
``_categories.json``, ``_summary.json`` and, last, ``_SUCCESS``; and in an incremental labels
dataset (:mod:`maskrcnn.incremental`), its ``run-*`` folders with their ``_inputs.parquet``
and ``_retried.parquet``. Readers take the dataset's root and see each image's newest row.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from maskrcnn import storage
from maskrcnn.keypoints import KeypointSpec

SCHEMA_VERSION = "3"  # 2: instances have keypoints; 3: and iscrowd (ground truth), and _categories.json
MASK = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
INSTANCE = pa.struct(
    [
        ("category_id", pa.int32()),
        ("category", pa.string()),
        ("score", pa.float32()),
        ("bbox", pa.list_(pa.float32())),  # COCO [x, y, w, h] in pixels, in the source's orientation
        ("mask", MASK),  # COCO compressed RLE; size = [height, width]; null for Keypoint R-CNN
        # K [x, y, score] in pixels, in the source's orientation (score: the heatmap's logit);
        # null for models without keypoints. The names and skeleton are in the checkpoint.
        # K [x, y, v] in ground truth (v: COCO's visibility, 0 unlabelled).
        ("keypoints", pa.list_(pa.list_(pa.float32(), 3))),
        ("iscrowd", pa.bool_()),  # ground truth's crowd regions (evaluated, not trained on); null in predictions
    ]
)
SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("width", pa.int32()),  # in the source's orientation; null when the image could not be read
        ("height", pa.int32()),
        ("instances", pa.list_(INSTANCE)),
        ("model", pa.string()),  # the model that predicted the row; null in ground truth
        ("error", pa.string()),  # null when processed; else "kind: message"
    ],
    metadata={"maskrcnn.schema_version": SCHEMA_VERSION},
)
JOB = "_job.json"  # beside the part files: what made them (input, model, rows per file, keypoints)
CATEGORIES = "_categories.json"  # beside the part files: {"categories": COCO categories, "orientation": ...}
SUMMARY = "_summary.json"  # written when every part has its file: the run's counts and status
SUCCESS = "_SUCCESS"  # written last, and only by a run within its error budget: the output is whole
DISPLAYED, STORED = "displayed", "stored"  # a source's orientation (see the module's docstring)
ORIENTATIONS = (DISPLAYED, STORED)
_PART = re.compile(r"part-(\d{6})\.parquet")
RUN = re.compile(r"run-\d{8}T\d{6}Z")  # an incremental run's folder, named by its UTC start
RETRIED = "_retried.parquet"  # in a run's folder: the URIs it labels again (their earlier rows failed)
INPUTS = "_inputs.parquet"  # a run's manifest; "_" keeps it out of pyarrow's and pandas' reads
# Error kinds that a later incremental run retries (up to --max-attempts rows an image):
# the bytes may be fine next time. Every other kind (corrupt, not_an_image, too_large, ...) is permanent.
TRANSIENT_ERRORS = ("missing", "read_failed", "inference_failed", "out_of_memory")
FOOTER_KEY = b"maskrcnn.stats"  # named before the word "footer" was; kept so existing outputs resume


def row(uri: str, size: tuple[int, int], result: list[dict[str, Any]] | str, model: str) -> dict[str, Any]:
    """One image's row of :data:`SCHEMA`: its instances, or the error (a string) that stopped it.
    ``size`` is the image's ``(height, width)``."""
    failed = isinstance(result, str)
    return {
        "uri": uri,
        "width": None if failed else size[1],
        "height": None if failed else size[0],
        "instances": [] if failed else result,
        "model": model,
        "error": result if failed else None,
    }


def part_uri(output: str, part: int) -> str:
    return storage.join(output, f"part-{part:06d}.parquet")


def error_kind(error: str | None) -> str | None:
    return error.split(":", 1)[0] if error else None


def footer(table: pa.Table) -> dict[str, Any]:
    """What a part file's footer records: counts for the summary, and the part's first and
    last URI, so that a resumed run can tell whether its listing still cuts the input the same way."""
    uris = table.column("uri")
    errors: Counter = Counter()
    examples: dict[str, str] = {}  # the first URI of each error kind, for the error budget's message
    for uri, error in zip(uris.to_pylist(), table.column("error").to_pylist()):
        if error:
            errors[error_kind(error)] += 1
            examples.setdefault(error_kind(error), uri)
    instances = sum(len(v) for v in table.column("instances").to_pylist())
    return {
        "rows": table.num_rows,
        "errors": dict(errors),
        "error_examples": examples,
        "instances": instances,
        "first_uri": uris[0].as_py(),
        "last_uri": uris[-1].as_py(),
    }


def write_part(output: str, part: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Write one part file atomically; return its :func:`footer`."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    facts = footer(table)
    table = table.replace_schema_metadata({**SCHEMA.metadata, FOOTER_KEY: json.dumps(facts).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(part_uri(output, part), buf.getvalue())
    return facts


def write_categories(output: str, categories: list[dict[str, Any]], orientation: str = DISPLAYED) -> None:
    """Write ``_categories.json``: the categories and the rows' orientation, :data:`DISPLAYED`
    for the segmentation job's labels, :data:`STORED` for ``jobs/coco_to_parquet.py``'s."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    text = json.dumps({"categories": categories, "orientation": orientation}, indent=1)
    storage.write_text(storage.join(output, CATEGORIES), text)


def read_categories(output: str) -> list[dict[str, Any]] | None:
    """The categories beside an output's part files, or None where there is no ``_categories.json``."""
    meta = read_meta(output)
    return None if meta is None else meta["categories"]


def read_meta(output: str) -> dict[str, Any] | None:
    """``_categories.json`` as written: ``categories``, and ``orientation`` (unchecked; absent
    where it was written before it said); None where there is none."""
    uri = storage.join(output, CATEGORIES)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def job_record(input: str, model_id: str, rows_per_file: int, keypoints: KeypointSpec | None) -> dict[str, Any]:
    """What ``_job.json`` records of a segmentation job (an incremental dataset adds ``incremental``)."""
    return {
        "input": input,
        "model": model_id,
        "rows_per_file": rows_per_file,
        "schema_version": SCHEMA_VERSION,
        "keypoints": keypoints.as_dict() if keypoints else None,
    }


def read_job(output: str) -> dict[str, Any]:
    """An output's ``_job.json`` (see :func:`job_record`), or {} where there is none."""
    record = storage.join(output, JOB)
    return json.loads(storage.read_text(record)) if storage.exists(record) else {}


def write_job(output: str, record: dict[str, Any]) -> None:
    storage.write_text(storage.join(output, JOB), json.dumps(record, indent=2))


def write_summary(output: str, summary: dict[str, Any], whole: bool = True) -> None:
    """``_summary.json``, then ``_SUCCESS`` when ``whole``: last, so whoever sees it sees every part."""
    storage.write_text(storage.join(output, SUMMARY), json.dumps(summary, indent=2))
    if whole:
        storage.write_text(storage.join(output, SUCCESS), "")


def read_summary(output: str) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(output, SUMMARY)))


def job_input(output: str) -> str | None:
    """The directory or prefix a segmentation output was made from (None for a manifest)."""
    source = read_job(output).get("input")
    return None if source is None or source.lower().endswith((".parquet", ".csv", ".txt")) else source


def job_keypoints(output: str) -> KeypointSpec | None:
    """The keypoint names and skeleton of the model that made a segmentation output, if it had keypoints."""
    return KeypointSpec.from_dict(read_job(output).get("keypoints"))


def count_rows(output: str) -> int:
    """The rows of a segmentation output, from the part files' footers (no row is read)."""
    return sum(
        pq.read_metadata(path, filesystem=fs).num_rows for fs, path in map(storage.filesystem, part_files(output))
    )


def part_files(output: str) -> list[str]:
    """The output's part files, in order: its own ``part-NNNNNN.parquet``, then each of its
    incremental runs' (``run-<UTC time>/part-NNNNNN.parquet``, see :mod:`maskrcnn.incremental`),
    run by run. A part file in any other folder is not the output's."""
    parts = {}
    for uri, folder, name in files(output):
        k = part_of(name)
        if k is not None and (folder == "" or RUN.fullmatch(folder)):
            parts[folder, k] = uri
    return [parts[key] for key in sorted(parts)]


def read_parts(files: list[str], columns: list[str], newest: dict[str, str] | None = None) -> Any:
    """``columns`` of part files (of one filesystem) as a Ray Data dataset, in file order;
    without the rows that ``newest`` (:func:`newest_rows`) says a later row supersedes."""
    import ray.data

    fs, _ = storage.filesystem(files[0])
    paths = [storage.filesystem(uri)[1] for uri in files]
    if not newest:
        return ray.data.read_parquet(paths, filesystem=fs).select_columns(columns)
    by_path = {uri: storage.filesystem(part)[1] for uri, part in newest.items()}

    def newest_only(batch: pa.Table) -> pa.Table:
        uris, where = batch.column("uri").to_pylist(), batch.column("path").to_pylist()
        return batch.filter(pa.array([by_path.get(u, p) == p for u, p in zip(uris, where)], pa.bool_()))

    ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True)
    return ds.map_batches(newest_only, batch_format="pyarrow").select_columns(columns)


def retry_parts(output: str) -> list[str]:
    """The part files of the incremental runs that labelled images again (with a :data:`RETRIED` list)."""
    found: dict[str, list[str]] = {}
    retried = set()
    for uri, folder, name in files(output):
        if RUN.fullmatch(folder):
            if name == RETRIED:
                retried.add(folder)
            elif part_of(name) is not None:
                found.setdefault(folder, []).append(uri)
    return [uri for folder in sorted(retried) for uri in sorted(found.get(folder, []))]


def read_columns(uri: str, columns: list[str]) -> Iterator[tuple]:
    """Rows of a Parquet file as tuples of ``columns``, a batch at a time."""
    with _open(uri) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=4096, columns=columns):
            yield from zip(*(batch.column(c).to_pylist() for c in columns))


def newest_rows(output: str) -> dict[str, str]:
    """The part file that holds the newest row of each image an incremental run labelled
    again (its earlier row failed for a passing reason, :data:`TRANSIENT_ERRORS`); a reader
    keeps only that row of it. Every other image has one row. Reads the runs' :data:`RETRIED`
    lists and, of the runs that have one, the part files' ``uri`` column: memory grows with
    the images retried, not with the dataset."""
    newest: dict[str, str] = {}
    retried: dict[str, set[str]] = {}  # a run's folder -> its RETRIED list
    for part in retry_parts(output):
        folder = part[: part.rindex("/" if storage.is_s3(part) else os.sep)]
        if folder not in retried:
            retried[folder] = {uri for (uri,) in read_columns(storage.join(folder, RETRIED), ["uri"])}
        for (uri,) in read_columns(part, ["uri"]):
            if uri in retried[folder]:
                newest[uri] = part
    return newest


def _open(uri: str) -> Any:
    fs, path = storage.filesystem(uri)
    return fs.open_input_file(path)


def files(output: str) -> Iterator[tuple[str, str, str]]:
    """``(uri, folder, name)`` of every file under ``output``; ``folder`` is relative to it
    (``""`` for the output's own files)."""
    start = len(output.rstrip("/" if storage.is_s3(output) else os.sep)) + 1
    for uri in storage.iter_files(output):
        folder, _, name = uri[start:].rpartition("/" if storage.is_s3(uri) else os.sep)
        yield uri, folder, name


def read_rows(output: str, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Stream the rows of a segmentation output, part file by part file, a batch at a time:
    memory depends on the size of a part file, never on how many there are. An image
    labelled again by a later incremental run yields only its newest row (:func:`newest_rows`)."""
    newest = newest_rows(output)
    extra = bool(newest) and columns is not None and "uri" not in columns  # read to filter, then dropped
    for uri in part_files(output):
        with _open(uri) as f:
            wanted = [*columns, "uri"] if extra else columns
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256, columns=wanted):
                for row in batch.to_pylist():
                    if newest and newest.get(row["uri"], uri) != uri:
                        continue
                    if extra:
                        del row["uri"]
                    yield row


def as_coco_annotation(inst: dict[str, Any]) -> dict[str, Any]:
    """One instance of a row -> a COCO annotation (without ids). A prediction keeps its
    ``score``; its keypoints get visibility 2 where the keypoint is drawn
    (:data:`KEYPOINT_MIN_SCORE`) and 0 elsewhere, and a Keypoint R-CNN instance (no mask)
    is its box, as pycocotools' loadRes makes a box result."""
    ann = {
        "category_id": inst["category_id"],
        "bbox": list(inst["bbox"]),
        "segmentation": dict(inst["mask"]) if inst.get("mask") else box_polygon(inst["bbox"]),
        "iscrowd": int(bool(inst.get("iscrowd"))),
    }
    points = inst.get("keypoints")
    if inst.get("score") is not None:
        ann["score"] = inst["score"]
        if points is not None:
            points = [(x, y, 2) if s > KEYPOINT_MIN_SCORE else (0, 0, 0) for x, y, s in points]
    if points is not None:
        ann["keypoints"] = [float(v) if i % 3 < 2 else int(v) for p in points for i, v in enumerate(p)]
        ann["num_keypoints"] = sum(v > 0 for v in ann["keypoints"][2::3])
    return ann


# A predicted keypoint is drawn, exported and trained on when its score (torchvision's heatmap
# logit) is above this, as detectron2's Visualizer leaves out its low-confidence keypoints.
KEYPOINT_MIN_SCORE = 0.0


def box_polygon(bbox: list[float]) -> list[list[float]]:
    x, y, w, h = bbox
    return [[x, y, x, y + h, x + w, y + h, x + w, y]]


def part_of(name: str) -> int | None:
    """The part number of a part file's name, or None for any other file."""
    match = _PART.fullmatch(name)
    return int(match.group(1)) if match else None


def runs(dataset: str) -> dict[str, set[str]]:
    """An incremental labels dataset's runs in order, each with the names of its files."""
    found: dict[str, set[str]] = {}
    for _, folder, name in files(dataset):
        if RUN.fullmatch(folder):
            found.setdefault(folder, set()).add(name)
    return dict(sorted(found.items()))


def ground_truth_uris(uri: str) -> list[str]:
    """The URIs of a part file's ground-truth rows (null ``model``). A file whose statistics
    say the column has no null (a model's output) is not read."""
    fs, path = storage.filesystem(uri)
    meta = pq.read_metadata(path, filesystem=fs)
    column = meta.schema.names.index("model")
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(column).statistics
        if stats is None or not stats.has_null_count or stats.null_count > 0:
            table = pq.read_table(path, filesystem=fs, columns=["uri", "model"])
            return table.filter(pc.is_null(table.column("model"))).column("uri").to_pylist()
    return []


def read_footer(uri: str) -> dict[str, Any]:
    """A part file's :func:`footer`, read without its rows."""
    with _open(uri) as f:
        meta = pq.read_schema(f).metadata or {}
    return json.loads(meta[FOOTER_KEY])
