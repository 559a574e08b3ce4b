"""Label Studio tasks and config, and the labelling tools' files read back (their quirks)."""

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from maskrcnn import coco, masks, prelabels
from maskrcnn.errors import UserError


def _row(uri: str, instances: list[dict], error: str | None = None) -> dict:
    return {"uri": uri, "width": 80, "height": 60, "instances": instances, "model": "m@1", "error": error}


def _instance(binary: np.ndarray, score: float, category: str = "dog") -> dict:
    rle = masks.encode(binary[None])[0]
    return {"category_id": 18, "category": category, "score": score, "bbox": [0, 0, 1, 1], "mask": rle}


def test_tasks_carry_polygons_in_percent_and_the_config_names_the_classes(tmp_path):
    square = np.zeros((60, 80), np.uint8)
    square[15:45, 20:60] = 1
    speck = np.zeros((60, 80), np.uint8)
    speck[5, 5] = 1
    url = prelabels.image_url("s3://b/in", "/data/local-files/?d=")
    with prelabels.LabelStudioTasks(str(tmp_path), url, min_score=0.3) as tasks:
        tasks.add(_row("s3://b/in/x y#1.jpg", [_instance(square, 0.8), _instance(speck, 0.9), _instance(square, 0.1)]))
        tasks.add(_row("s3://b/in/gone.jpg", [], error="missing: gone"))
        tasks.add(_row("s3://b/in/empty.jpg", []))
    written = json.loads((tmp_path / "tasks.json").read_text())
    assert (tasks.tasks, tasks.regions, tasks.no_polygon, tasks.errors) == (2, 1, 1, 1)
    assert written[0]["data"]["image"] == "/data/local-files/?d=x%20y%231.jpg"
    prediction = written[0]["predictions"][0]
    assert prediction["model_version"] == "m@1" and prediction["score"] == pytest.approx(0.8)
    (region,) = prediction["result"]
    assert region["type"] == "polygonlabels" and region["value"]["polygonlabels"] == ["dog"]
    assert (region["original_width"], region["original_height"]) == (80, 60)
    pixels = [[x * 80 / 100, y * 60 / 100] for x, y in region["value"]["points"]]
    assert sorted(map(tuple, pixels)) == sorted([(20, 15), (60, 15), (60, 45), (20, 45)])
    assert written[1]["predictions"][0]["result"] == []  # an image with nothing found is still a task
    config = ET.fromstring((tmp_path / "config.xml").read_text())
    assert [label.get("value") for label in config.iter("Label")] == ["dog"]


def test_the_config_escapes_hostile_class_names():
    config = ET.fromstring(prelabels.labelling_config(['a"b', "<script>", "x & y"]))
    assert [label.get("value") for label in config.iter("Label")] == ['a"b', "<script>", "x & y"]


def test_image_urls():
    assert prelabels.image_url(None, None)("s3://b/k/a.jpg") == "s3://b/k/a.jpg"  # Label Studio's S3 storage
    assert prelabels.image_url("/data", "/data/local-files/?d=photos/")("/data/a/b.jpg") == (
        "/data/local-files/?d=photos/a/b.jpg"
    )
    with pytest.raises(ValueError, match="a local image needs --url-prefix"):
        prelabels.image_url("/data", None)("/data/a.jpg")
    with pytest.raises(ValueError, match="not under --images /data"):
        prelabels.image_url("/data", "http://h/")("/elsewhere/a.jpg")


def test_label_studio_file_names_resolve_under_the_image_root():
    assert coco.image_uri("/root", "/data/local-files/?d=a/x%20y.jpg") == "/root/a/x y.jpg"
    assert coco.image_uri("/root", "s3://b/k.jpg") == "s3://b/k.jpg"
    assert coco.image_uri("/root", "a/k.jpg") == "/root/a/k.jpg"


def test_categories_are_matched_by_name_and_an_unknown_one_is_named():
    gt = {
        "categories": [{"id": 0, "name": "dog"}, {"id": 1, "name": "person"}],
        "annotations": [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 0}, {"id": 3, "category_id": 7}],
    }
    like = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 3, "name": "car"}]
    coco.match_categories(gt, like, "ls.json", gt["categories"])
    assert [a["category_id"] for a in gt["annotations"]] == [1, 18, -1] and gt["categories"] == like
    with pytest.raises(UserError, match=r"ls\.json: categories \['cat'\] are not among"):
        coco.match_categories({"annotations": []}, like, "ls.json", [{"id": 0, "name": "cat"}])


def test_only_cvat_masks_stop_being_crowds():
    cvat = {"iscrowd": 1, "segmentation": {"size": [2, 2], "counts": [0, 4]}, "attributes": {"occluded": False}}
    coco_crowd = {"iscrowd": 1, "segmentation": {"size": [2, 2], "counts": [0, 4]}}
    gt = coco.from_labelling_tools({"annotations": [dict(cvat), dict(coco_crowd)]})
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 1]
