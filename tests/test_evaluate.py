import json
from pathlib import Path

import numpy as np

from maskrcnn import masks
from maskrcnn.metric import to_results
from tests.helpers import call_job, run_job, small_model_file


def test_instances_become_coco_results():
    rle = masks.encode(np.ones((1, 10, 12), bool))[0]
    instances = [{"category_id": 90, "category": "x", "score": 0.8, "bbox": [3.0, 2.0, 6.0, 3.0], "mask": rle}]
    assert to_results(instances, image_id=7) == [
        {"image_id": 7, "category_id": 90, "bbox": [3.0, 2.0, 6.0, 3.0], "score": 0.8, "segmentation": rle}
    ]


def test_gpu_evaluation_without_a_gpu_stops_with_one_line(coco_small, tmp_path):
    model = small_model_file(tmp_path / "m.pt")
    result = call_job(
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
    # The ground truth as Parquet labels, which take full URIs: no --images.
    labels = str(tmp_path / "labels")
    converted = call_job(
        "coco_to_parquet.py", "--annotations", str(tmp_path / "one.json"), "--images", coco_small[1], "--output", labels
    )
    assert converted.returncode == 0, converted.stderr
    result = run_job(
        "evaluate.py", "--model", torchvision_pth, "--annotations", labels, "--output", str(tmp_path / "eval.json")
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["model_source"] == torchvision_pth and report["model"].startswith("maskrcnn_resnet50_fpn@0:")
    assert report["detections"] > 0 and "[evaluate] 1/1 images (100%)" in result.stdout
    assert "does not know category ids" not in result.stdout  # the model knows all 80 COCO ids


def test_evaluation_runs_on_the_actor_pool_and_skips_unreadable_images_by_kind(coco_small, tmp_path):
    """The segmentation job's pipeline: decode tasks, then the actor pool; an image that
    cannot be read, or is not the size its annotations give, is counted and scores nothing.
    The old name of --actors still works, with a warning."""
    from PIL import Image

    gt = json.loads(Path(coco_small[0]).read_text())
    gt["images"] = gt["images"][:5]
    kept = {i["id"] for i in gt["images"]}
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in kept]
    images = tmp_path / "images"
    images.mkdir()
    for image in gt["images"][:4]:
        (images / image["file_name"]).write_bytes((Path(coco_small[1]) / image["file_name"]).read_bytes())
    gt["images"][4]["file_name"] = "../gt.json"  # outside --images: never read
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
    assert "[evaluate] 4/4 images (100%)" in result.stdout and "4 skipped" in result.stdout
    report = json.loads(report_file.read_text())
    assert report["images"] == 5
    assert report["skipped_images"] == {"not_an_image": 1, "empty": 1, "size_mismatch": 1, "outside_root": 1}
