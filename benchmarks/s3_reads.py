"""S3 reads by exact key (boto3, what maskrcnn.storage does) against pyarrow's S3 filesystem
(what it did before, and what normalises ``..`` and ``//`` in keys), in one run, on a local
S3 endpoint (moto's server on loopback) or the one AWS_ENDPOINT_URL names.

    python benchmarks/s3_reads.py                 # 300 photos of ~95 KiB and one 150 MiB file
    python benchmarks/s3_reads.py --objects 1000 --big-mib 500

Each reader reads every object once after one warm-up read; the figures are wall-clock
seconds in this process, so they include the endpoint's own time (moto's is large).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import boto3

from maskrcnn import local_s3, storage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", type=int, default=300, help="small objects to read (default: %(default)s)")
    p.add_argument("--big-mib", type=int, default=150, help="size of the one large object (default: %(default)s)")
    args = p.parse_args()
    photo = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "photos", "dog1.jpg")
    small = open(photo, "rb").read() if os.path.exists(photo) else os.urandom(95 << 10)
    endpoint = contextlib.nullcontext() if os.environ.get("AWS_ENDPOINT_URL") else local_s3.serve()
    with endpoint:
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3")
        client.create_bucket(Bucket=bucket)
        keys = [f"img/{i:05d}.jpg" for i in range(args.objects)]
        for key in keys:
            client.put_object(Bucket=bucket, Key=key, Body=small)
        big = os.urandom(args.big_mib << 20)
        client.put_object(Bucket=bucket, Key="big.pt", Body=big)
        fs, _ = storage.filesystem(f"s3://{bucket}/x")

        def with_pyarrow(key: str) -> bytes:
            with fs.open_input_file(f"{bucket}/{key}") as f:
                return f.read()

        def exact(key: str) -> bytes:
            return storage.read_bytes(f"s3://{bucket}/{key}")

        figures = {
            name: measure(read, keys, len(small), len(big))
            for name, read in (("pyarrow", with_pyarrow), ("boto3, exact key", exact))
        }
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; "
        f"{args.objects} x {len(small) >> 10} KiB, 1 x {args.big_mib} MiB"
    )
    print(f"{'reader':<18} {'small objects/s':>16} {'big file s':>11}")
    for name, (rate, seconds) in figures.items():
        print(f"{name:<18} {rate:>16.0f} {seconds:>11.2f}")
    (pa_rate, pa_big), (rate, big_s) = figures.values()
    print(f"{'ratio exact/pyarrow':<18} {rate / pa_rate:>16.2f} {big_s / pa_big:>11.2f}")


def measure(read, keys: list[str], small: int, big: int) -> tuple[float, float]:
    """(small objects per second, seconds for the big one)."""
    read(keys[0])
    start = time.perf_counter()
    assert all(len(read(key)) == small for key in keys)
    rate = len(keys) / (time.perf_counter() - start)
    start = time.perf_counter()
    assert len(read("big.pt")) == big
    return rate, time.perf_counter() - start


if __name__ == "__main__":
    main()
