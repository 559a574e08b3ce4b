"""What a training example goes through on its way into the model.

The CPU data tasks shrink it to the largest training scale (:func:`resize_transform`, as
:func:`maskrcnn.data.load_example` applies it); each worker then unpacks its masks, grows it
if the data task left it smaller, and augments it on its device (:class:`Augment`,
:func:`to_model_inputs`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from maskrcnn import keypoints, masks


def resize_transform(size: int, max_size: int, *, shrink_only: bool = False) -> v2.Transform:
    """Shortest side to ``size`` (the largest training scale), longest side at most
    ``max_size``: torchvision's ``RandomShortestSize`` with one size, drawing no random number.

    The CPU data tasks resize with ``shrink_only``: an image smaller than the model's input
    crosses the object store at its own size (a 640x480 COCO photo is a third of its 800 px
    pixels), and the worker grows it on its device (:class:`Augment`): the same resize, so
    the same pixels, as when the data task did it."""
    return v2.Compose(
        [
            _Resize(size, max_size, shrink_only),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_per_instance),
        ]
    )


@dataclass(frozen=True)
class _Resize:
    size: int
    max_size: int
    shrink_only: bool

    def __call__(self, *sample: Any) -> Any:
        h, w = sample[0].shape[-2:]  # (image, target)
        scale = min(self.size / min(h, w), self.max_size / max(h, w))  # RandomShortestSize's rule
        if self.shrink_only and scale >= 1:
            return sample
        return v2.Resize([int(h * scale), int(w * scale)])(*sample)


class Augment:
    """What each training worker does to an example on its device: the resize to the largest
    scale that the data task left undone (:func:`resize_transform`), then a random flip and
    the batch's scale (:meth:`batch_scale`); boxes, masks and keypoints move with the image,
    and a flip swaps left and right keypoints (``spec``'s names say which). The flip draws
    from torch's global generator, which the worker seeds from (seed, step, rank), so a run
    and its resume augment alike."""

    def __init__(self, scales: tuple[int, ...], max_size: int, spec: keypoints.KeypointSpec | None = None):
        self.scales = tuple(scales)
        self.resize = resize_transform(max(scales), max_size)
        flip = RandomHorizontalFlip(0.5, spec.flip_permutation()) if spec else v2.RandomHorizontalFlip(0.5)
        self.random = {
            scale: v2.Compose(
                [
                    flip,
                    v2.RandomShortestSize(min_size=[scale], max_size=max_size),
                    v2.ClampBoundingBoxes(),
                    v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_per_instance),
                ]
            )
            for scale in self.scales
        }

    def batch_scale(self) -> int:
        """One of the scales for every image of a batch, so that they pad to little more than
        themselves (torchvision draws one per image). It comes from the seed torch's generator
        was given, (seed, step, rank) in training, without drawing from the generator."""
        return random.Random(torch.initial_seed()).choice(self.scales)

    def __call__(
        self, image: tv_tensors.Image, target: dict, full_size: bool, scale: int
    ) -> tuple[tv_tensors.Image, dict]:
        if full_size:
            image, target = self.resize(image, target)
        return self.random[scale](image, target)


class RandomHorizontalFlip(v2.Transform):
    """``v2.RandomHorizontalFlip`` that also swaps left and right keypoints (and their
    visibility), so a flipped left wrist is labelled a right wrist. It draws from torch's
    generator exactly as ``v2.RandomHorizontalFlip`` does."""

    def __init__(self, p: float, permutation: list[int]):
        super().__init__()
        self.p, self.permutation = p, permutation
        self.flip = v2.RandomHorizontalFlip(1.0)

    def forward(self, *inputs: Any) -> Any:
        if torch.rand(1) >= self.p:
            return inputs if len(inputs) > 1 else inputs[0]
        image, target = self.flip(*inputs)
        if "keypoints" in target:
            points = target["keypoints"]
            target = dict(
                target,
                keypoints=tv_tensors.wrap(points[:, self.permutation], like=points),
                visibility=target["visibility"][:, self.permutation],
            )
        return image, target


def batches(stream: Iterable[dict[str, np.ndarray]], batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Ray Data's numpy batches -> batches of ``batch_size`` rows whose images share an
    orientation, landscape or portrait, so that they pad to little more than themselves (as
    torchvision's reference groups by aspect ratio). Each orientation keeps its order; at the
    end of the stream what is left of both makes mixed batches, and a last partial one is
    dropped. A stream of one orientation comes out in the batches it went in."""
    groups: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for batch in stream:
        for row in rows_of(batch):
            height, width = np.shape(row["image"])[-2:]
            group = groups[width >= height]
            group.append(row)
            if len(group) == batch_size:
                yield group[:]
                group.clear()
    rest = groups[True] + groups[False]
    for start in range(0, len(rest) - batch_size + 1, batch_size):
        yield rest[start : start + batch_size]


def _per_instance(sample: tuple) -> tuple[torch.Tensor, ...]:
    """What a dropped box takes with it besides its mask: its label, and its keypoints."""
    target = sample[1]
    return tuple(target[k] for k in ("labels", "visibility", "keypoints") if k in target)


def _tensor(array: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``array`` on ``device``. A writable array on the CPU is shared, not copied; a read-only
    one (Ray Data's batches are views of Arrow buffers) is copied, which ``torch.as_tensor``
    would instead warn about: torch has no read-only tensors."""
    array = np.asarray(array)
    if array.flags.writeable:
        return torch.as_tensor(array, dtype=dtype).to(device, non_blocking=True)
    return torch.tensor(array, dtype=dtype, device=device)


def split_keypoints(points: torch.Tensor, canvas: tuple[int, int]) -> dict[str, torch.Tensor]:
    """COCO's ``(N, K, 3)`` ``[x, y, v]`` -> transforms.v2 ``KeyPoints`` (which move with the
    image) and the visibility beside them."""
    return {"keypoints": tv_tensors.KeyPoints(points[..., :2], canvas_size=canvas), "visibility": points[..., 2]}


def joined_keypoints(target: dict[str, torch.Tensor]) -> torch.Tensor:
    """The inverse of :func:`split_keypoints`: ``(N, K, 3)``, what torchvision trains on."""
    xy = target["keypoints"].as_subclass(torch.Tensor)
    return torch.cat([xy, target["visibility"].to(xy.dtype).unsqueeze(-1)], dim=-1)


def to_model_inputs(
    rows: list[dict[str, Any]], device: torch.device, augment: Augment | None = None
) -> tuple[list[torch.Tensor], list[dict]]:
    """Rows from :func:`maskrcnn.data.load_example` (errors already removed) -> torchvision's inputs on
    ``device``, their masks unpacked and augmented there when ``augment`` is given, all at
    one scale."""
    imgs, targets = [], []
    scale = augment.batch_scale() if augment is not None else 0
    for r in rows:
        image = tv_tensors.Image(_tensor(r["image"], torch.uint8, device))
        canvas = tuple(image.shape[-2:])
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                _tensor(r["boxes"], torch.float32, device), format="XYXY", canvas_size=canvas
            ),
            "labels": _tensor(r["labels"], torch.int64, device),
            "masks": tv_tensors.Mask(_tensor(masks.unpack(r["masks"], *canvas), torch.uint8, device)),
        }
        if "keypoints" in r:
            target.update(split_keypoints(_tensor(r["keypoints"], torch.float32, device), canvas))
        if augment is not None:
            full_size = canvas == (r.get("height"), r.get("width"))
            image, target = augment(image, target, full_size, scale)
        if "keypoints" in target:
            target = dict(target, keypoints=joined_keypoints(target))
            del target["visibility"]
        imgs.append(image.as_subclass(torch.Tensor).float().div_(255))
        targets.append({k: v.as_subclass(torch.Tensor) for k, v in target.items()})
    return imgs, targets


def rows_of(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """A Ray Data numpy batch (dict of columns) -> a list of row dicts."""
    n = len(batch["image_id"])
    return [{k: batch[k][i] for k in batch} for i in range(n)]
