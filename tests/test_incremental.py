"""Incremental runs (jobs/segment_bucket.py --incremental): an archive that grows, labelled
a run at a time, each image once, on local disk and on S3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import boto3
import duckdb
import pytest

from maskrcnn import incremental, output, storage
from maskrcnn import labels as parquet_labels
from maskrcnn.lease import holder
from tests.helpers import (
    call_job,
    kill_job_when,
    kill_marked,
    read_back,
    run_job,
    segment_summary,
    start_job,
)

pytestmark = pytest.mark.slow


class Archive:
    """An input folder or S3 prefix that grows by copies of real COCO photos."""

    def __init__(self, photos: list[Path], root: str):
        self.photos, self.root = photos, root

    def uri(self, photo: Path) -> str:
        return storage.join(self.root, photo.name)

    def add(self, photos: list[Path]) -> None:
        for photo in photos:
            if storage.is_s3(self.root):
                bucket, _, key = self.uri(photo)[len("s3://") :].partition("/")
                boto3.client("s3").upload_file(str(photo), bucket, key)
            else:
                os.makedirs(self.root, exist_ok=True)
                shutil.copy(photo, self.uri(photo))

    def remove(self, photo: Path) -> None:
        storage.delete(self.uri(photo))


@pytest.fixture
def archive(shared_data, bucket) -> tuple[Archive, str]:
    """(the archive, the labels dataset's URI), both on S3. Local disk's nights are the
    bad-night test's below (and the killed run's)."""
    photos = sorted((shared_data / "coco_small" / "images").iterdir())[:16]
    return Archive(photos, f"s3://{bucket}/archive"), f"s3://{bucket}/labels"


def _flags(archive: Archive, labels: str, model: str) -> list[str]:
    flags = ["--input", archive.root, "--output", labels, "--model", model, "--rows-per-file", "4"]
    return [*flags, "--incremental", "--score-threshold", "0.05"]


def _overlapped(archive: Archive, labels: str, model: str) -> dict:
    """A night whose run a second run overlaps: the second exits 75, naming the first, which
    goes on to finish. Returns the first's run summaries, from its files."""
    job = start_job("segment_bucket.py", *_flags(archive, labels, model))
    deadline = time.time() + 300
    while holder(labels) is None:
        assert job[0].poll() is None and time.time() < deadline, "the run ended before it held the dataset"
        time.sleep(0.1)
    held = call_job("segment_bucket.py", *_flags(archive, labels, model))
    assert held.returncode == 75 and f"pid {job[0].pid} since " in held.stderr, held.stderr
    assert job[0].wait(timeout=600) == 0
    kill_marked(job[1])  # what is left of the Ray it started
    name = list(output.runs(labels))[-1]  # the newest run: the first's
    return {name: json.loads(storage.read_text(storage.join(labels, name, "_summary.json")))}


def test_a_growing_archive_is_labelled_once_per_image_night_after_night(archive, model_file, tmp_path):
    archive, labels = archive
    photos = archive.photos
    done = []
    nights = (photos[:11], photos[11:])
    for grown in nights:
        if grown is nights[-1]:
            archive.remove(photos[3])  # gone from the archive; its row stays in the dataset
        archive.add(grown)
        if grown is nights[-1]:  # two runs overlap on S3: each image is labelled once
            runs = _overlapped(archive, labels, model_file)
        else:
            runs = segment_summary(run_job("segment_bucket.py", *_flags(archive, labels, model_file)))["runs"]
        (name, run), *others = runs.items()
        assert not others and run["processed_rows"] == len(grown) and run["resumed_rows"] == 0
        assert run["errors"] == {}
        done.append(name)
    assert sorted(done) == done and len(set(done)) == len(nights)

    # The dataset reads as one, each image once: the project's own reader (export.py's), DuckDB.
    rows = list(output.read_rows(labels, columns=["uri", "model"]))
    assert sorted(r["uri"] for r in rows) == sorted(archive.uri(p) for p in photos)
    assert len({r["model"] for r in rows}) == 1
    # The model's categories beside the runs, for training on the dataset's root (maskrcnn.labels)
    assert output.read_categories(labels) == [{"id": 2, "name": "a"}, {"id": 5, "name": "b"}, {"id": 9, "name": "c"}]
    files = output.part_files(labels)
    parts = [-(-len(grown) // 4) for grown in nights]  # --rows-per-file 4
    assert [f.split("/")[-2] for f in files] == [d for d, n in zip(done, parts) for _ in range(n)]
    exported = call_job(
        "export.py", "--predictions", labels, "--coco-dataset", str(tmp_path / "coco.json"), "--images", archive.root
    )
    assert exported.returncode == 0 and "[export] 16 images, " in exported.stdout, exported.stderr


def test_a_killed_run_resumes_exactly_once_and_the_next_labels_only_what_is_new(shared_data, model_file, tmp_path):
    photos = sorted((shared_data / "coco_small" / "images").iterdir())[:15]
    archive, labels = Archive(photos, str(tmp_path / "archive")), str(tmp_path / "labels")
    archive.add(photos[:12])
    # Big rows (score threshold 0) in parts of 1: the run's parts appear one by one.
    flags = ["--input", archive.root, "--output", labels, "--model", model_file, "--incremental"]
    flags += ["--rows-per-file", "1", "--score-threshold", "0"]
    job = start_job("segment_bucket.py", *flags, "--lease-ttl", "8")
    overlapping: list[subprocess.CompletedProcess] = []

    def labelling() -> bool:
        """Once the run has written a part, a second run overlaps it: it is told who holds the dataset."""
        if not (os.path.isdir(labels) and output.part_files(labels)):
            return False
        overlapping.append(call_job("segment_bucket.py", *flags))
        return True

    kill_job_when(job, labelling)
    (second,) = overlapping
    assert second.returncode == 75 and "is being labelled by another run (host " in second.stderr, second.stderr
    assert f"pid {job[0].pid} since " in second.stderr
    before = {p: os.stat(p).st_mtime_ns for p in output.part_files(labels)}
    (killed,) = {p.split("/")[-2] for p in before}
    assert 0 < len(before) < 12 and not os.path.exists(os.path.join(labels, killed, "_SUCCESS"))

    # The archive grew meanwhile: the killed run keeps its own input. Its lease (8 s) has not
    # expired yet: the next run waits for it, takes the dataset over and finishes that run first.
    archive.add(photos[12:])
    runs = segment_summary(run_job("segment_bucket.py", *flags, "--lease-wait", "120"))["runs"]
    (first, resumed), (second, new) = runs.items()
    assert first == killed and resumed["resumed_rows"] == len(before) and resumed["processed_rows"] == 12 - len(before)
    assert second > first and new["processed_rows"] == 3 and new["resumed_rows"] == 0
    assert all(os.stat(p).st_mtime_ns == t for p, t in before.items())
    uris = [r["uri"] for r in output.read_rows(labels, columns=["uri"])]
    assert sorted(uris) == sorted(archive.uri(p) for p in photos)


def test_another_model_or_a_plain_run_is_refused_before_ray_starts(model_file, shared_data, tmp_path):
    labels = str(tmp_path / "labels")
    storage.write_text(
        os.path.join(labels, "_job.json"), '{"model": "other@1:abc", "schema_version": "3", "incremental": true}'
    )
    flags = ["--input", str(shared_data / "photos"), "--output", labels, "--model", model_file]
    result = call_job("segment_bucket.py", *flags, "--incremental")
    assert result.returncode == 2 and "holds output of another job (model=other@1:abc" in result.stderr
    assert "a new model's labels are a new dataset" in result.stderr
    result = call_job("segment_bucket.py", *flags)
    assert result.returncode == 2, result.stderr
    assert "is a labels dataset of incremental runs; pass --incremental" in result.stderr
    result = call_job("segment_bucket.py", *flags, "--incremental", "--overwrite")
    assert result.returncode == 2 and "--incremental adds to a labels dataset" in result.stderr


# The view that docs give DuckDB users: the newest row of each image (runs sort after the
# dataset's own parts, and by their UTC names).
NEWEST_VIEW = """
SELECT * EXCLUDE (filename) FROM read_parquet('{glob}', filename = true)
QUALIFY row_number() OVER (PARTITION BY uri ORDER BY filename DESC) = 1
"""


def test_a_bad_night_exits_3_and_the_next_labels_its_passing_failures_again(shared_data, model_file, tmp_path):
    """A manifest of 8 images, 4 not yet in place: night 1 writes 4 ``missing`` rows, is over
    the error budget (exit 3, no _SUCCESS); night 2, once they are there, labels them again
    (and only them), and every reader sees one row per image."""
    photos = sorted((shared_data / "coco_small" / "images").iterdir())[:8]
    archive, labels = Archive(photos, str(tmp_path / "archive")), str(tmp_path / "labels")
    archive.add(photos[:4])
    manifest = tmp_path / "tonight.txt"
    manifest.write_text("".join(archive.uri(p) + "\n" for p in photos))
    flags = ["--input", str(manifest), "--output", labels, "--model", model_file, "--incremental"]
    flags += ["--rows-per-file", "4", "--score-threshold", "0.05"]

    night = run_job("segment_bucket.py", *flags)
    assert night.returncode == 3, night.stderr[-3000:]
    (line,) = [x for x in night.stderr.splitlines() if x.startswith("error:")]
    missing = sorted(archive.uri(p) for p in photos[4:])
    assert (
        f"4 of 8 rows in {labels}/run-" in line and "(50.0%), over --max-error-rate 0.05: missing 4 (transient)" in line
    )
    assert f"e.g. {missing[0]}; rows and _summary.json written, _SUCCESS not" in line
    (first, run), *_ = json.loads(night.stdout.splitlines()[-1])["runs"].items()
    assert run["status"] == "over_error_budget" and run["errors"] == {"missing": 4} and run["new"] == 8
    assert os.path.exists(os.path.join(labels, first, "_summary.json"))
    assert not os.path.exists(os.path.join(labels, first, "_SUCCESS"))

    archive.add(photos[4:])
    runs = segment_summary(run_job("segment_bucket.py", *flags))["runs"]
    (second, run), *others = runs.items()  # night 1's run is complete, if over budget: not resumed
    assert not others and second > first and run["status"] == "ok"
    assert (run["new"], run["retried"], run["processed_rows"], run["errors"]) == (0, 4, 4, {})

    # Every reader sees each image once, labelled: the project's reader, training's, DuckDB's view.
    rows = list(output.read_rows(labels, columns=["uri", "error"]))
    assert sorted(r["uri"] for r in rows) == sorted(archive.uri(p) for p in photos)
    assert not any(r["error"] for r in rows)
    source = parquet_labels.open_labels(labels)
    assert sorted(source.newest) == missing and all(f"/{second}/" in f for f in source.newest.values())
    glob = os.path.join(labels, "**", "part-*.parquet")
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall() == [(12,)]
    view = duckdb.sql(f"SELECT uri, error FROM ({NEWEST_VIEW.format(glob=glob)})").fetchall()
    assert sorted(view) == [(archive.uri(p), None) for p in sorted(photos)]
    uris = read_back("hf-datasets", glob, env={"HF_HOME": str(tmp_path / "hf")})["uris"]  # every row
    assert sorted(set(uris)) == sorted(archive.uri(p) for p in photos) and len(uris) == 12
    # The documented compaction for readers that take files (Hugging Face datasets): the view, copied out.
    newest = str(tmp_path / "newest.parquet")
    duckdb.sql(f"COPY ({NEWEST_VIEW.format(glob=glob)}) TO '{newest}' (FORMAT parquet)")
    uris = read_back("hf-datasets", newest, env={"HF_HOME": str(tmp_path / "hf")})["uris"]
    assert sorted(uris) == sorted(archive.uri(p) for p in photos)  # once each
    exported = call_job("export.py", "--predictions", labels, "--coco-dataset", str(tmp_path / "c.json"))
    assert exported.returncode == 0 and "[export] 8 images, " in exported.stdout, exported.stderr

    # --status shows the nights without starting Ray.
    status = call_job("segment_bucket.py", "--status", labels)
    assert status.returncode == 0, status.stderr
    text, report = status.stdout.splitlines()[:-1], json.loads(status.stdout.splitlines()[-1])
    assert text[0] == f"{labels}: 2 runs, 12 rows, 8 labelled; lease free"
    assert [r["state"] for r in report["runs"]] == ["over_error_budget", "complete"]
    assert report["images_with_newer_rows"] == 4


def test_an_image_is_retried_while_its_newest_row_failed_for_a_passing_reason_up_to_max_attempts(tmp_path):
    """incremental.retries reads the part files, not Ray: which images the next run labels again."""
    labels = str(tmp_path / "labels")

    def night(name: str, rows: dict[str, str | None], retried: list[str] = ()) -> None:
        folder = os.path.join(labels, name)
        output.write_part(folder, 0, [output.row(u, (4, 4), e if e else [], "m") for u, e in rows.items()])
        if retried:
            incremental.write_uris(list(retried), os.path.join(folder, output.RETRIED))

    night("run-20261201T020000Z", {"a": "missing: gone", "b": "corrupt: bad", "c": None, "d": "read_failed: 503"})
    night("run-20261202T020000Z", {"a": "missing: gone", "d": None, "e": "inference_failed: x"}, retried=["a", "d"])
    night("run-20261203T020000Z", {"a": "missing: still gone"}, retried=["a", "e"])
    parts = output.part_files(labels)
    # a: 3 rows, all missing -> done at --max-attempts 3; b: permanent; c, d: labelled; e: failed once.
    assert incremental.retries(labels, parts, max_attempts=3) == {"e"}
    assert incremental.retries(labels, parts, max_attempts=4) == {"a", "e"}
    assert output.newest_rows(labels) == {"a": parts[2], "d": parts[1]}  # e's retry has no row yet
