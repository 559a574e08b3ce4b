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

  # the 200 least certain images, for review in Label Studio (tasks.json + config.xml) and CVAT
  python jobs/export.py --predictions s3://labels/run1 --images s3://archive/photos --review 200 \\
      --label-studio labels/review1-ls --cvat labels/review1-cvat --html labels/review1-report

One pass over the part files feeds every output (two with --review: one to choose the
queue); each file appears whole or not at all.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn import checkpoint, export, masks, output, prelabels, review, storage
from maskrcnn.cli import add_options, job_parser, parse_config, run_main
from maskrcnn.config import arch_option, embed, model_option, option
from maskrcnn.draw import PICTURES, PictureOptions
from maskrcnn.keypoints import KeypointSpec
from maskrcnn.progress import Progress
from maskrcnn.report import Report
from maskrcnn.review import ReviewOptions

IO, COCO = "input (local paths or s3:// URIs)", "COCO JSON"
TOOLS = "labelling tools (polygons; file names or URLs relative to --images)"


@dataclass(kw_only=True)
class ExportConfig:
    """Everything an export is told: this job's flags."""

    predictions: str = option("the --output of jobs/segment_bucket.py", group=IO)
    images: str | None = option(
        "the image root: --coco-results matches the ground truth's file_names relative to it, --cvat "
        "writes file_names and --url-prefix URLs relative to it, pictures are named by it; "
        "--coco-dataset writes file_names relative to it (without --images: full URIs)",
        None,
        group=IO,
        default_text="the segmentation's --input",
    )
    min_score: float = option("leave out instances below this score", 0.0, group=IO)
    coco_results: str | None = option("write COCO results JSON (what loadRes takes) here", None, group=COCO)
    annotations: str | None = option("COCO ground truth whose image ids --coco-results uses", None, group=COCO)
    coco_dataset: str | None = option(
        "write a COCO dataset JSON (images, annotations with scores, categories) here", None, group=COCO
    )
    segmentation: str = option(
        "how --coco-dataset and --coco-results write masks: rle (COCO's compressed RLE) or polygons "
        "(pycocotools' loadRes reads RLE results only)",
        "rle",
        group=COCO,
        choices=("rle", "polygons"),
    )
    polygon_tolerance: float = option(
        "pixels a polygon may stray from its mask's outline (Douglas-Peucker; 0 keeps every boundary pixel)",
        masks.POLYGON_TOLERANCE,
        group=COCO,
        metavar="PX",
    )
    model: str | None = model_option(COCO, required=False)
    arch: str | None = arch_option(COCO)
    label_studio: str | None = option(
        "write Label Studio tasks with polygon predictions (tasks.json) and their labelling config (config.xml) here",
        None,
        group=TOOLS,
        metavar="DIR",
    )
    url_prefix: str | None = option(
        "Label Studio image URLs: this + the path under --images (e.g. /data/local-files/?d=photos/)",
        None,
        group=TOOLS,
        default_text="the s3:// URI, for Label Studio's S3 storage",
    )
    cvat: str | None = option(
        "write CVAT's COCO 1.0 layout here: annotations/instances_default.json, polygons, file_names "
        "relative to --images",
        None,
        group=TOOLS,
        metavar="DIR",
    )
    review: ReviewOptions = embed(ReviewOptions)
    render: int = option("draw the first N images with instances", 0, group=PICTURES, metavar="N")
    render_dir: str | None = option("write the N pictures here, one PNG each", None, group=PICTURES)
    contact_sheet: str | None = option("write the N pictures as one grid PNG here", None, group=PICTURES)
    columns: int = option("contact sheet columns", 4, group=PICTURES)
    pictures: PictureOptions = embed(PictureOptions)
    html: str | None = option(
        "write a report (index.html and its pictures) here; it shows --render N pictures, 24 without --render",
        None,
        group=PICTURES,
        metavar="DIR",
    )

    def __post_init__(self) -> None:
        """Usage errors for combinations that do nothing; then absolute paths, so that the
        image root and the segmentation's --input compare as written."""
        if not (self.coco_results or self.coco_dataset or self.label_studio or self.cvat or self.render or self.html):
            raise ValueError(
                "nothing to do: give --coco-results, --coco-dataset, --label-studio, --cvat, --render N or --html DIR"
            )
        if self.render and not (self.render_dir or self.contact_sheet or self.html):
            raise ValueError("--render needs --render-dir, --contact-sheet or --html")
        if (self.render_dir or self.contact_sheet) and not self.render:
            raise ValueError("--render-dir and --contact-sheet need --render N (how many images to draw)")
        if self.annotations and not self.coco_results:
            raise ValueError("--annotations only applies to --coco-results")
        if self.model and not (self.coco_dataset or self.label_studio or self.cvat):
            raise ValueError("--model only applies to --coco-dataset, --label-studio and --cvat (its categories)")
        if self.url_prefix is not None and not self.label_studio:
            raise ValueError("--url-prefix only applies to --label-studio")
        if self.render < 0 or self.columns < 1 or self.polygon_tolerance < 0:
            raise ValueError("--render and --polygon-tolerance must be at least 0 and --columns at least 1")
        self.predictions = storage.absolute(self.predictions)
        self.images = storage.absolute(self.images) if self.images else None


def parser() -> argparse.ArgumentParser:
    return add_options(job_parser("jobs/export.py", __doc__), ExportConfig)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(parser(), ExportConfig, argv)
    if not storage.exists(cfg.predictions):
        raise storage.StorageError(f"cannot read {cfg.predictions}: no such output")
    root = cfg.images or output.job_input(cfg.predictions)
    keypoints = output.job_keypoints(cfg.predictions)  # a keypoint model's names and skeleton
    rows = output.count_rows(cfg.predictions)
    queue = None
    if cfg.review.review:
        progress = Progress("review queue", rows, unit="rows")
        queue = review.select(progress.each(export.read_rows(cfg.predictions)), cfg.review, cfg.min_score)
        progress.finish()
        print(f"[export] review queue: {len(queue)} of {rows} rows, by {cfg.review.review_by}", flush=True)
    progress = Progress("export", rows, unit="rows")
    with contextlib.ExitStack() as stack:
        sinks = [stack.enter_context(sink) for sink in sinks_for(cfg, root, keypoints, queue)]
        feed(progress.each(export.read_rows(cfg.predictions)), sinks, queue)
    progress.finish()
    for sink in sinks:
        print(f"[export] {describe(sink, cfg)}")
    if any(isinstance(s, export.Pictures) and not s.drawn for s in sinks) and not queue:
        raise ValueError(
            f"nothing to draw: no image in {cfg.predictions} has instances at or above --min-score {cfg.min_score}"
        )


def feed(rows, sinks: list, queue: list[review.Queued] | None) -> None:
    """Every row to every sink; with a review queue, the report still sees every row (its
    counts are the whole output's) and the others get only the queued rows, in queue order,
    once the queue's last row has been read (so only the queue's rows are held)."""
    if queue is None:
        for row in rows:
            for sink in sinks:
                sink.add(row)
        return
    ranks, held = {q.uri: q.rank for q in queue}, {}
    reports = [s for s in sinks if isinstance(s, Report)]
    for row in rows:
        for report in reports:
            report.add(row)
        if row["uri"] in ranks:
            held[ranks[row["uri"]]] = row
    for rank in sorted(held):
        for sink in sinks:
            if not isinstance(sink, Report):
                sink.add(held[rank])


def sinks_for(
    cfg: ExportConfig,
    root: str | None,
    keypoints: KeypointSpec | None = None,
    queue: list[review.Queued] | None = None,
) -> list:
    """The outputs asked for, each a sink that takes the rows one at a time."""
    sinks: list = []
    polygons = export.Segmentation(cfg.polygon_tolerance if cfg.segmentation == "polygons" else None)
    categories = checkpoint.categories_of(cfg.model, cfg.arch) if cfg.model else None
    if cfg.coco_results:
        image_id = None
        if cfg.annotations:
            if root is None:
                raise ValueError("--annotations: pass --images, the root the ground truth's file_names are relative to")
            image_id = export.ground_truth_ids(cfg.annotations, root)
        sinks.append(export.CocoResults(cfg.coco_results, image_id, cfg.min_score, polygons))
    if cfg.coco_dataset:
        sinks.append(export.CocoDataset(cfg.coco_dataset, cfg.images, cfg.min_score, categories, keypoints, polygons))
    sinks += labelling_sinks(cfg, root, categories, keypoints)
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
        pictures = len(queue) if queue is not None else cfg.render or 24
        sinks.append(
            Report(
                cfg.html,
                cfg.predictions,
                pictures=pictures,
                root=root,
                min_score=cfg.min_score,
                keypoints=keypoints,
                queue=queue,
            )
        )
    return sinks


def labelling_sinks(
    cfg: ExportConfig, root: str | None, categories: list[dict] | None, keypoints: KeypointSpec | None
) -> list:
    """CVAT's COCO 1.0 and Label Studio's tasks, as asked; both always polygons."""
    sinks: list = []
    if cfg.cvat:
        if root is None:
            raise ValueError("--cvat: pass --images, the root CVAT's file names are relative to")
        cvat = export.Segmentation(cfg.polygon_tolerance)
        sinks.append(
            export.CocoDataset(prelabels.cvat_annotations(cfg.cvat), root, cfg.min_score, categories, keypoints, cvat)
        )
    if cfg.label_studio:
        url = prelabels.image_url(root, cfg.url_prefix)
        sinks.append(
            prelabels.LabelStudioTasks(
                cfg.label_studio, url, min_score=cfg.min_score, tolerance=cfg.polygon_tolerance, categories=categories
            )
        )
    return sinks


def describe(sink: object, cfg: ExportConfig) -> str:
    if isinstance(sink, export.CocoResults):
        missing = sink.unmatched
        unmatched = f"; {len(missing)} images not in {cfg.annotations}, e.g. {missing[0]}" if missing else ""
        return f"{sink.items.count} detections of {sink.rows} images -> {cfg.coco_results}{unmatched}"
    if isinstance(sink, export.CocoDataset):
        left_out = sink.segmentation.no_polygon
        specks = f" ({left_out} masks too small for a polygon left out)" if left_out else ""
        return f"{sink.images.count} images, {sink.annotations.count} annotations{specks} -> {sink.uri}"
    if isinstance(sink, prelabels.LabelStudioTasks):
        specks = f" ({sink.no_polygon} masks too small for a polygon left out)" if sink.no_polygon else ""
        where = storage.join(cfg.label_studio, prelabels.TASKS)
        return f"{sink.tasks} Label Studio tasks, {sink.regions} polygon regions{specks} -> {where}"
    if isinstance(sink, export.Pictures):
        return f"{sink.drawn} pictures drawn" + (f" -> {cfg.render_dir}" if cfg.render_dir else "")
    return f"report of {sink.images} rows, {len(sink.figures)} pictures -> {storage.join(cfg.html, 'index.html')}"


if __name__ == "__main__":
    run_main(main)
