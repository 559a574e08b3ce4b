"""The COCO metric: in one process, and split across workers as training scores it."""

import json
import math

import numpy as np
import pytest

from maskrcnn import metric
from maskrcnn.metric import STAT_NAMES, as_json, as_metrics, format_table, score
from tests.helpers import ground_truth_as_results


def _gt(coco_small):
    with open(coco_small[0]) as f:
        return json.load(f)


def test_ground_truth_as_predictions_scores_ap_one(coco_small):
    gt = _gt(coco_small)
    scores = score(gt, ground_truth_as_results(gt))
    assert scores.stats["bbox"][0] == pytest.approx(1.0) and scores.stats["segm"][0] == pytest.approx(1.0)
    assert scores.stats["segm"][1] == pytest.approx(1.0)  # AP50
    with_gt = {c["name"] for c in gt["categories"] if any(a["category_id"] == c["id"] for a in gt["annotations"])}
    per_class = scores.per_class["segm"]
    assert list(per_class) == [c["name"] for c in gt["categories"]]  # every category, in file order
    assert {n for n, ap in per_class.items() if not math.isnan(ap)} == with_gt
    assert all(per_class[n] == pytest.approx(1.0) for n in with_gt)
    report = as_json(scores)
    assert report["segm"]["AP"] == pytest.approx(1.0)
    assert json.loads(json.dumps(report, allow_nan=False))["per_class_AP"]["segm"] == {
        n: (None if math.isnan(ap) else ap) for n, ap in per_class.items()
    }  # categories without ground truth are null, so the file is strict JSON


def test_shuffled_labels_score_low(coco_small):
    gt = _gt(coco_small)
    ids = [c["id"] for c in gt["categories"]]
    rng = np.random.default_rng(0)

    def wrong(ann):
        return int(rng.choice([c for c in ids if c != ann["category_id"]]))

    scores = score(gt, ground_truth_as_results(gt, wrong))
    assert scores.stats["bbox"][0] < 0.05 and scores.stats["segm"][0] < 0.05
    assert max(ap for ap in scores.per_class["segm"].values() if not math.isnan(ap)) < 0.2


def test_no_detections_and_formatting():
    gt = {"images": [{"id": 1, "width": 4, "height": 4}], "annotations": [], "categories": [{"id": 3, "name": "cat"}]}
    scores = score(gt, [])
    assert scores.stats == {"bbox": [0.0] * 12, "segm": [0.0] * 12}
    assert scores.per_class == {"bbox": {"cat": 0.0}, "segm": {"cat": 0.0}}
    table = format_table(scores).splitlines()
    assert len(table) == 30 and table[0] == "IoU metric: bbox" and "maxDets=100 ] = 0.000" in table[1]
    assert table[13] == "Per-category bbox AP (%):" and table[14].split() == ["cat", "0.00"]
    assert set(as_metrics(scores)) == {f"{t}_{n}" for t in ("bbox", "segm") for n in STAT_NAMES}


def test_ground_truth_keypoints_as_predictions_score_keypoint_ap_1(shared_data):
    from maskrcnn import coco, keypoints
    from maskrcnn.metric import KEYPOINT_STAT_NAMES

    folder = shared_data / "coco_keypoints" / "super_gradients_train2017"
    dataset = coco.load_coco(str(folder / "person_keypoints_train2017.json"), str(folder / "images"))
    sigmas, warning = keypoints.sigmas(dataset.keypoints.names)
    assert warning is None and sigmas.shape == (17,)
    # people with no labelled keypoint are not scored by COCOeval (it ignores them), so not predicted
    labelled = dict(dataset.gt, annotations=[a for a in dataset.gt["annotations"] if a["num_keypoints"] > 0])
    scores = score(dataset.gt, ground_truth_as_results(labelled), iou_types=("keypoints",), sigmas=sigmas)
    assert scores.stats["keypoints"][0] == pytest.approx(1.0) and len(scores.stats["keypoints"]) == 10
    assert set(as_metrics(scores)) == {f"keypoints_{n}" for n in KEYPOINT_STAT_NAMES}
    assert "Average Precision  (AP) @[ OKS=0.50:0.95 | area=   all | maxDets= 20 ] = 1.000" in format_table(scores)
    wrong = [
        dict(r, keypoints=[v + 25 * (i % 3 != 2) for i, v in enumerate(r["keypoints"])])
        for r in ground_truth_as_results(labelled)
    ]
    assert score(dataset.gt, wrong, iou_types=("keypoints",), sigmas=sigmas).stats["keypoints"][0] < 0.5


@pytest.mark.parametrize("world", [2, 3])
def test_matches_split_across_workers_score_what_one_evaluation_does(coco_small, world):
    """As training validates: each worker matches its own images' results and one merges the
    parts. On real COCO ground truth with imperfect results every figure equals one
    evaluation of all the images together, also with a worker that has no image and one
    whose images have no detection."""
    gt = _gt(coco_small)
    api = metric.coco_api(gt)
    ids = sorted(api.getImgIds())
    shares = [ids[rank::world] for rank in range(world)] + [[]]
    rng = np.random.default_rng(0)
    results = [
        dict(r, score=float(rng.uniform(0.05, 1)), bbox=[v + float(rng.normal(0, 3)) for v in r["bbox"]])
        for r in ground_truth_as_results(gt)
        if rng.uniform() < 0.8 and r["image_id"] not in shares[1]
    ]
    whole = score(api, results, ids)
    parts = [metric.score_part(api, [r for r in results if r["image_id"] in s], s) for s in shares]
    assert parts[1].detections == 0 and parts[-1].image_ids == []
    split = metric.summarize(api, parts)
    assert split.stats == whole.stats and split.per_class == whole.per_class
    assert 0.2 < whole.stats["segm"][0] < 0.95
