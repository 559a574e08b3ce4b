"""The review queue: which images a person sees first, in a deterministic order."""

import pytest

from maskrcnn import review
from maskrcnn.review import ReviewOptions


def _row(uri: str, *scores: float, category: str = "dog", error: str | None = None) -> dict:
    instances = [{"score": s, "category": category} for s in scores]
    return {"uri": uri, "instances": instances, "error": error}


ROWS = [
    _row("s3://b/a.jpg", 0.9, 0.95),  # certain: not for review when uncertain
    _row("s3://b/b.jpg", 0.5, 0.4, 0.95),  # two uncertain
    _row("s3://b/c.jpg", 0.35, 0.6),  # two uncertain, mean 0.475 (b: 0.45)
    _row("s3://b/d.jpg", 0.5, category="person"),
    _row("s3://b/e.jpg", error="corrupt: bad"),
    _row("s3://b/f.jpg", *[0.9] * 5),
]


def test_uncertain_images_come_first_most_uncertain_instances_then_lowest_mean():
    queue = review.select(ROWS, ReviewOptions(review=3))
    assert [(q.rank, q.uri.rsplit("/", 1)[1], q.counted) for q in queue] == [
        (1, "b.jpg", 2),  # 2 in [0.3, 0.7), mean 0.45
        (2, "c.jpg", 2),  # 2, mean 0.475
        (3, "d.jpg", 1),
    ]
    assert queue[0].mean_score == pytest.approx(0.45)


def test_the_queue_is_the_same_in_any_row_order_and_holds_only_n():
    forward = review.select(ROWS, ReviewOptions(review=2))
    backward = review.select(ROWS[::-1], ReviewOptions(review=2))
    assert forward == backward and len(forward) == 2


def test_crowded_images_and_given_classes():
    crowded = review.select(ROWS, ReviewOptions(review=2, review_by="crowded"))
    assert [q.uri.rsplit("/", 1)[1] for q in crowded] == ["f.jpg", "b.jpg"]  # 5 instances, then 3
    persons = review.select(ROWS, ReviewOptions(review=5, review_by="crowded", review_classes=["person"]))
    assert [q.uri.rsplit("/", 1)[1] for q in persons] == ["d.jpg"]  # only images with a person


def test_min_score_and_error_rows_are_left_out():
    queue = review.select(ROWS, ReviewOptions(review=10, review_by="crowded"), min_score=0.92)
    assert [(q.uri.rsplit("/", 1)[1], q.counted) for q in queue] == [("a.jpg", 1), ("b.jpg", 1)]


@pytest.mark.parametrize("text", ["0.7,0.3", "0.5", "a,b", "-0.1,0.5", "0.2,1.5"])
def test_a_bad_score_range_is_refused(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        review.score_range(text)
