"""Export of a real segmentation output (part files written by maskrcnn.output from real
predictions on coco_small) to COCO JSON that pycocotools loads, and to pictures."""

import json

import numpy as np
import pandas as pd
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn import images, output, storage
from maskrcnn.predictor import Predictor
from tests.conftest import run_job, small_model_file


@pytest.fixture(scope="module")
def predictions(tmp_path_factory, coco_small):
    root = tmp_path_factory.mktemp("export")
    # category ids 1, 3, 18 exist in COCO, so the results score against coco_small's ground truth
    model_path = small_model_file(root / "small.pt", min_size=128, max_size=192, classes=("person", "car", "dog"),
                                  category_ids=(1, 3, 18))  # fmt: skip
    predictor = Predictor.load(model_path, score_threshold=0.2)
    gt = json.loads(open(coco_small[0]).read())
    rows = []
    for img in gt["images"][:6]:
        uri = f"{coco_small[1]}/{img['file_name']}"
        rgb = images.decode(storage.read_bytes(uri))
        rows.append({"uri": uri, "width": rgb.shape[1], "height": rgb.shape[0], "instances": predictor.predict([rgb])[0],
                     "model": predictor.model_id, "error": None})  # fmt: skip
    rows.append({"uri": f"{coco_small[1]}/gone.jpg", "width": None, "height": None, "instances": [], "model": predictor.model_id,
                 "error": "missing: gone"})  # fmt: skip
    out = str(root / "out")
    output.write_part(out, 0, rows[:4])
    output.write_part(out, 1, rows[4:])
    return out, rows


def test_pandas_reads_the_output_directly(predictions):
    out, rows = predictions
    df = pd.read_parquet(out)
    assert len(df) == 7 and list(df.columns) == ["uri", "width", "height", "instances", "model", "error"]
    assert df.error.notna().sum() == 1 and df.instances.map(len).sum() == sum(len(r["instances"]) for r in rows)
    assert output.read_stats(f"{out}/part-000001.parquet") == {
        "rows": 3, "errors": {"missing": 1}, "instances": sum(len(r["instances"]) for r in rows[4:]),
        "first_uri": rows[4]["uri"], "last_uri": rows[6]["uri"],
    }  # fmt: skip


def test_coco_results_load_in_pycocotools_and_score(predictions, coco_small, tmp_path):
    out, rows = predictions
    target = tmp_path / "results.json"
    result = run_job("export.py", "--predictions", out, "--coco-results", str(target), "--annotations", coco_small[0])
    assert result.returncode == 0, result.stderr
    results = json.loads(target.read_text())
    assert len(results) == sum(len(r["instances"]) for r in rows) > 0
    gt = COCO(coco_small[0])
    detections = gt.loadRes(str(target))
    ev = COCOeval(gt, detections, "segm")
    ev.params.imgIds = sorted({r["image_id"] for r in results})
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert 0.0 <= ev.stats[0] <= 1.0


def test_coco_dataset_and_pictures(predictions, tmp_path):
    out, rows = predictions
    scores = sorted(i["score"] for r in rows for i in r["instances"])
    cut = scores[len(scores) // 2]  # half the instances pass, half do not
    assert scores[0] < cut and sum(any(i["score"] >= cut for i in r["instances"]) for r in rows) >= 2
    result = run_job("export.py", "--predictions", out, "--coco-dataset", str(tmp_path / "coco.json"),
                     "--render", "2", "--render-dir", str(tmp_path / "pics"), "--min-score", repr(cut),
                     "--contact-sheet", str(tmp_path / "sheet.png"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    dataset = COCO(str(tmp_path / "coco.json"))
    assert len(dataset.imgs) == 6 and all(a["score"] >= cut for a in dataset.anns.values())
    assert len(dataset.anns) == len(scores) - len(scores) // 2
    for ann in dataset.anns.values():
        assert dataset.annToMask(ann).shape == (dataset.imgs[ann["image_id"]]["height"], dataset.imgs[ann["image_id"]]["width"])
    pictures = sorted((tmp_path / "pics").glob("*.png"))
    assert len(pictures) == 2
    drawn = [r for r in rows if any(i["score"] >= cut for i in r["instances"])][:2]
    for pic, row in zip(pictures, sorted(drawn, key=lambda r: r["uri"])):
        arr = images.decode(pic.read_bytes())
        assert arr.shape == (row["height"], row["width"], 3)
        assert not np.array_equal(arr, images.decode(storage.read_bytes(row["uri"])))  # something was drawn
    sheet = images.decode((tmp_path / "sheet.png").read_bytes())
    assert sheet.shape == (4 + 256 + 4, 4 + 2 * (256 + 4), 3)  # one row of two 256 px cells, 4 px padding
    assert sheet[4:260, 4:260].std() > 0 and sheet[4:260, 264:520].std() > 0  # both cells hold a picture


def test_nothing_to_draw_is_a_one_line_error(predictions, tmp_path):
    result = run_job("export.py", "--predictions", predictions[0], "--render", "3", "--contact-sheet",
                     str(tmp_path / "sheet.png"), "--min-score", "1.1")  # fmt: skip
    assert result.returncode == 2 and result.stderr.strip().startswith("error: nothing to draw: no image in")
    assert not (tmp_path / "sheet.png").exists()


def test_export_needs_something_to_do(predictions):
    result = run_job("export.py", "--predictions", predictions[0])
    assert result.returncode == 2 and result.stderr.strip() == "error: nothing to do: give --coco-results, --coco-dataset or --render N"


def test_duckdb_reads_the_output_with_no_project_code(predictions):
    import duckdb

    out, rows = predictions
    con = duckdb.connect()
    total, errors, instances = con.execute(
        f"SELECT count(*), count(error), sum(len(instances)) FROM read_parquet('{out}/*.parquet')"
    ).fetchone()
    assert (total, errors, instances) == (7, 1, sum(len(r["instances"]) for r in rows))
    (category,) = con.execute(
        f"SELECT i.category FROM (SELECT unnest(instances) AS i FROM read_parquet('{out}/*.parquet')) LIMIT 1"
    ).fetchone()
    assert category in ("person", "car", "dog")
