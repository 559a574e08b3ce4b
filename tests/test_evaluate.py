import json
import math
from pathlib import Path

import numpy as np
import pytest

from maskrcnn import masks
from maskrcnn.evaluate import STAT_NAMES, as_json, as_metrics, evaluate, format_table
from maskrcnn.export import to_results
from tests.helpers import ground_truth_as_results, run_job, small_model_file


def _gt(coco_small):
    with open(coco_small[0]) as f:
        return json.load(f)


def test_ground_truth_as_predictions_scores_ap_one(coco_small):
    gt = _gt(coco_small)
    scores = evaluate(gt, ground_truth_as_results(gt))
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

    scores = evaluate(gt, ground_truth_as_results(gt, wrong))
    assert scores.stats["bbox"][0] < 0.05 and scores.stats["segm"][0] < 0.05
    assert max(ap for ap in scores.per_class["segm"].values() if not math.isnan(ap)) < 0.2


def test_no_detections_and_formatting():
    gt = {"images": [{"id": 1, "width": 4, "height": 4}], "annotations": [], "categories": [{"id": 3, "name": "cat"}]}
    scores = evaluate(gt, [])
    assert scores.stats == {"bbox": [0.0] * 12, "segm": [0.0] * 12}
    assert scores.per_class == {"bbox": {"cat": 0.0}, "segm": {"cat": 0.0}}
    table = format_table(scores).splitlines()
    assert len(table) == 30 and table[0] == "IoU metric: bbox" and "maxDets=100 ] = 0.000" in table[1]
    assert table[13] == "Per-category bbox AP (%):" and table[14].split() == ["cat", "0.00"]
    assert set(as_metrics(scores)) == {f"{t}_{n}" for t in ("bbox", "segm") for n in STAT_NAMES}


def test_instances_become_coco_results():
    rle = masks.encode(np.ones((1, 10, 12), bool))[0]
    instances = [{"category_id": 90, "category": "x", "score": 0.8, "bbox": [3.0, 2.0, 6.0, 3.0], "mask": rle}]
    assert to_results(instances, image_id=7) == [
        {"image_id": 7, "category_id": 90, "bbox": [3.0, 2.0, 6.0, 3.0], "score": 0.8, "segmentation": rle}
    ]


def test_gpu_evaluation_without_a_gpu_stops_with_one_line(coco_small, tmp_path):
    model = small_model_file(tmp_path / "m.pt")
    result = run_job(
        "evaluate.py",
        "--model",
        model,
        "--annotations",
        coco_small[0],
        "--images",
        coco_small[1],
        "--gpus-per-actor",
        "1",
    )
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --gpus-per-actor: this machine has no GPU; pass --gpus-per-actor 0, "
        "or submit the job to a cluster with GPU nodes"
    ), result.stderr


def test_a_torchvision_state_dict_is_evaluated_with_coco_ids(torchvision_pth, coco_small, tmp_path):
    """COCO ids, not contiguous labels: the toothbrush detections are scored as category 90."""
    gt = json.loads(open(coco_small[0]).read())
    image = next(i for i in gt["images"] if any(a["image_id"] == i["id"] for a in gt["annotations"]))
    subset = dict(gt, images=[image], annotations=[a for a in gt["annotations"] if a["image_id"] == image["id"]])
    (tmp_path / "one.json").write_text(json.dumps(subset))
    result = run_job(
        "evaluate.py",
        "--model",
        torchvision_pth,
        "--annotations",
        str(tmp_path / "one.json"),
        "--images",
        coco_small[1],
        "--output",
        str(tmp_path / "eval.json"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["model_source"] == torchvision_pth and report["model"].startswith("maskrcnn_resnet50_fpn@0:")
    assert report["detections"] > 0 and "[evaluate] 1/1 images (100%)" in result.stdout
    assert "does not know category ids" not in result.stdout  # the model knows all 80 COCO ids


def test_ground_truth_keypoints_as_predictions_score_keypoint_ap_1(shared_data):
    from maskrcnn import data, keypoints
    from maskrcnn.evaluate import KEYPOINT_STAT_NAMES

    folder = shared_data / "coco_keypoints" / "super_gradients_train2017"
    dataset = data.load_coco(str(folder / "person_keypoints_train2017.json"), str(folder / "images"))
    sigmas, warning = keypoints.sigmas(dataset.keypoints.names)
    assert warning is None and sigmas.shape == (17,)
    # people with no labelled keypoint are not scored by COCOeval (it ignores them), so not predicted
    labelled = dict(dataset.gt, annotations=[a for a in dataset.gt["annotations"] if a["num_keypoints"] > 0])
    scores = evaluate(dataset.gt, ground_truth_as_results(labelled), iou_types=("keypoints",), sigmas=sigmas)
    assert scores.stats["keypoints"][0] == pytest.approx(1.0) and len(scores.stats["keypoints"]) == 10
    assert set(as_metrics(scores)) == {f"keypoints_{n}" for n in KEYPOINT_STAT_NAMES}
    assert "Average Precision  (AP) @[ OKS=0.50:0.95 | area=   all | maxDets= 20 ] = 1.000" in format_table(scores)
    wrong = [
        dict(r, keypoints=[v + 25 * (i % 3 != 2) for i, v in enumerate(r["keypoints"])])
        for r in ground_truth_as_results(labelled)
    ]
    assert evaluate(dataset.gt, wrong, iou_types=("keypoints",), sigmas=sigmas).stats["keypoints"][0] < 0.5


def test_evaluation_runs_on_the_actor_pool_and_skips_unreadable_images_by_kind(coco_small, tmp_path):
    """The segmentation job's pipeline: decode tasks, then the actor pool; an image that
    cannot be read, or is not the size its annotations give, is counted and scores nothing.
    The old name of --actors still works, with a warning."""
    from PIL import Image

    gt = _gt(coco_small)
    gt["images"] = gt["images"][:4]
    kept = {i["id"] for i in gt["images"]}
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in kept]
    images = tmp_path / "images"
    images.mkdir()
    for image in gt["images"]:
        (images / image["file_name"]).write_bytes((Path(coco_small[1]) / image["file_name"]).read_bytes())
    first, second, third = (images / i["file_name"] for i in gt["images"][:3])
    first.write_bytes(b"not an image")
    second.write_bytes(b"")
    Image.open(third).resize((64, 48)).save(third)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    model, report_file = small_model_file(tmp_path / "m.pt"), tmp_path / "eval.json"
    flags = ["--annotations", str(tmp_path / "gt.json"), "--images", str(images), "--output", str(report_file)]
    result = run_job("evaluate.py", "--model", model, *flags, "--num-workers", "2", "--batch-size", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: --num-workers is now --actors" in result.stderr
    assert "[evaluate] 4/4 images (100%)" in result.stdout and "3 skipped" in result.stdout
    report = json.loads(report_file.read_text())
    assert report["images"] == 4
    assert report["skipped_images"] == {"not_an_image": 1, "empty": 1, "size_mismatch": 1}
