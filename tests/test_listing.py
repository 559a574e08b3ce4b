"""The segmentation job's input: manifests, listings cut into parts, and the Ray Data
source that streams them and guards resuming."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maskrcnn import images, listing, storage
from maskrcnn.listing import Listing, ListingError


@pytest.mark.parametrize("kind", ["parquet", "csv", "txt"])
def test_manifests_stream_their_uris(kind, bucket):
    uris = [f"s3://{bucket}/img/{i:03d}.jpg" for i in range(7)]
    path = f"s3://{bucket}/lists/manifest.{kind}"
    if kind == "parquet":
        fs, p = storage.filesystem(path)
        pq.write_table(pa.table({"uri": uris, "note": ["x"] * 7}), p, filesystem=fs)
    elif kind == "csv":
        storage.write_text(path, "uri,note\n" + "".join(f"{u},x\n" for u in uris))
    else:
        storage.write_text(path, "\n".join(uris) + "\n\n")
    assert list(listing.input_uris(path, None, None)) == uris
    assert list(listing.input_uris(path, None, 3)) == uris[:3]
    with pytest.raises(ListingError, match="manifest not found"):
        listing.input_uris(f"s3://{bucket}/lists/none.{kind}", None, None)


def _archive(tmp_path, n: int):
    root = tmp_path / "archive"
    root.mkdir(exist_ok=True)
    for i in range(n):
        (root / f"{i:04d}.jpg").write_bytes(b"x")
    (root / "notes.txt").write_text("not an image")
    return root


class _Tally:
    """What a listing task tells the driver's :class:`maskrcnn.listing.Tally` actor, kept here."""

    def __init__(self) -> None:
        self.listed: list[dict] = []

    def __call__(self, images: int, part_files: int) -> None:
        self.listed.append({"images": images, "part_files": part_files})


def _rows(source: Listing) -> list[dict]:
    return [row for block in source._blocks() for row in block.to_pylist()]


def test_blocks_span_parts_skip_written_ones_and_record_the_listing(tmp_path):
    root, out = _archive(tmp_path, 150), tmp_path / "out"
    files = sorted(str(p) for p in root.glob("*.jpg"))
    written = {1: {"rows": 7, "first_uri": files[7], "last_uri": files[13]}}
    tally = _Tally()
    source = Listing(str(root), images.IMAGE_EXTENSIONS, None, 7, str(out), written, tally)
    blocks = list(source._blocks())
    assert [b.num_rows for b in blocks] == [listing.BLOCK_ROWS, listing.BLOCK_ROWS, 150 - 7 - 2 * listing.BLOCK_ROWS]
    rows = [r for b in blocks for r in b.to_pylist()]
    assert [r["uri"] for r in rows] == files[:7] + files[14:]  # part 1 is already written
    assert {(r["part"], r["index"]) for r in rows} == {(i // 7, i % 7) for i in range(150) if not 7 <= i < 14}
    assert {r["part_rows"] for r in rows if r["part"] == 21} == {150 - 21 * 7}  # the short last part
    assert tally.listed == [{"images": 150, "part_files": 22}]


@pytest.mark.parametrize("change", ["added", "removed_at_the_end"])
def test_a_changed_listing_is_refused(change, tmp_path):
    root, out = _archive(tmp_path, 20), tmp_path / "out"
    files = sorted(str(p) for p in root.glob("*.jpg"))
    written = {
        1: {"rows": 5, "first_uri": files[5], "last_uri": files[9]},
        3: {"rows": 5, "first_uri": files[15], "last_uri": files[19]},
    }
    if change == "added":
        (root / "0000a.jpg").write_bytes(b"x")  # sorts into part 0, shifting every later part
    else:
        for path in files[12:]:
            (root / path.rsplit("/", 1)[1]).unlink()  # part 3 no longer exists
    tally = _Tally()
    with pytest.raises(ListingError, match=r"the input listing changed since .*part-00000[13]\.parquet"):
        _rows(Listing(str(root), images.IMAGE_EXTENSIONS, None, 5, str(out), written, tally))
    assert tally.listed == []


def test_the_first_block_leaves_before_the_listing_ends(monkeypatch, tmp_path):
    """An endless listing: taking the first block reads only the first part of it."""
    import itertools

    read = []

    def endless(uri, extensions, limit):
        for i in itertools.count():
            read.append(i)
            yield f"s3://archive/{i:09d}.jpg"

    monkeypatch.setattr(listing, "input_uris", endless)
    blocks = Listing("s3://archive", None, None, 1000, str(tmp_path / "out"), {}, _Tally())._blocks()
    first = next(blocks)
    assert first.num_rows == listing.BLOCK_ROWS and first.column("part_rows").to_pylist()[0] == 1000
    assert len(read) <= 1001
