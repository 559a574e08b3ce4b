import re

from maskrcnn import progress
from maskrcnn.progress import Progress


def test_clock():
    assert [progress.clock(s) for s in (0, 59.9, 75, 3725)] == ["0:00", "0:59", "1:15", "1:02:05"]


def test_lines_give_done_total_rate_elapsed_and_eta(capsys):
    p = Progress("evaluate", 10, every=3600)
    p.start -= 20  # 20 s ago
    p.add(4)  # the first line is printed at once
    p.add(4)  # within `every`: silent
    p.add(2, "1 errors")  # the total: always printed
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"\[evaluate\] 4/10 images \(40%\), 0\.\d\d images/s, elapsed 0:20, ETA 0:(29|30)", lines[0]), (
        lines
    )
    assert re.fullmatch(r"\[evaluate\] 10/10 images \(100%\), .*, ETA 0:00, 1 errors", lines[1]), lines
    assert len(lines) == 2


def test_a_total_found_later_is_used_from_then_on(capsys):
    answers = iter([None, 50])
    p = Progress("segment", every=0, find_total=lambda: next(answers))
    p.add(5)
    p.add(5)
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("[segment] 5 images, ") and "ETA" not in first
    assert second.startswith("[segment] 10/50 images (20%), ") and "ETA" in second


def test_finish_prints_the_last_count_once(capsys):
    p = Progress("segment", every=3600, find_total=lambda: 7)
    p.add(3)  # first line: the total is asked for and found
    p.add(4)  # reaches the total: printed
    p.finish()  # already said
    q = Progress("segment", every=3600)
    q.add(2)
    q.add(3)  # within `every`: silent
    q.finish("0 errors")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "[segment] 3/7 images (43%)",
        "[segment] 7/7 images (100%)",
        "[segment] 2 images",
        "[segment] 5 images",
    ]
    assert lines[-1].endswith(", 0 errors")
