"""Where weights come from, and how they are read: the first layer of loading a model.

Loading reads top-down, and never calls back up:

1. **source** (this module): a name is a file (local or s3://) or a torchvision weight name
   (``COCO_V1``, ``MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1``), downloaded once into torch's cache;
2. **state dict** (this module): the file's tensors, read with ``weights_only`` so no pickled
   code runs, whoever wrote the file;
3. **module** (:mod:`maskrcnn.model`): the architecture those tensors fit, built and loaded;
4. **checkpoint** (:mod:`maskrcnn.checkpoint`): the project's self-describing file around them.
"""

from __future__ import annotations

import argparse
import io
import os
import posixpath
import urllib.parse
from typing import Any

import torch
from torchvision.models import get_model_weights, get_weight
from torchvision.models.detection import KeypointRCNN_ResNet50_FPN_Weights, MaskRCNN_ResNet50_FPN_Weights

from maskrcnn import storage
from maskrcnn.errors import UserError

# The architectures torchvision publishes weights for (by name: COCO_V1).
TORCHVISION_ARCHS = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "keypointrcnn_resnet50_fpn")
# torchvision's COCO_V1 Mask R-CNN and Keypoint R-CNN weights were trained with frozen batch
# norm's eps at 0 (pytorch/vision#2933): its builders set eps back to 0 when they load them,
# and so does this project, for the weight names and for those files by their published names.
LEGACY_EPS_FILES = tuple(
    w.COCO_V1.url.rsplit("/", 1)[-1] for w in (MaskRCNN_ResNet50_FPN_Weights, KeypointRCNN_ResNet50_FPN_Weights)
)


class WeightsError(UserError):
    """Initial weights that cannot be found, downloaded or matched to the model."""


# ---------------------------------------------------------------- 1. sources


def is_path(name: str) -> bool:
    """A file name (local or s3://), as opposed to a torchvision weight name."""
    return "/" in name or name.endswith((".pt", ".pth")) or os.path.exists(name)


def torchvision_weights(name: str, arch: str) -> Any | None:
    """Resolve ``Enum.VALUE`` or a bare value of ``arch``'s own weights; None for a file or
    anything else that is not a weight name."""
    if is_path(name):
        return None
    try:
        if "." in name:
            return get_weight(name)
        if arch in TORCHVISION_ARCHS:
            return get_model_weights(arch)[name]
    except (KeyError, ValueError, AttributeError):
        return None
    return None


def arch_of_weights(weights: Any) -> str | None:
    """The architecture whose torchvision weights these are; None for backbone weights."""
    return next((a for a in TORCHVISION_ARCHS if get_model_weights(a) is type(weights)), None)


def is_backbone(weights: Any) -> bool:
    """Torchvision's ImageNet weights of a ResNet body (``ResNet50_Weights.IMAGENET1K_V1``)."""
    return weights is not None and type(weights).__name__.startswith("ResNet")


# ---------------------------------------------------------------- 2. state dicts


def read_state_dict(source: str, arch: str) -> tuple[dict[str, torch.Tensor], str]:
    """One ``--weights`` source's tensors (downloaded or read) and the file they came from."""
    if is_path(source):
        return state_dict_of(read(source, WeightsError), source), source
    tv = torchvision_weights(source, arch)
    if tv is None:
        raise WeightsError(f"unknown weights {source!r}: not a torchvision weight name nor a .pt/.pth path")
    return torchvision_state_dict(tv, source, "--weights")


def read(source: str, error: type[Exception]) -> Any:
    """A weights file's contents, local or s3://, never executing pickled code."""
    try:
        data = storage.read_bytes(source)
    except storage.StorageError as err:
        raise error(str(err)) from err
    return load_safely(data, source, error)


def load_safely(data: bytes, source: str, error: type[Exception]) -> Any:
    """``torch.load`` with ``weights_only`` (no pickled code runs), also for torchvision's
    reference-script checkpoints, which hold their ``argparse.Namespace`` of arguments."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise error(f"refusing to load {source}: {first}") from err


def state_dict_of(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The weights in a loaded file: a project checkpoint, a reference-script checkpoint
    (``model``) or a bare state dict; a DDP ``module.`` prefix is dropped."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # torchvision reference scripts' checkpoints
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise WeightsError(f"{source} holds no state_dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def torchvision_state_dict(
    weights: Any, name: str, flag: str, error: type[Exception] = WeightsError
) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of torchvision's published ``weights`` and the file they came from: torch's
    cache (``$TORCH_HOME/hub/checkpoints/``), downloaded there first if missing (its hash
    checked, as torch hub does). The file is read like any other weights file, by :func:`read`,
    so a file someone put in the cache runs no pickled code either; torch hub's own loader
    would unpickle it in full."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", posixpath.basename(urllib.parse.urlparse(weights.url).path))
    if not os.path.exists(path):
        digest = torch.hub.HASH_REGEX.search(posixpath.basename(path))
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(weights.url, path, digest.group(1) if digest else None, progress=False)
        except (OSError, RuntimeError) as err:
            raise error(_download_error(name, weights, err, flag)) from err
    try:
        return state_dict_of(read(path, error), path), path
    except WeightsError as err:
        raise error(str(err)) from err


def _download_error(name: str, weights: Any, err: Exception, flag: str) -> str:
    """The offline error: names the URL and says what to pass instead."""
    return (
        f"cannot download weights {name} from {weights.url} ({type(err).__name__}: {err}); "
        f"where there is no internet, fetch that file elsewhere and pass its local path or "
        f"s3:// URI to {flag} (or put it in $TORCH_HOME/hub/checkpoints/)"
    )
