import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from maskrcnn import masks


def test_encode_decode_roundtrip_gives_ascii_counts():
    rng = np.random.default_rng(0)
    binary = rng.random((3, 17, 23)) > 0.5
    rles = masks.encode(binary)
    assert all(isinstance(r["counts"], str) and r["size"] == [17, 23] for r in rles)
    json.dumps(rles)  # JSON (and Parquet) safe
    for m, rle in zip(binary, rles):
        np.testing.assert_array_equal(masks.decode(rle, 17, 23), m)
    assert masks.encode(np.zeros((0, 4, 4), bool)) == []


def test_every_coco_small_segmentation_decodes_like_pycocotools(coco_small):
    annotations, _ = coco_small
    coco = COCO(annotations)
    kinds = {"polygon": 0, "multipart": 0, "uncompressed_rle": 0}
    for ann in coco.dataset["annotations"]:
        img = coco.imgs[ann["image_id"]]
        segm = ann["segmentation"]
        if isinstance(segm, list):
            kinds["multipart" if len(segm) > 1 else "polygon"] += 1
        else:
            kinds["uncompressed_rle"] += isinstance(segm["counts"], list)
        np.testing.assert_array_equal(masks.decode(segm, img["height"], img["width"]), coco.annToMask(ann))
    assert kinds == {"polygon": 739, "multipart": 65, "uncompressed_rle": 11}


@pytest.mark.parametrize("segm", [[[1, 2, 3, 4]], [[1, 2, 3, 4, 5]], [], {"counts": "x", "size": [9, 9]}, "nope"])
def test_invalid_segmentations_are_rejected(segm):
    with pytest.raises(masks.InvalidSegmentation):
        masks.decode(segm, 10, 10)


def test_paste_and_encode_equals_torchvision_paste_then_threshold():
    import torch
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    torch.manual_seed(0)
    probs = torch.rand(6, 1, 28, 28)
    boxes = torch.tensor([[3.2, 4.7, 40.1, 30.0], [-5.0, -3.0, 20.0, 12.0], [50.0, 20.0, 79.9, 59.9],
                          [10.0, 10.0, 10.4, 10.2], [70.0, 50.0, 95.0, 70.0], [0.0, 0.0, 79.0, 59.0]])  # fmt: skip
    expected = (paste_masks_in_image(probs, boxes, (60, 80), padding=1)[:, 0] > 0.5).numpy()
    rles = masks.paste_and_encode(probs, boxes, 60, 80)
    for want, rle in zip(expected, rles):
        np.testing.assert_array_equal(masks.decode(rle, 60, 80), want)
    assert masks.paste_and_encode(probs[:0], boxes[:0], 60, 80) == []
