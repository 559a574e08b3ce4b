"""Batch segmentation: a bucket prefix, directory or manifest of images -> Parquet rows.

Data flow (Ray Data, streaming)::

    listing (paged) -> waves of shards -> CPU tasks: fetch + decode (EXIF, RGB)
        -> actor pool: Mask R-CNN + RLE -> driver: one atomic part file per shard

The input is cut, in listing order, into shards of ``rows_per_file`` URIs; shard k is
written as ``part-{k:06d}.parquet`` only once all of its rows are back. That makes the
output exactly-once and resumable: a rerun skips shards whose file exists, and a part file
never holds half a shard. The driver holds at most one wave (``wave_files`` shards) of
keys, so listings of millions of keys stream.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray

from maskrcnn import checkpoint, images, output, storage
from maskrcnn.predictor import Predictor, check_classes
from maskrcnn.runtime import init_ray

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MANIFEST_SUFFIXES = (".parquet", ".csv", ".txt")
WORK_SCHEMA = pa.schema([("shard", pa.int64()), ("index", pa.int64()), *output.SCHEMA])
_EMPTY = np.zeros((0, 0, 3), np.uint8)


class SegmentError(RuntimeError):
    """Input or output that stops the job before the actor pool starts."""


@dataclass
class SegmentConfig:
    input: str
    output: str
    model: str
    extensions: tuple[str, ...] | None = IMAGE_EXTENSIONS  # None keeps every file
    limit: int | None = None
    batch_size: int = 4
    concurrency: tuple[int, int] = (1, 1)
    num_gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0  # also the actor's torch threads: Ray sets OMP_NUM_THREADS from it
    # Custom Ray resources that pin the stages to node groups, e.g. {"gpu_node": 1} for the
    # actors and {"decode_node": 1} for decoding; the cluster configs declare them.
    actor_resources: dict[str, float] | None = None
    decode_resources: dict[str, float] | None = None
    score_threshold: float = 0.5
    max_detections: int = 100
    classes: list[str] | None = None
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    rows_per_file: int = 1000
    wave_files: int = 32
    log_every: float = 30.0
    overwrite: bool = False
    fp16: bool = True

    def __post_init__(self) -> None:
        self.input, self.output, self.model = (storage.absolute(u) for u in (self.input, self.output, self.model))


# ---------------------------------------------------------------- input


def _manifest(uri: str) -> Iterator[str]:
    """Stream the ``uri`` column (or the first column) of a Parquet, CSV or text manifest."""
    fs, path = storage.filesystem(uri)
    if uri.lower().endswith(".parquet"):
        pf = pq.ParquetFile(fs.open_input_file(path))
        column = "uri" if "uri" in pf.schema_arrow.names else pf.schema_arrow.names[0]
        batches = pf.iter_batches(columns=[column])
    else:
        text = uri.lower().endswith(".txt")
        batches = pacsv.open_csv(
            fs.open_input_stream(path),
            read_options=pacsv.ReadOptions(column_names=["uri"] if text else None),
            parse_options=pacsv.ParseOptions(delimiter="\t" if text else ",", quote_char=False if text else '"'),
        )
    for batch in batches:
        col = batch.column("uri") if "uri" in batch.schema.names else batch.column(0)
        yield from (storage.absolute(u.strip()) for u in col.to_pylist() if u and u.strip())


def input_uris(cfg: SegmentConfig) -> Iterator[str]:
    if cfg.input.lower().endswith(MANIFEST_SUFFIXES):
        if not storage.exists(cfg.input):
            raise SegmentError(f"manifest not found: {cfg.input}")
        uris = _manifest(cfg.input)
    else:
        if not storage.is_s3(cfg.input):
            storage.check_readable_dir(cfg.input)
        uris = storage.iter_files(cfg.input, cfg.extensions)
    return itertools.islice(uris, cfg.limit) if cfg.limit else uris


def shards(uris: Iterator[str], rows_per_file: int) -> Iterator[tuple[int, list[str]]]:
    for k in itertools.count():
        chunk = list(itertools.islice(uris, rows_per_file))
        if not chunk:
            return
        yield k, chunk


# ---------------------------------------------------------------- pipeline stages


def _read_error(uri: str, err: Exception) -> str:
    try:
        missing = not storage.exists(uri)
    except storage.StorageError:
        missing = False
    return f"missing: {uri} no longer exists" if missing else f"read_failed: {err}"


def fetch_and_decode(batch: dict[str, np.ndarray], max_pixels: int) -> dict[str, Any]:
    """CPU task: bytes -> oriented RGB arrays; failures become ``error`` strings."""
    out: dict[str, list] = {"shard": [], "index": [], "uri": [], "image": [], "error": []}
    for shard, index, uri in zip(batch["shard"], batch["index"], batch["uri"]):
        image, error = _EMPTY, None
        try:
            image = images.decode(storage.read_bytes(str(uri)), exif=True, max_pixels=max_pixels)
        except storage.StorageError as err:
            error = _read_error(str(uri), err)
        except images.ImageError as err:
            error = f"{err.kind}: {err}"
        for key, value in (("shard", int(shard)), ("index", int(index)), ("uri", str(uri)), ("image", image), ("error", error)):
            out[key].append(value)
    return out


class InferenceActor:
    """The Ray Data actor: a :class:`Predictor` that turns decoded rows into output rows."""

    def __init__(self, model_uri: str, **predictor_kwargs: Any):
        self.predictor = Predictor.load(model_uri, **predictor_kwargs)

    def _predict_each(self, imgs: list[np.ndarray]) -> list[list[dict] | str]:
        """Batch first; if the batch fails, one at a time so one bad image fails alone."""
        try:
            return list(self.predictor.predict(imgs))
        except Exception:  # noqa: BLE001
            results: list[list[dict] | str] = []
            for img in imgs:
                try:
                    results.extend(self.predictor.predict([img]))
                except Exception as err:  # noqa: BLE001 - recorded in the row, never lost
                    results.append(f"inference_failed: {type(err).__name__}: {err}")
            return results

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["uri"])
        # Ray Data may hand a None in a string column back as NaN: only strings are errors.
        errors = [e if isinstance(e, str) and e else None for e in batch["error"]]
        ok = [i for i in range(n) if errors[i] is None]
        predicted = dict(zip(ok, self._predict_each([batch["image"][i] for i in ok])))
        rows = []
        for i in range(n):
            result, image = predicted.get(i, errors[i]), batch["image"][i]
            failed = isinstance(result, str)
            rows.append(
                {
                    "shard": int(batch["shard"][i]),
                    "index": int(batch["index"][i]),
                    "uri": str(batch["uri"][i]),
                    "width": None if failed else int(image.shape[1]),
                    "height": None if failed else int(image.shape[0]),
                    "instances": [] if failed else result,
                    "model": self.predictor.model_id,
                    "error": result if failed else None,
                }
            )
        return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


# ---------------------------------------------------------------- driver


def _job_record(cfg: SegmentConfig, model_id: str) -> dict[str, Any]:
    return {"input": cfg.input, "model": model_id, "rows_per_file": cfg.rows_per_file, "schema_version": output.SCHEMA_VERSION}


def prepare_output(cfg: SegmentConfig, model_id: str) -> dict[int, str]:
    """Check the output is writable and belongs to this job; return the parts already there.

    One listing of the output serves --overwrite, the clean-up of a killed run's leftovers
    (temporary files, the previous run's _SUCCESS) and finding the finished parts."""
    record_uri = storage.join(cfg.output, "_job.json")
    if not cfg.overwrite and storage.exists(record_uri):
        previous = json.loads(storage.read_text(record_uri))
        mine = _job_record(cfg, model_id)
        changed = [k for k in ("input", "model", "rows_per_file") if previous.get(k) != mine[k]]
        if changed:
            raise SegmentError(
                f"{cfg.output} holds output of another job ({', '.join(f'{k}={previous.get(k)}' for k in changed)}); "
                "pass --overwrite or choose another --output"
            )
    storage.write_text(record_uri, json.dumps(_job_record(cfg, model_id), indent=2))
    parts: dict[int, str] = {}
    for uri in storage.iter_files(cfg.output):
        name = uri.rsplit("/", 1)[-1]
        shard = output.shard_of(name)
        if name == "_job.json":
            continue
        if cfg.overwrite or (shard is None and (".tmp-" in name or name == "_SUCCESS")):
            storage.delete(uri)
        elif shard is not None:
            parts[shard] = uri
    return parts


def _pipeline(cfg: SegmentConfig, items: list[dict[str, Any]]) -> ray.data.Dataset:
    ds = ray.data.from_items(items).map_batches(
        fetch_and_decode,
        batch_size=cfg.batch_size,
        fn_kwargs={"max_pixels": cfg.max_pixels},
        batch_format="numpy",
        num_cpus=1,
        resources=cfg.decode_resources or None,
    )
    return ds.map_batches(
        InferenceActor,
        fn_constructor_args=(cfg.model,),
        fn_constructor_kwargs={
            "score_threshold": cfg.score_threshold,
            "max_detections": cfg.max_detections,
            "keep_classes": cfg.classes,
            "fp16": cfg.fp16,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=cfg.concurrency[0], max_size=cfg.concurrency[1]),
        num_gpus=cfg.num_gpus_per_actor or None,
        num_cpus=cfg.cpus_per_actor,
        resources=cfg.actor_resources or None,
    )


class _Progress:
    def __init__(self, every: float):
        self.every, self.start, self.last = every, time.perf_counter(), time.perf_counter()
        self.rows, self.errors = 0, 0

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        self.errors += table.num_rows - table.column("error").null_count
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            print(f"[segment] {self.rows} images done, {self.errors} errors, {self.rate():.2f} img/s", flush=True)

    def rate(self) -> float:
        return self.rows / max(time.perf_counter() - self.start, 1e-9)


def _run_wave(cfg: SegmentConfig, wave: list[tuple[int, list[str]]], progress: _Progress) -> dict[int, dict]:
    """Push one wave through the pipeline; write each shard's part file once it is whole."""
    expected = {k: len(uris) for k, uris in wave}
    items = [{"shard": k, "index": i, "uri": u} for k, uris in wave for i, u in enumerate(uris)]
    pending: dict[int, dict[int, dict]] = {k: {} for k in expected}
    written: dict[int, dict] = {}
    for table in _pipeline(cfg, items).iter_batches(batch_format="pyarrow", batch_size=None):
        progress.add(table)
        for row in table.to_pylist():
            pending[row["shard"]][row["index"]] = row  # keyed by index: a retried task cannot duplicate
        for k in [k for k, rows in pending.items() if len(rows) == expected[k]]:
            rows = [pending[k][i] for i in range(expected[k])]
            written[k] = output.write_part(cfg.output, k, [{f: r[f] for f in output.SCHEMA.names} for r in rows])
            del pending[k]
    if pending:
        missing = {k: expected[k] - len(rows) for k, rows in pending.items()}
        raise RuntimeError(f"rows missing from the pipeline for shards {missing}; nothing partial was written")
    return written


def run(cfg: SegmentConfig) -> dict[str, Any]:
    """Segment every input image; return (and write as _summary.json) the summary."""
    start = time.perf_counter()
    ckpt = checkpoint.load(cfg.model)
    check_classes(ckpt["classes"], cfg.classes)
    model_id = checkpoint.identity(ckpt)
    del ckpt
    uris = input_uris(cfg)
    first = next(uris, None)
    if first is None:
        raise SegmentError(f"no images found in {cfg.input}")
    done = prepare_output(cfg, model_id)
    progress = _Progress(cfg.log_every)
    stats: dict[int, dict] = {}
    wave: list[tuple[int, list[str]]] = []
    init_ray(min_cpus=int(cfg.concurrency[1] * cfg.cpus_per_actor) + 2)
    images_in = 0
    for k, chunk in shards(itertools.chain([first], uris), cfg.rows_per_file):
        images_in += len(chunk)
        if k in done:
            stats[k] = output.read_stats(done[k])
            _check_same_slice(cfg, k, chunk, stats[k])
            continue
        wave.append((k, chunk))
        if len(wave) == cfg.wave_files:
            stats.update(_run_wave(cfg, wave, progress))
            wave = []
    if wave:
        stats.update(_run_wave(cfg, wave, progress))
    return _finish(cfg, model_id, images_in, stats, done, progress, time.perf_counter() - start)


def _check_same_slice(cfg: SegmentConfig, shard: int, chunk: list[str], stats: dict) -> None:
    """A part file may only be reused if the listing still puts the same inputs in its slice."""
    if (stats["rows"], stats["first_uri"], stats["last_uri"]) != (len(chunk), chunk[0], chunk[-1]):
        raise SegmentError(
            f"the input listing changed since {output.part_uri(cfg.output, shard)} was written "
            "(files added or removed); resume needs the same input: pass --overwrite, a new --output, or a manifest"
        )


def _finish(
    cfg: SegmentConfig, model_id: str, images_in: int, stats: dict[int, dict], done: dict, progress: _Progress, wall: float
) -> dict:
    errors: Counter = Counter()
    for s in stats.values():
        errors.update(s["errors"])
    summary = {
        "input": cfg.input,
        "output": cfg.output,
        "model": model_id,
        "schema_version": output.SCHEMA_VERSION,
        "images_in": images_in,
        "rows_out": sum(s["rows"] for s in stats.values()),
        "part_files": len(stats),
        "resumed_rows": sum(stats[k]["rows"] for k in done if k in stats),
        "processed_rows": progress.rows,
        "errors": dict(sorted(errors.items())),
        "instances": sum(s["instances"] for s in stats.values()),
        "wall_s": round(wall, 2),
        "images_per_s": round(progress.rows / wall, 3) if wall else 0.0,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("input", "output", "model")},
    }
    storage.write_text(storage.join(cfg.output, "_summary.json"), json.dumps(summary, indent=2))
    storage.write_text(storage.join(cfg.output, "_SUCCESS"), "")
    return summary
