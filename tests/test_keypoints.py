"""Keypoint definitions from real COCO person files, the left/right swap a flip needs, and
keypoints through the data pipeline: loaded, cleaned, moved and scaled with the image."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from maskrcnn import coco, data, keypoints, metric, storage, transforms
from maskrcnn.keypoints import KeypointError
from tests.helpers import call_job, run_job, small_model_file

MMPOSE = "coco_keypoints/mmpose"
TRAIN2017 = "coco_keypoints/super_gradients_train2017"


def _coco(shared_data, folder: str) -> tuple[str, str]:
    name = "test_coco.json" if folder == MMPOSE else "person_keypoints_train2017.json"
    return str(shared_data / folder / name), str(shared_data / folder / "images")


def test_coco_keypoint_names_are_torchvisions():
    """Written out in keypoints.py, which imports no torch; torchvision's weights name them."""
    from torchvision.models.detection import KeypointRCNN_ResNet50_FPN_Weights

    assert keypoints.COCO_KEYPOINTS == KeypointRCNN_ResNet50_FPN_Weights.COCO_V1.meta["keypoint_names"]


def test_the_spec_and_flip_swap_come_from_the_names(shared_data):
    gt = json.loads((shared_data / MMPOSE / "test_coco.json").read_text())
    spec = keypoints.spec_of(gt["categories"], "test_coco.json")
    assert len(spec) == 17 and len(spec.skeleton) == 19 and spec.names[0] == "nose"
    perm = spec.flip_permutation()
    named = {spec.names[i]: spec.names[j] for i, j in enumerate(perm)}
    assert named["nose"] == "nose" and named["left_eye"] == "right_eye" and named["right_ankle"] == "left_ankle"
    assert [perm[j] for j in perm] == list(range(17))  # flipping twice is the identity
    odd = keypoints.KeypointSpec(("head", "l_hand", "r_hand", "tail_left", "tail_right"), ())
    assert odd.flip_permutation() == [0, 2, 1, 4, 3]


@pytest.mark.parametrize(
    "categories, message",
    [
        ([{"id": 1, "name": "a", "keypoints": ["x", 3]}], "'keypoints' must be a list of names"),
        ([{"id": 1, "name": "a", "keypoints": ["x", "y"], "skeleton": [[1, 3]]}], "numbers 1..2"),
        (
            [{"id": 1, "name": "a", "keypoints": ["x"]}, {"id": 2, "name": "b", "keypoints": ["y"]}],
            "categories 'a' and 'b' define different keypoints",
        ),
    ],
)
def test_unusable_keypoint_definitions_are_named(categories, message):
    with pytest.raises(KeypointError, match=message):
        keypoints.spec_of(categories, "gt.json")
    assert keypoints.spec_of([{"id": 1, "name": "a"}], "gt.json") is None


def test_a_flip_moves_an_asymmetric_pose_and_swaps_its_sides():
    spec = keypoints.KeypointSpec(("nose", "left_wrist", "right_wrist"), ((1, 2), (1, 3)))
    points = torch.tensor([[[50.0, 10.0, 2.0], [10.0, 40.0, 2.0], [90.0, 60.0, 1.0]]])
    image = tv_tensors.Image(torch.zeros(3, 80, 100, dtype=torch.uint8))
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor([[5.0, 5.0, 95.0, 70.0]]), format="XYXY", canvas_size=(80, 100)),
        "labels": torch.tensor([1]),
        **transforms.split_keypoints(points, (80, 100)),
    }
    _, flipped = transforms.RandomHorizontalFlip(1.0, spec.flip_permutation())(image, target)
    result = transforms.joined_keypoints(flipped)[0]
    # the new left wrist is the old right wrist, mirrored, with its own visibility
    assert result.tolist() == [[49.0, 10.0, 2.0], [9.0, 60.0, 1.0], [89.0, 40.0, 2.0]]
    _, same = transforms.RandomHorizontalFlip(0.0, spec.flip_permutation())(image, target)
    assert torch.equal(transforms.joined_keypoints(same), points)


def test_keypoint_annotations_load_clean_and_count(shared_data, tmp_path):
    annotations, images = _coco(shared_data, TRAIN2017)
    gt = json.loads(open(annotations).read())
    unlabelled = sum(1 for a in gt["annotations"] if a["num_keypoints"] == 0 and not a["iscrowd"])
    broken = dict(gt["annotations"][0], id=1, keypoints=gt["annotations"][0]["keypoints"][:-3])
    gt["annotations"].append(broken)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    dataset = coco.load_coco(str(tmp_path / "gt.json"), images)
    assert dataset.keypoints.names[0] == "nose" and len(dataset.keypoints) == 17
    assert dataset.dropped["invalid_keypoints"] == 1 and dataset.dropped["crowd"] == 1
    assert {r["num_keypoints"] for r in dataset.records} == {17} and len(dataset.records) == 30
    trained = [a for r in dataset.records for a in json.loads(r["annotations"])]
    assert sum(1 for a in trained if not any(a["keypoints"][2::3])) == unlabelled > 0  # they still train the box


def test_keypoints_are_scaled_with_the_image_and_go_with_a_dropped_box(shared_data):
    dataset = coco.load_coco(*_coco(shared_data, MMPOSE))
    record = max(dataset.records, key=lambda r: len(json.loads(r["annotations"])))
    original = np.array([a["keypoints"] for a in json.loads(record["annotations"])], np.float32).reshape(-1, 17, 3)
    row = data.load_example(record, transforms.resize_transform(200, 400))
    scale = row["image"].shape[1] / record["height"]
    assert row["keypoints"].shape == original.shape and row["keypoints"].dtype == np.float32
    seen = original[..., 2] > 0
    assert np.array_equal(row["keypoints"][..., 2], original[..., 2])
    assert np.allclose(row["keypoints"][seen][:, :2], original[seen][:, :2] * scale, atol=1.0)
    images, targets = transforms.to_model_inputs(
        [row], torch.device("cpu"), transforms.Augment((100,), 200, dataset.keypoints)
    )
    assert targets[0]["keypoints"].shape == (len(targets[0]["boxes"]), 17, 3)
    # a box too small to keep takes its keypoints (and visibility) with it
    sample = (
        tv_tensors.Image(torch.zeros(3, 50, 50, dtype=torch.uint8)),
        {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor([[1.0, 1.0, 20.0, 20.0], [5.0, 5.0, 5.2, 9.0]]), format="XYXY", canvas_size=(50, 50)
            ),
            "labels": torch.tensor([1, 1]),
            **transforms.split_keypoints(torch.rand(2, 17, 3) * 40, (50, 50)),
        },
    )
    kept = transforms.resize_transform(50, 100)(*sample)[1]
    assert transforms.joined_keypoints(kept).shape == (1, 17, 3) and torch.equal(kept["labels"], torch.tensor([1]))


def test_datasets_without_keypoints_load_as_before(coco_small):
    dataset = coco.load_coco(*coco_small)
    assert dataset.keypoints is None and "num_keypoints" not in dataset.records[0]
    row = data.load_example(dataset.records[0], transforms.resize_transform(128, 192))
    assert "keypoints" not in row


def test_sigmas_for_other_keypoint_sets_fall_back_with_a_warning():
    sigmas, warning = keypoints.sigmas(["head", "tail"])
    assert sigmas.tolist() == [keypoints.DEFAULT_SIGMA] * 2 and "no --keypoint-sigmas for these 2 keypoints" in warning
    assert keypoints.sigmas(["head", "tail"], [0.1, 0.2])[0].tolist() == [0.1, 0.2]
    with pytest.raises(keypoints.KeypointError, match="gives 1 values for 2 keypoints"):
        keypoints.sigmas(["head", "tail"], [0.1])


def test_the_coco_person_spec_is_cocos_own_category(shared_data):
    """The names and skeleton a torchvision Keypoint R-CNN file gets are those of COCO's person category."""
    gt = json.loads((shared_data / "coco_keypoints" / "mmpose" / "test_coco.json").read_text())
    assert keypoints.spec_of(gt["categories"], "test_coco.json") == keypoints.COCO_PERSON == keypoints.unnamed(17)
    assert keypoints.KeypointSpec.from_dict(keypoints.COCO_PERSON.as_dict()) == keypoints.COCO_PERSON
    assert keypoints.unnamed(3).names == ("keypoint_1", "keypoint_2", "keypoint_3")


# ---------------------------------------------------------------- through the jobs


@pytest.fixture(scope="module")
def keypoint_labels(shared_data, tmp_path_factory) -> tuple[Path, Path, str]:
    """jobs/segment_bucket.py with a small Keypoint R-CNN (random weights) on mmpose's 4 real
    COCO images, plus one of them as a PNG twice: upright, and stored sideways with EXIF
    orientation 6 (the same picture once oriented). Returns the archive, the output and the model."""
    root = tmp_path_factory.mktemp("keypoint_labels")
    archive, out = root / "archive", root / "out"
    shutil.copytree(shared_data / MMPOSE / "images", archive)
    upright = Image.open(archive / "000000000785.jpg").convert("RGB")
    upright.save(archive / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright.transpose(Image.Transpose.ROTATE_90).save(archive / "rotated.png", exif=exif.tobytes())
    model = small_model_file(
        root / "kp.pt", arch="keypointrcnn_resnet18_fpn_small", classes=("person",), category_ids=(1,)
    )
    args = ["--input", str(archive), "--output", str(out), "--model", model, "--score-threshold", "0"]
    result = run_job("segment_bucket.py", *args, "--max-detections", "10")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return archive, out, model


@pytest.mark.slow
def test_segmentation_writes_keypoints_in_the_oriented_images_coordinates(keypoint_labels):
    archive, out, _ = keypoint_labels
    fs, path = storage.filesystem(str(out))
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in pq.read_table(path, filesystem=fs).to_pylist()}
    assert len(rows) == 6 and not any(r["error"] for r in rows.values())
    assert (rows["rotated.png"]["width"], rows["rotated.png"]["height"]) == (640, 425)
    assert rows["rotated.png"]["instances"] == rows["upright.png"]["instances"]  # oriented, not stored, pixels
    for row in rows.values():
        assert 0 < len(row["instances"]) <= 10
        for inst in row["instances"]:
            points = np.asarray(inst["keypoints"])
            assert inst["mask"] is None and points.shape == (17, 3)
            assert (points[:, 0] >= 0).all() and (points[:, 0] <= row["width"]).all()
            assert (points[:, 1] >= 0).all() and (points[:, 1] <= row["height"]).all()
    job = json.loads((out / "_job.json").read_text())
    assert job["keypoints"] == keypoints.COCO_PERSON.as_dict() and job["schema_version"] == "3"


@pytest.mark.slow
def test_export_writes_coco_keypoint_results_and_draws_skeletons(keypoint_labels, shared_data, tmp_path):
    archive, out, _ = keypoint_labels
    results, dataset, sheet = tmp_path / "results.json", tmp_path / "dataset.json", tmp_path / "sheet.png"
    gt = shared_data / MMPOSE / "test_coco.json"
    args = f"--predictions {out} --coco-results {results} --annotations {gt} --images {archive}"
    exported = call_job(
        "export.py", *args.split(), "--coco-dataset", str(dataset), "--render", "2", "--contact-sheet", str(sheet)
    )
    assert exported.returncode == 0, exported.stderr
    found = json.loads(results.read_text())
    assert {r["image_id"] for r in found} == {785, 40083, 196141, 197388}  # the PNG copies are not in the gt
    assert all(len(r["keypoints"]) == 51 and set(r["keypoints"][2::3]) == {1} for r in found)
    api = metric.coco_api(json.loads(gt.read_text()))
    scores = metric.score(api, found, iou_types=("keypoints",), sigmas=keypoints.sigmas(keypoints.COCO_KEYPOINTS)[0])
    assert len(scores.stats["keypoints"]) == 10  # loadRes took them and COCOeval scored them
    coco = json.loads(dataset.read_text())
    assert coco["categories"] == [{"id": 1, "name": "person", **keypoints.COCO_PERSON.as_dict()}]
    ann = coco["annotations"][0]
    assert len(ann["keypoints"]) == 51 and ann["num_keypoints"] == sum(v > 0 for v in ann["keypoints"][2::3])
    assert Image.open(sheet).size[0] > 0


@pytest.mark.slow
def test_evaluate_scores_a_keypoint_model_on_keypoints_and_boxes(keypoint_labels, shared_data, tmp_path):
    _, _, model = keypoint_labels
    gt, images = shared_data / MMPOSE / "test_coco.json", shared_data / MMPOSE / "images"
    report_file = tmp_path / "eval.json"
    result = run_job(
        "evaluate.py", "--model", model, "--annotations", str(gt), "--images", str(images), "--output", str(report_file)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "IoU metric: keypoints" in result.stdout and "IoU metric: segm" not in result.stdout
    report = json.loads(report_file.read_text())
    assert set(report) >= {"bbox", "keypoints"} and "segm" not in report and len(report["keypoints"]) == 10


def test_evaluate_refuses_ground_truth_with_other_keypoints(keypoint_labels, tmp_path):
    from maskrcnn.synthetic import generate_split

    _, _, model = keypoint_labels
    gt = generate_split(str(tmp_path / "figures"), 2, seed=0, kind="figures")  # 11 joints, not COCO's 17
    result = call_job(
        "evaluate.py", "--model", model, "--annotations", gt, "--images", str(tmp_path / "figures" / "images")
    )
    assert (
        result.returncode == 2 and "its keypoints are not the model's (nose, left_eye, right_eye, ...)" in result.stderr
    )
