"""Pre-labels for the tools where people review labels: Label Studio tasks and CVAT's COCO 1.0.

- :class:`LabelStudioTasks` writes ``tasks.json`` (one task per image, its instances as a
  ``predictions`` entry of polygon regions in percent coordinates, as Label Studio
  pre-annotations take them) and ``config.xml`` (the labelling config naming the classes).
- CVAT's COCO 1.0 is a COCO dataset with polygons at ``annotations/instances_default.json``
  (:func:`cvat_annotations`), written by :class:`maskrcnn.export.CocoDataset`.

Both are sinks (see :mod:`maskrcnn.export`): rows in one at a time, files whole on close.
What comes back from the tools is read by :mod:`maskrcnn.coco`, with their quirks undone.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from typing import Any, Callable
from xml.sax.saxutils import quoteattr

from maskrcnn import export, masks, output, storage

TASKS, CONFIG = "tasks.json", "config.xml"
FROM_NAME, TO_NAME = "label", "image"  # the labelling config's control and image tag names


def cvat_annotations(directory: str) -> str:
    """Where CVAT's COCO 1.0 import looks for the annotations in a folder (or zip) it is given."""
    return storage.join(directory, "annotations", "instances_default.json")


def image_url(root: str | None, url_prefix: str | None) -> Callable[[str], str]:
    """How a task names its image: ``url_prefix`` + the path relative to ``root`` (percent-
    encoded, ``/`` kept), or, without a prefix, the ``s3://`` URI itself, which Label Studio's
    S3 storage serves. A local image without a prefix is an error: the browser cannot open it."""

    def url(uri: str) -> str:
        if url_prefix is not None:
            path = export.relative(uri, root) if root else None
            if path is None:
                raise ValueError(f"{uri} is not under --images {root}: --url-prefix needs the image root")
            return url_prefix + urllib.parse.quote(path, safe="/")
        if storage.is_s3(uri):
            return uri
        raise ValueError(
            f"{uri}: a local image needs --url-prefix (e.g. /data/local-files/?d= for Label Studio's local storage)"
        )

    return url


class LabelStudioTasks(contextlib.ExitStack):
    """Label Studio tasks with the model's instances as predictions, and their labelling config.

    Each instance at or above ``min_score`` is one polygon region per connected part of its
    mask (:func:`maskrcnn.masks.to_polygons`; a hole is kept by a zero-width cut), labelled
    with its class and carrying its score; an instance without a mask (a keypoint model's)
    is its box. A mask with no polygon of 3 points or more is left out and counted in
    ``no_polygon``. The prediction's ``score`` is the lowest of its regions' scores, so that
    sorting tasks by it in Label Studio brings the least certain image first. Error rows
    have no image to show and are left out (counted in ``errors``).
    """

    def __init__(
        self,
        directory: str,
        url: Callable[[str], str],
        *,
        min_score: float = 0.0,
        tolerance: float = masks.POLYGON_TOLERANCE,
        categories: list[dict] | None = None,
    ):
        super().__init__()
        self.directory, self.url, self.min_score, self.tolerance = directory, url, min_score, tolerance
        self.classes = [c["name"] for c in sorted(categories or [], key=lambda c: c["id"])]
        self.tasks = self.regions = self.no_polygon = self.errors = 0
        self.file = open(self.enter_context(storage.staged(storage.join(directory, TASKS))), "w")
        self.callback(self.file.close)
        self.file.write("[")
        self.items = export.JsonList(self.file)

    def add(self, row: dict[str, Any]) -> None:
        if row["error"]:
            self.errors += 1
            return
        result = []
        for inst in row["instances"]:
            if inst["score"] >= self.min_score:
                result += self._regions(inst, row["width"], row["height"], f"{self.tasks + 1}-{len(result) + 1}")
        scores = [r["score"] for r in result]
        prediction = {"model_version": row["model"] or "", "score": min(scores) if scores else 0.0, "result": result}
        task = {"data": {TO_NAME: self.url(row["uri"])}, "predictions": [prediction]}
        self.items.add(task)
        self.tasks += 1
        self.regions += len(result)

    def _regions(self, inst: dict[str, Any], width: int, height: int, first_id: str) -> list[dict[str, Any]]:
        if inst.get("mask"):
            polygons = masks.to_polygons(inst["mask"], self.tolerance)
            if not polygons:
                self.no_polygon += 1
        else:
            polygons = output.box_polygon(inst["bbox"])
        if inst["category"] not in self.classes:
            self.classes.append(inst["category"])
        return [
            {
                "id": f"{first_id}-{k}",
                "from_name": FROM_NAME,
                "to_name": TO_NAME,
                "type": "polygonlabels",
                "original_width": width,
                "original_height": height,
                "image_rotation": 0,
                "score": inst["score"],
                "value": {
                    "points": [[100 * p[i] / width, 100 * p[i + 1] / height] for i in range(0, len(p), 2)],
                    "polygonlabels": [inst["category"]],
                    "closed": True,
                },
            }
            for k, p in enumerate(polygons, 1)
        ]

    def __exit__(self, *exc: Any) -> bool:
        if exc[0] is None:
            self.file.write("]")
            storage.write_text(storage.join(self.directory, CONFIG), labelling_config(self.classes))
        return super().__exit__(*exc)


def labelling_config(classes: list[str]) -> str:
    """Label Studio's labelling config for polygon labels of ``classes`` over one image."""
    labels = "\n".join(f"    <Label value={quoteattr(name)}/>" for name in classes)
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="${TO_NAME}" zoom="true"/>\n'
        f'  <PolygonLabels name="{FROM_NAME}" toName="{TO_NAME}" strokeWidth="2" opacity="0.4">\n'
        f"{labels}\n"
        "  </PolygonLabels>\n"
        "</View>\n"
    )
