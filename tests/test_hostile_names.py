"""Hostile names through the jobs, locally and on S3: markup, quotes, ``#``, ``%``, ``?``,
``&``, a newline, a backslash, unicode, a name that is not UTF-8, a 255-byte name, deep
folders, equal stems, and the keys only S3 allows (``..``, ``.`` and empty segments, one
that points into another bucket). Every image is stored at its own size, so a row's size
tells which object was read. Each input gets exactly one row (a JPEG whose data ends long
before its declared size is a ``corrupt`` row), and one picture; nothing is written outside
the output folders; no markup in the report comes from a name."""

from __future__ import annotations

import html.parser
import io
import os
import struct
import urllib.parse
import uuid
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
from PIL import Image

from maskrcnn import storage
from tests.helpers import call_job, run_job, small_model_file

NAMES = [
    "<img src=x onerror=alert(1)>.jpg",
    "<b>bold</b>.png",
    "quote\"'.jpg",
    "hash#1 & 50% ?.png",
    "new\nline.jpg",
    "back\\slash.jpg",
    "ünïcödé 日本.jpg",
    "x" * 251 + ".jpg",  # 255 bytes
    "d1/d2/d3/d4/d5/d6/d7/deep.jpg",
    "dup.jpg",
    "dup.png",
    "a/same.jpg",
    "b/same.jpg",
]
LOCAL_ONLY = [b"caf\xe9 latin-1.jpg"]  # not UTF-8
S3_ONLY = ["names/plain.jpg", "names/a/../plain.jpg", "names/./dot.jpg", "odd//double.jpg", "odd/double.jpg"]
CORRUPT = "fake-10000x9000.jpg"
# Markup the report itself writes; anything else came from a name.
REPORT_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "code"}
REPORT_TAGS |= {"table", "tr", "th", "td", "figure", "img", "figcaption"}


def _image(photo: Path, size: tuple[int, int], name: str) -> bytes:
    buf = io.BytesIO()
    Image.open(photo).convert("RGB").resize(size).save(buf, "PNG" if name.endswith(".png") else "JPEG")
    return buf.getvalue()


def _fake_jpeg() -> bytes:
    """A small JPEG whose frame header declares 10000x9000 pixels: libjpeg pads it silently."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    struct.pack_into(">HH", data, data.find(b"\xff\xc0") + 5, 9000, 10000)
    return bytes(data)


class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attrs: set[str] = set()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs.update(a for a, _ in attrs)
        self.sources += [v for a, v in attrs if tag == "img" and a == "src"]


@pytest.fixture
def archive(request, shared_data, tmp_path):
    """(input root URI, {uri: (width, height)} of each image, a function listing every file
    or object there is now, outside and inside the outputs)."""
    photo = shared_data / "photos" / "dog1.jpg"
    where = request.param
    names: list[str | bytes] = [*NAMES, *(LOCAL_ONLY if where == "local" else S3_ONLY)]
    sizes = {}
    if where == "local":
        root = tmp_path / "in"
        for i, name in enumerate(names):
            path = os.path.join(os.fsencode(root), name) if isinstance(name, bytes) else str(root / name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            size = (64 + 4 * i, 48 + 2 * i)
            Path(os.fsdecode(path)).write_bytes(_image(photo, size, os.fsdecode(name)))
            sizes[storage._local_uri(os.fsdecode(path))] = size
        Path(root / CORRUPT).write_bytes(_fake_jpeg())
        return str(root), sizes, lambda: sorted(str(p) for p in tmp_path.rglob("*") if p.is_file())
    request.getfixturevalue("s3_server")
    # moto's server answers 404 to any request for a key with a newline (S3 itself allows it):
    # on S3 the control character is a carriage return instead.
    names = [n.replace("\n", "\r") if isinstance(n, str) else n for n in names]
    bucket, other = (f"test-{uuid.uuid4().hex[:12]}" for _ in range(2))
    client = boto3.client("s3")
    for b in (bucket, other):
        client.create_bucket(Bucket=b)
    # Read with pyarrow's normalisation, this key would be the other bucket's secret.jpg.
    names.append(f"../../{other}/secret.jpg")
    client.put_object(Bucket=other, Key="secret.jpg", Body=_image(photo, (300, 40), "secret.jpg"))
    for i, name in enumerate(names):
        size = (64 + 4 * i, 48 + 2 * i)
        client.put_object(Bucket=bucket, Key=f"in/{name}", Body=_image(photo, size, name))
        sizes[f"s3://{bucket}/in/{name}"] = size
    client.put_object(Bucket=bucket, Key=f"in/{CORRUPT}", Body=_fake_jpeg())

    def objects() -> list[str]:
        pages = [p for b in (bucket, other) for p in client.get_paginator("list_objects_v2").paginate(Bucket=b)]
        return sorted(f"{p['Name']}/{o['Key']}" for p in pages for o in p.get("Contents", []))

    return f"s3://{bucket}/in", sizes, objects


@pytest.mark.parametrize("archive", ["local", "s3"], indirect=True)
def test_hostile_names_get_one_row_and_one_picture_each_and_write_only_inside_the_outputs(archive, tmp_path):
    root, sizes, everything = archive
    out = storage.join(os.path.dirname(root), "out")
    model = small_model_file(tmp_path / "model" / "small.pt", min_size=96, max_size=128)
    before = everything()
    # 1. segment_bucket.py: one row per object, read from exactly its key.
    flags = ["--model", model, "--score-threshold", "0", "--max-detections", "2", "--rows-per-file", "5"]
    result = run_job("segment_bucket.py", "--input", root, "--output", out, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    fs, path = storage.filesystem(out)
    rows = pq.read_table(path, filesystem=fs).to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted([*sizes, storage.join(root, CORRUPT)])
    for row in rows:
        if row["uri"].endswith(CORRUPT):
            assert row["error"].startswith("corrupt: JPEG data ends early"), row["error"]
        else:
            assert row["error"] is None and (row["width"], row["height"]) == sizes[row["uri"]], row["uri"]
            assert row["instances"], row["uri"]  # so that every image is drawn below
    # 2. export.py: pictures, a contact sheet and the report.
    pictures, sheet, report = (storage.join(out + "-" + n) for n in ("pictures", "sheet.png", "report"))
    result = call_job("export.py", "--predictions", out, "--render", "100", "--render-dir", pictures)
    assert result.returncode == 0, result.stderr
    result = call_job("export.py", "--predictions", out, "--render", "100", "--contact-sheet", sheet, "--html", report)
    assert result.returncode == 0, result.stderr
    # 3. predict.py on the same input: one picture per image; the corrupt one fails (exit 2).
    predicted = storage.join(out + "-predict")
    result = call_job("predict.py", "--input", root, "--output", predicted, *flags[:-2], "--json-per-image")
    assert result.returncode == 2 and CORRUPT in result.stderr, result.stderr
    _check_outputs(everything, before, sizes, out, pictures, sheet, report, predicted)


def _check_outputs(everything, before, sizes, out, pictures, sheet, report, predicted) -> None:
    """One picture per image in each picture folder, the report's links all work, and every
    new file or object is inside one of the outputs."""
    after = everything()
    new = sorted(set(after) - set(before))
    prefixes = [u.removeprefix("s3://") for u in (out, pictures, report, predicted)]
    assert [
        n for n in new if not any(n.startswith(p + "/") for p in prefixes) and n != sheet.removeprefix("s3://")
    ] == []
    coco = ("coco_dataset.json", "coco_results.json")
    report_pictures = storage.join(report, "pictures")
    for folder, suffix in ((pictures, ".png"), (predicted, ".png"), (predicted, ".json"), (report_pictures, ".png")):
        found = [n for n in new if n.startswith(folder.removeprefix("s3://") + "/") and n.endswith(suffix)]
        assert len([n for n in found if not n.endswith(coco)]) == len(sizes), (folder, suffix, found)
    page = _Tags()
    page.feed(storage.read_text(storage.join(report, "index.html")))
    assert page.tags <= REPORT_TAGS and page.attrs <= {"lang", "charset", "src", "alt", "class"}, page.tags
    plots = {"scores.png", "instances.png", "errors.png"}
    assert len([s for s in page.sources if s not in plots]) == len(sizes) and plots <= set(page.sources)
    for src in page.sources:
        assert storage.exists(storage.join(report, *urllib.parse.unquote(src).split("/"))), src
    assert storage.read_bytes(sheet).startswith(b"\x89PNG")
