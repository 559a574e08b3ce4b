"""Parquet labels, the training-data form: a directory or s3:// prefix of part files (the
rows of :data:`maskrcnn.output.SCHEMA`, one per image) with ``_categories.json`` beside them.

A source is a segmentation output (pseudo-labels: rows with ``model`` set, instances with
scores) or ground truth converted from a COCO file (:mod:`maskrcnn.convert`). Training reads
the rows with ``ray.data.read_parquet`` and turns them into training records in Ray Data
tasks (:func:`records`) by the rules that clean a COCO file
(:func:`maskrcnn.data.clean_annotation`), so nothing gathers them on the driver; a first
pass over the same tasks counts what is kept and dropped (:func:`count`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from maskrcnn import data, keypoints, output, storage
from maskrcnn.data import DatasetError

COLUMNS = ["uri", "width", "height", "instances", "model", "error"]


def is_labels(source: str) -> bool:
    """A COCO file ends in ``.json``; anything else names Parquet labels."""
    return not source.lower().endswith(".json")


@dataclass(frozen=True)
class Labels:
    """One source of Parquet labels, checked: its categories and part files."""

    source: str
    categories: list[dict[str, Any]]
    files: list[str]


def open_labels(source: str) -> Labels:
    """Check a source of Parquet labels without reading its rows."""
    categories = output.read_categories(source)
    if categories is None:
        raise DatasetError(
            f"{source}: no {output.CATEGORIES} beside the part files; write labels with "
            "jobs/segment_bucket.py or jobs/coco_to_parquet.py"
        )
    files = output.part_files(source)
    if not files:
        raise DatasetError(f"{source}: no part-NNNNNN.parquet files")
    return Labels(source, data.categories({"categories": categories}, source), files)


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
    ``categories[i]``) and ``--min-score``, which keeps pseudo-label instances at or above it."""

    categories: tuple[tuple[int, str], ...]
    keypoints: keypoints.KeypointSpec | None = None
    min_score: float | None = None

    @functools.cached_property
    def label_of(self) -> dict[int, int]:
        return {cid: i + 1 for i, (cid, _) in enumerate(self.categories)}


def record_schema(rules: Rules) -> pa.Schema:
    """The columns of a training record, as :func:`maskrcnn.data.load_coco` makes them."""
    fields = [("image_id", pa.int64()), ("uri", pa.string()), ("width", pa.int64()), ("height", pa.int64())]
    fields.append(("annotations", pa.string()))
    if rules.keypoints:
        fields.append(("num_keypoints", pa.int64()))
    return pa.schema(fields)


def records(rows: list[dict[str, Any]], rules: Rules) -> tuple[list[dict[str, Any]], Counter, Counter]:
    """Rows -> training records; also the annotations dropped and the rows skipped, by reason.
    Error rows are skipped, as are pseudo-label rows left with nothing to train on."""
    out, dropped, skipped = [], Counter(), Counter()
    for row in rows:
        if row["error"]:
            skipped["error"] += 1
            continue
        img = {"id": image_id(row["uri"]), "file_name": row["uri"], "width": row["width"], "height": row["height"]}
        anns = _training_annotations(row, img, rules, dropped)
        if row["model"] is not None and not anns:
            skipped["no_instances"] += 1
            continue
        record = {"image_id": img["id"], "uri": row["uri"], "width": img["width"], "height": img["height"]}
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
        reason, clean = data.clean_annotation(output.as_coco_annotation(inst), img, rules.label_of, rules.keypoints)
        if reason or clean["iscrowd"]:
            dropped[reason or "crowd"] += 1
            continue
        anns.append(data.training_annotation(clean, img, rules.label_of, rules.keypoints))
    return anns


def image_id(uri: str) -> int:
    """A row's image id: a 56-bit hash of its URI, the same in every task and run."""
    return int.from_bytes(hashlib.blake2b(uri.encode("utf-8", "surrogateescape"), digest_size=7).digest(), "big")


def _records_batch(table: pa.Table, rules: Rules) -> pa.Table:
    kept, _, _ = records(table.to_pylist(), rules)
    return pa.Table.from_pylist(kept, schema=record_schema(rules))


def _counts_batch(table: pa.Table, rules: Rules) -> pa.Table:
    kept, dropped, skipped = records(table.to_pylist(), rules)
    return pa.table({"kept": [len(kept)], "dropped": [json.dumps(dropped)], "skipped": [json.dumps(skipped)]})


# ---------------------------------------------------------------- Ray Data


def read(labels: Labels) -> ray.data.Dataset:
    """One source's rows, in part-file order."""
    fs, _ = storage.filesystem(labels.files[0])
    paths = [storage.filesystem(uri)[1] for uri in labels.files]
    return ray.data.read_parquet(paths, filesystem=fs, columns=COLUMNS)


def dataset(sources: list[Labels], rules: Rules) -> ray.data.Dataset:
    """The training records of every source, cleaned in Ray Data tasks."""
    clean = functools.partial(_records_batch, rules=rules)
    parts = [read(one).map_batches(clean, batch_format="pyarrow") for one in sources]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def count(labels: Labels, rules: Rules) -> tuple[int, Counter, Counter]:
    """One pass over a source in Ray Data tasks: the records it gives, the annotations
    dropped and the rows skipped, by reason. The driver receives one small row per batch."""
    kept, dropped, skipped = 0, Counter(), Counter()
    counts = read(labels).map_batches(_counts_batch, fn_kwargs={"rules": rules}, batch_format="pyarrow")
    for row in counts.iter_rows():
        kept += row["kept"]
        dropped.update(json.loads(row["dropped"]))
        skipped.update(json.loads(row["skipped"]))
    return kept, dropped, skipped


# ---------------------------------------------------------------- for evaluation


def read_coco(source: str) -> dict[str, Any]:
    """A source's rows as one COCO instances dict (``file_name``: the image's URI), for
    scoring a validation set: that is, for labels small enough for one process."""
    labels = open_labels(source)
    images, annotations = [], []
    for uri in labels.files:
        fs, path = storage.filesystem(uri)
        for row in pq.read_table(path, filesystem=fs, columns=COLUMNS).to_pylist():
            if row["error"]:
                continue
            img_id = image_id(row["uri"])
            images.append({"id": img_id, "file_name": row["uri"], "width": row["width"], "height": row["height"]})
            for inst in row["instances"] or []:
                annotations.append({"id": len(annotations) + 1, "image_id": img_id, **output.as_coco_annotation(inst)})
    if not images:
        raise DatasetError(f"{source} lists no images")
    return {"images": images, "annotations": annotations, "categories": labels.categories}


def load_dataset(source: str, image_root: str | None) -> data.CocoDataset:
    """A validation set, indexed by the training rules: a COCO file whose images are under
    ``image_root``, or Parquet labels."""
    if is_labels(source):
        return data.index_coco(read_coco(source), source, None)
    return data.load_coco(source, image_root)
