import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from maskrcnn import coco, data, images, masks, storage, transforms
from maskrcnn.metric import score
from tests.helpers import add_defects, ground_truth_as_results


def test_coco_small_loads_completely(coco_small):
    ds = coco.load_coco(*coco_small)
    assert len(ds.gt["images"]) == 80 and len(ds.gt["annotations"]) == 815
    assert len(ds.records) == 80 and len(ds.classes) == 80
    kept = sum(len(json.loads(r["annotations"])) for r in ds.records)
    assert kept == 804 and ds.dropped == {"crowd": 11}  # crowd regions are not trained on
    # sparse COCO ids map to contiguous labels 1..80 and back
    assert ds.category_ids[0] == 1 and ds.category_ids[-1] == 90 and len(ds.classes) + 1 == 81
    labels = {a["label"] for r in ds.records for a in json.loads(r["annotations"])}
    assert labels <= set(range(1, 81))


def test_example_masks_and_boxes_match_the_annotations(coco_small):
    from pycocotools.coco import COCO

    ds = coco.load_coco(*coco_small)
    api = COCO(coco_small[0])
    record = next(r for r in ds.records if len(json.loads(r["annotations"])) > 10)
    row = data.load_example(record)
    assert row["error"] == ""
    anns = [a for a in api.imgToAnns[record["image_id"]] if not a["iscrowd"]]
    unpacked = masks.unpack(row["masks"], record["height"], record["width"])
    assert unpacked.shape == (len(anns), record["height"], record["width"])
    for mask, ann in zip(unpacked, anns):
        np.testing.assert_array_equal(mask, api.annToMask(ann))
    assert [ds.category_ids[label - 1] for label in row["labels"]] == [a["category_id"] for a in anns]


def test_a_coco_file_trains_on_the_stored_pixels_whatever_their_exif_orientation(oriented_photos, coco_small, tmp_path):
    """COCO gives sizes and coordinates in the pixels as stored: images tagged with EXIF
    orientations 3, 6 and 8 decode as stored, and fit their annotations exactly."""
    from PIL import Image
    from pycocotools.coco import COCO

    gt = oriented_photos(tmp_path / "images", [3, 6, 8], turned=False)
    (tmp_path / "instances.json").write_text(json.dumps(gt))
    ds = coco.load_coco(str(tmp_path / "instances.json"), str(tmp_path / "images"))
    api = COCO(str(tmp_path / "instances.json"))
    for record, img in zip(ds.records, gt["images"]):
        row = data.load_example(record)
        assert record["orientation"] == "stored" and row["error"] == "", img["file_name"]
        original = Image.open(f"{coco_small[1]}/{img['file_name'].rsplit('-', 1)[0]}.jpg").convert("RGB")
        np.testing.assert_array_equal(row["image"], np.asarray(original).transpose(2, 0, 1))
        anns = [a for a in api.imgToAnns[img["id"]] if not a["iscrowd"]]
        unpacked = masks.unpack(row["masks"], *row["image"].shape[1:])
        np.testing.assert_array_equal(unpacked, np.stack([api.annToMask(a) for a in anns]))
        displayed = data.load_example(dict(record, orientation="displayed"))  # what the tag would make of it
        assert displayed["error"] == ("" if img["file_name"].endswith("-3.png") else "size_mismatch")


def test_file_without_categories_loads(shared_data):
    root = shared_data / "coco_tv_gallery"
    ds = coco.load_coco(str(root / "instances.json"), str(root / "images"))
    assert ds.category_ids == [1, 18] and len(ds.records) == 2
    assert [len(data.load_example(r)["masks"].split()) for r in ds.records] == [1, 1]


def test_bad_annotations_are_dropped_and_counted(tmp_path):
    gt = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 20, "height": 10},
            {"id": 2, "file_name": "b.jpg", "width": 20, "height": 10},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 7,
                "bbox": [1, 1, 5, 5],
                "segmentation": [[1, 1, 6, 1, 6, 6]],
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 7,
                "bbox": [1, 1, 0, 5],
                "segmentation": [[1, 1, 1, 6, 1, 1]],
                "iscrowd": 0,
            },
            {"id": 3, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6]], "iscrowd": 0},
            {
                "id": 4,
                "image_id": 1,
                "category_id": 3,
                "bbox": [1, 1, 5, 5],
                "segmentation": [[1, 1, 6, 1, 6, 6]],
                "iscrowd": 0,
            },
        ],
        "categories": [{"id": 7, "name": "seven"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(gt))
    ds = coco.load_coco(str(path), str(tmp_path))
    assert ds.dropped == {"degenerate_box": 1, "invalid_segmentation": 1, "unknown_category": 1}
    assert [len(json.loads(r["annotations"])) for r in ds.records] == [1, 0]  # image 2: no annotations, kept


def test_unusable_dataset_files_raise_one_line_errors(tmp_path):
    with pytest.raises(coco.DatasetError, match="annotation file not found: .*nope.json"):
        coco.load_coco(str(tmp_path / "nope.json"), str(tmp_path))
    (tmp_path / "empty.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(coco.DatasetError, match="lists no images"):
        coco.load_coco(str(tmp_path / "empty.json"), str(tmp_path))


def test_every_defect_is_dropped_from_training_and_evaluation_alike(coco_small, tmp_path):
    gt = json.loads(Path(coco_small[0]).read_text())
    original = coco.load_coco(*coco_small)
    expected = add_defects(gt)
    path = tmp_path / "defective.json"
    path.write_text(json.dumps(gt))
    ds = coco.load_coco(str(path), coco_small[1])
    assert ds.dropped - original.dropped == expected
    assert len(ds.gt["annotations"]) == len(original.gt["annotations"]) + 3  # bad part cut, area computed, crowd
    trained = sum(len(json.loads(r["annotations"])) for r in ds.records)
    assert trained == sum(len(json.loads(r["annotations"])) for r in original.records) + 2  # crowd: evaluation only
    # pycocotools cannot score the raw file (a 4-number polygon is read as a box)...
    perfect = ground_truth_as_results(ds.gt)
    with pytest.raises(Exception):  # noqa: B017 - whichever defect it meets first
        score(gt, perfect)
    # ...but scores the cleaned ground truth against itself perfectly.
    scores = score(ds.gt, perfect)
    assert scores.stats["segm"][0] == pytest.approx(1.0) and scores.stats["bbox"][0] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "defect, message",
    [
        (lambda gt: gt["annotations"].append(dict(gt["annotations"][0])), r"annotation id \d+: the id is used twice"),
        (lambda gt: gt["annotations"][1].pop("id"), r"annotation #1: needs an integer 'id'"),
        (
            lambda gt: gt["annotations"][2].update(image_id="12"),
            r"annotation id \d+: 'image_id' must be an integer, got '12'",
        ),
        (
            lambda gt: gt["annotations"][0].pop("category_id"),
            r"annotation id \d+: 'category_id' must be an integer, got None",
        ),
        (lambda gt: gt["images"][3].pop("width"), r"image id \d+: 'width' and 'height' must be positive integers"),
        (lambda gt: gt["images"].append(dict(gt["images"][0])), r"image id \d+: the id is used twice"),
        (lambda gt: gt["images"][0].pop("file_name"), r"image id \d+: needs a 'file_name'"),
        (lambda gt: gt["categories"].append(dict(gt["categories"][0])), r"category id \d+: the id is used twice"),
    ],
)
def test_defects_no_rule_can_clean_name_the_file_and_the_id(defect, message, coco_small, tmp_path):
    gt = json.loads(Path(coco_small[0]).read_text())
    defect(gt)
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(gt))
    with pytest.raises(coco.DatasetError) as err:
        coco.load_coco(str(path), coco_small[1])
    assert re.fullmatch(f"{re.escape(str(path))}: {message}", str(err.value)), str(err.value)


def test_missing_and_corrupt_images_become_error_rows(tmp_path, shared_data):
    storage.write_bytes(str(tmp_path / "bad.jpg"), (shared_data / "odd_images" / "corrupt.jpg").read_bytes())
    base = {"width": 120, "height": 90, "orientation": "stored", "annotations": "[]"}
    assert data.load_example(dict(base, image_id=1, uri=str(tmp_path / "missing.jpg")))["error"] == "missing"
    assert data.load_example(dict(base, image_id=2, uri=str(tmp_path / "bad.jpg")))["error"] == "corrupt"


@pytest.mark.parametrize("scales,max_size", [((160, 200), 333), ((600, 700), 1000)], ids=["shrunk", "grown"])
def test_the_worker_trains_on_the_targets_of_a_full_resize_in_the_data_task(shared_data, scales, max_size):
    """Real COCO photos through the data task and the worker's augmentation give exactly the
    targets of the old path, which resized every image in the data task and shipped its masks
    as arrays; now masks cross the object store as RLE, and an image smaller than the
    largest scale at its own size (the worker grows it), in a small fraction of the bytes."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    from maskrcnn import loading

    root = shared_data / "coco_small_train"
    ds = coco.load_coco(str(root / "instances_train2017.json"), str(root / "images"))
    old_resize = v2.Compose(
        [
            v2.RandomShortestSize(min_size=[max(scales)], max_size=max_size),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=transforms._per_instance),
        ]
    )
    augment = transforms.Augment(scales, max_size)
    sent = old_sent = 0
    for seed, record in enumerate(ds.records[:6]):
        anns = json.loads(record["annotations"])
        h, w = record["height"], record["width"]
        image = tv_tensors.Image(torch.from_numpy(data.images.decode(storage.read_bytes(record["uri"]), exif=False)))
        full = np.stack([masks.decode(a["segmentation"], h, w) for a in anns])
        boxes = tv_tensors.BoundingBoxes(torch.tensor([a["box"] for a in anns]), format="XYXY", canvas_size=(h, w))
        target = {"boxes": boxes, "masks": tv_tensors.Mask(full), "labels": torch.tensor([a["label"] for a in anns])}
        old_image, old_target = old_resize(image.permute(2, 0, 1), target)
        old_sent += old_image.numel() + old_target["masks"].numel()
        torch.manual_seed(seed)
        want_image, want = augment.random[augment.batch_scale()](old_image, old_target)

        row = loading.LoadExample(max(scales), max_size)(record)
        sent += row["image"].nbytes + len(row["masks"])
        torch.manual_seed(seed)
        images, targets = transforms.to_model_inputs([row], torch.device("cpu"), augment)
        assert torch.equal(images[0], want_image.float() / 255), record["uri"]
        for key in ("boxes", "masks", "labels"):
            assert torch.equal(targets[0][key], want[key].as_subclass(torch.Tensor)), (record["uri"], key)
    assert sent * (2 if min(scales) < 480 else 8) < old_sent


def test_augmentation_moves_boxes_and_masks_with_the_image(shapes):
    """The data tasks shrink to the largest scale; the worker flips and rescales on its device."""
    ds = coco.load_coco(str(shapes / "train" / "annotations.json"), str(shapes / "train" / "images"))
    rows = [data.load_example(r, transforms.resize_transform(96, 128)) for r in ds.records[:8]]
    assert all(min(r["image"].shape[1:]) == 96 or max(r["image"].shape[1:]) == 128 for r in rows)
    torch.manual_seed(0)
    images, targets = transforms.to_model_inputs(rows, torch.device("cpu"), transforms.Augment((64, 96), 128))
    for image, target in zip(images, targets):
        _, h, w = image.shape
        assert min(abs(min(h, w) - s) for s in (64, 96)) <= 1 or max(h, w) <= 128
        assert target["masks"].shape[1:] == (h, w) and len(target["masks"]) == len(target["boxes"]) == len(
            target["labels"]
        )
        for mask, (x0, y0, x1, y1) in zip(target["masks"].numpy(), target["boxes"].tolist()):
            ys, xs = np.nonzero(mask)
            # the box still surrounds its mask after two resizes and a flip (within resampling slack)
            assert abs(xs.min() - x0) <= 2.5 and abs(xs.max() + 1 - x1) <= 2.5
            assert abs(ys.min() - y0) <= 2.5 and abs(ys.max() + 1 - y1) <= 2.5


def _stream(shapes: list[tuple[int, int]], per_batch: int):
    """Ray Data-like numpy batches of rows whose images have these (height, width)."""
    rows = [{"image_id": i, "image": np.zeros((3, h, w), np.uint8)} for i, (h, w) in enumerate(shapes)]
    for start in range(0, len(rows), per_batch):
        part = rows[start : start + per_batch]
        yield {"image_id": np.array([r["image_id"] for r in part]), "image": [r["image"] for r in part]}


def test_batches_group_landscape_with_landscape_and_portrait_with_portrait():
    L, P = (30, 40), (40, 30)
    shapes = [L, P, L, L, P, P, L, P, L, L, P]
    got = [[r["image_id"] for r in b] for b in transforms.batches(_stream(shapes, 3), 2)]
    assert got == [[0, 2], [1, 4], [3, 6], [5, 7], [8, 9]]  # 10 was left alone: dropped, as drop_last would
    # what is left of both orientations at the end makes mixed batches
    assert [[r["image_id"] for r in b] for b in transforms.batches(_stream([L, P, L, P], 4), 4)] == [[0, 2, 1, 3]]
    # one orientation: the batches it came in
    assert [[r["image_id"] for r in b] for b in transforms.batches(_stream([L] * 7, 2), 2)] == [[0, 1], [2, 3], [4, 5]]


def test_every_image_of_a_batch_takes_the_batchs_scale(shapes):
    ds = coco.load_coco(str(shapes / "train" / "annotations.json"), str(shapes / "train" / "images"))
    rows = [data.load_example(r, transforms.resize_transform(96, 1000)) for r in ds.records[:4]]
    augment, seen = transforms.Augment((64, 80, 96), 1000), set()
    for seed in range(8):
        torch.manual_seed(seed)
        images, _ = transforms.to_model_inputs(rows, torch.device("cpu"), augment)
        sides = {min(i.shape[-2:]) for i in images}
        assert len(sides) == 1, sides
        seen |= sides
    assert seen == {64, 80, 96}


def test_model_inputs_copy_only_read_only_arrays():
    """Ray Data hands a worker read-only views of its blocks: those are copied (torch, which has
    no read-only tensors, warns about them otherwise); a writable array is shared, not copied."""
    cpu, writable = torch.device("cpu"), np.ones((1, 8, 8), np.uint8)
    frozen = writable.copy()
    frozen.setflags(write=False)
    assert np.shares_memory(transforms._tensor(writable, torch.uint8, cpu).numpy(), writable)
    copied = transforms._tensor(frozen, torch.uint8, cpu)
    assert not np.shares_memory(copied.numpy(), frozen) and torch.equal(copied, torch.from_numpy(writable))


def test_augmentation_repeats_under_the_same_seed(shapes):
    ds = coco.load_coco(str(shapes / "train" / "annotations.json"), str(shapes / "train" / "images"))
    rows = [data.load_example(r, transforms.resize_transform(96, 128)) for r in ds.records[:6]]
    augment = transforms.Augment((64, 80, 96), 128)

    def run(seed: int) -> list:
        torch.manual_seed(seed)
        images, targets = transforms.to_model_inputs(rows, torch.device("cpu"), augment)
        return [(tuple(i.shape), t["boxes"].tolist()) for i, t in zip(images, targets)]

    assert run(5) == run(5)
    assert run(5) != run(6)  # 6 images, 3 scales and a flip: another seed differs somewhere


def test_a_file_name_that_leaves_the_image_root_is_never_read(coco_small, tmp_path, monkeypatch):
    """``..`` past --train-images, or an absolute path: an ``outside_root`` error row, counted as a
    skipped image by kind; no read is even tried. A ``..`` that stays inside is an ordinary name."""
    annotations, root = coco_small
    gt = json.loads(Path(annotations).read_text())
    names = [f"../{Path(root).name}/{gt['images'][0]['file_name']}", "/etc/hostname", "../../secret.jpg"]
    for img, name in zip(gt["images"], names):
        img["file_name"] = name
    ds = coco.index_coco(gt, annotations, root)
    first, *outside = ds.records[:3]
    assert os.path.exists(first["uri"]) and "error" not in first  # "../images/x.jpg" under images/ stays inside
    assert [r["error"] for r in outside] == [coco.OUTSIDE_ROOT] * 2 and [r["uri"] for r in outside] == names[1:]
    monkeypatch.setattr(images, "read", lambda *a, **k: pytest.fail("an image outside the root was read"))
    assert [data.load_example(r)["error"] for r in outside] == [coco.OUTSIDE_ROOT] * 2
    assert coco.OUTSIDE_ROOT in data.IMAGE_ERRORS  # what training counts skipped images by
