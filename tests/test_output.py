"""The segmentation output's part files: written whole and atomically, locally and on S3,
with the schema and a footer that resuming and summaries read without the rows."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maskrcnn import output, storage


def _rows() -> list[dict]:
    mask = {"size": [4, 6], "counts": "0H0"}
    instance = {"category_id": 5, "category": "dog", "score": 0.9, "bbox": [1.0, 1.0, 2.0, 2.0], "mask": mask}
    return [
        {
            "uri": "s3://a/1.jpg",
            "width": 6,
            "height": 4,
            "instances": [instance, instance],
            "model": "m",
            "error": None,
        },
        {"uri": "s3://a/2.jpg", "width": None, "height": None, "instances": [], "model": "m", "error": "corrupt: x"},
        {"uri": "s3://a/3.jpg", "width": None, "height": None, "instances": [], "model": "m", "error": "missing: y"},
    ]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_part_file_holds_its_rows_and_a_footer(where, tmp_path, request):
    out = str(tmp_path / "out") if where == "local" else f"s3://{request.getfixturevalue('bucket')}/labels"
    facts = output.write_part(out, 42, _rows())
    uri = output.part_uri(out, 42)
    assert uri.endswith("/part-000042.parquet") and storage.exists(uri)
    expected = {
        "rows": 3,
        "errors": {"corrupt": 1, "missing": 1},
        "error_examples": {"corrupt": "s3://a/2.jpg", "missing": "s3://a/3.jpg"},  # for the error budget's line
        "instances": 2,
        "first_uri": "s3://a/1.jpg",
        "last_uri": "s3://a/3.jpg",
    }
    assert facts == output.read_footer(uri) == expected
    fs, path = storage.filesystem(uri)
    table = pq.read_table(path, filesystem=fs)
    assert table.schema.metadata[b"maskrcnn.schema_version"] == output.SCHEMA_VERSION.encode()
    assert table.schema.remove_metadata() == output.SCHEMA.remove_metadata()
    assert table.to_pylist()[0]["instances"][0]["mask"] == {"size": [4, 6], "counts": "0H0"}
    assert [u for u in storage.iter_files(out)] == [uri]  # no temporary file left beside it


def test_part_numbers_come_from_part_file_names_only():
    assert output.part_of("part-000042.parquet") == 42
    for name in ("part-42.parquet", "part-000042.parquet.tmp-1", "_summary.json", "xpart-000001.parquet"):
        assert output.part_of(name) is None


def test_error_kind_is_the_first_word():
    assert output.error_kind("too_large: 1x2 pixels exceeds --max-pixels 1") == "too_large"
    assert output.error_kind(None) is None


def test_a_row_that_breaks_the_schema_writes_nothing(tmp_path):
    bad = dict(_rows()[0], width="wide")
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        output.write_part(str(tmp_path), 0, [bad])
    assert list(tmp_path.iterdir()) == []


def test_an_output_of_an_older_schema_is_refused_on_resume(tmp_path):
    """Schema 2 added keypoints: a rerun into schema-1 part files would mix two schemas."""
    import json

    from maskrcnn.segment import SegmentConfig, SegmentError, prepare_output

    cfg = SegmentConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model="m.pt")
    (tmp_path / "out").mkdir()
    record = {"input": cfg.input, "model": "x", "rows_per_file": 1000, "schema_version": "1"}
    (tmp_path / "out" / "_job.json").write_text(json.dumps(record))
    with pytest.raises(SegmentError, match="holds part files of schema version 1, not 3.*pass --overwrite"):
        prepare_output(cfg, "x")
    assert prepare_output(SegmentConfig(**{**vars(cfg), "overwrite": True}), "x") == {}
    assert json.loads((tmp_path / "out" / "_job.json").read_text())["schema_version"] == output.SCHEMA_VERSION
