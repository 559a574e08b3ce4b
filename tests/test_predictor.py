"""The inference actor against torchvision's own forward pass on the same checkpoint."""

import numpy as np
import pytest
import torch

from maskrcnn import checkpoint, images, masks
from maskrcnn.predictor import Predictor
from tests.helpers import MIXED, large_jpeg, small_model_file


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    return small_model_file(tmp_path_factory.mktemp("ck") / "small.pt")


def _iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


@pytest.mark.parametrize(
    "name", ["photos/dog1.jpg", "odd_images/hopper_orientation_6.jpg", "odd_images/wizard_low-interlaced.png"]
)
def test_predictions_match_torchvision_on_the_oriented_image(name, small_checkpoint, shared_data):
    rgb = images.decode((shared_data / name).read_bytes())
    h, w = rgb.shape[:2]
    predictor = Predictor.load(small_checkpoint, score_threshold=0.05, max_detections=50)
    (ours,) = predictor.predict([rgb])

    reference = checkpoint.build(checkpoint.load(small_checkpoint))
    reference.roi_heads.score_thresh, reference.roi_heads.detections_per_img = 0.05, 50
    with torch.no_grad():
        ref = reference([torch.from_numpy(rgb).permute(2, 0, 1).float() / 255])[0]
    assert len(ours) == len(ref["boxes"]) > 0
    for inst, box, label, score, prob in zip(ours, ref["boxes"], ref["labels"], ref["scores"], ref["masks"]):
        x, y, bw, bh = inst["bbox"]
        assert np.allclose([x, y, x + bw, y + bh], box.tolist(), atol=1.0)
        assert inst["category_id"] == [2, 5, 9][label - 1] and inst["score"] == pytest.approx(float(score), abs=1e-4)
        assert inst["mask"]["size"] == [h, w]
        assert _iou(masks.decode(inst["mask"], h, w), (prob[0] > 0.5).numpy()) >= 0.99


def test_class_filter_cap_and_unknown_classes(small_checkpoint, shared_data):
    rgb = images.decode((shared_data / "photos" / "dog2.jpg").read_bytes())
    only_b = Predictor.load(small_checkpoint, score_threshold=0.0, max_detections=5, keep_classes=["b"]).predict([rgb])[
        0
    ]
    assert 0 < len(only_b) <= 5 and {i["category"] for i in only_b} == {"b"}
    with pytest.raises(ValueError, match="--classes zebra not among the model's classes: a, b, c"):
        Predictor.load(small_checkpoint, keep_classes=["zebra"])


def test_torchvisions_placeholder_classes_are_never_predicted_nor_listed(tmp_path, shared_data):
    """torchvision's COCO models have "N/A" classes for the unused COCO ids."""
    model = small_model_file(tmp_path / "gaps.pt", classes=("a", "N/A", "c"), category_ids=(1, 2, 3))
    rgb = images.decode((shared_data / "photos" / "dog2.jpg").read_bytes())
    found = Predictor.load(model, score_threshold=0.0, max_detections=100).predict([rgb])[0]
    assert len(found) == 100 and {i["category"] for i in found} == {"a", "c"}
    with pytest.raises(ValueError, match="--classes N/A not among the model's classes: a, c$"):
        Predictor.load(model, keep_classes=["N/A"])


def _mixed_images(shared_data, n_coco: int = 10) -> list[np.ndarray]:
    """Real images of mixed sizes and orientations, several of them sharing a canvas."""
    coco = sorted((shared_data / "coco_small" / "images").iterdir())[:n_coco]
    return [images.decode(p.read_bytes()) for p in [*(shared_data / n for n in MIXED), *coco]]


def _torchvision_alone(ckpt_uri, imgs, score=0.05, detections=50):
    reference = checkpoint.build(checkpoint.load(ckpt_uri))
    reference.roi_heads.score_thresh, reference.roi_heads.detections_per_img = score, detections
    with torch.no_grad():
        return [reference([torch.from_numpy(im).permute(2, 0, 1).float() / 255])[0] for im in imgs]


def _assert_matches(ours, ref, h, w):
    assert len(ours) == len(ref["boxes"])
    for inst, box, label, prob in zip(ours, ref["boxes"], ref["labels"], ref["masks"]):
        x, y, bw, bh = inst["bbox"]
        assert np.allclose([x, y, x + bw, y + bh], box.tolist(), atol=1.0)
        assert inst["category_id"] == [2, 5, 9][label - 1]
        assert _iou(masks.decode(inst["mask"], h, w), (prob[0] > 0.5).numpy()) >= 0.99


def test_rows_are_identical_at_any_batch_size(small_checkpoint, shared_data):
    imgs = _mixed_images(shared_data)
    predictor = Predictor.load(small_checkpoint, score_threshold=0.05, max_detections=50)
    alone = [predictor.predict([im])[0] for im in imgs]
    order = np.random.default_rng(0).permutation(len(imgs))
    batched: dict[int, list] = {}
    for start in range(0, len(imgs), 8):  # batches of 8, in another order
        chunk = order[start : start + 8]
        batched.update(zip(chunk, predictor.predict([imgs[i] for i in chunk])))
    assert sum(len(a) for a in alone) > 100
    assert [batched[i] for i in range(len(imgs))] == alone


def test_same_canvas_batches_match_torchvision_on_each_image_alone(small_checkpoint, shared_data, monkeypatch):
    """With batching on (as on a GPU), images share a forward pass only with images of their
    own canvas, so each still matches torchvision's forward of that image alone; torchvision's
    own batching, which pads to the largest image, does not. A pass takes at most
    ``group_size`` images (the actor's --batch-size)."""
    imgs = _mixed_images(shared_data, n_coco=14)
    predictor = Predictor.load(
        small_checkpoint, score_threshold=0.05, max_detections=50, batch_images=True, group_size=3
    )
    forward, passes = predictor._forward, []
    monkeypatch.setattr(predictor, "_forward", lambda canvases: passes.append(len(canvases)) or forward(canvases))
    ours = predictor.predict(imgs)
    assert len(passes) < len(imgs) - 4 and max(passes) == 3  # several images really shared a forward pass
    for inst, ref, im in zip(ours, _torchvision_alone(small_checkpoint, imgs), imgs):
        _assert_matches(inst, ref, *im.shape[:2])

    reference = checkpoint.build(checkpoint.load(small_checkpoint))
    reference.roi_heads.score_thresh, reference.roi_heads.detections_per_img = 0.05, 50
    with torch.no_grad():
        padded = reference([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in imgs])
    changed = [
        i
        for i, (p, r) in enumerate(zip(padded, _torchvision_alone(small_checkpoint, imgs)))
        if len(p["boxes"]) != len(r["boxes"]) or not torch.allclose(p["boxes"], r["boxes"], atol=1.0)
    ]
    assert len(changed) >= len(imgs) // 2, changed


@pytest.mark.parametrize("size", [160, 800])
def test_a_reduced_decode_feeds_the_model_nearly_what_a_full_decode_does(size, shared_data, tmp_path):
    """A 12 MP JPEG decoded at 1/2..1/8 scale reaches the same canvas as the full decode, with
    pixel values within a grey level or two (of 255) on average."""
    predictor = Predictor.load(small_model_file(tmp_path / "m.pt", min_size=size, max_size=int(size * 1.6)))
    std = torch.tensor(predictor.model.transform.image_std)[:, None, None] * 255
    for photo in ("person1.jpg", "astronaut.jpg"):
        data = large_jpeg(shared_data, 4032, 3024, photo=photo)
        full, reduced = images.decode_to_fit(data, None), images.decode_to_fit(data, (size, int(size * 1.6)))
        assert reduced.pixels.shape[0] * 2 <= full.pixels.shape[0] and (reduced.height, reduced.width) == (3024, 4032)
        (a, a_size), (b, b_size) = predictor._canvas(full.pixels), predictor._canvas(reduced.pixels)
        assert a.shape == b.shape and a_size == b_size
        assert ((a - b).abs()[0] * std).mean() < 2.0


def test_the_decode_task_hands_the_actor_what_the_model_sees_in_uint8(shared_data, tmp_path):
    """A 12 MP JPEG leaves the decode task at the model's input size (a 640x480 photo, which
    the model enlarges, as it is): the canvas the actor builds from it is the reduced decode's
    within uint8 rounding, and torchvision's own resize leaves it as it is, so the actor's rows
    are torchvision's forward pass of exactly what crossed the object store."""
    from maskrcnn import inference

    fit = (800, 1333)
    predictor = Predictor.load(small_model_file(tmp_path / "m.pt", min_size=fit[0], max_size=fit[1]))
    std = torch.tensor(predictor.model.transform.image_std)[:, None, None] * 255
    (tmp_path / "big.jpg").write_bytes(large_jpeg(shared_data, 4032, 3024, orientation=6))
    (tmp_path / "small.jpg").write_bytes(large_jpeg(shared_data, 640, 480))
    uris = np.array([str(tmp_path / "big.jpg"), str(tmp_path / "small.jpg")], dtype=object)
    out = inference.fetch_and_decode({"uri": uris}, max_pixels=10**8, fit=fit)
    assert [(h, w) for h, w in zip(out["height"], out["width"])] == [(4032, 3024), (480, 640)]
    big, small = out["image"]
    assert big.shape == (1066, 800, 3) and small.shape == (480, 640, 3) and big.dtype == np.uint8
    reduced = images.decode_to_fit((tmp_path / "big.jpg").read_bytes(), fit).pixels
    assert big.nbytes * 3.5 < reduced.nbytes
    (a, a_size), (b, b_size) = predictor._canvas(reduced), predictor._canvas(big)
    assert a_size == b_size and ((a - b).abs() * std).max() <= 0.5 + 1e-3
    pixels = torch.from_numpy(big).permute(2, 0, 1).float()
    assert torch.equal(predictor.model.transform.resize(pixels, None)[0], pixels)


@pytest.mark.parametrize("arch", ["keypointrcnn_resnet18_fpn_small", "maskrcnn_keypoint_resnet18_fpn_small"])
def test_keypoints_match_torchvision_in_the_oriented_images_coordinates(arch, shared_data, tmp_path):
    """On a real person photo stored sideways (EXIF orientation 6): K [x, y, score] per
    instance, where torchvision's own forward pass puts them on the displayed picture."""
    path = small_model_file(tmp_path / "kp.pt", arch=arch, classes=("person",), category_ids=(1,))
    rgb = images.decode(large_jpeg(shared_data, 480, 320, orientation=6))
    h, w = rgb.shape[:2]
    assert (h, w) == (480, 320)
    (ours,) = Predictor.load(path, score_threshold=0.0, max_detections=20).predict([rgb])
    reference = checkpoint.build(checkpoint.load(path))
    reference.roi_heads.score_thresh, reference.roi_heads.detections_per_img = 0.0, 20
    with torch.no_grad():
        ref = reference([torch.from_numpy(rgb).permute(2, 0, 1).float() / 255])[0]
    assert len(ours) == len(ref["boxes"]) > 0
    for inst, points, scores in zip(ours, ref["keypoints"], ref["keypoints_scores"]):
        got = np.asarray(inst["keypoints"])
        assert got.shape == (17, 3) and (inst["mask"] is None) == arch.startswith("keypointrcnn")
        assert np.allclose(got[:, :2], points[:, :2].numpy(), atol=1.0)
        assert np.allclose(got[:, 2], scores.numpy(), atol=1e-3)
        assert (got[:, 0] >= 0).all() and (got[:, 0] <= w).all() and (got[:, 1] >= 0).all() and (got[:, 1] <= h).all()


def test_out_of_memory_splits_the_batch_and_only_an_image_alone_becomes_an_error(
    small_checkpoint, shared_data, monkeypatch
):
    """Out of memory above 2 images a call: a batch of 8 is split in halves (1 + 2 splits),
    and the results equal those of each image alone. An image that fails alone is the one error."""
    imgs = _mixed_images(shared_data, n_coco=4)[:8]
    predictor = Predictor.load(small_checkpoint, score_threshold=0.05, max_detections=50)
    alone = [predictor.predict([im])[0] for im in imgs]
    real = Predictor.predict

    def tight(self, batch, sizes=None):
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any(im is imgs[5] for im in batch):
            raise ValueError("a broken image")
        return real(self, batch, sizes)

    monkeypatch.setattr(Predictor, "predict", tight)
    results, splits = predictor.predict_each(imgs, [im.shape[:2] for im in imgs])
    assert splits == 3
    assert results[5] == "inference_failed: ValueError: a broken image"
    assert results[:5] + results[6:] == alone[:5] + alone[6:]


def test_a_lost_device_context_is_raised_not_recorded(small_checkpoint, shared_data, monkeypatch):
    from maskrcnn.predictor import DeviceLost

    predictor = Predictor.load(small_checkpoint)

    def lost(self, batch, sizes=None):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(Predictor, "predict", lost)
    with pytest.raises(DeviceLost, match="illegal memory access"):
        predictor.predict_each([np.zeros((64, 64, 3), np.uint8)] * 2, [(64, 64)] * 2)
