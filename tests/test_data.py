import json

import numpy as np
import pytest

from maskrcnn import data, storage


def test_coco_small_loads_completely(coco_small):
    ds = data.load_coco(*coco_small)
    assert len(ds.gt["images"]) == 80 and len(ds.gt["annotations"]) == 815
    assert len(ds.records) == 80 and len(ds.classes) == 80
    kept = sum(len(json.loads(r["annotations"])) for r in ds.records)
    assert kept == 804 and ds.dropped == {"crowd": 11}  # crowd regions are not trained on
    # sparse COCO ids map to contiguous labels 1..80 and back
    assert ds.category_ids[0] == 1 and ds.category_ids[-1] == 90 and ds.num_classes == 81
    labels = {a["label"] for r in ds.records for a in json.loads(r["annotations"])}
    assert labels <= set(range(1, 81))


def test_example_masks_and_boxes_match_the_annotations(coco_small):
    from pycocotools.coco import COCO

    ds = data.load_coco(*coco_small)
    coco = COCO(coco_small[0])
    record = next(r for r in ds.records if len(json.loads(r["annotations"])) > 10)
    row = data.load_example(record)
    assert row["error"] == ""
    anns = [a for a in coco.imgToAnns[record["image_id"]] if not a["iscrowd"]]
    assert row["masks"].shape == (len(anns), record["height"], record["width"])
    for mask, ann in zip(row["masks"], anns):
        np.testing.assert_array_equal(mask, coco.annToMask(ann))
    assert [ds.category_ids[label - 1] for label in row["labels"]] == [a["category_id"] for a in anns]


def test_file_without_categories_loads(shared_data):
    root = shared_data / "coco_tv_gallery"
    ds = data.load_coco(str(root / "instances.json"), str(root / "images"))
    assert ds.category_ids == [1, 18] and len(ds.records) == 2
    assert [data.load_example(r)["masks"].shape[0] for r in ds.records] == [1, 1]


def test_bad_annotations_are_dropped_and_counted(tmp_path):
    gt = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 10}, {"id": 2, "file_name": "b.jpg", "width": 20, "height": 10}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6]], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [1, 1, 0, 5], "segmentation": [[1, 1, 1, 6, 1, 1]], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6]], "iscrowd": 0},
            {"id": 4, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6]], "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "seven"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(gt))
    ds = data.load_coco(str(path), str(tmp_path))
    assert ds.dropped == {"degenerate_box": 1, "invalid_segmentation": 1, "unknown_category": 1}
    assert [len(json.loads(r["annotations"])) for r in ds.records] == [1, 0]  # image 2: no annotations, kept


def test_unusable_dataset_files_raise_one_line_errors(tmp_path):
    with pytest.raises(data.DatasetError, match="annotation file not found: .*nope.json"):
        data.load_coco(str(tmp_path / "nope.json"), str(tmp_path))
    (tmp_path / "empty.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(data.DatasetError, match="lists no images"):
        data.load_coco(str(tmp_path / "empty.json"), str(tmp_path))


def test_missing_and_corrupt_images_become_error_rows(tmp_path, shared_data):
    storage.write_bytes(str(tmp_path / "bad.jpg"), (shared_data / "odd_images" / "corrupt.jpg").read_bytes())
    base = {"width": 120, "height": 90, "annotations": "[]"}
    assert data.load_example(dict(base, image_id=1, uri=str(tmp_path / "missing.jpg")))["error"] == "missing_image"
    assert data.load_example(dict(base, image_id=2, uri=str(tmp_path / "bad.jpg")))["error"] == "undecodable_image"


def test_augmentation_moves_boxes_and_masks_with_the_image(shapes):
    ds = data.load_coco(str(shapes / "train" / "annotations.json"), str(shapes / "train" / "images"))
    transform = data.train_transform((64, 96), 128)
    for record in ds.records[:8]:
        row = data.load_example(record, transform)
        _, h, w = row["image"].shape
        assert min(abs(min(h, w) - s) for s in (64, 96)) <= 1 or max(h, w) <= 128
        assert row["masks"].shape[1:] == (h, w) and len(row["masks"]) == len(row["boxes"]) == len(row["labels"])
        for mask, (x0, y0, x1, y1) in zip(row["masks"], row["boxes"]):
            ys, xs = np.nonzero(mask)
            # the box still surrounds its mask after flip and resize (within resampling slack)
            assert abs(xs.min() - x0) <= 2 and abs(xs.max() + 1 - x1) <= 2
            assert abs(ys.min() - y0) <= 2 and abs(ys.max() + 1 - y1) <= 2
