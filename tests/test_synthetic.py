import json

import numpy as np

from maskrcnn import coco, data, masks
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
    ds = coco.load_coco(str(tmp_path / "a" / "annotations.json"), str(tmp_path / "a" / "images"))
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


def test_stick_figures_have_named_joints_that_face_the_viewer_and_load_for_training(tmp_path):
    """Each figure: 11 joints inside the image, its left limbs on the image's right (it faces
    the viewer), visibility 2 on its own pixels, 1 where another
    figure hides it; the dataset loads with keypoints and its flip swaps left and right."""
    from maskrcnn.synthetic import FIGURE_KEYPOINTS

    gt = json.loads(open(generate_split(str(tmp_path), 40, seed=5, size_range=(128, 192), kind="figures")).read())
    (category,) = gt["categories"]
    assert category["keypoints"] == list(FIGURE_KEYPOINTS.names) and category["skeleton"]
    name = {n: i for i, n in enumerate(FIGURE_KEYPOINTS.names)}
    hidden = 0
    for ann in gt["annotations"]:
        img = next(i for i in gt["images"] if i["id"] == ann["image_id"])
        points = np.asarray(ann["keypoints"]).reshape(11, 3)
        assert (points[:, 0] >= 0).all() and (points[:, 0] < img["width"]).all()
        assert (points[:, 1] >= 0).all() and (points[:, 1] < img["height"]).all()
        x = {n: points[i, 0] for n, i in name.items()}
        assert x["left_hand"] >= x["left_elbow"] > x["neck"] > x["right_elbow"] >= x["right_hand"]
        assert x["left_knee"] > x["hip"] > x["right_knee"] and x["left_foot"] > x["right_foot"]
        assert set(points[:, 2]) <= {1, 2} and ann["num_keypoints"] == 11
        mask = masks.decode(ann["segmentation"], img["height"], img["width"])
        xy = points[:, :2].round().astype(int)
        assert (mask[xy[:, 1], xy[:, 0]] == (points[:, 2] == 2)).all()
        hidden += int((points[:, 2] == 1).sum())
    assert hidden > 0 and len(gt["annotations"]) > len(gt["images"])  # some overlap, several per image
    ds = coco.load_coco(str(tmp_path / "annotations.json"), str(tmp_path / "images"))
    assert ds.keypoints == FIGURE_KEYPOINTS and not ds.dropped
    assert FIGURE_KEYPOINTS.flip_permutation()[name["left_hand"]] == name["right_hand"]
