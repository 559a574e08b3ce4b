"""Incremental runs: a labels dataset that grows with its archive, a run at a time.

``jobs/segment_bucket.py --incremental`` treats ``--output`` as a labels dataset::

    labels/                         the dataset: _job.json (its model), _categories.json
      _lease/000041.json            who holds the dataset now (maskrcnn.lease)
      part-*.parquet                an ordinary output's own parts, if it began as one
      run-20261204T020000Z/         a run: a whole segmentation output (maskrcnn.segment)
        _retried.parquet            the images it labels again (their newest rows failed)
        _inputs.parquet             whose input is its manifest: what no earlier run held
        part-000000.parquet ...     _job.json, _summary.json, _SUCCESS (unless over budget)
      run-20261205T020000Z/ ...

One run at a time: a run holds the dataset's lease from before it looks for new images
until it is done. A run is exactly once and resumable as any output is, because its input
is its own manifest, written before its first part: an interrupted run is finished first,
however the archive changed since. Then the new inputs are a Ray Data left-anti join of the
listing against every part file's ``uri`` column, hash-partitioned across the cluster, so
the driver never holds the archive's keys; it streams the sorted new URIs into the next
run's manifest, with the images whose newest row failed for a passing reason
(:func:`retries`). An input removed from the archive keeps its row. Readers take the
dataset's root and see the newest row of each image (:func:`maskrcnn.output.newest_rows`).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.expressions import col

from maskrcnn import checkpoint, inference, listing, output, segment, storage
from maskrcnn.keypoints import KeypointSpec
from maskrcnn.lease import Lease
from maskrcnn.predictor import check_classes
from maskrcnn.segment import SegmentConfig, SegmentError

PARTS_PER_JOIN_PARTITION = 50  # part files (of --rows-per-file rows) per partition of the join


def run(cfg: SegmentConfig) -> dict[str, Any]:
    """Take the dataset's lease (:mod:`maskrcnn.lease`); finish its interrupted runs, then
    label what is new, and what failed for a passing reason, as a run of its own; return the
    dataset's summary, with each run's summary by name."""
    with Lease(cfg.output, cfg.lease_ttl, cfg.lease_wait) as held:
        return _run(cfg, held)


def _run(cfg: SegmentConfig, held: Lease) -> dict[str, Any]:
    # 1. The model, and the dataset's record of its own: one model's labels per dataset.
    ckpt = checkpoint.load(cfg.model, cfg.arch)
    check_classes(ckpt["classes"], cfg.inference.classes)
    model_id = checkpoint.identity(ckpt)
    claim(cfg, model_id, checkpoint.keypoint_spec(ckpt))
    output.write_categories(cfg.output, checkpoint.categories(ckpt))  # for training on the whole dataset
    if listing.is_empty(cfg.input, cfg.extensions):
        raise SegmentError(f"no images found in {cfg.input}: a moved or mistyped input prefix? nothing was labelled")
    inference.start(cfg.inference, min_cpus=2)
    lease = {"lease": held.summary()}
    # 2. An interrupted run resumes with its own manifest; a run killed before its manifest
    #    was whole is started again under its name. A run with a summary is complete.
    done, fresh, earlier = {}, None, output.runs(cfg.output)
    for name, files in earlier.items():
        if output.SUMMARY in files:
            continue
        if output.INPUTS not in files:
            fresh = name
            continue
        print(f"[segment] resuming {name}, an interrupted run", flush=True)
        done[name] = label(cfg, name, ckpt, held, lease | {"resumed_run": True})
    # 3. What no run holds yet, and what failed for a passing reason, as a new run.
    name = fresh or new_name(set(earlier))
    parts = output.part_files(cfg.output)
    retry = retries(cfg.output, parts, cfg.max_attempts)
    if retry:
        write_uris(sorted(retry), storage.join(cfg.output, name, output.RETRIED))
    tally = listing.start_tally()
    new, retried = write_manifest(
        new_inputs(cfg, parts, retry, tally), storage.join(cfg.output, name, output.INPUTS), retry
    )
    listed = (ray.get(tally.get.remote()) or {}).get("images")  # None where --limit ended the listing early
    if new:
        print(f"[segment] {name}: {new} inputs, {retried} of them failed before", flush=True)
        facts = {"listed": listed, "new": new - retried, "retried": retried}
        done[name] = label(cfg, name, ckpt, held, lease | facts)
    else:
        print(f"[segment] nothing new: every input of {cfg.input} has a row in {cfg.output}", flush=True)
    return {"input": cfg.input, "output": cfg.output, "model": model_id, "listed": listed, **lease, "runs": done}


def claim(cfg: SegmentConfig, model_id: str, keypoints: KeypointSpec | None) -> None:
    """Refuse a dataset of another model or schema version; then record it as this one's."""
    previous = output.read_job(cfg.output)
    if previous:
        if previous.get("schema_version") != output.SCHEMA_VERSION or previous.get("model") != model_id:
            raise SegmentError(
                f"{cfg.output} holds output of another job (model={previous.get('model')}, schema version "
                f"{previous.get('schema_version')}); a new model's labels are a new dataset: choose another --output"
            )
    record = output.job_record(cfg.input, model_id, cfg.rows_per_file, keypoints) | {"incremental": True}
    output.write_job(cfg.output, record)


def new_name(taken: set[str]) -> str:
    """``run-<UTC time>``, a second later if a run of the dataset has this second's name."""
    while (name := time.strftime("run-%Y%m%dT%H%M%SZ", time.gmtime())) in taken:
        time.sleep(1)
    return name


def label(cfg: SegmentConfig, name: str, ckpt: dict[str, Any], held: Lease, facts: dict) -> dict[str, Any]:
    """One run: segmentation of the run's manifest into the run's folder."""
    inputs, folder = storage.join(cfg.output, name, output.INPUTS), storage.join(cfg.output, name)
    run_cfg = dataclasses.replace(cfg, input=inputs, output=folder, limit=None, incremental=False)
    summary = segment.run(run_cfg, ckpt, lease=held, extra=facts)
    summary.pop("config")
    return summary


def retries(dataset: str, parts: list[str], max_attempts: int) -> set[str]:
    """The images to label again: those whose newest row failed for a passing reason
    (:data:`maskrcnn.output.TRANSIENT_ERRORS`) and that have fewer than ``max_attempts`` rows.
    Read on the driver from the part files whose footers count such errors and the runs that
    retried images before: memory grows with the failures, not with the dataset."""
    again = set(output.retry_parts(dataset))
    failed = [p for p in parts if p in again or set(output.read_footer(p)["errors"]) & set(output.TRANSIENT_ERRORS)]
    newest: dict[str, str] = {}  # image -> its newest row's error kind ("" when labelled)
    attempts: Counter = Counter()
    for part in failed:  # in the dataset's order: earlier runs first
        for uri, error in output.read_columns(part, ["uri", "error"]):
            if uri in newest or output.error_kind(error) in output.TRANSIENT_ERRORS:
                newest[uri] = output.error_kind(error) or ""
                attempts[uri] += 1
    return {u for u, kind in newest.items() if kind in output.TRANSIENT_ERRORS and attempts[u] < max_attempts}


def new_inputs(cfg: SegmentConfig, earlier: list[str], retry: set[str], tally: Any) -> ray.data.Dataset:
    """The input's URIs that no part file in ``earlier`` holds, or whose row is to be
    retried (``retry``), sorted (at most ``--limit``); the listing's count goes to ``tally``."""
    source = listing.Uris(cfg.input, cfg.extensions, listing.reporter(tally))
    listed = ray.data.read_datasource(source, override_num_blocks=1)
    if earlier:
        held = output.read_parts(earlier, ["uri"])
        if retry:
            held = held.filter(expr=col("uri").not_in(sorted(retry)))
        partitions = 1 + len(earlier) // PARTS_PER_JOIN_PARTITION
        listed = listed.join(held, join_type="left_anti", num_partitions=partitions, on=("uri",))
    listed = listed.sort("uri")
    return listed.limit(cfg.limit) if cfg.limit else listed


def write_manifest(uris: ray.data.Dataset, uri: str, retry: set[str]) -> tuple[int, int]:
    """Stream ``uris`` into the Parquet manifest at ``uri``, atomically; return its row
    count, and how many of them are in ``retry``. Nothing is written when there are none."""
    batches = (b for b in uris.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows)
    first = next(batches, None)
    if first is None:
        return 0, 0
    rows = retried = 0
    with storage.staged(uri) as tmp, pq.ParquetWriter(tmp, first.schema) as writer:
        for batch in itertools.chain([first], batches):
            writer.write_table(batch)
            rows += batch.num_rows
            retried += sum(u in retry for u in batch.column("uri").to_pylist()) if retry else 0
    return rows, retried


def write_uris(uris: list[str], uri: str) -> None:
    """A Parquet file of one ``uri`` column, atomically."""
    with storage.staged(uri) as tmp:
        pq.write_table(pa.table({"uri": uris}), tmp)
