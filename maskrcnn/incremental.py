"""Incremental runs: a labels dataset that grows with its archive, a run at a time.

``jobs/segment_bucket.py --incremental`` treats ``--output`` as a labels dataset::

    labels/                         the dataset: _job.json (its model), _categories.json
      part-*.parquet                an ordinary output's own parts, if it began as one
      run-20261204T020000Z/         a run: a whole segmentation output (maskrcnn.segment)
        _inputs.parquet             whose input is its manifest: what no earlier run held
        part-000000.parquet ...     _job.json, _summary.json, _SUCCESS
      run-20261205T020000Z/ ...

A run is exactly once and resumable as any output is, because its input is its own
manifest, written before its first part: an interrupted run is finished first, however the
archive changed since. Then the new inputs are a Ray Data left-anti join of the listing
against every part file's ``uri`` column, hash-partitioned across the cluster, so the
driver never holds the archive's keys; it streams the sorted new URIs into the next run's
manifest. An input removed from the archive keeps its row. Readers take the dataset's root
(:func:`maskrcnn.output.part_files`, pyarrow, DuckDB ``labels/**/part-*.parquet``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from typing import Any

import pyarrow.parquet as pq
import ray

from maskrcnn import checkpoint, inference, listing, output, segment, storage
from maskrcnn.keypoints import KeypointSpec
from maskrcnn.predictor import check_classes
from maskrcnn.segment import SegmentConfig, SegmentError

INPUTS = "_inputs.parquet"  # a run's manifest; "_" keeps it out of pyarrow's and pandas' reads
PARTS_PER_JOIN_PARTITION = 50  # part files (of --rows-per-file rows) per partition of the join


def run(cfg: SegmentConfig) -> dict[str, Any]:
    """Finish the dataset's interrupted runs, then label what is new as a run of its own;
    return the dataset's summary, with each run's summary by name."""
    # 1. The model, and the dataset's record of its own: one model's labels per dataset.
    ckpt = checkpoint.load(cfg.model, cfg.arch)
    check_classes(ckpt["classes"], cfg.inference.classes)
    model_id = checkpoint.identity(ckpt)
    claim(cfg, model_id, checkpoint.keypoint_spec(ckpt))
    output.write_categories(cfg.output, checkpoint.categories(ckpt))  # for training on the whole dataset
    inference.start(cfg.inference, min_cpus=2)
    # 2. An interrupted run resumes with its own manifest; a run killed before its manifest
    #    was whole is started again under its name.
    done, fresh, earlier = {}, None, runs(cfg.output)
    for name, files in earlier.items():
        if "_SUCCESS" in files:
            continue
        if INPUTS not in files:
            fresh = name
            continue
        print(f"[segment] resuming {name}, an interrupted run", flush=True)
        done[name] = label(cfg, name, ckpt)
    # 3. What no run holds yet, as a new run.
    name = fresh or new_name(set(earlier))
    new = write_manifest(new_inputs(cfg, output.part_files(cfg.output)), run_uri(cfg, name, INPUTS))
    if new:
        print(f"[segment] {name}: new inputs: {new}", flush=True)
        done[name] = label(cfg, name, ckpt)
    else:
        print(f"[segment] nothing new: every input of {cfg.input} has a row in {cfg.output}", flush=True)
    return {"input": cfg.input, "output": cfg.output, "model": model_id, "runs": done}


def claim(cfg: SegmentConfig, model_id: str, keypoints: KeypointSpec | None) -> None:
    """Refuse a dataset of another model or schema version; then record it as this one's."""
    record_uri = storage.join(cfg.output, "_job.json")
    if storage.exists(record_uri):
        previous = json.loads(storage.read_text(record_uri))
        if previous.get("schema_version") != output.SCHEMA_VERSION or previous.get("model") != model_id:
            raise SegmentError(
                f"{cfg.output} holds output of another job (model={previous.get('model')}, schema version "
                f"{previous.get('schema_version')}); a new model's labels are a new dataset: choose another --output"
            )
    record = segment.job_record(cfg, model_id, keypoints) | {"incremental": True}
    storage.write_text(record_uri, json.dumps(record, indent=2))


def runs(dataset: str) -> dict[str, set[str]]:
    """The dataset's runs in order, each with the names of its files."""
    found: dict[str, set[str]] = {}
    for _, folder, name in output.files(dataset):
        if output.RUN.fullmatch(folder):
            found.setdefault(folder, set()).add(name)
    return dict(sorted(found.items()))


def new_name(taken: set[str]) -> str:
    """``run-<UTC time>``, a second later if a run of the dataset has this second's name."""
    while (name := time.strftime("run-%Y%m%dT%H%M%SZ", time.gmtime())) in taken:
        time.sleep(1)
    return name


def run_uri(cfg: SegmentConfig, name: str, *parts: str) -> str:
    return storage.join(cfg.output, name, *parts)


def label(cfg: SegmentConfig, name: str, ckpt: dict[str, Any]) -> dict[str, Any]:
    """One run: segmentation of the run's manifest into the run's folder."""
    inputs, folder = run_uri(cfg, name, INPUTS), run_uri(cfg, name)
    summary = segment.run(dataclasses.replace(cfg, input=inputs, output=folder, limit=None, incremental=False), ckpt)
    summary.pop("config")
    return summary


def new_inputs(cfg: SegmentConfig, earlier: list[str]) -> ray.data.Dataset:
    """The input's URIs that no part file in ``earlier`` holds, sorted (at most ``--limit``)."""
    listed = ray.data.read_datasource(listing.Uris(cfg.input, cfg.extensions), override_num_blocks=1)
    if earlier:
        held = output.read_parts(earlier, ["uri"])
        partitions = 1 + len(earlier) // PARTS_PER_JOIN_PARTITION
        listed = listed.join(held, join_type="left_anti", num_partitions=partitions, on=("uri",))
    listed = listed.sort("uri")
    return listed.limit(cfg.limit) if cfg.limit else listed


def write_manifest(uris: ray.data.Dataset, uri: str) -> int:
    """Stream ``uris`` into the Parquet manifest at ``uri``, atomically; return its row
    count. Nothing is written when there are none."""
    batches = (b for b in uris.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows)
    first = next(batches, None)
    if first is None:
        return 0
    rows = 0
    with storage.staged(uri) as tmp, pq.ParquetWriter(tmp, first.schema) as writer:
        for batch in itertools.chain([first], batches):
            writer.write_table(batch)
            rows += batch.num_rows
    return rows
