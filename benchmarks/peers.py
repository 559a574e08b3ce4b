"""This project beside what a user would write instead: same model, images, batch and
machine, in one run (issue #34).

    python benchmarks/peers.py [--train-steps 100] [--threads 2] [--segment-images 160] [--skip train,segment]

Training: ``jobs/train.py`` (Ray Train, 1 worker, Ray Data decoding beside it) against the
loop a user writes after torchvision's ``references/detection``: a Dataset that reads the
COCO file with pycocotools (``annToMask``), a DataLoader with 2 workers, SGD, one process.
Both compute with ``--threads`` torch threads: the loop by ``torch.set_num_threads``, the
job's worker by ``--cpus-per-worker`` (Ray gives an actor as many threads as CPUs it reserves).
Synthetic shapes, ``maskrcnn_resnet18_fpn_small`` at 128 px, batch 2.

Segmentation: ``jobs/segment_bucket.py`` against Ray Data's documented batch-inference
recipe (``read_images`` -> ``map_batches`` with an actor class -> ``write_parquet``, masks
from torchvision's own post-processing encoded with pycocotools) and a plain loop without
Ray. ``coco_small``'s photos, the same small model at 320 px, 10 masks an image, batch 4.

Every contender runs as its own process, at N and at 2N (steps or images). Steady-state
rate = N / (T(2N) - T(N)); start-up = T(N) - N / rate: the interpreter, imports, Ray and
the model. Ratios are of steady-state rates, this project's over the peer's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared" / "data"
SMALL = "maskrcnn_resnet18_fpn_small"
TRAIN = {"size": 128, "max_size": 192, "batch": 2, "lr": 1e-9}  # a still model: every step costs the same
SEGMENT = {"size": 320, "batch": 4, "threshold": 0.3, "masks": 10}


# ---------------------------------------------------------------- the peers, each run as its own process


def hand_train(annotations: str, images: str, steps: int, threads: int) -> None:
    """The loop of torchvision's references/detection, cut to what a user keeps."""
    import numpy as np
    import torch
    from PIL import Image
    from pycocotools.coco import COCO
    from torchvision.transforms.functional import hflip, pil_to_tensor

    from maskrcnn.model import build_model

    class CocoMasks(torch.utils.data.Dataset):
        def __init__(self):
            self.coco = COCO(annotations)
            self.ids = [i for i in sorted(self.coco.imgs) if self.coco.imgToAnns[i]]
            self.labels = {c: n + 1 for n, c in enumerate(sorted(self.coco.cats))}

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            info = self.coco.imgs[self.ids[i]]
            image = pil_to_tensor(Image.open(f"{images}/{info['file_name']}").convert("RGB")).float() / 255
            anns = [a for a in self.coco.imgToAnns[info["id"]] if not a.get("iscrowd")]
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
            masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns]))
            target = {"boxes": boxes, "labels": torch.tensor([self.labels[a["category_id"]] for a in anns])}
            target["masks"] = masks
            if torch.rand(1) < 0.5:
                image, target["masks"] = hflip(image), hflip(masks)
                width = image.shape[-1]
                target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
            return image, target

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    data = CocoMasks()
    loader = torch.utils.data.DataLoader(
        data, batch_size=TRAIN["batch"], shuffle=True, num_workers=2, drop_last=True,
        collate_fn=lambda batch: tuple(zip(*batch)), persistent_workers=True,
    )  # fmt: skip
    model = build_model(SMALL, len(data.labels) + 1, min_size=TRAIN["size"], max_size=TRAIN["max_size"]).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=TRAIN["lr"], momentum=0.9, weight_decay=1e-4)
    done = 0
    while done < steps:
        for images_, targets in loader:
            loss = sum(model(list(images_), list(targets)).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    torch.save(model.state_dict(), f"{tempfile.gettempdir()}/peers-hand-train.pt")


def _load(weights: str):
    """The model as a user's script loads it, with torchvision's cap on detections."""
    import torch

    from maskrcnn import checkpoint

    model = checkpoint.build(checkpoint.load(weights))
    model.roi_heads.detections_per_img = SEGMENT["masks"]  # torchvision's box_detections_per_img
    return model, torch


def _instances(out: dict, torch) -> str:
    """torchvision's detections of one image -> its instances as JSON, masks as COCO RLE."""
    import numpy as np
    from pycocotools import mask as mask_utils

    keep = out["scores"] >= SEGMENT["threshold"]
    binary = (out["masks"][keep, 0] > 0.5).numpy().astype(np.uint8)
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
    return json.dumps(
        [
            {"category_id": int(label), "score": float(score), "bbox": box, "mask": rle["counts"].decode()}
            for label, score, box, rle in zip(
                out["labels"][keep], out["scores"][keep], out["boxes"][keep].tolist(), rles
            )
        ]
    )


def ray_recipe(folder: str, weights: str, output: str) -> None:
    """Ray Data's batch-inference recipe: read_images -> map_batches(actor class) -> write_parquet."""
    import ray

    class Segmenter:
        def __init__(self):
            self.model, self.torch = _load(weights)

        def __call__(self, batch):
            images = [self.torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in batch["image"]]
            with self.torch.inference_mode():
                outs = self.model(images)
            return {"path": batch["path"], "instances": [_instances(o, self.torch) for o in outs]}

    ds = ray.data.read_images(folder, mode="RGB", include_paths=True)
    ds = ds.map_batches(Segmenter, batch_size=SEGMENT["batch"], concurrency=1)
    ds.write_parquet(output)


def plain_loop(folder: str, weights: str, output: str) -> None:
    """No Ray: decode, predict and encode in one loop, then one Parquet file."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    model, torch = _load(weights)
    paths, rows = sorted(str(p) for p in Path(folder).iterdir()), []
    for i in range(0, len(paths), SEGMENT["batch"]):
        batch = paths[i : i + SEGMENT["batch"]]
        images = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))) for p in batch]
        with torch.inference_mode():
            outs = model([im.permute(2, 0, 1).float() / 255 for im in images])
        rows += [{"path": p, "instances": _instances(o, torch)} for p, o in zip(batch, outs)]
    Path(output).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), f"{output}/part-0.parquet")


PEERS = {"hand-train": hand_train, "ray-recipe": ray_recipe, "plain-loop": plain_loop}


# ---------------------------------------------------------------- the data, the contenders' commands, the timing


def _timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command[:3])} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def _rates(name: str, unit: str, n: int, run) -> float:
    """Time ``run(n)`` and ``run(2n)``; print and return the steady-state rate."""
    one, two = run(n), run(2 * n)
    rate = n / (two - one)
    print(f"  {name:<36} {one:6.1f} s / {two:6.1f} s: {rate:6.2f} {unit}/s, start-up {one - n / rate:5.1f} s")
    return rate


def train(tmp: Path, steps: int, threads: int) -> None:
    from maskrcnn.synthetic import generate_split

    data = Path(generate_split(str(tmp / "shapes"), 2 * steps * TRAIN["batch"], seed=0)).parent
    ann, images = str(data / "annotations.json"), str(data / "images")
    flags = (
        f"--arch {SMALL} --num-workers 1 --cpus-per-worker {threads} --batch-size {TRAIN['batch']} "
        f"--scales {TRAIN['size']} --max-size {TRAIN['max_size']} --lr {TRAIN['lr']} --warmup-steps 1 --epochs 1 "
        "--log-every 1000"
    ).split()

    def project(s: int) -> float:
        run = ["--storage", str(tmp / "runs"), "--name", f"steps{s}", "--max-steps", str(s)]
        return _timed(
            [sys.executable, "jobs/train.py", "--train-annotations", ann, "--train-images", images, *flags, *run]
        )

    def hand(s: int) -> float:
        return _timed([sys.executable, __file__, "hand-train", ann, images, str(s), str(threads)])

    shape = f"{SMALL}, {TRAIN['size']} px, batch {TRAIN['batch']}, {threads} torch threads each"
    print(f"training: {shape}; {steps} and {2 * steps} steps")
    ours = _rates("jobs/train.py (Ray Train, 1 worker)", "steps", steps, project)
    theirs = _rates("torchvision reference loop", "steps", steps, hand)
    print(f"  ratio {ours / theirs:.2f} (goal >= 1.0)")


def segment(tmp: Path, count: int) -> None:
    weights = _model(tmp / "model.pt")
    photos = sorted((SHARED / "coco_small" / "images").iterdir())
    for n in (count, 2 * count):
        folder = tmp / f"photos{n}"
        folder.mkdir()
        for i in range(n):
            shutil.copy(photos[i % len(photos)], folder / f"{i:05d}.jpg")
    job = "jobs/segment_bucket.py --model {m} --batch-size {b} --score-threshold {t} --max-detections {d}".format(
        m=weights, b=SEGMENT["batch"], t=SEGMENT["threshold"], d=SEGMENT["masks"]
    )
    contenders = {  # name -> command, with {i} and {o} the input folder and the output
        "jobs/segment_bucket.py": [*job.split(), "--input", "{i}", "--output", "{o}"],
        "Ray Data's recipe": [__file__, "ray-recipe", "{i}", weights, "{o}"],
        "a plain loop without Ray": [__file__, "plain-loop", "{i}", weights, "{o}"],
    }
    print(f"segmentation: {SMALL}, {SEGMENT['size']} px, batch {SEGMENT['batch']}; {count} and {2 * count} photos")
    rates, masks = {}, {}
    for k, (name, command) in enumerate(contenders.items()):

        def run(n: int, k=k, command=command) -> float:
            out = tmp / f"out{k}-{n}"
            return _timed([sys.executable, *(a.format(i=tmp / f"photos{n}", o=out) for a in command)])

        rates[name] = _rates(name, "images", count, run)
        masks[name] = _masks(tmp / f"out{k}-{2 * count}")
    ours, recipe, plain = rates.values()
    print(f"  ratio over Ray Data's recipe {ours / recipe:.2f}; over the plain loop {ours / plain:.2f} (goal >= 0.9)")
    print("  masks an image: " + ", ".join(f"{name} {m:.1f}" for name, m in masks.items()))


def _masks(output: Path) -> float:
    """Mean instances an image in a contender's Parquet output."""
    import pyarrow.parquet as pq

    table = pq.read_table(output, columns=["instances"])
    counts = [len(json.loads(x)) if isinstance(x, str) else len(x) for x in table.column("instances").to_pylist()]
    return sum(counts) / len(counts)


def _model(path: Path) -> str:
    """The small model with random weights whose class scores are biased to the first class,
    so that every image gets its 10 masks above the threshold."""
    import torch

    from maskrcnn import checkpoint
    from maskrcnn.model import build_model

    torch.manual_seed(0)
    kwargs = {"num_classes": 4, "min_size": SEGMENT["size"], "max_size": int(SEGMENT["size"] * 1.667)}
    model = build_model(SMALL, **kwargs)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([-5.0, 5.0, -5.0, -5.0]))
    ckpt = checkpoint.make(
        model, arch=SMALL, arch_kwargs=kwargs, classes=["a", "b", "c"], category_ids=[1, 2, 3], step=0, epoch=0
    )
    checkpoint.save(str(path), ckpt)
    return str(path)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in PEERS:
        peer, *rest = sys.argv[1:]
        PEERS[peer](*[int(a) if a.isdigit() else a for a in rest])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", type=int, default=100, help="N for training (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each trainer (default: %(default)s)")
    p.add_argument("--segment-images", type=int, default=160, help="N for segmentation (default: %(default)s)")
    p.add_argument("--skip", default="", help="train and/or segment")
    args = p.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as tmp:
        if "train" not in args.skip:
            train(Path(tmp), args.train_steps, args.threads)
        if "segment" not in args.skip:
            segment(Path(tmp), args.segment_images)


if __name__ == "__main__":
    main()
