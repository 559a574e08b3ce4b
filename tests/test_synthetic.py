import json

import numpy as np

from maskrcnn import data, masks
from maskrcnn.synthetic import CLASSES, generate_split


def test_generation_is_deterministic_and_annotations_match_the_pixels(tmp_path):
    a = json.loads(open(generate_split(str(tmp_path / "a"), 6, seed=3)).read())
    b = json.loads(open(generate_split(str(tmp_path / "b"), 6, seed=3)).read())
    assert a == b
    assert [c["name"] for c in a["categories"]] == list(CLASSES)
    sizes = {(i["height"], i["width"]) for i in a["images"]}
    assert len(sizes) > 1 and any(h != w for h, w in sizes)  # varied, non-square
    for ann in a["annotations"]:
        img = next(i for i in a["images"] if i["id"] == ann["image_id"])
        m = masks.decode(ann["segmentation"], img["height"], img["width"])
        ys, xs = np.nonzero(m)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["area"] == m.sum() >= 16
    ds = data.load_coco(str(tmp_path / "a" / "annotations.json"), str(tmp_path / "a" / "images"))
    assert all(data.load_example(r)["error"] == "" for r in ds.records)
