import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from maskrcnn import masks
from tests.helpers import mask_iou


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


def _reference_rles(probs, boxes, height, width):
    """What box-local encoding must equal: torchvision's full-image paste, > 0.5, pycocotools.
    torchvision cannot paste a box that misses the image (the model never predicts one);
    its mask is empty."""
    from pycocotools import mask as mask_utils
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    rles = []
    for prob, box in zip(probs, boxes):
        try:
            full = (paste_masks_in_image(prob[None], box[None], (height, width), padding=1)[0, 0] > 0.5).numpy()
        except RuntimeError:
            x0, y0, x1, y1 = box.tolist()
            assert x1 < 0 or y1 < 0 or x0 >= width or y0 >= height, box
            full = np.zeros((height, width), bool)
        rles.append(mask_utils.encode(np.asfortranarray(full.astype(np.uint8))))
    return rles


def _edge_case_boxes(height: int, width: int):
    import torch

    h, w = float(height), float(width)
    return torch.tensor(
        [
            [3.2, 4.7, w * 0.5, h * 0.5],  # inside
            [-5.0, -3.0, 20.0, 12.0],  # clipped at the top-left corner
            [w - 20, h - 15, w + 9, h + 7],  # clipped at the bottom-right: touches the last pixel
            [w * 0.3, -9.0, w * 0.6, 10.0],  # clipped at the top
            [-4.0, h * 0.2, 7.0, h * 0.8],  # clipped at the left
            [w - 6, h * 0.1, w + 30, h * 0.4],  # clipped at the right
            [w * 0.1, h - 5, w * 0.2, h + 40],  # clipped at the bottom
            [0.0, 0.0, w - 1, h - 1],  # the whole image: runs continue into the next column
            [5.0, -10.0, 12.0, h + 10],  # full height, part width
            [10.0, 10.0, 10.4, 10.2],  # about one pixel
            [w + 5, h + 5, w + 30, h + 30],  # entirely outside: an empty crop
            [-30.0, -30.0, -2.0, -2.0],  # entirely outside, before the first pixel
        ]
    )


@pytest.mark.parametrize("seed", range(6))
def test_box_local_rle_is_byte_identical_to_pycocotools_on_the_pasted_mask(seed):
    """Random masks and boxes, borders, full-height boxes, empty crops, 1-pixel boxes, all-on
    and all-off masks, and masks touching the last pixel, on odd image shapes."""
    import torch

    rng = np.random.default_rng(seed)
    height, width = [(60, 80), (37, 53), (1, 9), (9, 1), (128, 128), (201, 77)][seed]
    edge = _edge_case_boxes(height, width)
    x0, y0 = rng.uniform(-0.3, 1.1, 20) * width, rng.uniform(-0.3, 1.1, 20) * height
    random = torch.tensor(
        np.stack([x0, y0, x0 + rng.uniform(0, 1.2, 20) * width, y0 + rng.uniform(0, 1.2, 20) * height], 1),
        dtype=torch.float32,
    )
    boxes = torch.cat([edge, random])
    torch.manual_seed(seed)
    probs = torch.rand(len(boxes), 1, 28, 28)
    probs[0] = 1.0  # all on
    probs[3] = 0.0  # all off
    probs[7, :, ::3] = 0.0  # the whole image with stripes
    expected = _reference_rles(probs, boxes, height, width)
    got = masks.paste_and_encode(probs, boxes, height, width)
    assert len(got) == len(expected) == len(boxes)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == {"size": e["size"], "counts": e["counts"].decode("ascii")}, (i, boxes[i].tolist())


def test_box_local_rle_of_a_mask_filling_the_image_and_of_no_instances():
    import torch

    probs, boxes = torch.ones(1, 1, 28, 28), torch.tensor([[-10.0, -10.0, 50.0, 50.0]])
    (rle,) = masks.paste_and_encode(probs, boxes, 20, 30)
    assert masks.decode(rle, 20, 30).all() and rle == {
        "size": [20, 30],
        "counts": _reference_rles(probs, boxes, 20, 30)[0]["counts"].decode(),
    }
    assert masks.paste_and_encode(probs[:0], boxes[:0], 20, 30) == []


def test_iou_is_computed_on_the_runs():
    rng = np.random.default_rng(3)
    binary = rng.random((4, 30, 40)) > 0.6
    a, b = masks.encode(binary[:2]), masks.encode(binary[1:])
    expected = [[(x & y).sum() / (x | y).sum() for y in binary[1:]] for x in binary[:2]]
    np.testing.assert_allclose(mask_iou(a, b), expected)
    assert mask_iou(a, []).shape == (2, 0)


# ---------------------------------------------------------------- polygons


def _coco_small_masks(coco_small) -> list[dict]:
    gt = json.loads(open(coco_small[0]).read())
    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    return [masks.to_compressed(a["segmentation"], *sizes[a["image_id"]]) for a in gt["annotations"]]


def test_the_crop_of_every_real_mask_is_its_decoded_box(coco_small):
    for rle in _coco_small_masks(coco_small):
        full = masks.decode(rle, *rle["size"])
        ys, xs = np.nonzero(full)
        crop, x0, y0 = masks._crop(rle)
        assert (x0, y0) == (xs.min(), ys.min())
        np.testing.assert_array_equal(crop, full[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])


def test_polygons_of_real_masks_cover_them(coco_small):
    """Every coco_small mask (polygons, multi-part polygons, crowd RLEs) -> polygons -> the
    mask pycocotools draws from them: measured here at a mean IoU of 0.986 (min 0.87) at the
    default tolerance, with 25 points a mask (benchmarks/polygons.py)."""
    ious = []
    for rle in _coco_small_masks(coco_small):
        polygons = masks.to_polygons(rle)
        assert polygons and all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
        ious.append(mask_iou([rle], [masks.to_compressed(polygons, *rle["size"])])[0, 0])
    assert len(ious) > 800 and np.mean(ious) > 0.98 and min(ious) > 0.85


def test_a_hole_stays_empty_and_a_square_comes_back_exactly():
    binary = np.zeros((1, 60, 80), np.uint8)
    binary[0, 10:50, 20:70] = 1
    binary[0, 20:30, 30:45] = 0  # the hole
    binary[0, 55:58, 2:5] = 1  # a second part: a 3 x 3 square
    rle = masks.encode(binary)[0]
    polygons = masks.to_polygons(rle, tolerance=0)
    assert len(polygons) == 2  # one polygon per part, the hole joined into its part's
    drawn = masks.decode(polygons, 60, 80)
    np.testing.assert_array_equal(drawn, binary[0])  # straight edges: pixel-exact, hole included
    corners = {(2.0, 55.0), (5.0, 55.0), (5.0, 58.0), (2.0, 58.0)}  # the square's, on the pixels' edges
    assert any(len(p) == 8 and set(zip(p[::2], p[1::2])) == corners for p in polygons)


def test_masks_with_no_polygon_give_none():
    empty = masks.encode(np.zeros((1, 5, 5), np.uint8))[0]
    speck = np.zeros((1, 5, 5), np.uint8)
    speck[0, 2, 2] = 1
    line = np.zeros((1, 5, 9), np.uint8)
    line[0, 2, 1:8] = 1  # one pixel high: its outline has no area
    assert masks.to_polygons(empty) == []
    assert masks.to_polygons(masks.encode(speck)[0]) == []
    assert masks.to_polygons(masks.encode(line)[0], tolerance=1) == []


def test_uncompressed_rle_counts_give_the_same_polygons():
    binary = np.zeros((1, 30, 40), np.uint8)
    binary[0, 5:25, 8:30] = 1
    rle = masks.encode(binary)[0]
    runs = masks._counts(rle["counts"]).tolist()
    assert masks.to_polygons({"size": [30, 40], "counts": runs}) == masks.to_polygons(rle)
