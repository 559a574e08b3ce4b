"""Parquet labels, the training-data form: a directory or s3:// prefix of part files (the
rows of :data:`maskrcnn.output.SCHEMA`, one per image) with ``_categories.json`` beside them.

A source is a segmentation output (pseudo-labels: rows with ``model`` set, instances with
scores) or ground truth converted from a COCO file (:mod:`maskrcnn.convert`). Training reads
the rows with ``ray.data.read_parquet`` and turns them into training records in Ray Data
tasks (:func:`records`) by the rules that clean a COCO file
(:func:`maskrcnn.coco.clean_annotation`), once, before the first step (:func:`clean`): the
records stay in Ray's object store and only their counts reach the driver. Each epoch then
streams them in the seed's order (:func:`shuffled`).

Each record carries its source's **orientation** (``_categories.json`` says it, see
:mod:`maskrcnn.output`): ``displayed`` for a segmentation output, whose coordinates are those
of the picture with its EXIF orientation applied, ``stored`` for ground truth converted from
COCO; :func:`maskrcnn.data.load_example` decodes the image in it, so a phone photo stored
turned trains, and validates, as it was labelled. A source written before
``_categories.json`` said so is read by :func:`row_orientation`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from maskrcnn import coco, keypoints, loading, output, storage
from maskrcnn.coco import DatasetError

COLUMNS = ["uri", "width", "height", "instances", "model", "error"]


def is_labels(source: str) -> bool:
    """A COCO file ends in ``.json``; anything else names Parquet labels."""
    return not source.lower().endswith(".json")


@dataclass(frozen=True)
class Labels:
    """One source of Parquet labels, checked: its categories, part files and orientation
    (None where its ``_categories.json`` was written before it said: see :func:`row_orientation`)."""

    source: str
    categories: list[dict[str, Any]]
    files: list[str]
    orientation: str | None = None
    newest: dict[str, str] = field(default_factory=dict)  # images labelled again: see output.newest_rows


def open_labels(source: str) -> Labels:
    """Check a source of Parquet labels without reading its rows."""
    meta = output.read_meta(source)
    if meta is None:
        raise DatasetError(
            f"{source}: no {output.CATEGORIES} beside the part files; write labels with "
            "jobs/segment_bucket.py or jobs/coco_to_parquet.py"
        )
    files = output.part_files(source)
    if not files:
        raise DatasetError(f"{source}: no part-NNNNNN.parquet files")
    categories, orientation = meta["categories"], meta.get("orientation")
    if orientation is not None and orientation not in output.ORIENTATIONS:
        raise DatasetError(
            f"{source}: {output.CATEGORIES} gives orientation {orientation!r}; "
            f"it must be one of {', '.join(output.ORIENTATIONS)}"
        )
    cats = coco.categories({"categories": categories}, source)
    return Labels(source, cats, files, orientation, output.newest_rows(source))


def row_orientation(row: dict[str, Any], orientation: str | None) -> str:
    """The orientation of a row's coordinates: its source's (``orientation``), or, for a source
    written before ``_categories.json`` said it (None), the one its writer always used: a
    pseudo-label row (``model`` set) is the segmentation job's, ``displayed``; a ground-truth
    row is ``jobs/coco_to_parquet.py``'s, ``stored``, as the COCO file had it."""
    if orientation is not None:
        return orientation
    return output.DISPLAYED if row["model"] is not None else output.STORED


def same_categories(sources: dict[str, list[dict]]) -> None:
    """Several training sources must name the same categories with the same ids."""
    (first, cats), *others = sources.items()
    want = {(c["id"], c["name"]) for c in cats}
    for source, other in others:
        got = {(c["id"], c["name"]) for c in other}
        if got != want:
            diff = sorted(got ^ want)[:3]
            raise DatasetError(f"{source}: its categories differ from {first}'s (by id and name: {diff} ...)")


# ---------------------------------------------------------------- rows -> training records


@dataclass(frozen=True)
class Rules:
    """What turns rows into training records: the training set's categories (label i+1 is
    ``categories[i]``), ``--min-score``, which keeps pseudo-label instances at or above it,
    and the reviewed images (:func:`reviewed_images`), whose pseudo-labels are not trained on."""

    categories: tuple[tuple[int, str], ...]
    keypoints: keypoints.KeypointSpec | None = None
    min_score: float | None = None
    reviewed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), compare=False, repr=False)

    @functools.cached_property
    def label_of(self) -> dict[int, int]:
        return {cid: i + 1 for i, (cid, _) in enumerate(self.categories)}

    def is_reviewed(self, uri: str) -> bool:
        key = review_key(uri)
        at = int(np.searchsorted(self.reviewed, key))
        return at < len(self.reviewed) and int(self.reviewed[at]) == key


def review_key(uri: str) -> int:
    """The :func:`image_id` of a URI written the one way: local paths absolute and normalised."""
    if not storage.is_s3(uri):
        uri = os.path.normpath(os.path.abspath(storage.local_path(uri)))
    return image_id(uri)


def reviewed_images(coco_records: list[dict[str, Any]], sources: list[Labels]) -> np.ndarray:
    """The images a person labelled, as sorted :func:`review_key`\\ s: every image of a COCO
    file (a reviewed export from Label Studio or CVAT, or any ground truth) and every Parquet
    row without ``model`` (ground truth converted by ``jobs/coco_to_parquet.py``). A pseudo-
    label row of one of these images is skipped (counted as ``reviewed``): the person's labels
    replace the model's. Part files whose ``model`` column has no null (its statistics say
    so) are not read; 8 bytes per reviewed image reach every cleaning task."""
    keys = {review_key(r["uri"]) for r in coco_records}
    for labels in sources:
        for uri in labels.files:
            keys.update(review_key(u) for u in output.ground_truth_uris(uri))
    return np.array(sorted(keys), dtype=np.int64)


def record_schema(rules: Rules) -> pa.Schema:
    """The columns of a training record, as :func:`maskrcnn.coco.load_coco` makes them."""
    fields = [("image_id", pa.int64()), ("uri", pa.string()), ("width", pa.int64()), ("height", pa.int64())]
    fields += [("orientation", pa.string()), ("annotations", pa.string())]
    if rules.keypoints:
        fields.append(("num_keypoints", pa.int64()))
    return pa.schema(fields)


def records(
    rows: list[dict[str, Any]], rules: Rules, orientation: str | None = None
) -> tuple[list[dict[str, Any]], Counter, Counter]:
    """A source's rows -> training records; also the annotations dropped and the rows skipped,
    by reason. Error rows are skipped, as are pseudo-label rows left with nothing to train on.
    ``orientation`` is the source's (:attr:`Labels.orientation`); each record gets its row's
    (:func:`row_orientation`)."""
    out, dropped, skipped = [], Counter(), Counter()
    for row in rows:
        if row["error"]:
            skipped["error"] += 1
            continue
        if row["model"] is not None and rules.is_reviewed(row["uri"]):
            skipped["reviewed"] += 1
            continue
        img = {"id": image_id(row["uri"]), "file_name": row["uri"], "width": row["width"], "height": row["height"]}
        anns = _training_annotations(row, img, rules, dropped)
        if row["model"] is not None and not anns:
            skipped["no_instances"] += 1
            continue
        record = {"image_id": img["id"], "uri": row["uri"], "width": img["width"], "height": img["height"]}
        record["orientation"] = row_orientation(row, orientation)
        record["annotations"] = json.dumps(anns)
        if rules.keypoints:
            record["num_keypoints"] = len(rules.keypoints)
        out.append(record)
    return out, dropped, skipped


def _training_annotations(row: dict, img: dict, rules: Rules, dropped: Counter) -> list[dict]:
    anns = []
    for inst in row["instances"] or []:
        if rules.min_score is not None and inst.get("score") is not None and inst["score"] < rules.min_score:
            dropped["below_min_score"] += 1
            continue
        reason, clean = coco.clean_annotation(output.as_coco_annotation(inst), img, rules.label_of, rules.keypoints)
        if reason or clean["iscrowd"]:
            dropped[reason or "crowd"] += 1
            continue
        anns.append(coco.training_annotation(clean, img, rules.label_of, rules.keypoints))
    return anns


def image_id(uri: str) -> int:
    """A row's image id: a 56-bit hash of its URI, the same in every task and run."""
    return int.from_bytes(hashlib.blake2b(uri.encode("utf-8", "surrogateescape"), digest_size=7).digest(), "big")


def _records_batch(table: pa.Table, rules: Rules, orientation: str | None) -> pa.Table:
    """A batch of one source's rows -> its records, each with ``drops`` empty, and one more row
    (no URI) whose ``drops`` holds the batch's drops and skips: the counts travel with the data."""
    kept, dropped, skipped = records(table.to_pylist(), rules, orientation)
    stats = {"image_id": 0, "uri": "", "width": 0, "height": 0, "orientation": "", "annotations": "[]"}
    stats["drops"] = json.dumps({"dropped": dropped, "skipped": skipped})
    if rules.keypoints:
        stats["num_keypoints"] = 0
    return pa.Table.from_pylist([*(dict(r, drops="") for r in kept), stats], schema=_cleaned_schema(rules))


def _cleaned_schema(rules: Rules) -> pa.Schema:
    return record_schema(rules).append(pa.field("drops", pa.string()))


# ---------------------------------------------------------------- Ray Data

WINDOW = 16384  # records shuffled together once the blocks are in the seed's order


@dataclass
class Cleaned:
    """The training records of every source, in Ray's object store, and what cleaning counted."""

    dataset: ray.data.Dataset
    images: int
    dropped: Counter
    skipped: Counter


def read(labels: Labels) -> ray.data.Dataset:
    """One source's rows, in part-file order."""
    return output.read_parts(labels.files, COLUMNS, labels.newest)


def clean(sources: list[Labels], rules: Rules, coco_records: list[dict[str, Any]]) -> Cleaned:
    """One pass of Ray Data tasks: every source's rows cleaned into training records (with a
    COCO file's records beside them), kept in Ray's object store for every epoch, as a
    shuffle would keep them; the driver reads only the counts."""
    parts = [
        read(one).map_batches(
            functools.partial(_records_batch, rules=rules, orientation=one.orientation), batch_format="pyarrow"
        )
        for one in sources
    ]
    if coco_records:
        table = pa.Table.from_pylist([dict(r, drops="") for r in coco_records], schema=_cleaned_schema(rules))
        parts.insert(0, ray.data.from_arrow(table))
    dataset = (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).materialize()
    images, dropped, skipped = 0, Counter(), Counter()
    for batch in dataset.select_columns(["drops"]).iter_batches(batch_format="pyarrow", batch_size=65536):
        for drops in batch.column("drops").to_pylist():
            if not drops:
                images += 1
                continue
            counts = json.loads(drops)
            dropped.update(counts["dropped"])
            skipped.update(counts["skipped"])
    return Cleaned(dataset, images, dropped, skipped)


def shuffled(cleaned: Cleaned, seed: int) -> ray.data.Dataset:
    """The records in the seed's order, streamed, with no all-to-all shuffle (whose barrier
    would hold the first step until every record had passed through it): the blocks in a
    seeded order, then each window of :data:`WINDOW` records shuffled, seeded. The same
    blocks give the same order, on every epoch, resume and re-run."""
    return cleaned.dataset.randomize_block_order(seed=seed).map_batches(
        loading.shuffle_window, fn_kwargs={"seed": seed}, batch_size=WINDOW, batch_format="pyarrow"
    )


# ---------------------------------------------------------------- for evaluation


def read_coco(source: str) -> dict[str, Any]:
    """A source's rows as one COCO instances dict (``file_name``: the image's URI; and, beyond
    COCO, each image's ``orientation``: :func:`row_orientation`), for scoring a validation set:
    that is, for labels small enough for one process."""
    labels = open_labels(source)
    images, annotations = [], []
    for row in output.read_rows(source, columns=COLUMNS):
        if not row["error"]:
            img_id = image_id(row["uri"])
            size = {"width": row["width"], "height": row["height"]}
            orientation = row_orientation(row, labels.orientation)
            images.append({"id": img_id, "file_name": row["uri"], **size, "orientation": orientation})
            for inst in row["instances"] or []:
                annotations.append({"id": len(annotations) + 1, "image_id": img_id, **output.as_coco_annotation(inst)})
    if not images:
        raise DatasetError(f"{source} lists no images")
    return {"images": images, "annotations": annotations, "categories": labels.categories}


def load_dataset(source: str, image_root: str | None) -> coco.CocoIndex:
    """A validation set, indexed by the training rules: a COCO file whose images are under
    ``image_root``, or Parquet labels, whose records keep their images' orientation."""
    if is_labels(source):
        return coco.index_coco(read_coco(source), source, None)
    return coco.load_coco(source, image_root)
