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


def test_generated_images_have_one_to_six_instances_of_every_class():
    from maskrcnn.synthetic import make_image

    rng = np.random.default_rng(0)
    counts, classes = [], set()
    for _ in range(60):
        image, instances = make_image(rng, (96, 160), 6)
        counts.append(len(instances))
        classes |= {c for c, _ in instances}
        assert image.dtype == np.uint8 and image.shape[2] == 3
    assert 1 <= min(counts) and max(counts) <= 6 and len(set(counts)) >= 4
    assert classes == set(range(len(CLASSES)))


def test_archive_holds_images_and_damaged_files_that_decode_as_errors(tmp_path):
    from maskrcnn import images
    from maskrcnn.synthetic import generate_archive

    generate_archive(str(tmp_path), 5, seed=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[:5] == [f"{i:06d}.jpg" for i in range(1, 6)] and len(names) == 8
    kinds = {}
    for name in names[5:]:
        try:
            images.decode((tmp_path / name).read_bytes())
        except images.ImageError as err:
            kinds[name] = err.kind
    assert kinds == {
        "damaged_empty.jpg": "empty",
        "damaged_not_an_image.jpg": "not_an_image",
        "damaged_truncated.jpg": "corrupt",
    }
