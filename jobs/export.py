"""Export a segmentation output (Parquet) to COCO JSON, pictures and a browsable HTML report.

Examples:
  # COCO results that pycocotools' loadRes accepts, with the ground truth's image ids, matched
  # by the path relative to the image root (by default the segmentation job's --input)
  python jobs/export.py --predictions labels/run1 --coco-results labels/run1.results.json \\
      --annotations coco/annotations/instances_val2017.json --images coco/val2017

  # a COCO dataset for a labelling tool (file_name relative to --images), with the model's categories
  python jobs/export.py --predictions s3://labels/run1 --coco-dataset labels/run1.coco.json \\
      --images s3://archive/photos --model COCO_V1

  # 16 pictures, a contact sheet of them, and an HTML report to open in a browser
  python jobs/export.py --predictions labels/run1 --render 16 --render-dir labels/run1-pictures \\
      --contact-sheet labels/run1-sheet.png --html labels/run1-report

One pass over the part files feeds every output; each file appears whole or not at all.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn import checkpoint, export, storage
from maskrcnn.cli import add_options, arch_option, embed, job_parser, model_option, option, parse_config, run_main
from maskrcnn.draw import PICTURES, PictureOptions
from maskrcnn.keypoints import KeypointSpec
from maskrcnn.progress import Progress
from maskrcnn.report import Report

IO, COCO = "input (local paths or s3:// URIs)", "COCO JSON"


@dataclass(kw_only=True)
class ExportConfig:
    """Everything an export is told: this job's flags."""

    predictions: str = option("the --output of jobs/segment_bucket.py", group=IO)
    images: str | None = option(
        "the image root: --coco-results matches the ground truth's file_names relative to "
        "it (default: the segmentation's --input), --coco-dataset writes file_names "
        "relative to it (default: full URIs), pictures are named by it",
        None,
        group=IO,
    )
    min_score: float = option("leave out instances below this score", 0.0, group=IO)
    coco_results: str | None = option("write COCO results JSON (what loadRes takes) here", None, group=COCO)
    annotations: str | None = option("COCO ground truth whose image ids --coco-results uses", None, group=COCO)
    coco_dataset: str | None = option(
        "write a COCO dataset JSON (images, annotations with scores, categories) here", None, group=COCO
    )
    model: str | None = model_option(COCO, required=False)
    arch: str | None = arch_option(COCO)
    render: int = option("draw the first N images with instances", 0, group=PICTURES, metavar="N")
    render_dir: str | None = option("write the N pictures here, one PNG each", None, group=PICTURES)
    contact_sheet: str | None = option("write the N pictures as one grid PNG here", None, group=PICTURES)
    columns: int = option("contact sheet columns", 4, group=PICTURES)
    pictures: PictureOptions = embed(PictureOptions)
    html: str | None = option(
        "write a report (index.html and its pictures) here; it shows --render N pictures (default 24)",
        None,
        group=PICTURES,
        metavar="DIR",
    )

    def __post_init__(self) -> None:
        """Usage errors for combinations that do nothing; then absolute paths, so that the
        image root and the segmentation's --input compare as written."""
        if not (self.coco_results or self.coco_dataset or self.render or self.html):
            raise ValueError("nothing to do: give --coco-results, --coco-dataset, --render N or --html DIR")
        if self.render and not (self.render_dir or self.contact_sheet or self.html):
            raise ValueError("--render needs --render-dir, --contact-sheet or --html")
        if (self.render_dir or self.contact_sheet) and not self.render:
            raise ValueError("--render-dir and --contact-sheet need --render N (how many images to draw)")
        if self.annotations and not self.coco_results:
            raise ValueError("--annotations only applies to --coco-results")
        if self.model and not self.coco_dataset:
            raise ValueError("--model only applies to --coco-dataset (its categories)")
        if self.render < 0 or self.columns < 1:
            raise ValueError("--render must be at least 0 and --columns at least 1")
        self.predictions = storage.absolute(self.predictions)
        self.images = storage.absolute(self.images) if self.images else None


def parser() -> argparse.ArgumentParser:
    return add_options(job_parser("jobs/export.py", __doc__), ExportConfig)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(parser(), ExportConfig, argv)
    if not storage.exists(cfg.predictions):
        raise storage.StorageError(f"cannot read {cfg.predictions}: no such output")
    root = cfg.images or export.job_input(cfg.predictions)
    keypoints = export.job_keypoints(cfg.predictions)  # a keypoint model's names and skeleton
    progress = Progress("export", export.count_rows(cfg.predictions), unit="rows")
    with contextlib.ExitStack() as stack:
        sinks = [stack.enter_context(sink) for sink in sinks_for(cfg, root, keypoints)]
        for row in export.read_rows(cfg.predictions):
            for sink in sinks:
                sink.add(row)
            progress.add(1)
    progress.finish()
    for sink in sinks:
        print(f"[export] {describe(sink, cfg)}")
    if any(isinstance(s, export.Pictures) and not s.drawn for s in sinks):
        raise ValueError(
            f"nothing to draw: no image in {cfg.predictions} has instances at or above --min-score {cfg.min_score}"
        )


def sinks_for(cfg: ExportConfig, root: str | None, keypoints: KeypointSpec | None = None) -> list:
    """The outputs asked for, each a sink that takes the rows one at a time."""
    sinks: list = []
    if cfg.coco_results:
        image_id = None
        if cfg.annotations:
            if root is None:
                raise ValueError("--annotations: pass --images, the root the ground truth's file_names are relative to")
            image_id = export.ground_truth_ids(cfg.annotations, root)
        sinks.append(export.CocoResults(cfg.coco_results, image_id, cfg.min_score))
    if cfg.coco_dataset:
        categories = checkpoint.categories_of(cfg.model, cfg.arch) if cfg.model else None
        sinks.append(export.CocoDataset(cfg.coco_dataset, cfg.images, cfg.min_score, categories, keypoints))
    if cfg.render_dir or cfg.contact_sheet:
        sinks.append(
            export.Pictures(
                cfg.render,
                cfg.render_dir,
                cfg.contact_sheet,
                root=root,
                columns=cfg.columns,
                max_side=cfg.pictures.max_side,
                min_score=cfg.min_score,
                boxes=cfg.pictures.boxes,
                keypoints=keypoints,
            )
        )
    if cfg.html:
        sinks.append(
            Report(
                cfg.html,
                cfg.predictions,
                pictures=cfg.render or 24,
                root=root,
                min_score=cfg.min_score,
                keypoints=keypoints,
            )
        )
    return sinks


def describe(sink: object, cfg: ExportConfig) -> str:
    if isinstance(sink, export.CocoResults):
        missing = sink.unmatched
        unmatched = f"; {len(missing)} images not in {cfg.annotations}, e.g. {missing[0]}" if missing else ""
        return f"{sink.items.count} detections of {sink.rows} images -> {cfg.coco_results}{unmatched}"
    if isinstance(sink, export.CocoDataset):
        return f"{sink.images.count} images, {sink.annotations.count} annotations -> {cfg.coco_dataset}"
    if isinstance(sink, export.Pictures):
        return f"{sink.drawn} pictures drawn" + (f" -> {cfg.render_dir}" if cfg.render_dir else "")
    return f"report of {sink.images} rows, {len(sink.figures)} pictures -> {storage.join(cfg.html, 'index.html')}"


if __name__ == "__main__":
    run_main(main)
