"""Batch segmentation: a bucket prefix, directory or manifest of images -> Parquet rows.

One Ray Data execution per job, however many part files it writes::

    listing (one read task, page by page) -> CPU tasks: fetch + decode (EXIF, RGB,
        large JPEGs reduced to the model's input size) -> one warm actor pool:
        Mask R-CNN + box-local RLE -> driver: one atomic part file per part

The input is cut, in listing order, into parts of ``rows_per_file`` URIs; part k is
written as ``part-{k:06d}.parquet`` only once all of its rows are back. That makes the
output exactly-once and resumable: a rerun's listing skips parts whose file exists
(after checking that the listing still cuts them the same way), and a part file never
holds half a part. The listing (:mod:`maskrcnn.listing`) runs in a Ray task and streams,
so output starts before a listing of millions of keys ends and the driver never holds the keys.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import ray

from maskrcnn import checkpoint, images, inference, listing, output, storage
from maskrcnn.config import arch_option, embed, extensions, model_option, option, resources
from maskrcnn.errors import UserError
from maskrcnn.images import IMAGE_EXTENSIONS
from maskrcnn.inference import InferenceOptions
from maskrcnn.keypoints import KeypointSpec
from maskrcnn.listing import KEYS
from maskrcnn.model import inference_size
from maskrcnn.output import TRANSIENT_ERRORS
from maskrcnn.predictor import check_classes
from maskrcnn.progress import Progress
from maskrcnn.runtime import without_false_alarms
from maskrcnn.weights import is_path


class SegmentError(UserError):
    """Input or output that stops the job, before the actor pool starts where it can."""


IO, MODEL, DECODE, PROGRESS = "input and output (local paths or s3:// URIs)", "model", "decoding", "progress"
NIGHTLY = "unattended runs"
INCREMENTAL_MAX_ERROR_RATE = 0.05


class ErrorBudgetExceeded(UserError):
    """More of a run's rows are errors than --max-error-rate allows (exit status 3)."""

    exit_status = 3


@dataclass(kw_only=True)
class SegmentConfig:
    """Everything a job is told; ``jobs/segment_bucket.py``'s flags are these fields."""

    input: str = option(
        "a directory or prefix (listed recursively), or a .parquet/.csv/.txt manifest of URIs", group=IO
    )
    output: str = option("directory or prefix for the Parquet files", group=IO)
    extensions: tuple[str, ...] | None = option(
        "comma-separated file extensions to keep when listing, case-insensitive; '*' keeps every file",
        IMAGE_EXTENSIONS,
        group=IO,
        type=extensions,
    )
    limit: int | None = option("process only the first N inputs (a quick trial)", None, group=IO, metavar="N")
    rows_per_file: int = option("rows per Parquet part file", 1000, group=IO)
    overwrite: bool = option("delete what --output holds and start over", False, group=IO)
    incremental: bool = option(
        "--output is a labels dataset that grows by runs: label only the inputs none of its runs holds, "
        "as a new run (run-<UTC time>/), after finishing an interrupted one",
        False,
        group=IO,
    )
    model: str = model_option(MODEL)
    arch: str | None = arch_option(MODEL)
    inference: InferenceOptions = embed(InferenceOptions)
    decode_resources: dict[str, float] | None = option(
        "custom Ray resources per decode task, JSON, e.g. '{\"decode_node\": 1}' keeps decoding on CPU nodes",
        None,
        group=DECODE,
        type=resources,
        metavar="JSON",
    )
    max_pixels: int = option("larger images become too_large error rows", images.DEFAULT_MAX_PIXELS, group=DECODE)
    full_decode: bool = option(
        "decode every JPEG at full size; by default one at least twice the model's input size "
        "decodes at 1/2, 1/4 or 1/8 scale (labels stay in full-image coordinates)",
        False,
        group=DECODE,
    )
    progress_seconds: float = option("seconds between progress lines", 30.0, group=PROGRESS, was={"--log-every": None})
    max_error_rate: float | None = option(
        "a run whose share of error rows exceeds this still writes its rows and _summary.json, "
        "but not _SUCCESS, and exits 3",
        None,
        group=NIGHTLY,
        default_text=f"{INCREMENTAL_MAX_ERROR_RATE} with --incremental, else none",
        metavar="R",
    )
    max_attempts: int = option(
        "with --incremental: an image whose newest row failed for a passing reason ("
        + ", ".join(TRANSIENT_ERRORS)
        + ") is labelled again by the next run, until it has this many rows",
        3,
        group=NIGHTLY,
    )
    lease_ttl: float = option(
        "with --incremental: seconds the run's lease on --output lasts unless renewed (every third of it); "
        "a killed run's lease is taken over once it expires",
        600.0,
        group=NIGHTLY,
        metavar="SECONDS",
    )
    lease_wait: float = option(
        "with --incremental: seconds to wait while another run holds --output, before exiting 75",
        0.0,
        group=NIGHTLY,
        metavar="SECONDS",
    )

    def __post_init__(self) -> None:
        """Checks that name a flag (the job turns them into usage errors), then absolute paths."""
        for name in ("rows_per_file", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.incremental and self.overwrite:
            raise ValueError("--incremental adds to a labels dataset; --overwrite would delete it: pass one of them")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if self.max_error_rate is None and self.incremental:
            self.max_error_rate = INCREMENTAL_MAX_ERROR_RATE
        if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
            raise ValueError(f"--max-error-rate must be between 0 and 1, got {self.max_error_rate}")
        if self.max_attempts < 1:
            raise ValueError(f"--max-attempts must be at least 1, got {self.max_attempts}")
        if self.lease_ttl <= 0 or self.lease_wait < 0:
            raise ValueError(
                f"--lease-ttl must be above 0 and --lease-wait at least 0, got {self.lease_ttl}, {self.lease_wait}"
            )
        self.input, self.output = storage.absolute(self.input), storage.absolute(self.output)
        self.model = storage.absolute(self.model) if is_path(self.model) else self.model


def run(
    cfg: SegmentConfig, ckpt: dict[str, Any] | None = None, lease: Any = None, extra: dict | None = None
) -> dict[str, Any]:
    """Segment every input image; return (and write as _summary.json) the summary.
    :mod:`maskrcnn.incremental` passes the model it loaded already (``ckpt``), the lease it
    holds (checked before each file is written) and more facts for the summary (``extra``)."""
    start = time.perf_counter()
    # 1. Fail fast, before any actor starts: the model (fetched once, here), its classes,
    #    the input, the output.
    ckpt = ckpt or checkpoint.load(cfg.model, cfg.arch)
    check_classes(ckpt["classes"], cfg.inference.classes)
    model_id, fit = checkpoint.identity(ckpt), inference_size(ckpt["arch"], **ckpt["arch_kwargs"])
    if listing.is_empty(cfg.input, cfg.extensions):
        raise SegmentError(f"no images found in {cfg.input}")
    finished = prepare_output(cfg, model_id, checkpoint.keypoint_spec(ckpt))
    resumed = {k: output.read_footer(uri) for k, uri in finished.items()}
    output.write_categories(cfg.output, checkpoint.categories(ckpt))
    # 2. One pipeline for the whole input; the driver writes each part once it is whole.
    inference.start(cfg.inference, min_cpus=2)
    model = inference.share(ckpt)
    del ckpt
    tally = listing.start_tally()  # what the listing task saw, once it ends
    recoveries = inference.start_recoveries()  # the device faults the actor pool recovered from
    progress = _progress(cfg, tally, resumed=sum(f["rows"] for f in resumed.values()))
    with without_false_alarms():
        ds = pipeline(cfg, resumed, None if cfg.full_decode else fit, model, tally, recoveries)
        written = write_parts(cfg, ds, progress, lease)
    # 3. Every part is on disk (this run's or an earlier one's): write the summary and _SUCCESS.
    listed = ray.get(tally.get.remote())
    if listed is None:
        raise RuntimeError("the pipeline ended before the listing did; nothing partial was written")
    missing = sorted(set(range(listed["part_files"])) - set(resumed) - set(written))
    if missing:
        raise RuntimeError(f"the pipeline returned no rows for parts {missing[:10]}; nothing partial was written")
    faults = ray.get(recoveries.get.remote())
    summary = _summary(cfg, model_id, listed["images"], resumed, written, progress, faults, time.perf_counter() - start)
    return _finish(cfg, summary | (extra or {}), lease)


# ---------------------------------------------------------------- 1. before the pool starts


def prepare_output(cfg: SegmentConfig, model_id: str, keypoints: KeypointSpec | None = None) -> dict[int, str]:
    """Check the output is writable and belongs to this job; return the parts already there.
    ``_job.json`` records the job, and a keypoint model's keypoint names and skeleton for export.

    One listing of the output serves --overwrite, the clean-up of a killed run's leftovers
    (temporary files, the previous run's _SUCCESS) and finding the finished parts."""
    record = output.job_record(cfg.input, model_id, cfg.rows_per_file, keypoints)
    previous = {} if cfg.overwrite else output.read_job(cfg.output)
    if previous:
        if previous.get("schema_version") != output.SCHEMA_VERSION:
            raise SegmentError(
                f"{cfg.output} holds part files of schema version {previous.get('schema_version')}, not "
                f"{output.SCHEMA_VERSION}, which this version writes; pass --overwrite or choose another --output"
            )
        if previous.get("incremental"):
            raise SegmentError(
                f"{cfg.output} is a labels dataset of incremental runs; pass --incremental to label what is new"
            )
        changed = [k for k in ("input", "model", "rows_per_file") if previous.get(k) != record[k]]
        if changed:
            raise SegmentError(
                f"{cfg.output} holds output of another job ({', '.join(f'{k}={previous.get(k)}' for k in changed)}); "
                "pass --overwrite or choose another --output"
            )
    output.write_job(cfg.output, record)
    parts: dict[int, str] = {}
    for uri, folder, name in output.files(cfg.output):
        part = output.part_of(name)
        if folder or name == output.JOB:
            continue
        if cfg.overwrite or (part is None and (".tmp-" in name or name == output.SUCCESS)):
            storage.delete(uri)
        elif part is not None:
            parts[part] = uri
    return parts


def _progress(cfg: SegmentConfig, tally: ray.actor.ActorHandle, resumed: int) -> Progress:
    """Progress over the images this run processes. The total is known from ``--limit``
    (at most), and exactly once the listing has ended and told ``tally`` its count."""

    def listed_total() -> int | None:
        listed = ray.get(tally.get.remote())
        return listed["images"] - resumed if listed else None

    total = max(0, cfg.limit - resumed) if cfg.limit else None
    return Progress("segment", total, every=cfg.progress_seconds, find_total=listed_total)


# ---------------------------------------------------------------- 2. the pipeline


def pipeline(
    cfg: SegmentConfig,
    resumed: dict[int, dict],
    fit: tuple[int, int] | None,
    model: list[ray.ObjectRef],
    tally: ray.actor.ActorHandle,
    recoveries: ray.actor.ActorHandle | None = None,
) -> ray.data.Dataset:
    """Listing -> decode tasks -> actor pool (:mod:`maskrcnn.inference`), as one Ray Data
    execution. ``resumed`` holds the footers of the parts already written; ``model`` the
    reference to the checkpoint's bytes in the object store; ``tally`` hears the listing's
    count, and ``recoveries`` the pool's device faults."""
    place = {"resources": cfg.decode_resources} if cfg.decode_resources else {}
    report = listing.reporter(tally)
    source = listing.Listing(cfg.input, cfg.extensions, cfg.limit, cfg.rows_per_file, cfg.output, resumed, report)
    ds = ray.data.read_datasource(source, override_num_blocks=1, ray_remote_args=place)
    ds = inference.decode(
        ds, cfg.inference.batch_size, fit=fit, max_pixels=cfg.max_pixels, resources=cfg.decode_resources
    )
    ds = inference.predict(ds, cfg.inference, model, KEYS, recoveries)
    ds.context.target_max_block_size = listing.BLOCK_BYTES  # this job's datasets only
    return ds


# ---------------------------------------------------------------- 3. the driver: part files, then the summary


def write_parts(cfg: SegmentConfig, ds: ray.data.Dataset, progress: Progress, lease: Any = None) -> dict[int, dict]:
    """Collect the pipeline's rows by part; write each part file once the part is whole.

    Rows are keyed by (part, index), so a retried task cannot duplicate one, and rows of a
    part already written (a re-run listing task) are dropped."""
    pending: dict[int, dict[int, dict]] = {}
    written: dict[int, dict] = {}
    errors = 0
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        errors += table.num_rows - table.column("error").null_count
        progress.add(table.num_rows, f"{errors} errors")
        for row in table.to_pylist():
            k = row["part"]
            if k in written:
                continue
            rows = pending.setdefault(k, {})
            rows[row["index"]] = row
            if len(rows) == row["part_rows"]:
                ordered = [{f: rows[i][f] for f in output.SCHEMA.names} for i in range(len(rows))]
                if lease is not None:
                    lease.check()
                written[k] = output.write_part(cfg.output, k, ordered)
                del pending[k]
    progress.finish(f"{errors} errors")
    if pending:
        missing = {k: next(iter(rows.values()))["part_rows"] - len(rows) for k, rows in pending.items()}
        raise RuntimeError(f"rows missing from the pipeline for parts {missing}; nothing partial was written")
    return written


def _summary(
    cfg: SegmentConfig,
    model_id: str,
    images_in: int,
    resumed: dict[int, dict],
    written: dict[int, dict],
    progress: Progress,
    faults: dict[str, int],
    wall: float,
) -> dict:
    """The job's summary, from the part files' footers."""
    footers = [*resumed.values(), *written.values()]
    errors: Counter = Counter()
    examples: dict[str, str] = {}
    for f in footers:
        errors.update(f["errors"])
        for kind, uri in f.get("error_examples", {}).items():  # footers of older versions have none
            examples.setdefault(kind, uri)
    rows = sum(f["rows"] for f in footers)
    transient = sum(n for kind, n in errors.items() if kind in output.TRANSIENT_ERRORS)
    rate = sum(errors.values()) / rows if rows else 0.0
    return {
        "input": cfg.input,
        "output": cfg.output,
        "model": model_id,
        "schema_version": output.SCHEMA_VERSION,
        "images_in": images_in,
        "rows_out": rows,
        "labelled": rows - sum(errors.values()),
        "part_files": len(footers),
        "resumed_rows": sum(f["rows"] for f in resumed.values()),
        "processed_rows": progress.done,
        "errors": dict(sorted(errors.items())),
        "errors_transient": transient,
        "errors_permanent": sum(errors.values()) - transient,
        "error_examples": dict(sorted(examples.items())),
        "error_rate": round(rate, 4),
        "max_error_rate": cfg.max_error_rate,
        "status": "over_error_budget" if cfg.max_error_rate is not None and rate > cfg.max_error_rate else "ok",
        **faults,  # split_batches, restarted_actors: recovered, so no error rows
        "instances": sum(f["instances"] for f in footers),
        "wall_s": round(wall, 2),
        "images_per_s": round(progress.done / wall, 3) if wall else 0.0,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("input", "output", "model")},
    }


def _finish(cfg: SegmentConfig, summary: dict, lease: Any) -> dict:
    """Write ``_summary.json``, then ``_SUCCESS`` unless the run is over its error budget."""
    if lease is not None:
        lease.check()
    output.write_summary(cfg.output, summary, whole=summary["status"] == "ok")
    return summary


def budget_error(summary: dict) -> ErrorBudgetExceeded:
    """The one line for a run over its error budget: the share, the top error kinds, an example URI of each."""
    kinds = sorted(summary["errors"].items(), key=lambda kv: -kv[1])[:3]
    named = "; ".join(
        f"{kind} {n} ({'transient' if kind in output.TRANSIENT_ERRORS else 'permanent'})"
        + (f", e.g. {summary['error_examples'][kind]}" if kind in summary["error_examples"] else "")
        for kind, n in kinds
    )
    errors = summary["rows_out"] - summary["labelled"]
    return ErrorBudgetExceeded(
        f"{errors} of {summary['rows_out']} rows in {summary['output']} are errors ({summary['error_rate']:.1%}), "
        f"over --max-error-rate {summary['max_error_rate']}: {named}; rows and _summary.json written, _SUCCESS not"
    )
