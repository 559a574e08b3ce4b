"""Inference on Ray, the one way every job that predicts many images runs it (segmentation
and evaluation)::

    rows with a uri (and the job's key columns) -> CPU tasks: fetch + decode
        -> one autoscaling actor pool: Mask R-CNN -> output rows (maskrcnn.output.SCHEMA)

:class:`InferenceOptions` are the flags of that pool, the same words in every job;
:func:`share` puts the model's bytes in Ray's object store once, and each
:class:`InferenceActor` builds the model from there in its ``__init__`` and predicts in
its ``__call__``. An image that cannot be read or predicted becomes a row with an
``error``, never a lost row. A device fault is not the image's: a batch that runs out of
GPU memory is split in halves and retried, and a lost device context ends the actor, which
Ray Data restarts and whose batch it retries; :class:`Recoveries` counts both.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from maskrcnn import checkpoint, devices, images, output
from maskrcnn.config import option, pool_size, resources
from maskrcnn.predictor import INFER, DeviceLost, PredictOptions, Predictor, model_input
from maskrcnn.runtime import init_ray, on_this_node

WINDOW = 4  # a GPU actor's call: this many forward passes' worth of images, grouped by canvas

__all__ = ["INFER", "InferenceOptions", "InferenceActor", "Recoveries", "decode", "predict", "share", "start"]


@dataclass(kw_only=True)
class InferenceOptions(PredictOptions):
    """The actor pool, and what it keeps of its predictions; jobs embed these as their flags."""

    batch_size: int = option(
        "images per forward pass: on GPU, up to this many with the same canvas, gathered from a "
        "window of 4x as many; on CPU each image runs alone",
        4,
        group=INFER,
    )
    actors: tuple[int, int] = option(
        "inference actors, N or MIN,MAX (autoscaling)",
        (1, 1),
        group=INFER,
        type=pool_size,
        metavar="N|MIN,MAX",
        was={"--concurrency": None, "--num-workers": None},
    )
    gpus_per_actor: float = option(
        "GPUs per inference actor; 0 runs on CPU", 0.0, group=INFER, was={"--num-gpus-per-actor": None, "--gpu": 1.0}
    )
    cpus_per_actor: float = option(
        "CPUs reserved per actor; on CPU actors also torch's thread count (Ray sets OMP_NUM_THREADS), "
        "on GPU actors the calls that paste and encode masks beside the forward pass",
        1.0,
        group=INFER,
        was={"--cpus-per-worker": None},
    )
    # Custom Ray resources pin the actors to node groups; the cluster configs declare them.
    actor_resources: dict[str, float] | None = option(
        "custom Ray resources per inference actor, JSON, e.g. '{\"gpu_node\": 1}' (see cluster/README.md)",
        None,
        group=INFER,
        type=resources,
        metavar="JSON",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.gpus_per_actor < 0:
            raise ValueError(f"--gpus-per-actor must be at least 0, got {self.gpus_per_actor}")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"--cpus-per-actor must be above 0, got {self.cpus_per_actor}")

    @property
    def window(self) -> int:
        """Images per actor call: on GPU a window in which same-canvas images find each other;
        on CPU, where each image runs alone, ``batch_size``."""
        return self.batch_size * (WINDOW if self.gpus_per_actor else 1)

    @property
    def calls_per_actor(self) -> int:
        """Actor calls at once, in threads: on GPU one more than the actor's CPUs, so that one
        call is on the device (one at a time: :class:`maskrcnn.predictor.Predictor`) while
        the others' masks are pasted and encoded, one a CPU (docs/benchmarks.md measures that
        host work); on CPU one, whose forward pass has the actor's CPUs to itself."""
        return 1 + math.ceil(self.cpus_per_actor) if self.gpus_per_actor else 1

    @property
    def cpus(self) -> int:
        """The CPUs the largest pool reserves."""
        return int(self.actors[1] * self.cpus_per_actor)


def start(options: InferenceOptions, min_cpus: int) -> None:
    """Start or join Ray (:func:`maskrcnn.runtime.init_ray`) with room for the pool and
    ``min_cpus`` more; stop at once where GPU actors could never start."""
    if options.gpus_per_actor and not os.environ.get("RAY_ADDRESS") and not _local_gpus():
        raise ValueError(
            "--gpus-per-actor: this machine has no GPU; pass --gpus-per-actor 0, "
            "or submit the job to a cluster with GPU nodes"
        )
    init_ray(min_cpus=options.cpus + min_cpus)


def _local_gpus() -> float:
    """The GPUs a local Ray has, or would have once started (checked before starting it)."""
    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0.0)
    import torch

    return float(torch.cuda.device_count())


def share(ckpt: dict[str, Any]) -> list[ray.ObjectRef]:
    """The checkpoint's bytes in Ray's object store, once: every actor reads them there, not
    from the source. (A list, so that Ray passes the reference instead of the bytes.)"""
    return [ray.put(checkpoint.to_bytes(ckpt))]


def decode(
    ds: ray.data.Dataset,
    batch_size: int,
    *,
    fit: tuple[int, int] | None,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    exif: bool = True,
    resources: dict[str, float] | None = None,
) -> ray.data.Dataset:
    """Fetch and decode every row's ``uri`` in CPU tasks (:func:`fetch_and_decode`)."""
    place = {"resources": resources} if resources else {}
    return ds.map_batches(
        fetch_and_decode,
        batch_size=batch_size,
        fn_kwargs={"max_pixels": max_pixels, "fit": fit, "exif": exif},
        batch_format="numpy",
        num_cpus=1,
        **place,
    )


def predict(
    ds: ray.data.Dataset,
    options: InferenceOptions,
    model: list[ray.ObjectRef],
    keys: pa.Schema,
    recoveries: ray.actor.ActorHandle | None = None,
) -> ray.data.Dataset:
    """Decoded rows -> output rows (``keys`` first, then :data:`maskrcnn.output.SCHEMA`), in
    the actor pool that ``options`` describe; ``model`` is :func:`share`'s reference, and
    ``recoveries`` (:func:`start_recoveries`) hears of the faults the pool recovered from."""
    return ds.map_batches(
        InferenceActor,
        fn_constructor_args=(model, options, keys, recoveries),
        batch_size=options.window,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            min_size=options.actors[0],
            max_size=options.actors[1],
            max_concurrent_calls_per_actor=options.calls_per_actor,
            enable_true_multi_threading=True,
        ),
        num_gpus=options.gpus_per_actor or None,
        num_cpus=options.cpus_per_actor,
        resources=options.actor_resources or None,
    )


def fetch_and_decode(
    batch: dict[str, np.ndarray], max_pixels: int, fit: tuple[int, int] | None, exif: bool = True
) -> dict[str, Any]:
    """CPU task: bytes -> RGB arrays (EXIF-oriented with ``exif``; with ``fit``, large JPEGs
    decoded reduced and every image shrunk to the model's input size,
    :func:`maskrcnn.predictor.model_input`) and each image's full size; failures become
    ``error`` strings. Other columns pass through."""
    out: dict[str, list] = {k: [v.item() for v in batch[k]] for k in batch if k != "uri"}
    out.update(uri=[str(u) for u in batch["uri"]], image=[], height=[], width=[], error=[])
    for uri in out["uri"]:
        decoded, error = images.read(uri, fit, max_pixels, exif=exif)
        out["image"].append(model_input(decoded.pixels, fit) if fit and not error else decoded.pixels)
        out["height"].append(decoded.height)
        out["width"].append(decoded.width)
        out["error"].append(error)
    return out


def start_recoveries() -> ray.actor.ActorHandle:
    """A :class:`Recoveries` actor on the driver's own node (:func:`maskrcnn.runtime.on_this_node`)."""
    return Recoveries.options(**on_this_node()).remote()


@ray.remote(num_cpus=0)
class Recoveries:
    """What the actor pool recovered from, for the job's summary: ``split_batches`` (out of
    device memory, retried in halves) and ``restarted_actors`` (a lost device context)."""

    def __init__(self) -> None:
        self.counts = {"split_batches": 0, "restarted_actors": 0}

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def get(self) -> dict[str, int]:
        return self.counts


class InferenceActor:
    """The Ray Data actor: builds the model once, from the bytes :func:`share` put in the
    object store, on the device it reserved; decoded rows in, output rows out. A GPU actor
    takes :attr:`InferenceOptions.calls_per_actor` calls at once, in threads that share the
    model: nothing here changes after ``__init__``."""

    def __init__(
        self,
        model: list[ray.ObjectRef],
        options: InferenceOptions,
        keys: pa.Schema,
        recoveries: ray.actor.ActorHandle | None = None,
    ):
        self.device = devices.for_actor(options.gpus_per_actor)
        ckpt = checkpoint.from_bytes(ray.get(model[0]), "the job's model")
        self.predictor = Predictor.with_options(ckpt, options, device=self.device, group_size=options.batch_size)
        self.keys, self.schema = keys, pa.schema([*keys, *output.SCHEMA])
        self.recoveries = recoveries

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["uri"])
        # Ray Data may hand a None in a string column back as NaN: only strings are errors.
        errors = [e if isinstance(e, str) and e else None for e in batch["error"]]
        ok = [i for i in range(n) if errors[i] is None]
        sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in range(n)]
        predicted = dict(zip(ok, self._predict_each([batch["image"][i] for i in ok], [sizes[i] for i in ok])))
        rows = [
            {
                **{k: batch[k][i].item() for k in self.keys.names},
                **output.row(str(batch["uri"][i]), sizes[i], predicted.get(i, errors[i]), self.predictor.model_id),
            }
            for i in range(n)
        ]
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _predict_each(self, imgs: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[list[dict] | str]:
        """:meth:`Predictor.predict_each`; a lost device context ends the process, so that Ray
        Data restarts the actor (a fresh context) and retries its batch: no row is written."""
        try:
            results, splits = self.predictor.predict_each(imgs, sizes)
        except DeviceLost as err:
            print(
                f"[inference] actor on {socket.gethostname()} ends, to be restarted: {err}", file=sys.stderr, flush=True
            )
            self._count("restarted_actors")
            os._exit(1)
        if splits:
            self._count("split_batches", splits)
        return results

    def _count(self, name: str, n: int = 1) -> None:
        if self.recoveries is not None:
            ray.get(self.recoveries.add.remote(name, n))
