import json

import numpy as np
import pytest

from maskrcnn import masks
from maskrcnn.evaluate import STAT_NAMES, as_metrics, evaluate, format_table, to_results


def _gt(coco_small):
    with open(coco_small[0]) as f:
        return json.load(f)


def _perfect_results(gt, category_of=lambda ann: ann["category_id"]):
    size = {i["id"]: (i["height"], i["width"]) for i in gt["images"]}
    return [
        {
            "image_id": a["image_id"],
            "category_id": category_of(a),
            "bbox": a["bbox"],
            "score": 1.0,
            "segmentation": masks.encode(masks.decode(a["segmentation"], *size[a["image_id"]])[None])[0],
        }
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]


def test_ground_truth_as_predictions_scores_ap_one(coco_small):
    gt = _gt(coco_small)
    stats = evaluate(gt, _perfect_results(gt))
    assert stats["bbox"][0] == pytest.approx(1.0) and stats["segm"][0] == pytest.approx(1.0)
    assert stats["segm"][1] == pytest.approx(1.0)  # AP50


def test_shuffled_labels_score_low(coco_small):
    gt = _gt(coco_small)
    ids = [c["id"] for c in gt["categories"]]
    rng = np.random.default_rng(0)
    wrong = lambda ann: int(rng.choice([c for c in ids if c != ann["category_id"]]))  # noqa: E731
    stats = evaluate(gt, _perfect_results(gt, wrong))
    assert stats["bbox"][0] < 0.05 and stats["segm"][0] < 0.05


def test_no_detections_and_formatting():
    stats = evaluate({"images": [{"id": 1, "width": 4, "height": 4}], "annotations": [], "categories": []}, [])
    assert stats == {"bbox": [0.0] * 12, "segm": [0.0] * 12}
    table = format_table(stats).splitlines()
    assert len(table) == 26 and table[0] == "IoU metric: bbox" and "maxDets=100 ] = 0.000" in table[1]
    assert set(as_metrics(stats)) == {f"{t}_{n}" for t in ("bbox", "segm") for n in STAT_NAMES}


def test_instances_become_coco_results():
    rle = masks.encode(np.ones((1, 10, 12), bool))[0]
    instances = [{"category_id": 90, "category": "x", "score": 0.8, "bbox": [3.0, 2.0, 6.0, 3.0], "mask": rle}]
    assert to_results(instances, image_id=7) == [
        {"image_id": 7, "category_id": 90, "bbox": [3.0, 2.0, 6.0, 3.0], "score": 0.8, "segmentation": rle}
    ]
