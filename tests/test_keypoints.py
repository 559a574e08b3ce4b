"""Keypoint definitions from real COCO person files, the left/right swap a flip needs, and
keypoints through the data pipeline: loaded, cleaned, moved and scaled with the image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from maskrcnn import data, keypoints
from maskrcnn.keypoints import KeypointError

MMPOSE = "coco_keypoints/mmpose"
TRAIN2017 = "coco_keypoints/super_gradients_train2017"


def _coco(shared_data, folder: str) -> tuple[str, str]:
    name = "test_coco.json" if folder == MMPOSE else "person_keypoints_train2017.json"
    return str(shared_data / folder / name), str(shared_data / folder / "images")


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
        **data._split_keypoints(points, (80, 100)),
    }
    _, flipped = keypoints.RandomHorizontalFlip(1.0, spec.flip_permutation())(image, target)
    result = data._joined_keypoints(flipped)[0]
    # the new left wrist is the old right wrist, mirrored, with its own visibility
    assert result.tolist() == [[49.0, 10.0, 2.0], [9.0, 60.0, 1.0], [89.0, 40.0, 2.0]]
    _, same = keypoints.RandomHorizontalFlip(0.0, spec.flip_permutation())(image, target)
    assert torch.equal(data._joined_keypoints(same), points)


def test_keypoint_annotations_load_clean_and_count(shared_data, tmp_path):
    annotations, images = _coco(shared_data, TRAIN2017)
    gt = json.loads(open(annotations).read())
    unlabelled = sum(1 for a in gt["annotations"] if a["num_keypoints"] == 0 and not a["iscrowd"])
    broken = dict(gt["annotations"][0], id=1, keypoints=gt["annotations"][0]["keypoints"][:-3])
    gt["annotations"].append(broken)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    dataset = data.load_coco(str(tmp_path / "gt.json"), images)
    assert dataset.keypoints.names[0] == "nose" and len(dataset.keypoints) == 17
    assert dataset.dropped["invalid_keypoints"] == 1 and dataset.dropped["crowd"] == 1
    assert {r["num_keypoints"] for r in dataset.records} == {17} and len(dataset.records) == 30
    trained = [a for r in dataset.records for a in json.loads(r["annotations"])]
    assert sum(1 for a in trained if not any(a["keypoints"][2::3])) == unlabelled > 0  # they still train the box


def test_keypoints_are_scaled_with_the_image_and_go_with_a_dropped_box(shared_data):
    dataset = data.load_coco(*_coco(shared_data, MMPOSE))
    record = max(dataset.records, key=lambda r: len(json.loads(r["annotations"])))
    original = np.array([a["keypoints"] for a in json.loads(record["annotations"])], np.float32).reshape(-1, 17, 3)
    row = data.load_example(record, data.resize_transform(200, 400))
    scale = row["image"].shape[1] / record["height"]
    assert row["keypoints"].shape == original.shape and row["keypoints"].dtype == np.float32
    seen = original[..., 2] > 0
    assert np.array_equal(row["keypoints"][..., 2], original[..., 2])
    assert np.allclose(row["keypoints"][seen][:, :2], original[seen][:, :2] * scale, atol=1.0)
    images, targets = data.to_model_inputs(
        [row], torch.device("cpu"), data.train_transform((100,), 200, dataset.keypoints)
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
            **data._split_keypoints(torch.rand(2, 17, 3) * 40, (50, 50)),
        },
    )
    kept = data.resize_transform(50, 100)(*sample)[1]
    assert data._joined_keypoints(kept).shape == (1, 17, 3) and torch.equal(kept["labels"], torch.tensor([1]))


def test_datasets_without_keypoints_load_as_before(coco_small):
    dataset = data.load_coco(*coco_small)
    assert dataset.keypoints is None and "num_keypoints" not in dataset.records[0]
    row = data.load_example(dataset.records[0], data.resize_transform(128, 192))
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
