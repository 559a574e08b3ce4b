"""Export a segmentation output (Parquet) to COCO JSON, and draw overlay pictures.

Examples:
  # COCO results that pycocotools' loadRes accepts, with image ids matched to a ground truth
  python jobs/export.py --predictions labels/run1 --coco-results labels/run1.results.json \\
      --annotations coco/annotations/instances_val2017.json

  # a full COCO dataset (images, annotations, categories) for a labelling tool, plus 20 pictures
  python jobs/export.py --predictions s3://labels/run1 --coco-dataset s3://labels/run1.coco.json \\
      --render 20 --render-dir labels/run1-pictures
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
    p.add_argument("--render", type=int, default=0, metavar="N", help="draw the first N images that have instances")
    p.add_argument("--render-dir", help="where the pictures go (required with --render)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if not (args.coco_results or args.coco_dataset or args.render):
        raise ValueError("nothing to do: give --coco-results, --coco-dataset or --render N")
    if args.render and not args.render_dir:
        raise ValueError("--render needs --render-dir")
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
        rows = (r for r in export.read_rows(args.predictions) if not r["error"] and r["instances"])
        for row in itertools.islice(rows, args.render):
            name = posixpath.splitext(posixpath.basename(row["uri"]))[0] + ".png"
            target = storage.join(args.render_dir, name)
            storage.write_bytes(target, export.render(row, args.min_score))
            print(f"[export] {target}")


if __name__ == "__main__":
    run_main(main)
