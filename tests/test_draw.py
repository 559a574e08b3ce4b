"""The renderer: a colour per instance, alpha fills with solid contours, labels that never
overlap and stay inside, a legend strip, and a contact sheet that keeps aspect ratios."""

import numpy as np
import pytest

from maskrcnn import draw, masks


def _instance(category: str, score: float, box: tuple[int, int, int, int], size: tuple[int, int]) -> dict:
    x0, y0, x1, y1 = box
    binary = np.zeros(size, np.uint8)
    binary[y0:y1, x0:x1] = 1
    return {
        "category": category,
        "category_id": 1,
        "score": score,
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "mask": masks.encode(binary[None])[0],
    }


def test_each_instance_has_its_own_colour_filled_at_alpha_with_a_solid_contour():
    size = (600, 800)
    grey = np.full((*size, 3), 100, np.uint8)
    boxes = [(50, 100, 250, 300), (300, 100, 500, 300), (550, 100, 750, 300)]
    instances = [_instance(c, s, b, size) for c, s, b in zip(("dog", "dog", "cat"), (0.9, 0.8, 0.7), boxes)]
    picture = np.asarray(draw.picture(grey, instances, max_side=800))
    strip = picture.shape[0] - size[0]
    assert picture.shape[1] == 800 and 10 < strip < 40  # the picture at full size, a legend strip under it
    for k, (x0, y0, x1, y1) in enumerate(boxes):  # highest score first: palette colours 0, 1, 2
        colour = np.array(draw.PALETTE[k])
        inside = picture[y1 - 20, (x0 + x1) // 2]  # well inside the mask, below any label
        assert np.abs(inside.astype(int) - (0.5 * 100 + 0.5 * colour)).max() <= 1
        assert (picture[(y0 + y1) // 2, x1 - 1] == colour).all()  # the contour is the solid colour
        assert (picture[(y0 + y1) // 2, x1 + 5] == 100).all()  # outside is untouched
    assert len({tuple(draw.PALETTE[k]) for k in range(3)}) == 3


def test_small_images_are_enlarged_and_large_ones_reduced():
    small = draw.picture(np.zeros((100, 150, 3), np.uint8), [], max_side=1024)
    large = draw.picture(np.zeros((3000, 4000, 3), np.uint8), [], max_side=1024)
    assert small.width == 512 and large.width == 1024 and round(large.height - 768) == large.height - 768


def test_labels_stay_inside_and_never_overlap():
    width, height = 300, 200
    boxes = [(0, 0, 60, 40), (5, 5, 65, 45), (10, 10, 70, 50), (280, 190, 300, 200), (10, 12, 60, 48)]
    spots = draw.place_labels(boxes, [(90, 14)] * len(boxes), (width, height))
    placed = [s for s in spots if s is not None]
    assert spots[0] == (0, 0, 90, 14)  # no room above the box: inside its top instead
    assert spots[3] == (210, 176, 300, 190)  # at the corner: moved left and up into the picture
    assert spots[4] is None  # every spot for the fifth label is taken: it is left out
    for i, a in enumerate(placed):
        assert 0 <= a[0] and a[2] <= width and 0 <= a[1] and a[3] <= height
        assert not any(draw._overlap(a, b) for b in placed[i + 1 :])


def test_legend_counts_every_instance_by_category():
    instances = [{"category": c} for c in ("dog", "person", "dog")]
    assert draw.legend(instances) == "3 instances: 2 dog, 1 person"
    assert draw.legend(instances[:1]) == "1 instance: 1 dog" and draw.legend([]) == "no instances"


@pytest.mark.parametrize("shape", [(100, 200), (300, 120)])
def test_contact_sheet_keeps_aspect_ratios_and_captions_each_cell(shape):
    from PIL import Image

    from maskrcnn import images

    red = Image.new("RGB", (shape[1], shape[0]), (255, 0, 0))
    sheet = images.decode(draw.contact_sheet([(red, "a/long/name.jpg"), (red, "b.jpg")], columns=2, cell=160))
    cell = sheet[6 : 6 + 160, 6 : 6 + 160]
    ys, xs = np.nonzero((cell == (255, 0, 0)).all(axis=2))
    fitted_h, fitted_w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert max(fitted_h, fitted_w) == 160 and abs(fitted_w / fitted_h - shape[1] / shape[0]) < 0.05
    caption = sheet[6 + 160 : 6 + 160 + 14, 6 : 6 + 160]
    assert (caption < 100).any()  # dark text under the cell


def test_keypoints_and_their_bones_are_drawn_in_the_instances_colour_only_where_confident():
    """A keypoint model's instance (no mask): its box, its keypoints above KEYPOINT_MIN_SCORE and
    the bones between two of them, in its colour; a bone to a keypoint scored below is left out."""
    grey = np.full((200, 300, 3), 100, np.uint8)
    points = [[50, 100, 5.0], [150, 100, 3.0], [250, 100, -1.0]]  # the third is not confident
    inst = {"category": "figure", "category_id": 1, "score": 0.9, "bbox": [40, 60, 220, 100], "mask": None}
    picture = np.asarray(draw.picture(grey, [dict(inst, keypoints=points)], max_side=300, skeleton=((1, 2), (2, 3))))
    colour = np.array(draw.PALETTE[0])
    assert (picture[100, 100] == colour).all()  # on the bone from keypoint 1 to 2
    assert (picture[100, 200] == 100).all() and (picture[100, 250] == 100).all()  # no bone to 3, nor 3 itself
    assert (picture[80, 40] == colour).all()  # the box, drawn because there is no mask
