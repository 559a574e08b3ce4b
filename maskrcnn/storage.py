"""The one place that reads, writes and lists local paths, ``file://`` and ``s3://`` URIs.

Writes go through pyarrow's filesystems; Ray Train's checkpoint storage gets the same
filesystem object through :func:`filesystem`. An S3 object is read (and checked for) with
boto3 by its exact key: pyarrow normalises a key's ``.``, ``..`` and empty segments, so it
would read another object (or one in another bucket) than the one listed, and S3 allows such
keys. Listing an S3 prefix goes through boto3's paginator (:func:`iter_files`), page by page,
so that a prefix of millions of keys streams.

A local file whose name is not UTF-8 is listed as a ``file://`` URI with that name
percent-encoded (RFC 8089), since Parquet and Ray Data hold text as UTF-8; ``file://`` URIs
are percent-decoded wherever they are read.

S3 is configured only by the standard AWS settings: pyarrow and boto3 read the keys
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` or an instance profile) themselves, and
:func:`_s3` passes pyarrow the region (``AWS_REGION``) and the endpoint (``AWS_ENDPOINT_URL_S3``
or ``AWS_ENDPOINT_URL``), which boto3 honours on its own.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import posixpath
import re
import shutil
import tempfile
import urllib.parse
from functools import lru_cache
from typing import Any, Iterator

import pyarrow.fs as pafs

from maskrcnn.errors import UserError


class StorageError(UserError):
    """A URI that cannot be read, written or listed. The message names the URI."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join URI parts with ``/`` for S3 and the OS separator for local paths."""
    if is_s3(base) or base.startswith("file://"):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


@lru_cache(maxsize=None)
def _s3() -> pafs.S3FileSystem:
    """pyarrow reads the keys itself; the region and the endpoint (the standard
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` settings, which boto3 also honours) are
    passed explicitly because this pyarrow does not read them. Retries back off."""
    env = os.environ
    kwargs = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=5)}
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    kwargs.update({k: v for k, v in (("region", region), ("endpoint_override", endpoint)) if v})
    return pafs.S3FileSystem(**kwargs)


# pyarrow finalizes its S3 client at exit; the cached filesystem goes first (atexit runs
# last-registered first), so that no S3 object outlives the AWS SDK it was made with.
atexit.register(_s3.cache_clear)


def absolute(uri: str) -> str:
    """A local path made absolute, URIs unchanged. Jobs call this on the driver: Ray's
    workers run in another working directory, where a relative path means something else."""
    if is_s3(uri) or uri.startswith("file://"):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def local_path(uri: str) -> str:
    """The OS path of a local path or ``file://`` URI (percent-decoded, to the file name's own bytes)."""
    if not uri.startswith("file://"):
        return uri
    return os.fsdecode(urllib.parse.unquote_to_bytes(uri[len("file://") :]))


def _local_uri(path: str) -> str:
    """A listed local path as text every reader can hold: the path itself, or, for a name
    that is not UTF-8 (Python keeps its bytes as surrogates), its percent-encoded ``file://`` URI."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "file://" + urllib.parse.quote(os.fsencode(path))


def _bucket_key(uri: str) -> tuple[str, str]:
    """An s3:// URI's bucket and its key exactly as written, dot and empty segments included."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a URI, for pyarrow, Parquet and Ray Train."""
    if is_s3(uri):
        return _s3(), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(local_path(uri))


def _fail(action: str, uri: str, err: Exception) -> StorageError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return StorageError(f"cannot {action} {uri}: {reason}")


def read_bytes(uri: str) -> bytes:
    """The whole object or file; an S3 object by its exact key (see the module docstring)."""
    if is_s3(uri):
        return _read_s3(uri)
    try:
        with open(local_path(uri), "rb") as f:
            return f.read()
    except (OSError, ValueError) as err:
        raise _fail("read", uri, err) from err


# botocore retries a request that fails, but not a body that breaks off while it is read.
_BODY_ATTEMPTS = 5


def _read_s3(uri: str) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError, IncompleteReadError, ResponseStreamingError

    bucket, key = _bucket_key(uri)
    for _ in range(_BODY_ATTEMPTS):
        try:
            return _boto3_s3().get_object(Bucket=bucket, Key=key)["Body"].read()
        except (IncompleteReadError, ResponseStreamingError) as err:
            broken = err
        except (BotoCoreError, ClientError, OSError, ValueError) as err:
            raise _fail("read", uri, err) from err
    raise _fail("read", uri, broken) from broken


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


@contextlib.contextmanager
def open_stream(uri: str) -> Iterator[Any]:
    """A binary stream of a file or S3 object (by its exact key), for files too large to
    hold: it has ``read(n)``. An S3 body that breaks off is an error, not retried."""
    if not is_s3(uri):
        try:
            f = open(local_path(uri), "rb")
        except OSError as err:
            raise _fail("read", uri, err) from err
        with f:
            yield f
        return
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _bucket_key(uri)
    try:
        body = _boto3_s3().get_object(Bucket=bucket, Key=key)["Body"]
    except (BotoCoreError, ClientError) as err:
        raise _fail("read", uri, err) from err
    try:
        yield body
    except (BotoCoreError, ClientError) as err:
        raise _fail("read", uri, err) from err
    finally:
        body.close()


def exists(uri: str) -> bool:
    """Whether a file or directory (an S3 object by its exact key, or a prefix) is there."""
    if not is_s3(uri):
        return os.path.exists(local_path(uri))
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _bucket_key(uri)
    client = _boto3_s3()
    try:
        if key and not key.endswith("/"):
            try:
                client.head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                    raise
        prefix = key.rstrip("/") + "/" if key else ""
        return client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0) > 0
    except (BotoCoreError, ClientError) as err:
        raise _fail("check", uri, err) from err


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object atomically: readers see the old content or the new, never a part.

    On S3 a single PUT (or a completed multipart upload) is already atomic; locally the
    bytes go through :func:`staged`.
    """
    if not is_s3(uri):
        with staged(uri) as tmp, open(tmp, "wb") as f:
            f.write(data)
        return
    fs, path = filesystem(uri)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except (OSError, ValueError) as err:
        raise _fail("write", uri, err) from err


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def create_new(uri: str, data: bytes) -> bool:
    """Write a whole file that is not there yet; False, writing nothing, if it is. Of racing
    writers exactly one gets True: on S3 by a conditional PUT (``If-None-Match: *``; 412 or
    409 when another has it), locally by a hard link, which fails where the name exists."""
    if is_s3(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            _boto3_s3().put_object(**dict(zip(("Bucket", "Key"), _bucket_key(uri))), Body=data, IfNoneMatch="*")
            return True
        except (BotoCoreError, ClientError) as err:
            code = getattr(err, "response", {}).get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise _fail("create", uri, err) from err
    path = local_path(uri)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path) or ".", prefix=".create-") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
            os.link(tmp.name, path)
        return True
    except FileExistsError:
        return False
    except OSError as err:
        raise _fail("create", uri, err) from err


@contextlib.contextmanager
def staged(uri: str) -> Iterator[str]:
    """A local file path to write ``uri``'s content into, for output too large to hold in
    memory; on a clean exit it becomes ``uri`` atomically, and on an error it is deleted, so
    no partial file appears. Locally the file is hidden beside the target (Parquet readers
    such as pyarrow, pandas and DuckDB globs skip dot-files), flushed to disk, then renamed
    with ``os.replace``; on S3 it is uploaded in one stream."""
    fs, path = filesystem(uri)
    local = None if is_s3(uri) else os.path.dirname(path)
    try:
        if local is not None:
            os.makedirs(local, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{shorten(posixpath.basename(path), 200)}.tmp-", dir=local)
        os.close(fd)
    except (OSError, ValueError) as err:
        raise _fail("write", uri, err) from err
    try:
        yield tmp
        if local is not None:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return
        with open(tmp, "rb") as src, fs.open_output_stream(path) as out:
            shutil.copyfileobj(src, out, 8 << 20)
    except (OSError, ValueError) as err:
        raise _fail("write", uri, err) from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def shorten(name: str, max_bytes: int) -> str:
    """``name`` cut to at most ``max_bytes`` bytes of UTF-8, at a character boundary."""
    data = name.encode("utf-8", "surrogateescape")[:max_bytes]
    return data.decode("utf-8", "ignore")


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except (OSError, ValueError) as err:
        raise _fail("delete", uri, err) from err


def make_dirs(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.create_dir(path, recursive=True)
    except (OSError, ValueError) as err:
        raise _fail("create", uri, err) from err


@lru_cache(maxsize=None)
def _boto3_s3() -> Any:
    """boto3 for paged listing only; it reads the same standard AWS settings as pyarrow."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 5}))


def _walk_local(root: str) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield _local_uri(os.path.join(dirpath, name))


def _walk_s3(prefix: str, page_size: int) -> Iterator[str]:
    bucket, _, key_prefix = prefix[len("s3://") :].partition("/")
    if key_prefix and not key_prefix.endswith("/"):
        key_prefix += "/"
    pages = (
        _boto3_s3()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket, Prefix=key_prefix, PaginationConfig={"PageSize": page_size})
    )
    for page in pages:
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                yield f"s3://{bucket}/{obj['Key']}"


def iter_files(prefix: str, extensions: tuple[str, ...] | None = None, page_size: int = 1000) -> Iterator[str]:
    """The URIs of the files under ``prefix``, recursively, in a stable order; with
    ``extensions`` (``(".jpg", ".png")``), only those, case-insensitive. It streams: S3 a page
    (``page_size`` keys) at a time, a local tree a folder at a time."""
    exts = tuple(e.lower() for e in extensions) if extensions else None
    try:
        walk = _walk_s3(prefix, page_size) if is_s3(prefix) else _walk_local(local_path(prefix))
        for uri in walk:
            if exts is None or uri.lower().endswith(exts):
                yield uri
    except Exception as err:  # botocore and OS errors alike
        if isinstance(err, StorageError):
            raise
        raise _fail("list", prefix, err) from err


def expand(spec: str, extensions: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """The files one command-line input names, each with the root its relative name starts
    from: a file (root: its folder); a folder or prefix, listed recursively for
    ``extensions``; or a glob (``*`` and ``?`` within a name, ``**`` across folders),
    listed from the folder before its first wildcard."""
    spec = absolute(spec)
    wild = [spec.index(c) for c in "*?" if c in spec]
    if not wild:
        fs, path = filesystem(spec)
        try:
            kind = fs.get_file_info(path).type
        except (OSError, ValueError) as err:
            raise _fail("reach", spec, err) from err
        if kind == pafs.FileType.NotFound and not is_s3(spec):
            raise StorageError(f"cannot read {spec}: no such file or directory")
        if kind == pafs.FileType.File:
            yield _local_uri(spec), spec.rsplit("/" if is_s3(spec) else os.sep, 1)[0]
        else:
            yield from ((uri, spec) for uri in iter_files(spec, extensions))
        return
    sep = "/" if is_s3(spec) else os.sep
    root = spec[: min(wild)].rpartition(sep)[0]
    pattern = re.compile(_glob_regex(spec, sep))
    yield from ((uri, root) for uri in iter_files(root) if pattern.fullmatch(uri))


def _glob_regex(pattern: str, sep: str) -> str:
    s = re.escape(sep)
    parts = {"**" + sep: f"(?:.*{s})?", "**": ".*", "*": f"[^{s}]*", "?": f"[^{s}]"}
    out, i = "", 0
    while i < len(pattern):
        token = next((t for t in parts if pattern.startswith(t, i)), None)
        out += parts[token] if token else re.escape(pattern[i])
        i += len(token) if token else 1
    return out


def check_readable_dir(uri: str) -> None:
    """Fail fast, with a one-line error, when a directory or bucket prefix is unreachable."""
    fs, path = filesystem(uri)
    try:
        info = fs.get_file_info(path)
    except (OSError, ValueError) as err:
        raise _fail("reach", uri, err) from err
    if info.type == pafs.FileType.NotFound and not is_s3(uri):
        raise StorageError(f"cannot reach {uri}: no such directory")
    bucket = path.split("/", 1)[0]
    try:
        if is_s3(uri) and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(f"cannot reach {uri}: bucket {bucket!r} does not exist")
    except (OSError, ValueError) as err:
        raise _fail("reach", uri, err) from err
