"""Export a segmentation output (Parquet) to COCO JSON, and draw overlay pictures.

Examples:
  # COCO results that pycocotools' loadRes accepts, with image ids matched to a ground truth
  python jobs/export.py --predictions labels/run1 --coco-results labels/run1.results.json \\
      --annotations coco/annotations/instances_val2017.json

  # a full COCO dataset (images, annotations, categories) for a labelling tool, plus 20 pictures
  python jobs/export.py --predictions s3://labels/run1 --coco-dataset s3://labels/run1.coco.json \\
      --render 20 --render-dir labels/run1-pictures

  # one grid picture of the first 16 images with instances
  python jobs/export.py --predictions labels/run1 --render 16 --contact-sheet labels/run1-sheet.png
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import posixpath
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn import export, storage  # noqa: E402
from maskrcnn.cli import job_parser, run_main  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = job_parser("jobs/export.py", __doc__)
    p.add_argument("--predictions", required=True, help="the --output of jobs/segment_bucket.py")
    p.add_argument("--coco-results", help="write COCO results JSON here")
    p.add_argument("--annotations", help="COCO ground truth whose image ids the results should use (matched by file name)")
    p.add_argument("--coco-dataset", help="write a COCO dataset JSON (images, annotations, categories) here")
    p.add_argument("--min-score", type=float, default=0.0, help="leave out instances below this score")
    p.add_argument("--render", type=int, default=0, metavar="N", help="draw the first N images that have instances (at or above --min-score)")
    p.add_argument("--render-dir", help="write the N pictures here, one PNG each")
    p.add_argument("--contact-sheet", help="write the N pictures as one grid PNG here")
    p.add_argument("--columns", type=int, default=4, help="contact sheet columns (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if not (args.coco_results or args.coco_dataset or args.render):
        raise ValueError("nothing to do: give --coco-results, --coco-dataset or --render N")
    if args.render and not (args.render_dir or args.contact_sheet):
        raise ValueError("--render needs --render-dir or --contact-sheet")
    if args.contact_sheet and not args.render:
        raise ValueError("--contact-sheet needs --render N (how many images it shows)")
    if not storage.exists(args.predictions):
        raise storage.StorageError(f"cannot read {args.predictions}: no such output")
    if args.coco_results:
        ids = export.image_ids_from(json.loads(storage.read_text(args.annotations))) if args.annotations else None
        results = export.to_coco_results(export.read_rows(args.predictions), ids, args.min_score)
        storage.write_text(args.coco_results, json.dumps(results))
        print(f"[export] {len(results)} detections -> {args.coco_results}")
    if args.coco_dataset:
        dataset = export.to_coco_dataset(export.read_rows(args.predictions), args.min_score)
        storage.write_text(args.coco_dataset, json.dumps(dataset))
        print(f"[export] {len(dataset['images'])} images, {len(dataset['annotations'])} annotations -> {args.coco_dataset}")
    if args.render:
        _render(args)


def _render(args: argparse.Namespace) -> None:
    rows = (r for r in export.read_rows(args.predictions) if any(i["score"] >= args.min_score for i in r["instances"]))
    pictures = []
    for row in itertools.islice(rows, args.render):
        pictures.append(export.render(row, args.min_score))
        if args.render_dir:
            target = storage.join(args.render_dir, posixpath.splitext(posixpath.basename(row["uri"]))[0] + ".png")
            storage.write_bytes(target, pictures[-1])
            print(f"[export] {target}")
    if not pictures:
        raise ValueError(f"nothing to draw: no image in {args.predictions} has instances above --min-score {args.min_score}")
    if args.contact_sheet:
        storage.write_bytes(args.contact_sheet, export.contact_sheet(pictures, args.columns))
        print(f"[export] contact sheet of {len(pictures)} images -> {args.contact_sheet}")


if __name__ == "__main__":
    run_main(main)
