"""jobs/predict.py: quick predictions on files, folders and globs, with no Ray."""

import json
import os
import re
import subprocess
import sys

import pytest
from pycocotools.coco import COCO

from maskrcnn import images
from tests.helpers import OFFLINE, REPO, TOOTHBRUSH, small_model_file

PHOTOS = ["FudanPed00054", "FudanPed00054_mask", "astronaut", "dog1", "dog2", "person1"]


def _predict(*args: str) -> None:
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import predict
    finally:
        sys.path.pop(0)
    predict.main(list(args))


def test_a_folder_gives_pictures_and_coco_json_with_no_ray(shared_data, tmp_path):
    model = small_model_file(tmp_path / "m.pt", classes=("person", "dog"), category_ids=(1, 18))
    out = tmp_path / "out"
    argv = [
        "--input",
        str(shared_data / "photos"),
        "--model",
        model,
        "--output",
        str(out),
        "--score-threshold",
        "0.05",
        "--json-per-image",
    ]
    script = (
        "import runpy, sys; sys.argv = ['jobs/predict.py'] + sys.argv[1:]; "
        "runpy.run_path('jobs/predict.py', run_name='__main__'); "
        "print('ray imported:', any(m == 'ray' or m.startswith('ray.') for m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ray imported: False")
    lines = [line for line in result.stdout.splitlines() if line.startswith("[predict] ") and "/6 images" in line]
    assert [re.search(r"ETA \d+:\d\d, ([^:]+): ", line).group(1) for line in lines] == PHOTOS  # one per image
    assert sorted(p.stem for p in out.glob("*.png")) == PHOTOS
    dataset = COCO(str(out / "coco_dataset.json"))
    assert [img["file_name"] for img in dataset.dataset["images"]] == [
        str(p) for p in sorted((shared_data / "photos").iterdir())
    ]
    assert dataset.dataset["categories"] == [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]
    results = json.loads((out / "coco_results.json").read_text())
    assert len(results) == len(dataset.anns) > 0 and len(dataset.loadRes(results).anns) == len(results)
    row = json.loads((out / "dog1.json").read_text())
    assert row["uri"].endswith("dog1.jpg") and row["error"] is None and row["width"] == 500
    drawn = images.decode((out / "dog1.png").read_bytes())
    assert drawn.shape[1] == 512 and drawn.shape[0] > 512  # enlarged from 500 px, with the legend strip


def test_globs_repeated_names_and_unreadable_images(shared_data, tmp_path):
    model = small_model_file(tmp_path / "m.pt")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"1 of 4 images failed, e\.g\. .*corrupt\.jpg: corrupt: "):
        _predict(
            "--input",
            str(shared_data / "photos" / "dog*.jpg"),
            str(shared_data / "odd_images" / "corrupt.jpg"),
            str(shared_data / "photos" / "dog1.jpg"),
            "--model",
            model,
            "--output",
            str(out),
        )
    assert sorted(p.name for p in out.glob("*.png")) == ["dog1-2.png", "dog1.png", "dog2.png"]
    assert len(json.loads((out / "coco_dataset.json").read_text())["images"]) == 3
    with pytest.raises(Exception, match=r"cannot read .*nowhere\.jpg: no such file or directory"):
        _predict("--input", str(tmp_path / "nowhere.jpg"), "--model", model, "--output", str(out))


@pytest.mark.parametrize("form", ["pth", "weight name, offline, from torch's cache"])
def test_torchvision_models_label_with_coco_classes(form, torchvision_pth, shared_data, tmp_path, monkeypatch):
    """A .pth file, and ``COCO_V1`` with no internet: found in torch's cache, where a
    machine that once downloaded it (or a user who copied it there) keeps it."""
    model = torchvision_pth
    if form != "pth":
        cache = tmp_path / "torch" / "hub" / "checkpoints"
        cache.mkdir(parents=True)
        os.symlink(torchvision_pth, cache / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")
        for key, value in {**OFFLINE, "TORCH_HOME": str(tmp_path / "torch")}.items():
            monkeypatch.setenv(key, value)
        model = "COCO_V1"
    out = tmp_path / "out"
    _predict(
        "--input",
        str(shared_data / "photos" / "dog1.jpg"),
        "--model",
        model,
        "--output",
        str(out),
        "--max-detections",
        "10",
    )
    dataset = json.loads((out / "coco_dataset.json").read_text())
    assert len(dataset["categories"]) == 80 and {"id": TOOTHBRUSH, "name": "toothbrush"} in dataset["categories"]
    assert len(dataset["annotations"]) == 10 and {a["category_id"] for a in dataset["annotations"]} == {TOOTHBRUSH}


def test_a_keypoint_model_gives_skeleton_pictures_and_coco_keypoints(shared_data, tmp_path):
    """The joint model's instances carry masks and keypoints; the COCO dataset names the
    keypoints and skeleton; the results load in pycocotools."""
    from maskrcnn.keypoints import COCO_PERSON

    model = small_model_file(
        tmp_path / "kp.pt", arch="maskrcnn_keypoint_resnet18_fpn_small", classes=("person",), category_ids=(1,)
    )
    out = tmp_path / "out"
    photos = shared_data / "coco_keypoints" / "mmpose" / "images"
    _predict(
        "--input", str(photos), "--model", model, "--output", str(out), "--score-threshold", "0", "--json-per-image"
    )
    dataset = COCO(str(out / "coco_dataset.json"))
    assert dataset.dataset["categories"] == [{"id": 1, "name": "person", **COCO_PERSON.as_dict()}]
    ann = dataset.dataset["annotations"][0]
    assert len(ann["keypoints"]) == 51 and "counts" in ann["segmentation"]
    results = json.loads((out / "coco_results.json").read_text())
    assert all(len(r["keypoints"]) == 51 and "segmentation" in r for r in results)
    assert len(dataset.loadRes(results).anns) == len(results) > 0
    row = json.loads((out / "000000000785.json").read_text())
    assert all(len(i["keypoints"]) == 17 and i["mask"] for i in row["instances"])
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.stem + ".png" for p in photos.iterdir())
