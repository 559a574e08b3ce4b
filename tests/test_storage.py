from __future__ import annotations

import os
import urllib.parse
from collections import Counter
from typing import Any

import pytest

from maskrcnn import storage


def test_local_roundtrip_is_atomic_and_lists_by_extension(tmp_path):
    target = tmp_path / "a" / "b.bin"
    storage.write_bytes(str(target), b"hello")
    storage.write_bytes("file://" + str(tmp_path / "c.JPG"), b"img")
    storage.write_text(str(tmp_path / "d.txt"), "text")
    assert storage.read_bytes(str(target)) == b"hello"
    assert storage.read_text("file://" + str(tmp_path / "d.txt")) == "text"
    assert sorted(os.listdir(tmp_path / "a")) == ["b.bin"]  # no temporary file left behind
    assert list(storage.iter_files(str(tmp_path), (".jpg",))) == [str(tmp_path / "c.JPG")]
    assert storage.exists(str(target)) and not storage.exists(str(tmp_path / "nope"))


def test_missing_local_file_error_names_the_path(tmp_path):
    with pytest.raises(storage.StorageError, match=str(tmp_path / "missing.json")):
        storage.read_bytes(str(tmp_path / "missing.json"))


def test_s3_roundtrip_through_standard_aws_configuration(bucket):
    uri = f"s3://{bucket}/dir/x.bin"
    storage.write_bytes(uri, b"\x00\x01" * 1000)
    storage.write_bytes(f"s3://{bucket}/dir/sub/y.PNG", b"png")
    assert storage.read_bytes(uri) == b"\x00\x01" * 1000
    assert storage.exists(uri) and not storage.exists(f"s3://{bucket}/dir/none")
    assert list(storage.iter_files(f"s3://{bucket}/dir", (".png",))) == [f"s3://{bucket}/dir/sub/y.PNG"]
    assert storage.join(f"s3://{bucket}/dir", "a", "b") == f"s3://{bucket}/dir/a/b"


def test_s3_missing_object_and_bucket_errors_name_the_uri(bucket):
    with pytest.raises(storage.StorageError, match=f"s3://{bucket}/missing"):
        storage.read_bytes(f"s3://{bucket}/missing")
    with pytest.raises(storage.StorageError, match="no-such-bucket-here"):
        storage.check_readable_dir("s3://no-such-bucket-here/runs")


def test_s3_listing_streams_page_by_page(bucket):
    import boto3

    client = boto3.client("s3")
    for i in range(25):
        client.put_object(Bucket=bucket, Key=f"imgs/{i:03d}.jpg", Body=b"x")
    client.put_object(Bucket=bucket, Key="imgs/notes.txt", Body=b"x")
    client.put_object(Bucket=bucket, Key="imgsX/other.jpg", Body=b"x")  # not under imgs/
    listing = storage.iter_files(f"s3://{bucket}/imgs", (".jpg",), page_size=10)
    assert next(listing) == f"s3://{bucket}/imgs/000.jpg"  # the first page arrives before the rest is listed
    assert list(listing) == [f"s3://{bucket}/imgs/{i:03d}.jpg" for i in range(1, 25)]
    with pytest.raises(storage.StorageError, match="no-such-bucket-x"):
        list(storage.iter_files("s3://no-such-bucket-x/imgs"))


def test_absolute_resolves_local_paths_on_the_driver_and_leaves_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("data/x.json") == str(tmp_path / "data" / "x.json")
    assert storage.absolute("s3://b/k") == "s3://b/k" and storage.absolute("file:///a/b") == "file:///a/b"


def test_s3_objects_are_read_by_their_exact_key(bucket):
    """S3 allows ``.``, ``..`` and empty segments in a key; each names its own object, and
    ``..`` never reaches another bucket (pyarrow's normalised path would)."""
    import boto3

    client = boto3.client("s3")
    other = f"{bucket}-other"
    client.create_bucket(Bucket=other)
    client.put_object(Bucket=other, Key="secret.jpg", Body=b"the other bucket's")
    keys = ["names/plain.jpg", "names/a/../plain.jpg", "names/./dot.jpg", "odd//double.jpg", f"../{other}/secret.jpg"]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    listed = list(storage.iter_files(f"s3://{bucket}"))
    assert sorted(listed) == sorted(f"s3://{bucket}/{k}" for k in keys)
    for uri in listed:
        assert storage.read_bytes(uri) == uri.split("/", 3)[3].encode() and storage.exists(uri)
    assert not storage.exists(f"s3://{bucket}/names/dot.jpg") and storage.exists(f"s3://{bucket}/names")
    with pytest.raises(storage.StorageError, match=r"cannot read s3://.*/names/\./gone\.jpg"):
        storage.read_bytes(f"s3://{bucket}/names/./gone.jpg")


def test_s3_reads_survive_a_store_that_fails_one_request_in_six(bucket, s3_server, monkeypatch):
    """500s, 503 SlowDown, resets and bodies cut off halfway: every read still returns the
    whole object (botocore retries requests; a broken body is read again)."""
    import boto3

    blobs = {f"x/{i:03d}.bin": os.urandom(2000 + 97 * i) for i in range(60)}
    for key, data in blobs.items():
        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data)
    with FlakyS3(s3_server, rate=1 / 6) as flaky:
        monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.url)
        storage._boto3_s3.cache_clear()
        try:
            assert all(storage.read_bytes(f"s3://{bucket}/{k}") == data for k, data in blobs.items())
        finally:
            storage._boto3_s3.cache_clear()
    assert set(flaky.failed) == set(FlakyS3.KINDS), flaky.failed


def test_legal_local_names_are_listed_read_and_written(tmp_path):
    """A name that is not UTF-8 is listed as its percent-encoded file:// URI, which reads the
    file; a 255-byte name is written atomically (its staging name stays within the limit)."""
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9 latin-1.jpg")
    with open(raw, "wb") as f:
        f.write(b"latin")
    long = str(tmp_path / ("n" * 251 + ".png"))
    storage.write_bytes(long, b"long")
    listed = list(storage.iter_files(str(tmp_path)))
    uri = f"file://{urllib.parse.quote(str(tmp_path))}/caf%E9%20latin-1.jpg"
    assert listed == [uri, long] and storage.read_bytes(uri) == b"latin" and storage.exists(uri)
    assert storage.read_bytes(long) == b"long" and sorted(os.listdir(tmp_path))[1:] == [b"n".decode() * 251 + ".png"]


class FlakyS3:
    """A proxy on loopback in front of an S3 endpoint that fails a share of GETs the ways a
    busy store and a bad network do: 500, 503 SlowDown, a reset before any answer, and a
    body cut off halfway. Seeded, so a run fails the same requests. Use as a context manager;
    ``url`` is its address, ``failed`` counts the failures by kind."""

    KINDS = ("500", "503", "reset", "truncated")

    def __init__(self, endpoint: str, rate: float = 0.15, seed: int = 0):
        import http.server
        import random
        import threading

        self.endpoint, self.rate, self.random, self.failed = endpoint, rate, random.Random(seed), Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy.answer(self, "GET")

            def do_HEAD(self) -> None:
                proxy.answer(self, "HEAD")

            def do_PUT(self) -> None:
                proxy.answer(self, "PUT")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyS3:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, handler: Any, method: str) -> None:
        import http.client
        import urllib.parse

        with self.lock:
            kind = self.random.choice(self.KINDS) if method == "GET" and self.random.random() < self.rate else None
            if kind:
                self.failed[kind] += 1
        if kind == "reset":
            handler.close_connection = True
            handler.connection.shutdown(2)
            return
        if kind in ("500", "503"):
            code = "SlowDown" if kind == "503" else "InternalError"
            body = f"<Error><Code>{code}</Code><Message>try again</Message></Error>".encode()
            handler.send_response(int(kind))
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        length = int(handler.headers.get("Content-Length") or 0)
        sent = handler.rfile.read(length) if length else None
        target = urllib.parse.urlsplit(self.endpoint)
        upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        upstream.request(method, handler.path, body=sent, headers=dict(handler.headers))
        response = upstream.getresponse()
        data = response.read()
        handler.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "date", "server"):
                handler.send_header(key, value)
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(data[: len(data) // 2] if kind == "truncated" else data)
        if kind == "truncated":
            handler.close_connection = True
        upstream.close()
