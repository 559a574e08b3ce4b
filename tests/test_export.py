"""Export of a real segmentation output (part files written by maskrcnn.output from real
predictions on coco_small) to COCO JSON that pycocotools loads, and to pictures."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn import images, masks, output, storage
from maskrcnn.predictor import Predictor
from tests.helpers import call_job, small_model_file


@pytest.fixture(scope="module")
def predictions(tmp_path_factory, coco_small):
    root = tmp_path_factory.mktemp("export")
    # category ids 1, 3, 18 exist in COCO, so the results score against coco_small's ground truth
    model_path = small_model_file(
        root / "small.pt", min_size=128, max_size=192, classes=("person", "car", "dog"), category_ids=(1, 3, 18)
    )
    predictor = Predictor.load(model_path, score_threshold=0.2)
    gt = json.loads(open(coco_small[0]).read())
    rows = []
    for img in gt["images"][:6]:
        uri = f"{coco_small[1]}/{img['file_name']}"
        rgb = images.decode(storage.read_bytes(uri))
        rows.append(
            {
                "uri": uri,
                "width": rgb.shape[1],
                "height": rgb.shape[0],
                "instances": predictor.predict([rgb])[0],
                "model": predictor.model_id,
                "error": None,
            }
        )
    rows.append(
        {
            "uri": f"{coco_small[1]}/gone.jpg",
            "width": None,
            "height": None,
            "instances": [],
            "model": predictor.model_id,
            "error": "missing: gone",
        }
    )
    out = str(root / "out")
    output.write_part(out, 0, rows[:4])
    output.write_part(out, 1, rows[4:])
    return out, rows


def test_pandas_reads_the_output_directly(predictions):
    out, rows = predictions
    df = pd.read_parquet(out)
    assert len(df) == 7 and list(df.columns) == ["uri", "width", "height", "instances", "model", "error"]
    assert df.error.notna().sum() == 1 and df.instances.map(len).sum() == sum(len(r["instances"]) for r in rows)
    assert output.read_footer(f"{out}/part-000001.parquet") == {
        "rows": 3,
        "errors": {"missing": 1},
        "error_examples": {"missing": next(r["uri"] for r in rows[4:] if r["error"])},
        "instances": sum(len(r["instances"]) for r in rows[4:]),
        "first_uri": rows[4]["uri"],
        "last_uri": rows[6]["uri"],
    }


def test_coco_results_load_in_pycocotools_and_score(predictions, coco_small, tmp_path):
    out, rows = predictions
    target = tmp_path / "results.json"
    result = call_job(
        "export.py",
        "--predictions",
        out,
        "--coco-results",
        str(target),
        "--annotations",
        coco_small[0],
        "--images",
        coco_small[1],
    )
    assert result.returncode == 0, result.stderr
    assert "[export] 7/7 rows (100%)" in result.stdout  # progress over the rows, from the part files' footers
    results = json.loads(target.read_text())
    assert len(results) == sum(len(r["instances"]) for r in rows) > 0
    gt = COCO(coco_small[0])
    ids = {img["file_name"]: img["id"] for img in gt.dataset["images"]}
    assert {r["image_id"] for r in results} <= {ids[r["uri"].rsplit("/", 1)[1]] for r in rows[:6]}
    detections = gt.loadRes(str(target))
    ev = COCOeval(gt, detections, "segm")
    ev.params.imgIds = sorted({r["image_id"] for r in results})
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert 0.0 <= ev.stats[0] <= 1.0


def _row(uri: str, instances: list[dict]) -> dict:
    return {"uri": uri, "width": 4, "height": 2, "instances": instances, "model": "m", "error": None}


def _instance(category_id: int, name: str, score: float) -> dict:
    return {
        "category_id": category_id,
        "category": name,
        "score": score,
        "bbox": [0.0, 0.0, 2.0, 1.0],
        "mask": masks.encode(np.ones((1, 2, 4), np.uint8))[0],
    }


def test_images_are_matched_by_their_path_under_the_image_root_not_their_file_name(tmp_path):
    """Two folders hold a 1.jpg each: ids come from the relative path; the root defaults to
    the segmentation's --input (its _job.json)."""
    root = tmp_path / "photos"
    out = str(tmp_path / "out")
    output.write_part(
        out,
        0,
        [
            _row(f"{root}/a/1.jpg", [_instance(1, "person", 0.9)]),
            _row(f"{root}/b/1.jpg", [_instance(3, "car", 0.8)]),
            _row(f"{root}/c/2.jpg", [_instance(1, "person", 0.7)]),
        ],
    )
    storage.write_text(f"{out}/_job.json", json.dumps({"input": str(root)}))
    gt = {
        "images": [
            {"id": 11, "file_name": "b/1.jpg", "width": 4, "height": 2},
            {"id": 12, "file_name": "a/1.jpg", "width": 4, "height": 2},
        ],
        "annotations": [],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    result = call_job(
        "export.py",
        "--predictions",
        out,
        "--coco-results",
        str(tmp_path / "r.json"),
        "--annotations",
        str(tmp_path / "gt.json"),
    )
    assert result.returncode == 0, result.stderr
    assert {(r["image_id"], r["category_id"]) for r in json.loads((tmp_path / "r.json").read_text())} == {
        (12, 1),
        (11, 3),
    }
    assert f"1 images not in {tmp_path / 'gt.json'}, e.g. {root}/c/2.jpg" in result.stdout


def test_coco_dataset_names_files_relative_to_the_image_root_and_lists_the_models_categories(
    predictions, tmp_path, coco_small
):
    out, rows = predictions
    model = small_model_file(tmp_path / "m.pt", classes=("person", "car", "dog"), category_ids=(1, 3, 18))
    result = call_job(
        "export.py",
        "--predictions",
        out,
        "--coco-dataset",
        str(tmp_path / "rel.json"),
        "--images",
        coco_small[1],
        "--model",
        model,
    )
    assert result.returncode == 0, result.stderr
    dataset = json.loads((tmp_path / "rel.json").read_text())
    assert [img["file_name"] for img in dataset["images"]] == [r["uri"].rsplit("/", 1)[1] for r in rows[:6]]
    assert dataset["categories"] == [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    result = call_job("export.py", "--predictions", out, "--coco-dataset", str(tmp_path / "full.json"))
    assert [img["file_name"] for img in json.loads((tmp_path / "full.json").read_text())["images"]] == [
        r["uri"] for r in rows[:6]
    ]


def test_relative_paths_name_the_same_files_as_absolute_ones(predictions, tmp_path, coco_small, monkeypatch):
    """--images and --predictions as a user types them, relative to where the job runs."""
    out, rows = predictions
    monkeypatch.chdir(tmp_path)
    relative = [os.path.relpath(out, tmp_path), os.path.relpath(coco_small[1], tmp_path)]
    assert not any(map(os.path.isabs, relative))
    result = call_job("export.py", "--predictions", relative[0], "--coco-dataset", "rel.json", "--images", relative[1])
    assert result.returncode == 0, result.stderr
    dataset = json.loads((tmp_path / "rel.json").read_text())
    assert [img["file_name"] for img in dataset["images"]] == [r["uri"].rsplit("/", 1)[1] for r in rows[:6]]


def test_coco_dataset_and_pictures(predictions, tmp_path):
    out, rows = predictions
    scores = sorted(i["score"] for r in rows for i in r["instances"])
    cut = scores[len(scores) // 2]  # half the instances pass, half do not
    assert scores[0] < cut and sum(any(i["score"] >= cut for i in r["instances"]) for r in rows) >= 2
    result = call_job(
        "export.py",
        "--predictions",
        out,
        "--coco-dataset",
        str(tmp_path / "coco.json"),
        "--render",
        "2",
        "--render-dir",
        str(tmp_path / "pics"),
        "--min-score",
        repr(cut),
        "--contact-sheet",
        str(tmp_path / "sheet.png"),
    )
    assert result.returncode == 0, result.stderr
    dataset = COCO(str(tmp_path / "coco.json"))
    assert len(dataset.imgs) == 6 and all(a["score"] >= cut for a in dataset.anns.values())
    assert len(dataset.anns) == len(scores) - len(scores) // 2
    for ann in dataset.anns.values():
        assert dataset.annToMask(ann).shape == (
            dataset.imgs[ann["image_id"]]["height"],
            dataset.imgs[ann["image_id"]]["width"],
        )
    pictures = sorted((tmp_path / "pics").glob("*.png"))
    assert len(pictures) == 2
    drawn = [r for r in rows if any(i["score"] >= cut for i in r["instances"])][:2]
    for pic, row in zip(pictures, sorted(drawn, key=lambda r: r["uri"])):
        arr = images.decode(pic.read_bytes())
        assert arr.shape[1] == row["width"] and arr.shape[0] > row["height"]  # full width, a legend strip under it
        assert not np.array_equal(arr[: row["height"]], images.decode(storage.read_bytes(row["uri"])))  # drawn on
    sheet = images.decode((tmp_path / "sheet.png").read_bytes())
    assert sheet.shape[1] == 6 + 2 * (320 + 6)  # one row of two 320 px cells, 6 px padding
    assert sheet[6:326, 6:326].std() > 0 and sheet[6:326, 332:652].std() > 0  # both cells hold a picture


def test_html_report_parses_and_links_only_to_files_that_exist(predictions, tmp_path):
    from html.parser import HTMLParser

    out, rows = predictions
    result = call_job("export.py", "--predictions", out, "--html", str(tmp_path / "report"), "--render", "3")
    assert result.returncode == 0, result.stderr

    class Links(HTMLParser):
        def __init__(self):
            super().__init__()
            self.links, self.text, self.open = [], [], []

        def handle_starttag(self, tag, attrs):
            self.links += [v for k, v in attrs if k in ("src", "href")]
            if tag not in ("img", "meta"):
                self.open.append(tag)

        def handle_endtag(self, tag):
            assert self.open.pop() == tag  # well nested

        def handle_data(self, data):
            self.text.append(data)

    page = Links()
    page.feed((tmp_path / "report" / "index.html").read_text())
    assert page.open == [] and len(page.links) == 3 + 3  # the pictures, and the plots: scores, instances, errors
    assert all((tmp_path / "report" / link).is_file() for link in page.links)
    assert {"scores.png", "instances.png", "errors.png"} <= set(page.links)
    text = " ".join(page.text)
    assert f"{rows[6]['uri']} missing: gone" in text  # the error row, with its URI and reason
    assert f"instances {sum(len(r['instances']) for r in rows)}" in text and "images 7" in text


@pytest.mark.parametrize(
    "uri, root, name",
    [
        ("s3://b/in/../../other/secret.jpg", "s3://b/in", "%2E%2E/%2E%2E/other/secret.png"),
        ("s3://b/in/a/./b//c.jpg", "s3://b/in", "a/b/c.png"),
        ("/in/new\nline\\back.jpg", "/in", "new%0Aline%5Cback.png"),
        ("/in/<b> #1 & 50% ?.jpg", "/in", "<b> #1 & 50% ?.png"),
        ("file:///in/caf%E9.jpg", "/in", "caf%E9.png"),
        ("s3://b/x/..", None, "%2E%2E.png"),
    ],
)
def test_picture_names_stay_inside_the_output_folder(uri, root, name):
    from maskrcnn.export import picture_name

    assert picture_name(uri, root) == name


def test_long_and_colliding_names_get_one_picture_each():
    from maskrcnn.export import SEGMENT_BYTES, PictureNames

    names = PictureNames()
    long_a, long_b = "/in/" + "é" * 120 + "a.jpg", "/in/" + "é" * 120 + "b.jpg"
    got = [names(u, "/in") for u in ("/in/dup.jpg", "/in/dup.png", "/in/dup-2.jpg", long_a, long_b)]
    assert got[:3] == ["dup.png", "dup-2.png", "dup-2-2.png"] and got[3] != got[4]
    assert all(len(n.encode()) <= SEGMENT_BYTES + 4 for n in got[3:]) and got[3].startswith("é" * 90)


def test_nothing_to_draw_is_a_one_line_error(predictions, tmp_path):
    result = call_job(
        "export.py",
        "--predictions",
        predictions[0],
        "--render",
        "3",
        "--contact-sheet",
        str(tmp_path / "sheet.png"),
        "--coco-results",
        str(tmp_path / "r.json"),
        "--min-score",
        "1.1",
    )
    assert result.returncode == 2 and result.stderr.strip().startswith("error: nothing to draw: no image in")
    assert not (tmp_path / "sheet.png").exists() and json.loads((tmp_path / "r.json").read_text()) == []


def test_export_needs_something_to_do(predictions):
    result = call_job("export.py", "--predictions", predictions[0])
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        "error: nothing to do: give --coco-results, --coco-dataset, --label-studio, --cvat, --render N or --html DIR"
    )


def test_coco_results_go_to_s3_whole(predictions, bucket):
    out, rows = predictions
    result = call_job("export.py", "--predictions", out, "--coco-results", f"s3://{bucket}/export/r.json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(storage.read_text(f"s3://{bucket}/export/r.json"))) == sum(len(r["instances"]) for r in rows)


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


def test_a_review_queue_writes_only_the_queued_images_in_queue_order(predictions, tmp_path):
    out, rows = predictions
    flags = ["--review", "2", "--review-by", "crowded", "--coco-dataset", str(tmp_path / "queue.json")]
    done = call_job("export.py", "--predictions", out, *flags, "--html", str(tmp_path / "report"))
    assert done.returncode == 0, done.stderr
    crowded = sorted((r for r in rows if not r["error"]), key=lambda r: (-len(r["instances"]), r["uri"]))[:2]
    written = json.loads((tmp_path / "queue.json").read_text())
    assert [i["file_name"] for i in written["images"]] == [r["uri"] for r in crowded]
    assert len(written["annotations"]) == sum(len(r["instances"]) for r in crowded)
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Review queue" in page and page.count("<figure>") == 2
    assert page.index(crowded[0]["uri"]) < page.index(crowded[1]["uri"])
    assert f'images</td><td class="n">{len(rows)}' in page  # the summary still counts every row


def test_polygons_in_coco_files_draw_the_masks_again(predictions, tmp_path):
    out, rows = predictions
    flags = ["--segmentation", "polygons", "--coco-dataset", str(tmp_path / "d.json")]
    assert call_job("export.py", "--predictions", out, *flags).returncode == 0
    written = json.loads((tmp_path / "d.json").read_text())
    assert all(isinstance(a["segmentation"], list) for a in written["annotations"])
    sent = [i for r in rows if not r["error"] for i in r["instances"]]
    assert 0 < len(written["annotations"]) <= len(sent)
