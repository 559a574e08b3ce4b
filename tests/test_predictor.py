"""The inference actor against torchvision's own forward pass on the same checkpoint."""

import numpy as np
import pytest
import torch

from maskrcnn import checkpoint, images, masks
from maskrcnn.model import SMALL, build_model
from maskrcnn.predictor import Predictor


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    kwargs = {"num_classes": 4, "min_size": 160, "max_size": 256}
    model = build_model(SMALL, **kwargs)
    path = tmp_path_factory.mktemp("ck") / "small.pt"
    checkpoint.save(str(path), checkpoint.make(model, arch=SMALL, arch_kwargs=kwargs, classes=["a", "b", "c"],
                                               category_ids=[2, 5, 9], step=0, epoch=0))  # fmt: skip
    return str(path)


def _iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


@pytest.mark.parametrize("name", ["photos/dog1.jpg", "odd_images/hopper_orientation_6.jpg", "odd_images/wizard_low-interlaced.png"])
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
    only_b = Predictor.load(small_checkpoint, score_threshold=0.0, max_detections=5, keep_classes=["b"]).predict([rgb])[0]
    assert 0 < len(only_b) <= 5 and {i["category"] for i in only_b} == {"b"}
    with pytest.raises(ValueError, match="--classes zebra not among the model's classes: a, b, c"):
        Predictor.load(small_checkpoint, keep_classes=["zebra"])
