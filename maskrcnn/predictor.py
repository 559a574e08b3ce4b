"""The inference actor: one checkpoint on one device, decoded images in, instances out.

It runs torchvision's Mask R-CNN stages itself (transform, backbone, RPN, RoI heads) so
that it can paste the 28x28 mask probabilities straight into RLE (see
:func:`maskrcnn.masks.paste_and_encode`) instead of building full-size float masks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.transform import resize_boxes

from maskrcnn import checkpoint, masks


def check_classes(names: list[str], classes: list[str] | None) -> None:
    unknown = sorted(set(classes or ()) - set(names))
    if unknown:
        raise ValueError(f"--classes {', '.join(unknown)} not among the model's classes: {', '.join(names)}")


class Predictor:
    """Wraps a Mask R-CNN (in eval mode while predicting) with its class names and ids.

    Used by the segmentation actors (:meth:`load` from a checkpoint) and by evaluation,
    in training too (the live model), so both share one inference and post-processing path.
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
        fp16: bool = True,
    ):
        check_classes(classes, keep_classes)
        self.model, self.names, self.category_ids, self.model_id = model, classes, category_ids, model_id
        self.keep = torch.tensor([i + 1 for i, n in enumerate(classes) if n in keep_classes]) if keep_classes else None
        self.device = next(model.parameters()).device
        model.roi_heads.score_thresh = score_threshold
        # With a class filter, take more candidates so the cap applies after filtering.
        model.roi_heads.detections_per_img = max(max_detections, 300) if keep_classes else max_detections
        self.max_detections = max_detections
        self.fp16 = fp16 and self.device.type == "cuda"
        self.calls = 0  # forward passes, for tests and benchmarks

    @classmethod
    def load(cls, uri: str, *, device: str | None = None, **kwargs: Any) -> "Predictor":
        """A predictor for a checkpoint file (local or s3://), on ``device`` (default: GPU if any)."""
        ckpt = checkpoint.load(uri)
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = checkpoint.build(ckpt).to(target)
        return cls(model, ckpt["classes"], ckpt["category_ids"], model_id=checkpoint.identity(ckpt), **kwargs)

    @torch.no_grad()
    def predict(self, images: list[np.ndarray]) -> list[list[dict[str, Any]]]:
        """``(H, W, 3)`` uint8 RGB images -> per image, a list of instance dicts."""
        if not images:
            return []
        m = self.model.eval()
        tensors = [torch.from_numpy(im).to(self.device).permute(2, 0, 1).float().div_(255) for im in images]
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.fp16):
            batch, _ = m.transform(tensors)
            features = m.backbone(batch.tensors)
            proposals, _ = m.rpn(batch, features)
            detections, _ = m.roi_heads(features, proposals, batch.image_sizes)
        self.calls += 1
        return [
            self._instances(det, size, im.shape[0], im.shape[1])
            for det, size, im in zip(detections, batch.image_sizes, images)
        ]

    def _instances(self, det: dict[str, torch.Tensor], size: tuple[int, int], h: int, w: int) -> list[dict]:
        boxes = resize_boxes(det["boxes"].float(), size, (h, w))
        labels, scores, probs = det["labels"], det["scores"].float(), det["masks"].float()
        if self.keep is not None:
            sel = torch.isin(labels, self.keep.to(labels.device))
            boxes, labels, scores, probs = boxes[sel], labels[sel], scores[sel], probs[sel]
        n = min(len(boxes), self.max_detections)
        boxes, labels, scores, probs = boxes[:n], labels[:n], scores[:n], probs[:n]
        rles = masks.paste_and_encode(probs, boxes, h, w)
        out = []
        for (x0, y0, x1, y1), label, score, rle in zip(boxes.tolist(), labels.tolist(), scores.tolist(), rles):
            out.append(
                {
                    "category_id": self.category_ids[label - 1],
                    "category": self.names[label - 1],
                    "score": score,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "mask": rle,
                }
            )
        return out
