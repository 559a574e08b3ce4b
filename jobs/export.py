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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn import checkpoint, export, storage
from maskrcnn.cli import BOXES_HELP, add_model_arguments, job_parser, run_main
from maskrcnn.keypoints import KeypointSpec
from maskrcnn.progress import Progress
from maskrcnn.report import Report


def parser() -> argparse.ArgumentParser:
    p = job_parser("jobs/export.py", __doc__)
    p.add_argument("--predictions", required=True, help="the --output of jobs/segment_bucket.py")
    p.add_argument(
        "--images",
        help="the image root: --coco-results matches the ground truth's file_names relative to "
        "it (default: the segmentation's --input), --coco-dataset writes file_names "
        "relative to it (default: full URIs), pictures are named by it",
    )
    p.add_argument("--min-score", type=float, default=0.0, help="leave out instances below this score")
    coco = p.add_argument_group("COCO JSON")
    coco.add_argument("--coco-results", help="write COCO results JSON (what loadRes takes) here")
    coco.add_argument("--annotations", help="COCO ground truth whose image ids --coco-results uses")
    coco.add_argument(
        "--coco-dataset", help="write a COCO dataset JSON (images, annotations with scores, categories) here"
    )
    add_model_arguments(coco, required=False)
    pics = p.add_argument_group("pictures")
    pics.add_argument("--render", type=int, default=0, metavar="N", help="draw the first N images with instances")
    pics.add_argument("--render-dir", help="write the N pictures here, one PNG each")
    pics.add_argument("--contact-sheet", help="write the N pictures as one grid PNG here")
    pics.add_argument("--columns", type=int, default=4, help="contact sheet columns (default: %(default)s)")
    pics.add_argument(
        "--max-side", type=int, default=1024, help="longest side of a picture, pixels (default: %(default)s)"
    )
    pics.add_argument("--boxes", action="store_true", help=BOXES_HELP)
    pics.add_argument(
        "--html",
        metavar="DIR",
        help="write a report (index.html and its pictures) here; it shows --render N pictures (default 24)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    check(p, args)
    root = args.images or export.job_input(args.predictions)
    keypoints = export.job_keypoints(args.predictions)  # a keypoint model's names and skeleton
    progress = Progress("export", export.count_rows(args.predictions), unit="rows")
    with contextlib.ExitStack() as stack:
        sinks = [stack.enter_context(sink) for sink in sinks_for(args, root, keypoints)]
        for row in export.read_rows(args.predictions):
            for sink in sinks:
                sink.add(row)
            progress.add(1)
    progress.finish()
    for sink in sinks:
        print(f"[export] {describe(sink, args)}")
    if any(isinstance(s, export.Pictures) and not s.drawn for s in sinks):
        raise ValueError(
            f"nothing to draw: no image in {args.predictions} has instances at or above --min-score {args.min_score}"
        )


def check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not (args.coco_results or args.coco_dataset or args.render or args.html):
        p.error("nothing to do: give --coco-results, --coco-dataset, --render N or --html DIR")
    if args.render and not (args.render_dir or args.contact_sheet or args.html):
        p.error("--render needs --render-dir, --contact-sheet or --html")
    if (args.render_dir or args.contact_sheet) and not args.render:
        p.error("--render-dir and --contact-sheet need --render N (how many images to draw)")
    if args.annotations and not args.coco_results:
        p.error("--annotations only applies to --coco-results")
    if args.model and not args.coco_dataset:
        p.error("--model only applies to --coco-dataset (its categories)")
    if not storage.exists(args.predictions):
        raise storage.StorageError(f"cannot read {args.predictions}: no such output")


def sinks_for(args: argparse.Namespace, root: str | None, keypoints: KeypointSpec | None = None) -> list:
    """The outputs asked for, each a sink that takes the rows one at a time."""
    sinks: list = []
    if args.coco_results:
        image_id = None
        if args.annotations:
            if root is None:
                raise ValueError("--annotations: pass --images, the root the ground truth's file_names are relative to")
            image_id = export.ground_truth_ids(args.annotations, root)
        sinks.append(export.CocoResults(args.coco_results, image_id, args.min_score))
    if args.coco_dataset:
        categories = checkpoint.categories_of(args.model, args.arch) if args.model else None
        sinks.append(export.CocoDataset(args.coco_dataset, args.images, args.min_score, categories, keypoints))
    if args.render_dir or args.contact_sheet:
        sinks.append(
            export.Pictures(
                args.render,
                args.render_dir,
                args.contact_sheet,
                root=root,
                columns=args.columns,
                max_side=args.max_side,
                min_score=args.min_score,
                boxes=args.boxes,
                keypoints=keypoints,
            )
        )
    if args.html:
        sinks.append(
            Report(
                args.html,
                args.predictions,
                pictures=args.render or 24,
                root=root,
                min_score=args.min_score,
                keypoints=keypoints,
            )
        )
    return sinks


def describe(sink: object, args: argparse.Namespace) -> str:
    if isinstance(sink, export.CocoResults):
        missing = sink.unmatched
        unmatched = f"; {len(missing)} images not in {args.annotations}, e.g. {missing[0]}" if missing else ""
        return f"{sink.items.count} detections of {sink.rows} images -> {args.coco_results}{unmatched}"
    if isinstance(sink, export.CocoDataset):
        return f"{sink.images.count} images, {sink.annotations.count} annotations -> {args.coco_dataset}"
    if isinstance(sink, export.Pictures):
        return f"{sink.drawn} pictures drawn" + (f" -> {args.render_dir}" if args.render_dir else "")
    return f"report of {sink.images} rows, {len(sink.figures)} pictures -> {storage.join(args.html, 'index.html')}"


if __name__ == "__main__":
    run_main(main)
