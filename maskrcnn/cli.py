"""How every job ends: a one-line error naming the problem and a non-zero exit."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from maskrcnn.errors import UserError
from maskrcnn.model import ARCHS

EXPECTED = (UserError, ValueError)


def _root_cause(err: BaseException) -> BaseException:
    """Ray wraps worker and task errors (TrainingFailedError -> worker error -> ours,
    RayTaskError(ours) from a Ray Data task); find ours."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        original = getattr(err, "cause", None)  # a RayTaskError carries the task's own exception
        if isinstance(original, BaseException):
            err = original
            continue
        if isinstance(err, EXPECTED):
            return err
        nxt = err.__cause__ or err.__context__
        for attr in ("worker_failures", "errors"):
            failures = getattr(err, attr, None)
            if isinstance(failures, dict) and failures:
                nxt = next(iter(failures.values()))
        if nxt is None:
            return err
        err = nxt
    return err


def run_main(main: Callable[[], None]) -> None:
    try:
        main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # the top of a command-line program
        cause = _root_cause(err)
        text = str(cause).strip().splitlines()
        print(f"error: {text[0] if text else type(cause).__name__}", file=sys.stderr)
        sys.exit(2 if isinstance(cause, EXPECTED) else 1)


def job_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A job's parser: the docstring's first paragraph as the description, the rest
    (the examples) after the flags."""
    return argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


MODEL_HELP = (
    "the model: a checkpoint written by jobs/train.py (best.pt), a torchvision Mask R-CNN state dict "
    "or reference-script checkpoint (.pth), local or s3://, or a torchvision weight name (COCO_V1, "
    "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1), downloaded once by this process"
)


def add_model_arguments(group: argparse._ActionsContainer, required: bool = True) -> None:
    """``--model`` and ``--arch``, declared once for every job that takes a model."""
    group.add_argument("--model", required=required, help=MODEL_HELP)
    group.add_argument(
        "--arch",
        choices=ARCHS,
        help="the architecture of a .pth file that does not say (default: from the file; "
        "maskrcnn_resnet50_fpn for a bare weight name)",
    )
