"""The segmentation output: Parquet part files, one row per input image.

The input listing is cut, in order, into parts of R rows (``--rows-per-file``): part k is
inputs k*R .. (k+1)*R-1 and is written as ``part-{k:06d}.parquet``, whole and atomically.
Each part file's footer holds the schema version and a few facts about its rows
(:func:`footer`), so resuming and summarising never need to read the rows.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from maskrcnn import storage

SCHEMA_VERSION = "2"  # 2: instances have keypoints
MASK = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
INSTANCE = pa.struct(
    [
        ("category_id", pa.int32()),
        ("category", pa.string()),
        ("score", pa.float32()),
        ("bbox", pa.list_(pa.float32())),  # COCO [x, y, w, h] in pixels of the oriented image
        ("mask", MASK),  # COCO compressed RLE; size = [height, width]; null for Keypoint R-CNN
        # K [x, y, score] in pixels of the oriented image (score: the heatmap's logit);
        # null for models without keypoints. The names and skeleton are in the checkpoint.
        ("keypoints", pa.list_(pa.list_(pa.float32(), 3))),
    ]
)
SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("width", pa.int32()),  # after EXIF orientation; null when the image could not be read
        ("height", pa.int32()),
        ("instances", pa.list_(INSTANCE)),
        ("model", pa.string()),
        ("error", pa.string()),  # null when processed; else "kind: message"
    ],
    metadata={"maskrcnn.schema_version": SCHEMA_VERSION},
)
_PART = re.compile(r"part-(\d{6})\.parquet")
FOOTER_KEY = b"maskrcnn.stats"  # named before the word "footer" was; kept so existing outputs resume


def part_uri(output: str, part: int) -> str:
    return storage.join(output, f"part-{part:06d}.parquet")


def error_kind(error: str | None) -> str | None:
    return error.split(":", 1)[0] if error else None


def footer(table: pa.Table) -> dict[str, Any]:
    """What a part file's footer records: counts for the summary, and the part's first and
    last URI, so that a resumed run can tell whether its listing still cuts the input the same way."""
    uris = table.column("uri")
    errors = Counter(error_kind(e) for e in table.column("error").to_pylist() if e)
    instances = sum(len(v) for v in table.column("instances").to_pylist())
    return {
        "rows": table.num_rows,
        "errors": dict(errors),
        "instances": instances,
        "first_uri": uris[0].as_py(),
        "last_uri": uris[-1].as_py(),
    }


def write_part(output: str, part: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Write one part file atomically; return its :func:`footer`."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    facts = footer(table)
    table = table.replace_schema_metadata({**SCHEMA.metadata, FOOTER_KEY: json.dumps(facts).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(part_uri(output, part), buf.getvalue())
    return facts


def part_of(name: str) -> int | None:
    """The part number of a part file's name, or None for any other file."""
    match = _PART.fullmatch(name)
    return int(match.group(1)) if match else None


def read_footer(uri: str) -> dict[str, Any]:
    """A part file's :func:`footer`, read without its rows."""
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        meta = pq.read_schema(f).metadata or {}
    return json.loads(meta[FOOTER_KEY])
