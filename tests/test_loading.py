"""The training dataset: what Ray Train's processes import to unpickle it, and what its tasks load."""

from __future__ import annotations

import uuid

import pytest

from maskrcnn import convert, labels
from maskrcnn.train import TrainConfig, prepare, training_data


@pytest.fixture
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("source", ["coco", "parquet"])
def test_the_training_dataset_unpickles_without_torch_and_loads_resized_examples(source, ray_local, shapes, tmp_path):
    """Ray Train's controller, dataset manager and split coordinator each unpickle the
    dataset; a map function of a module that imports torch would cost each of them seconds."""
    ray = ray_local
    train = shapes / "train"
    annotations = str(train / "annotations.json")
    if source == "parquet":
        labels_dir = str(tmp_path / "labels")
        convert.run(convert.ConvertConfig(annotations=annotations, images=str(train / "images"), output=labels_dir))
        cfg = TrainConfig(train_annotations=labels_dir, storage=str(tmp_path / "runs"), name="t", scales=(96,))
    else:
        cfg = TrainConfig(
            train_annotations=annotations,
            train_images=str(train / "images"),
            storage=str(tmp_path / "runs"),
            name="t",
            scales=(96,),
        )
    train_set = prepare(cfg)[0]
    if train_set.sources:  # as train.count does
        train_set.cleaned = labels.clean(train_set.sources, train_set.rules, train_set.records)
    dataset = training_data(cfg, train_set)

    # A fresh worker (its own runtime environment), as Ray Train's processes are.
    @ray.remote(runtime_env={"env_vars": {"MASKRCNN_TEST_WORKER": uuid.uuid4().hex}})
    def unpickled(ds) -> tuple[bool, str]:
        import sys

        return "torch" in sys.modules, type(ds).__name__

    assert ray.get(unpickled.remote(dataset)) == (False, "Dataset")
    rows = dataset.take_all()
    assert len(rows) == 32 and not any(r["error"] for r in rows)
    assert all(min(r["image"].shape[1:]) == 96 for r in rows)
