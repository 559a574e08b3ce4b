"""jobs/segment_bucket.py end to end, run as a user runs it, against real files, a real
S3 endpoint on loopback, and real Ray."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from maskrcnn import images, masks, output, storage
from tests.helpers import (
    MIXED,
    OFFLINE,
    REPO,
    TOOTHBRUSH,
    UNUSABLE,
    call_job,
    kill_job_when,
    large_jpeg,
    mask_iou,
    run_job,
    segment_summary,
    start_job,
    upload_dir,
)

pytestmark = pytest.mark.slow


def _read(output: str) -> pd.DataFrame:
    fs, path = storage.filesystem(output)
    return pq.read_table(path, filesystem=fs).to_pandas()


def test_s3_archive_with_damaged_files_gives_exactly_one_row_per_object(shared_data, bucket, model_file):
    upload_dir(shared_data / "photos", bucket, "archive/photos")
    upload_dir(shared_data / "coco_small" / "images", bucket, "archive/coco")
    upload_dir(shared_data / "odd_images", bucket, "archive/odd")
    keys = [
        o["Key"]
        for p in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in p["Contents"]
    ]
    out = f"s3://{bucket}/labels/run1"
    flags = f"--input s3://{bucket}/archive --output {out} --model {model_file} --extensions *"
    result = run_job(
        "segment_bucket.py", *flags.split(), *"--rows-per-file 16 --score-threshold 0.3 --batch-size 4".split()
    )
    summary = segment_summary(result)
    df = _read(out)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in result.stdout + result.stderr + df.to_json() + storage.read_text(f"{out}/_summary.json")
    assert sorted(df.uri) == sorted(f"s3://{bucket}/{k}" for k in keys) and len(keys) == 6 + 80 + 45
    assert summary["images_in"] == summary["rows_out"] == len(df) and summary["resumed_rows"] == 0
    # The terminal shows the job's own lines: progress with the total, and the summary; no Ray internals.
    progress = [line for line in result.stdout.splitlines() if line.startswith("[segment] ") and "images/s" in line]
    assert re.fullmatch(rf"\[segment\] 131/131 images \(100%\), .*, ETA 0:00, {len(UNUSABLE) + 1} errors", progress[-1])
    assert not re.search(r"core_worker\.cc| INFO |Deprecat|Running Dataset", result.stdout + result.stderr), (
        result.stderr
    )

    errors = {u.rsplit("/", 1)[1]: e.split(":")[0] for u, e in zip(df.uri, df.error) if isinstance(e, str)}
    assert errors == {**UNUSABLE, "INDEX.tsv": "not_an_image"}
    assert summary["errors"] == dict(pd.Series(list(errors.values())).value_counts().sort_index())
    failed = df[df.error.notna()]
    assert failed.instances.map(len).eq(0).all() and failed.width.isna().all()

    ok = df[df.error.isna()]
    assert ok.instances.map(len).sum() == summary["instances"] > 0 and set(ok.model) == {summary["model"]}
    local = {
        "odd/hopper_orientation_6.jpg": shared_data / "odd_images" / "hopper_orientation_6.jpg",
        "odd/orientation_rectangle.jpg": shared_data / "odd_images" / "orientation_rectangle.jpg",
        "photos/dog1.jpg": shared_data / "photos" / "dog1.jpg",
    }
    for suffix, path in local.items():
        row = ok[ok.uri.str.endswith(suffix)].iloc[0]
        h, w = images.decode(path.read_bytes()).shape[:2]
        assert (row.height, row.width) == (h, w)
        for inst in row.instances:
            assert list(inst["mask"]["size"]) == [h, w] and masks.decode(
                dict(inst["mask"], size=[h, w]), h, w
            ).shape == (h, w)

    _manifest_run_gives_the_same_rows(bucket, model_file, out, sorted(ok.uri)[:12], summary["model"])


def _manifest_run_gives_the_same_rows(bucket: str, model_file: str, out: str, chosen: list[str], model: str) -> None:
    """The same rows when the model comes from S3 and the input is a manifest; written over
    the first run's output with --overwrite, which leaves none of its part files."""
    fs, path = storage.filesystem(out)
    first = {r["uri"]: r["instances"] for r in pq.read_table(path, filesystem=fs).to_pylist() if r["uri"] in chosen}
    storage.write_bytes(f"s3://{bucket}/models/small.pt", Path(model_file).read_bytes())
    manifest = f"s3://{bucket}/manifest.csv"
    storage.write_text(manifest, "uri\n" + "\n".join(chosen) + "\n")
    flags = f"--input {manifest} --output {out} --model s3://{bucket}/models/small.pt --score-threshold 0.3"
    refused = run_job("segment_bucket.py", *flags.split())
    assert refused.returncode == 2 and "holds output of another job (input=" in refused.stderr, refused.stderr
    summary2 = segment_summary(run_job("segment_bucket.py", *flags.split(), "--overwrite"))
    assert summary2["model"] == model and summary2["rows_out"] == 12 and summary2["part_files"] == 1
    again = {r["uri"]: r["instances"] for r in pq.read_table(path, filesystem=fs).to_pylist()}
    assert sorted(again) == chosen and len(list(storage.iter_files(out, (".parquet",)))) == 1
    for uri in chosen:  # batches are composed differently, so allow float noise
        assert [i["category_id"] for i in again[uri]] == [i["category_id"] for i in first[uri]]
        for a, b in zip(again[uri], first[uri]):
            assert a["score"] == pytest.approx(b["score"], abs=1e-3) and a["bbox"] == pytest.approx(b["bbox"], abs=0.5)


def _parts(output: Path) -> list[Path]:
    return sorted(output.glob("part-*.parquet"))


def test_interrupted_run_resumes_without_duplicates_or_recomputation(shared_data, model_file, tmp_path):
    out, archive = tmp_path / "out", tmp_path / "archive"
    archive.mkdir()
    for src in sorted((shared_data / "coco_small" / "images").iterdir())[:32]:
        shutil.copy(src, archive / src.name)
    rel = functools.partial(os.path.relpath, start=REPO)  # relative paths, as users type them
    # Score threshold 0: the untrained model's every box is kept, so each row is big enough to
    # leave its block at once and the part files appear one by one (tiny rows would leave
    # together, many parts at a time, and the run could end before it is killed).
    args = ["--input", rel(archive), "--output", rel(out), "--model", rel(model_file)]
    args += ["--rows-per-file", "4", "--score-threshold", "0", "--progress-seconds", "1"]
    kill_job_when(start_job("segment_bucket.py", *args), lambda: bool(_parts(out)))
    before = {p.name: p.stat().st_mtime_ns for p in _parts(out)}
    assert not (out / "_SUCCESS").exists()
    for p in _parts(out):
        assert pq.read_metadata(p).num_rows == 4  # every visible part is whole

    summary = segment_summary(run_job("segment_bucket.py", *args))
    df = _read(str(out))
    listed = sorted(str(p) for p in archive.iterdir())
    assert sorted(df.uri) == listed and not df.uri.duplicated().any()
    assert summary["resumed_rows"] == 4 * len(before) and summary["processed_rows"] == 32 - 4 * len(before)
    assert all(p.stat().st_mtime_ns == before[p.name] for p in _parts(out) if p.name in before)
    assert (out / "_SUCCESS").exists()
    # The model's categories beside the part files, for training on them (maskrcnn.labels)
    assert output.read_categories(str(out)) == [{"id": 2, "name": "a"}, {"id": 5, "name": "b"}, {"id": 9, "name": "c"}]

    # A finished output is not recomputed; a changed listing is refused (--overwrite, which
    # starts over, is the S3 test's).
    assert segment_summary(run_job("segment_bucket.py", *args))["processed_rows"] == 0
    shutil.copy(shared_data / "photos" / "dog1.jpg", archive / "000000000000.jpg")  # the archive grew
    refused = run_job("segment_bucket.py", *args)
    assert refused.returncode == 2 and "the input listing changed since" in refused.stderr
    # Only its one-line error: not Ray Data's report of the failed listing task and its retry advice.
    assert "Traceback" not in refused.stderr and "DataContext" not in refused.stderr, refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("error: the input listing changed since")


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_model", r"error: cannot read .*nope\.pt"),
        ("empty_input", r"error: no images found in .*empty"),
        ("missing_input", r"error: cannot reach .*nowhere: no such directory"),
        ("bad_bucket", r"error: cannot list s3://no-such-bucket-seg/x"),
        ("unwritable_output", r"error: cannot write .*blocker/out/_job\.json"),
        ("other_model", r"error: .*holds output of another job \(model="),
        ("unknown_class", r"error: --classes zebra not among the model's classes"),
        ("no_gpu", r"error: --gpus-per-actor: this machine has no GPU"),
        (
            "offline_weights",
            r"error: cannot download weights COCO_V1 from "
            r"https://download\.pytorch\.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e\.pth .*"
            r"pass its local path or s3:// URI to --model",
        ),
    ],
)
def test_bad_job_input_stops_before_the_pool_starts(
    case, expected, shared_data, model_file, tmp_path, s3_server, monkeypatch
):
    photos, out, model = str(shared_data / "photos"), str(tmp_path / "out"), model_file
    extra: list[str] = []
    if case == "missing_model":
        model = str(tmp_path / "nope.pt")
    elif case == "empty_input":
        (tmp_path / "empty").mkdir()
        photos = str(tmp_path / "empty")
    elif case == "missing_input":
        photos = str(tmp_path / "nowhere")
    elif case == "bad_bucket":
        photos = "s3://no-such-bucket-seg/x"
    elif case == "unwritable_output":
        (tmp_path / "blocker").write_text("a file, not a directory")
        out = str(tmp_path / "blocker" / "out")
    elif case == "other_model":
        storage.write_text(
            f"{out}/_job.json",
            json.dumps({"input": photos, "model": "other@1:abc", "rows_per_file": 1000, "schema_version": "3"}),
        )
    elif case == "offline_weights":
        model = "COCO_V1"
        for key, value in {**OFFLINE, "TORCH_HOME": str(tmp_path / "torch")}.items():
            monkeypatch.setenv(key, value)
    elif case == "no_gpu":
        extra = ["--gpus-per-actor", "1"]
    else:
        extra = ["--classes", "zebra"]
    result = call_job("segment_bucket.py", "--input", photos, "--output", out, "--model", model, *extra)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and re.search(expected, result.stderr), result.stderr
    assert "testing-secret" not in result.stdout + result.stderr


def test_a_torchvision_state_dict_labels_with_coco_names_and_ids(torchvision_pth, shared_data, tmp_path):
    """The first thing most users want: torchvision's COCO Mask R-CNN (here its .pth with
    random weights, biased to toothbrushes) labelling images, with no training run."""
    out = str(tmp_path / "out")
    result = run_job(
        "segment_bucket.py",
        "--input",
        str(shared_data / "photos"),
        "--output",
        out,
        "--model",
        torchvision_pth,
        "--limit",
        "1",
        "--max-detections",
        "10",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = _read(out).to_dict("records")
    found = {(i["category"], i["category_id"]) for i in row["instances"]}
    assert found == {("toothbrush", TOOTHBRUSH)} and len(row["instances"]) == 10
    assert row["model"].startswith("maskrcnn_resnet50_fpn@0:")


def test_help_lists_every_flag():
    result = call_job("segment_bucket.py", "--help")
    assert result.returncode == 0
    flags = "--input --output --model --extensions --limit --batch-size --actors --gpus-per-actor"
    for flag in (
        flags + " --score-threshold --max-detections --classes --max-pixels --rows-per-file --overwrite"
    ).split():
        assert flag in result.stdout, flag


def test_decode_stage_turns_deleted_and_empty_objects_into_error_rows(bucket, shared_data):
    import numpy as np

    from maskrcnn.inference import fetch_and_decode

    client = boto3.client("s3")
    client.put_object(Bucket=bucket, Key="a/gone.jpg", Body=(shared_data / "photos" / "dog1.jpg").read_bytes())
    uris = storage.iter_files(f"s3://{bucket}/a")
    listed = next(uris)  # listed ...
    client.delete_object(Bucket=bucket, Key="a/gone.jpg")  # ... then deleted before it is read
    client.put_object(Bucket=bucket, Key="a/empty.jpg", Body=b"")
    client.put_object(Bucket=bucket, Key="a/dog.jpg", Body=(shared_data / "photos" / "dog1.jpg").read_bytes())
    batch = {
        "part": np.array([0, 0, 0]),
        "index": np.array([0, 1, 2]),
        "part_rows": np.array([3, 3, 3]),
        "uri": np.array([listed, f"s3://{bucket}/a/empty.jpg", f"s3://{bucket}/a/dog.jpg"]),
    }
    out = fetch_and_decode(batch, max_pixels=10**8, fit=None)
    assert out["error"][0].startswith("missing: ") and out["error"][1].startswith("empty: ") and out["error"][2] is None
    assert out["image"][2].shape == (500, 500, 3) and (out["height"][2], out["width"][2]) == (500, 500)
    assert out["image"][0].shape == (0, 0, 3) and out["index"] == [0, 1, 2] and out["part_rows"] == [3, 3, 3]


def test_decoding_stays_in_cpu_tasks_when_actors_hold_gpus(model_file, shared_data, tmp_path):
    """With GPU actors (a logical GPU here), decoding must not be fused into the actors, and
    the listing stays a task of its own."""
    import ray

    from maskrcnn.inference import InferenceOptions
    from maskrcnn.listing import start_tally
    from maskrcnn.segment import SegmentConfig, pipeline

    manifest = tmp_path / "m.txt"
    manifest.write_text("".join(f"{shared_data / 'photos' / n}\n" for n in ["dog1.jpg", "dog2.jpg"]))

    def actors_on_the_cpu() -> None:  # a logical GPU, which CUDA cannot start: run on the CPU here
        from maskrcnn import devices

        devices.for_actor = lambda gpus: devices.CPU

    hook = {"worker_process_setup_hook": actors_on_the_cpu}
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, runtime_env=hook)
    try:
        cfg = SegmentConfig(
            input=str(manifest),
            output=str(tmp_path / "out"),
            model=model_file,
            inference=InferenceOptions(gpus_per_actor=1.0),
        )
        ds = pipeline(cfg, {}, (160, 256), [ray.put(open(model_file, "rb").read())], start_tally())
        rows = sum(t.num_rows for t in ds.iter_batches(batch_format="pyarrow", batch_size=None))
        stats = ds.stats()
        assert rows == 2
        assert "MapBatches(fetch_and_decode)->MapBatches(InferenceActor)" not in stats
        assert "ReadListing->" not in stats
        assert "MapBatches(fetch_and_decode)" in stats and "MapBatches(InferenceActor)" in stats
    finally:
        ray.shutdown()


def _rows(output) -> dict[str, dict]:
    fs, path = storage.filesystem(str(output))
    return {r.pop("uri"): r for r in pq.read_table(path, filesystem=fs).to_pylist()}


def test_rows_depend_on_neither_the_batch_size_nor_the_run_and_large_jpegs_decode_reduced(
    shared_data, model_file, tmp_path
):
    """Mixed sizes, EXIF orientations and four 12 MP JPEGs: two runs, at --batch-size 1 and 8,
    give identical rows. The 12 MP JPEGs decode at 1/8 for this 160 px model; their rows keep
    the full displayed size, and their masks land where a --full-decode run puts them."""
    archive = tmp_path / "archive"
    archive.mkdir()
    for path in [*(shared_data / n for n in MIXED), *sorted((shared_data / "coco_small" / "images").iterdir())[:10]]:
        shutil.copy(path, archive / f"{path.parent.name}_{path.name}")
    made = {
        "a.jpg": (4032, 3024, 1, "person1.jpg"),
        "b.jpg": (4032, 3024, 6, "dog1.jpg"),
        "c.jpg": (3024, 4032, 8, "astronaut.jpg"),
        "d.jpg": (4000, 3000, 3, "dog2.jpg"),
    }
    for name, (w, h, orientation, photo) in made.items():
        (archive / name).write_bytes(large_jpeg(shared_data, w, h, orientation, photo))
    common = ["--model", model_file, "--score-threshold", "0.05"]
    for out, extra in (("out1", ["--batch-size", "1"]), ("out8", ["--batch-size", "8"])):
        done = run_job("segment_bucket.py", "--input", str(archive), *common, "--output", str(tmp_path / out), *extra)
        assert segment_summary(done)["rows_out"] == 20
    runs = [_rows(tmp_path / "out1"), _rows(tmp_path / "out8")]
    assert sum(len(r["instances"]) for r in runs[0].values()) > 100
    assert runs[0] == runs[1]

    reduced, big = runs[0], tmp_path / "big.txt"  # the --full-decode run reads the large JPEGs only
    big.write_text("".join(f"{archive / name}\n" for name in made))
    full_flags = ["--input", str(big), "--output", str(tmp_path / "full"), "--full-decode"]
    done = run_job("segment_bucket.py", *full_flags, *common)
    assert segment_summary(done)["rows_out"] == len(made)
    full = _rows(tmp_path / "full")
    ious = []
    for uri, row in full.items():
        w, h, orientation, _ = made[uri.rsplit("/", 1)[1]]
        h, w = (w, h) if orientation in (6, 8) else (h, w)
        assert (row["height"], row["width"]) == (reduced[uri]["height"], reduced[uri]["width"]) == (h, w)
        for inst in reduced[uri]["instances"]:
            x, y, bw, bh = inst["bbox"]
            assert list(inst["mask"]["size"]) == [h, w] and -1 <= x <= x + bw <= w + 1 and -1 <= y <= y + bh <= h + 1
        for inst in row["instances"]:
            same_class = [i["mask"] for i in reduced[uri]["instances"] if i["category_id"] == inst["category_id"]]
            ious.append(mask_iou([inst["mask"]], same_class).max(initial=0.0))
    # Random weights make every label fragile; a coordinate mistake would give about 0. The
    # figure for a trained model is in docs/benchmarks.md.
    assert len(ious) > 50 and np.mean(ious) > 0.5, np.mean(ious)
