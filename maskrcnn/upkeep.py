"""Looking after a labels dataset without running the job: ``jobs/segment_bucket.py
--status`` (its runs, totals and lease, read from the files, without Ray) and ``--repair``
(what an output of an older version lacks, so that it can be trained on)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from maskrcnn import checkpoint, output, storage
from maskrcnn.config import option
from maskrcnn.lease import describe, holder
from maskrcnn.segment import SegmentError


@dataclass(kw_only=True)
class Modes:
    """What ``jobs/segment_bucket.py`` does instead of a run; then no other flag is needed."""

    status: str | None = option(
        "print the runs and totals of the labels dataset OUTPUT, and who holds its lease, without Ray",
        None,
        group="instead of a run",
        metavar="OUTPUT",
    )
    repair: str | None = option(
        "write the _categories.json that an output of an older version lacks, from the model its "
        "_job.json records, which --model gives",
        None,
        group="instead of a run",
        metavar="OUTPUT",
    )


def status(dataset: str) -> dict[str, Any]:
    """The dataset's runs (each run's summary, or how far it got) and totals, read from the
    runs' ``_summary.json`` and the part files' footers; no Ray."""
    if not storage.exists(storage.join(dataset, output.JOB)):
        raise SegmentError(f"{dataset} is not a labels dataset (no _job.json)")
    found = []
    for name, files in output.runs(dataset).items():
        if output.SUMMARY in files:
            summary = output.read_summary(storage.join(dataset, name))
            state = "complete" if output.SUCCESS in files else summary.get("status", "complete")
        else:
            parts = [output.read_footer(storage.join(dataset, name, f)) for f in files if output.part_of(f) is not None]
            summary = {"rows_out": sum(p["rows"] for p in parts), "part_files": len(parts)}
            state = "interrupted" if output.INPUTS in files else "starting"
        found.append({"run": name, "state": state, **{k: summary.get(k) for k in STATUS_FIELDS}})
    return {
        "dataset": dataset,
        "runs": found,
        "rows": sum(r["rows_out"] or 0 for r in found),
        "labelled": sum(r["labelled"] or 0 for r in found),
        "images_with_newer_rows": len(output.newest_rows(dataset)),  # readers see only the newest
        "lease": holder(dataset),
    }


STATUS_FIELDS = ("rows_out", "new", "retried", "labelled", "errors_transient", "errors_permanent", "wall_s")


def status_text(report: dict[str, Any]) -> str:
    """:func:`status` as lines for a person."""
    held = report["lease"]
    lease = f"held by {describe(held)}" if held else "free"
    counts = f"{len(report['runs'])} runs, {report['rows']} rows, {report['labelled']} labelled"
    lines = [f"{report['dataset']}: {counts}; lease {lease}"]
    for r in report["runs"]:
        errors = f"errors {r['errors_transient'] or 0} transient, {r['errors_permanent'] or 0} permanent"
        lines.append(
            f"  {r['run']}  {r['state']:<17} {r['rows_out'] or 0:>8} rows  {r['new'] or 0:>8} new  "
            f"{r['retried'] or 0:>6} retried  {errors}  {r['wall_s'] or 0:.0f} s"
        )
    return "\n".join(lines)


def repair(out: str, model: str | None) -> dict[str, Any]:
    """Write the ``_categories.json`` that an output of an older version lacks (schema 2 had
    none), from ``model``, which must be the model its ``_job.json`` records; the rows stay."""
    record = output.read_job(out)
    if not record:
        raise SegmentError(f"{out} is not a segmentation output (no _job.json)")
    if output.read_meta(out) is not None:
        return {"output": out, "repaired": []}
    if not model:
        raise SegmentError(f"--repair {out} needs --model: the model that wrote it, to take its categories from")
    ckpt = checkpoint.load(model)
    if record.get("model") != checkpoint.identity(ckpt):
        raise SegmentError(f"{out} was written by {record.get('model')}, not {model} ({checkpoint.identity(ckpt)})")
    output.write_categories(out, checkpoint.categories(ckpt))
    return {"output": out, "repaired": [output.CATEGORIES]}
