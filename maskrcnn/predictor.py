"""One model on one device, decoded images in, instances out: the inference of every job
(the Ray actors of :mod:`maskrcnn.inference`, ``jobs/predict.py``, validation in training).

An image's instances depend only on that image and the model, never on the other images
of its batch. torchvision batches by padding every image to the largest in the batch, and
that padding changes the features near the borders; here each image is resized and padded
to its own *canvas* (its resized size rounded up to a multiple of 32), exactly as
torchvision's ``GeneralizedRCNNTransform`` pads an image on its own, and only images with
the same canvas share a forward pass. Photos come in few shapes, so batches stay full on
real archives. On CPU every image runs alone: batching is slower there (measured in
``docs/benchmarks.md``), and alone its result is bit-identical at any batch size.

Masks go straight from the 28x28 probabilities to full-image RLE in time proportional to
the box areas (:func:`maskrcnn.masks.paste_and_encode`). A keypoint model's instances also
carry their keypoints, K ``[x, y, score]`` in the same coordinates as the boxes.
"""

from __future__ import annotations

import functools
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes, resize_keypoints

from maskrcnn import checkpoint, devices, masks
from maskrcnn.config import names, option

INFER = "inference"
EVAL_SCORE_THRESHOLD = 0.05  # what evaluation keeps: torchvision's default, what COCO AP is usually reported at


@dataclass(kw_only=True)
class PredictOptions:
    """What a :class:`Predictor` keeps of its detections, and its precision: the flags of
    every job that predicts (``jobs/predict.py``; with the actor pool's flags,
    :class:`maskrcnn.inference.InferenceOptions`)."""

    score_threshold: float = option("drop detections below this score", 0.5, group=INFER)
    max_detections: int = option("keep at most this many instances per image", 100, group=INFER)
    classes: list[str] | None = option(
        "comma-separated class names to keep", None, group=INFER, default_text="all", type=names
    )
    amp: bool = option(
        "run GPU inference in fp32 instead of fp16 autocast (AMP)",
        True,
        group=INFER,
        flag="--no-amp",
        was={"--no-fp16": False},
    )

    def __post_init__(self) -> None:
        if self.max_detections < 1:
            raise ValueError(f"--max-detections must be at least 1, got {self.max_detections}")


class DeviceLost(RuntimeError):
    """The device's context is lost (:data:`maskrcnn.devices.LOST`): every later call in this
    process would fail too, so the process must end; no image is to blame."""


def check_classes(names: list[str], classes: list[str] | None) -> None:
    real = [n for n in names if n != checkpoint.PLACEHOLDER]
    unknown = sorted(set(classes or ()) - set(real))
    if unknown:
        raise ValueError(f"--classes {', '.join(unknown)} not among the model's classes: {', '.join(real)}")


class Predictor:
    """Wraps a Mask R-CNN (in eval mode while predicting) with its class names and ids.

    Built from a checkpoint (:meth:`from_checkpoint`) by the inference actors and
    ``jobs/predict.py``, and around the live model by validation in training, so all share
    one inference and post-processing path. ``amp``: fp16 autocast, on CUDA only.
    ``batch_images`` lets same-canvas images share a forward pass (default: on CUDA only),
    at most ``group_size`` of them (default: all of a call's). Calls from several threads
    take turns on the device and paste and encode their masks side by side.
    """

    def __init__(
        self,
        model: nn.Module,
        classes: list[str],
        category_ids: list[int],
        *,
        model_id: str = "",
        score_threshold: float = 0.5,
        max_detections: int = 100,
        keep_classes: list[str] | None = None,
        amp: bool = True,
        batch_images: bool | None = None,
        group_size: int | None = None,
    ):
        check_classes(classes, keep_classes)
        self.model, self.names, self.category_ids, self.model_id = model, classes, category_ids, model_id
        # Labels kept: those of --classes, never torchvision's "N/A" placeholders.
        wanted = set(keep_classes or classes) - {checkpoint.PLACEHOLDER}
        self.keep = (
            None if wanted >= set(classes) else torch.tensor([i + 1 for i, n in enumerate(classes) if n in wanted])
        )
        self.device = next(model.parameters()).device
        model.roi_heads.score_thresh = score_threshold
        # With a class filter, take more candidates so the cap applies after filtering.
        model.roi_heads.detections_per_img = max(max_detections, 300) if self.keep is not None else max_detections
        self.max_detections = max_detections
        self.amp = amp and self.device.type == "cuda"
        self.batch_images = self.device.type == "cuda" if batch_images is None else batch_images
        self.group_size = group_size
        self.forward_lock = threading.Lock()

    @classmethod
    def load(cls, model: str, *, arch: str | None = None, **kwargs: Any) -> "Predictor":
        """A predictor for any ``--model`` (see :func:`maskrcnn.checkpoint.load`)."""
        return cls.from_checkpoint(checkpoint.load(model, arch), **kwargs)

    @classmethod
    def with_options(
        cls,
        ckpt: dict[str, Any],
        options: PredictOptions,
        device: str | torch.device | None = None,
        group_size: int | None = None,
    ) -> "Predictor":
        """A predictor for a loaded checkpoint, as a job's flags say."""
        return cls.from_checkpoint(
            ckpt,
            device=device,
            score_threshold=options.score_threshold,
            max_detections=options.max_detections,
            keep_classes=options.classes,
            amp=options.amp,
            group_size=group_size,
        )

    @classmethod
    def from_checkpoint(
        cls, ckpt: dict[str, Any], *, device: str | torch.device | None = None, **kwargs: Any
    ) -> "Predictor":
        """A predictor for a loaded checkpoint, on ``device`` (default: the GPU if there is one)."""
        target = torch.device(device) if device else devices.default()
        model = checkpoint.build(ckpt).to(target)
        return cls(model, ckpt["classes"], ckpt["category_ids"], model_id=checkpoint.identity(ckpt), **kwargs)

    @torch.no_grad()
    def predict(
        self, images: list[np.ndarray], sizes: list[tuple[int, int]] | None = None
    ) -> list[list[dict[str, Any]]]:
        """``(H, W, 3)`` uint8 RGB images -> per image, a list of instance dicts.

        Boxes and masks are in the coordinates of ``sizes`` (each image's full ``(height,
        width)`` when it was decoded reduced); by default each array's own size.
        """
        sizes = sizes or [im.shape[:2] for im in images]
        self.model.eval()
        detections: list[dict[str, torch.Tensor]] = [{}] * len(images)
        with self.forward_lock:  # one call's images on the device at a time; the others post-process
            canvases = [self._canvas(im) for im in images]
            for group in self._groups(canvases):
                for i, det in zip(group, self._forward([canvases[i] for i in group])):
                    detections[i] = det
        return [self._instances(det, resized, size) for det, (_, resized), size in zip(detections, canvases, sizes)]

    def predict_each(
        self, images: list[np.ndarray], sizes: list[tuple[int, int]]
    ) -> tuple[list[list[dict[str, Any]] | str], int]:
        """:meth:`predict`, healing device faults; returns each image's instances or error
        (``"kind: message"``), and how many batches were split. The batch goes in one call if
        it can; out of device memory, in halves, down to one image; after another error, one
        image at a time, so that one bad image fails alone. Only an image that fails alone
        becomes an error. A lost device context raises :class:`DeviceLost`."""
        outcome = self._try(images, sizes)
        if not isinstance(outcome, str):
            return outcome, 0
        devices.release(self.device)  # here, not in the except block: its traceback holds the batch
        if len(images) == 1:
            return [outcome], 0
        if outcome.startswith(devices.OUT_OF_MEMORY):
            half = (len(images) + 1) // 2
            parts, splits = [(images[:half], sizes[:half]), (images[half:], sizes[half:])], 1
        else:
            parts, splits = [([im], [size]) for im, size in zip(images, sizes)], 0
        results: list[list[dict[str, Any]] | str] = []
        for part in parts:
            done, more = self.predict_each(*part)
            results += done
            splits += more
        return results, splits

    def _try(self, images: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[list[dict[str, Any]]] | str:
        """The batch's instances, or what went wrong as an error says it."""
        try:
            return self.predict(images, sizes)
        except Exception as err:
            kind = devices.fault(err)
            if kind == devices.LOST:
                raise DeviceLost(f"{type(err).__name__}: {err}") from None
            return f"{kind or 'inference_failed'}: {type(err).__name__}: {err}"

    def _canvas(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """The image as torchvision would feed it alone: resized, normalised and padded to a
        multiple of 32; and its resized size. Resizing comes before normalising (the same to
        float rounding), so a 12 MP photo costs one conversion, not three full-size passes."""
        transform = self.model.transform
        pixels = _pixels(image, self.device).permute(2, 0, 1).float()
        resized = transform.resize(pixels, None)[0].div_(255)
        canvas = transform.batch_images([transform.normalize(resized)], size_divisible=transform.size_divisible)
        return canvas, (resized.shape[-2], resized.shape[-1])

    def _groups(self, canvases: list[tuple[torch.Tensor, tuple[int, int]]]) -> list[list[int]]:
        """Indices of the images that share a forward pass: the same canvas shape, or alone."""
        if not self.batch_images:
            return [[i] for i in range(len(canvases))]
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (canvas, _) in enumerate(canvases):
            groups[tuple(canvas.shape)].append(i)
        size = self.group_size or len(canvases)
        return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]

    def _forward(self, canvases: list[tuple[torch.Tensor, tuple[int, int]]]) -> list[dict[str, torch.Tensor]]:
        """torchvision's stages after the transform, on images of one canvas shape."""
        m = self.model
        batch = ImageList(torch.cat([c for c, _ in canvases]), [size for _, size in canvases])
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            features = m.backbone(batch.tensors)
            proposals, _ = m.rpn(batch, features)
            detections, _ = m.roi_heads(features, proposals, batch.image_sizes)
        return detections

    def _instances(self, det: dict[str, torch.Tensor], resized: tuple[int, int], size: tuple[int, int]) -> list[dict]:
        """One image's detections as instance dicts, in the coordinates of ``size``: ``mask``
        (COCO RLE) and ``keypoints`` (K x ``[x, y, score]``) are None where the model has no
        such head."""
        h, w = size
        det = dict(det, boxes=resize_boxes(det["boxes"].float(), resized, (h, w)))
        if "keypoints" in det:
            det["keypoints"] = resize_keypoints(det["keypoints"].float(), resized, (h, w))
        if self.keep is not None:
            sel = torch.isin(det["labels"], self.keep.to(det["labels"].device))
            det = {k: v[sel] for k, v in det.items()}
        det = {k: v[: self.max_detections] for k, v in det.items()}
        boxes = det["boxes"]
        rles = masks.paste_and_encode(det["masks"].float(), boxes, h, w) if "masks" in det else [None] * len(boxes)
        points = _keypoint_triples(det) if "keypoints" in det else [None] * len(boxes)
        return [
            {
                "category_id": self.category_ids[label - 1],
                "category": self.names[label - 1],
                "score": score,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "mask": rle,
                "keypoints": kps,
            }
            for (x0, y0, x1, y1), label, score, rle, kps in zip(
                boxes.tolist(), det["labels"].tolist(), det["scores"].float().tolist(), rles, points
            )
        ]


def model_input(image: np.ndarray, fit: tuple[int, int]) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 image shrunk as the model's transform would resize it (``fit``:
    its shortest side and longest-side cap), rounded back to uint8; an image the model would
    enlarge, as it is. What the decode tasks hand the actors: the bytes the model uses, not
    more. torchvision's transform then resizes it by a scale of 1, which leaves it as it is,
    so the actor's rows are those of torchvision's forward pass of this image."""
    h, w = image.shape[:2]
    if min(fit[0] / min(h, w), fit[1] / max(h, w)) >= 1:
        return image
    resized = _resizer(fit).resize(torch.from_numpy(image).permute(2, 0, 1).float(), None)[0]
    return resized.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


@functools.lru_cache(maxsize=4)
def _resizer(fit: tuple[int, int]) -> GeneralizedRCNNTransform:
    return GeneralizedRCNNTransform(fit[0], fit[1], image_mean=[0.0] * 3, image_std=[1.0] * 3).eval()


def _keypoint_triples(det: dict[str, torch.Tensor]) -> list[list[list[float]]]:
    """torchvision's ``keypoints`` (N, K, 3: x, y, 1) and ``keypoints_scores`` (N, K: the heatmap
    logit at each keypoint) -> per instance, K ``[x, y, score]``."""
    xy = det["keypoints"][..., :2]
    return torch.cat([xy, det["keypoints_scores"].float().unsqueeze(-1)], dim=-1).tolist()


def _pixels(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """An ``(H, W, 3)`` uint8 image as a tensor on ``device``: float on the CPU, uint8 on a GPU
    (a quarter of the bytes to copy; converted there). One copy either way, made by
    ``torch.tensor``: the arrays Ray hands an actor are read-only views of its object store,
    and ``torch.from_numpy`` warns about every one of them (torch has no read-only tensors)."""
    dtype = torch.float32 if device.type == "cpu" else torch.uint8
    return torch.tensor(image, dtype=dtype, device=device)
