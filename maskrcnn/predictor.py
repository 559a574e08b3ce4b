"""The inference actor: one checkpoint on one device, decoded images in, instances out.

It runs torchvision's Mask R-CNN stages itself (transform, backbone, RPN, RoI heads) so
that it can paste the 28x28 mask probabilities straight into RLE (see
:func:`maskrcnn.masks.paste_and_encode`) instead of building full-size float masks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.models.detection.transform import resize_boxes

from maskrcnn import checkpoint, masks


def check_classes(names: list[str], classes: list[str] | None) -> None:
    unknown = sorted(set(classes or ()) - set(names))
    if unknown:
        raise ValueError(f"--classes {', '.join(unknown)} not among the model's classes: {', '.join(names)}")


class Predictor:
    def __init__(
        self,
        model_uri: str,
        *,
        score_threshold: float = 0.5,
        max_detections: int = 100,
        classes: list[str] | None = None,
        device: str | None = None,
        fp16: bool = True,
    ):
        ckpt = checkpoint.load(model_uri)
        self.model_id = checkpoint.identity(ckpt)
        self.names, self.category_ids = ckpt["classes"], ckpt["category_ids"]
        check_classes(self.names, classes)
        self.keep = torch.tensor([i + 1 for i, n in enumerate(self.names) if n in classes]) if classes else None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = checkpoint.build(ckpt).to(self.device)
        self.model.roi_heads.score_thresh = score_threshold
        # With a class filter, take more candidates so the cap applies after filtering.
        self.model.roi_heads.detections_per_img = max(max_detections, 300) if classes else max_detections
        self.max_detections = max_detections
        self.fp16 = fp16 and self.device.type == "cuda"
        self.calls = 0  # forward passes, for tests and benchmarks

    @torch.no_grad()
    def predict(self, images: list[np.ndarray]) -> list[list[dict[str, Any]]]:
        """``(H, W, 3)`` uint8 RGB images -> per image, a list of instance dicts."""
        if not images:
            return []
        m = self.model
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
