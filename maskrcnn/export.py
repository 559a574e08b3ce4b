"""Output rows -> COCO results JSON, a COCO dataset JSON, and pictures.

Rows are the segmentation output's (:mod:`maskrcnn.output`): ``uri``, ``width``, ``height``,
``instances``, ``model``, ``error``; ``predict.py`` makes the same rows in memory. Every
writer here is a *sink*: it takes rows one at a time (:meth:`add`) and commits its file when
closed, so one pass over the part files feeds them all, the driver holds one batch of rows
at a time, and JSON goes to a local staging file before it is stored whole
(:func:`maskrcnn.storage.staged`): no partial file appears, however large the output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from typing import Any, Callable

from maskrcnn import draw, images, masks, storage
from maskrcnn.keypoints import KeypointSpec
from maskrcnn.metric import to_results
from maskrcnn.output import as_coco_annotation, part_files, read_rows  # noqa: F401 (read_rows: export's API)


def relative(uri: str, root: str) -> str | None:
    """``uri``'s path under ``root``, with ``/`` separators; None when it is not under it."""
    if uri.startswith("file://") and not root.startswith("file://"):
        uri = storage.local_path(uri)  # a listed name that is not UTF-8 (see maskrcnn.storage)
    root = root.rstrip("/\\")
    for sep in ("/", os.sep):
        if uri.startswith(root + sep):
            return uri[len(root) + 1 :].replace(os.sep, "/")
    return None


# ---------------------------------------------------------------- COCO JSON


class Segmentation:
    """How a COCO file writes masks: as their COCO RLE (``tolerance`` None), or as polygons
    (:func:`maskrcnn.masks.to_polygons` within ``tolerance`` pixels). A mask with no polygon
    of 3 points or more (a speck) cannot be written as polygons: its instance is left out,
    and counted in ``no_polygon``."""

    def __init__(self, tolerance: float | None = None):
        self.tolerance, self.no_polygon = tolerance, 0

    def __call__(self, ann: dict[str, Any]) -> dict[str, Any] | None:
        """A COCO annotation or result with its ``segmentation`` as asked; None to leave it out."""
        segm = ann.get("segmentation")
        if self.tolerance is None or not isinstance(segm, dict):
            return ann
        polygons = masks.to_polygons(segm, self.tolerance)
        if not polygons:
            self.no_polygon += 1
            return None
        return dict(ann, segmentation=polygons)


class JsonList:
    """A JSON array written item by item to a local file."""

    def __init__(self, f: Any):
        self.f, self.count = f, 0

    def add(self, item: Any) -> None:
        self.f.write(("," if self.count else "") + json.dumps(item))
        self.count += 1


class CocoResults(contextlib.ExitStack):
    """COCO results (what ``COCO.loadRes`` takes): image ids from ``image_id(row)``, which
    returns None for rows to leave out; by default rows are numbered 1.. in order, as
    :class:`CocoDataset` numbers them."""

    def __init__(
        self,
        uri: str,
        image_id: Callable[[dict], int | None] | None = None,
        min_score: float = 0.0,
        segmentation: Segmentation | None = None,
    ):
        super().__init__()
        self.uri, self.image_id, self.min_score, self.rows, self.unmatched = uri, image_id, min_score, 0, []
        self.segmentation = segmentation or Segmentation()
        self.file = open(self.enter_context(storage.staged(uri)), "w")
        self.callback(self.file.close)
        self.file.write("[")
        self.items = JsonList(self.file)

    def add(self, row: dict[str, Any]) -> None:
        if row["error"]:
            return
        self.rows += 1
        image_id = self.image_id(row) if self.image_id else self.rows
        if image_id is None:
            self.unmatched.append(row["uri"])
            return
        for result in to_results([i for i in row["instances"] if i["score"] >= self.min_score], image_id):
            result = self.segmentation(result)
            if result is not None:
                self.items.add(result)

    def __exit__(self, *exc: Any) -> bool:
        if exc[0] is None:
            self.file.write("]")
        return super().__exit__(*exc)


def ground_truth_ids(annotations: str, root: str) -> Callable[[dict], int | None]:
    """Match rows to a COCO ground truth's image ids by the path relative to ``root``
    (the image root its ``file_name``\\ s are relative to), never by bare file name."""
    gt = json.loads(storage.read_text(annotations))
    ids = {posixpath.normpath(img["file_name"]): img["id"] for img in gt["images"]}

    def image_id(row: dict) -> int | None:
        path = relative(row["uri"], root)
        return None if path is None else ids.get(posixpath.normpath(path))

    return image_id


class CocoDataset(contextlib.ExitStack):
    """A COCO instances file (images, annotations with their ``score``, categories) for
    labelling tools. ``file_name`` is the image's URI, or its path relative to ``root``.
    ``categories`` (the model's) are listed even where nothing was found. With ``keypoints``
    (a keypoint model's), the categories carry their names and skeleton, and each annotation
    its ``keypoints`` ``[x, y, v]``: v 2 where the keypoint is drawn (see :data:`maskrcnn.output.KEYPOINT_MIN_SCORE`),
    else 0 at (0, 0), as COCO writes unlabelled keypoints."""

    def __init__(
        self,
        uri: str,
        root: str | None = None,
        min_score: float = 0.0,
        categories: list[dict] | None = None,
        keypoints: KeypointSpec | None = None,
        segmentation: Segmentation | None = None,
    ):
        super().__init__()
        self.uri, self.root, self.min_score, self.keypoints = uri, root, min_score, keypoints
        self.segmentation = segmentation or Segmentation()
        self.categories = {c["id"]: c["name"] for c in categories or []}
        self.file = open(self.enter_context(storage.staged(uri)), "w")
        self.callback(self.file.close)
        # Annotations wait in a second file until the images are written.
        self.anns_file = self.enter_context(tempfile.TemporaryFile("w+"))
        self.file.write('{"images": [')
        self.images, self.annotations = JsonList(self.file), JsonList(self.anns_file)

    def add(self, row: dict[str, Any]) -> None:
        if row["error"]:
            return
        file_name = row["uri"] if self.root is None else relative(row["uri"], self.root)
        if file_name is None:
            raise ValueError(f"{row['uri']} is not under --images {self.root}")
        image_id = self.images.count + 1
        self.images.add({"id": image_id, "file_name": file_name, "width": row["width"], "height": row["height"]})
        for inst in row["instances"]:
            if inst["score"] >= self.min_score:
                self.categories[inst["category_id"]] = inst["category"]
                ann = self.segmentation(self._annotation(inst))
                if ann is not None:
                    self.annotations.add({"id": self.annotations.count + 1, "image_id": image_id, **ann})

    @staticmethod
    def _annotation(inst: dict[str, Any]) -> dict[str, Any]:
        """An instance as COCO's ground truth has it: with a mask, its ``bbox`` is the mask's
        tight box (a predicted box may stray from its mask, and FiftyOne, for one, crops the
        mask to the box) and ``area`` the mask's."""
        ann = as_coco_annotation(inst)
        if not inst["mask"]:
            return dict(ann, area=inst["bbox"][2] * inst["bbox"][3])
        return dict(ann, bbox=masks.box(inst["mask"]), area=masks.area(inst["mask"]))

    def __exit__(self, *exc: Any) -> bool:
        if exc[0] is None:
            self.file.write('], "annotations": [')
            self.anns_file.seek(0)
            shutil.copyfileobj(self.anns_file, self.file)
            extra = self.keypoints.as_dict() if self.keypoints else {}
            categories = [{"id": i, "name": n, **extra} for i, n in sorted(self.categories.items())]
            self.file.write(f'], "categories": {json.dumps(categories)}}}')
        return super().__exit__(*exc)


# ---------------------------------------------------------------- pictures


def picture(row: dict[str, Any], rgb: Any, *, min_score: float = 0.0, **style: Any):
    """One row's instances at or above ``min_score`` drawn over its image ``rgb`` (``style``:
    :func:`maskrcnn.draw.picture`'s keywords)."""
    kept = [i for i in row["instances"] if i["score"] >= min_score]
    return draw.picture(rgb, kept, (row["height"], row["width"]), **style)


def read_image(row: dict[str, Any], max_side: int) -> Any:
    """A row's image again, decoded no larger than needed to draw it ``max_side`` wide."""
    decoded, error = images.read(row["uri"], (max_side, max_side))
    if error:
        raise storage.StorageError(f"cannot draw {row['uri']}: {error}")
    return decoded.pixels


def source_name(uri: str, root: str | None) -> str:
    """How pictures name an image: its path relative to the input ``root``, so that equal
    file names in different folders stay apart; its file name when not under it."""
    return (relative(uri, root) if root else None) or posixpath.basename(uri)


def picture_name(uri: str, root: str | None) -> str:
    """Where a picture of ``uri`` goes under an output directory: :func:`source_name` as a
    relative path ending in ``.png`` that stays inside that directory whatever the name holds.
    Empty and ``.`` segments go, ``..`` becomes ``%2E%2E``, characters a file name or a
    terminal should not carry are percent-encoded (:func:`printable`), and a segment too long
    for a file system is cut, with a hash of the whole to keep it apart from its neighbours."""
    segments = [s for s in source_name(uri, root).split("/") if s not in ("", ".")] or ["_"]
    segments[-1] = posixpath.splitext(segments[-1])[0] or "_"
    safe = [_shortened(printable(s) if s != ".." else "%2E%2E") for s in segments]
    return "/".join(safe) + ".png"


# Characters no picture name or caption carries as they are: control characters, the backslash
# (a separator elsewhere) and the lone surrogates that stand for a file name's non-UTF-8 bytes.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\\\ud800-\udfff]")
SEGMENT_BYTES = 200  # a picture's file name, with "-N", ".png", ".json" or staging's ".tmp-" added, stays < 255


def printable(name: str) -> str:
    """``name`` with its :data:`_UNPRINTABLE` characters percent-encoded (a surrogate as the byte it stands for)."""

    def encode(m: re.Match) -> str:
        return "".join(f"%{b:02X}" for b in m.group().encode("utf-8", "surrogateescape"))

    return _UNPRINTABLE.sub(encode, name)


def _shortened(segment: str) -> str:
    if len(segment.encode("utf-8")) <= SEGMENT_BYTES:
        return segment
    digest = hashlib.sha256(segment.encode("utf-8")).hexdigest()[:8]
    return storage.shorten(segment, SEGMENT_BYTES - 9) + "~" + digest


class PictureNames:
    """One :func:`picture_name` per image: a second image whose name comes out the same
    (``dup.jpg`` and ``dup.png``, or ``a//b.jpg`` and ``a/b.jpg`` on S3) gets ``-2``, ``-3``..."""

    def __init__(self) -> None:
        self.taken: set[str] = set()

    def __call__(self, uri: str, root: str | None) -> str:
        name = picture_name(uri, root)
        stem, n = name.removesuffix(".png"), 1
        while name in self.taken:
            n += 1
            name = f"{stem}-{n}.png"
        self.taken.add(name)
        return name


class Pictures(contextlib.AbstractContextManager):
    """The first ``count`` rows with instances at or above ``min_score``, drawn: one PNG each
    under ``directory`` and/or, on close, one contact sheet PNG at ``sheet``."""

    def __init__(
        self,
        count: int,
        directory: str | None = None,
        sheet: str | None = None,
        *,
        root: str | None = None,
        columns: int = 4,
        cell: int = 320,
        max_side: int = 1024,
        min_score: float = 0.0,
        boxes: bool = False,
        keypoints: KeypointSpec | None = None,
    ):
        self.count, self.directory, self.sheet, self.root, self.columns, self.cell = (
            count,
            directory,
            sheet,
            root,
            columns,
            cell,
        )
        self.style = {"min_score": min_score, "boxes": boxes, "skeleton": keypoints.skeleton if keypoints else ()}
        self.max_side, self.drawn, self.cells, self.names = max_side, 0, [], PictureNames()

    def add(self, row: dict[str, Any]) -> str | None:
        """Draw the row if it is one of the first ``count`` to draw; return its picture's name
        (relative to ``directory``), or None if it was not drawn."""
        if (
            self.drawn >= self.count
            or row["error"]
            or not any(i["score"] >= self.style["min_score"] for i in row["instances"])
        ):
            return None
        self.drawn += 1
        name = self.names(row["uri"], self.root)
        rgb = read_image(row, self.max_side if self.directory else self.cell)
        if self.directory:
            target = storage.join(self.directory, *name.split("/"))
            storage.write_bytes(target, draw.png(picture(row, rgb, max_side=self.max_side, **self.style)))
            print(f"[export] {printable(target)}", flush=True)
        if self.sheet:
            cell = picture(row, rgb, max_side=self.cell, enlarge_to=self.cell, **self.style)
            self.cells.append((cell, printable(source_name(row["uri"], self.root))))
        return name

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None and self.sheet and self.cells:
            storage.write_bytes(self.sheet, draw.contact_sheet(self.cells, self.columns, self.cell))
            print(f"[export] contact sheet of {len(self.cells)} images -> {self.sheet}", flush=True)
