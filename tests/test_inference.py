import re
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest


@pytest.mark.slow
def test_device_faults_heal_every_image_once_with_no_error_row(coco_small, model_file, tmp_path):
    """Out of memory above 2 images a call and, once, a lost device context in one actor: the
    batches are split and the actor restarted, and the output holds every image exactly once,
    none of them an error row; the summary counts the splits and the restart."""
    import ray

    from maskrcnn import segment
    from maskrcnn.inference import InferenceOptions

    _, images = coco_small
    chosen = sorted(Path(images).iterdir())[:8]
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("".join(f"{p}\n" for p in chosen))
    marker = tmp_path / "lost-once"
    ray.init(
        address="local",
        num_cpus=3,
        include_dashboard=False,
        runtime_env={"worker_process_setup_hook": device_faults(str(marker))},
    )
    try:
        cfg = segment.SegmentConfig(
            input=str(manifest),
            output=str(tmp_path / "out"),
            model=model_file,
            inference=InferenceOptions(batch_size=4, score_threshold=0.05),
        )
        summary = segment.run(cfg)
    finally:
        ray.shutdown()
    assert marker.exists()  # the lost context did happen
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted(str(p) for p in chosen)
    assert [r["error"] for r in rows] == [None] * len(chosen)
    assert summary["errors"] == {} and summary["rows_out"] == len(chosen)
    assert summary["restarted_actors"] == 1
    assert summary["split_batches"] >= 2  # each batch of 4, and again for the one retried after the restart


@pytest.mark.slow
def test_an_actor_whose_node_cannot_start_cuda_stops_the_job_with_one_line(coco_small, model_file, tmp_path, capsys):
    """A node that offers a GPU (a logical one here) on which CUDA cannot start: the actor
    that reserved it fails at start, naming the node, instead of running on a CPU."""
    import ray

    from maskrcnn import segment
    from maskrcnn.cli import run_main
    from maskrcnn.inference import InferenceOptions

    _, images = coco_small
    manifest = tmp_path / "manifest.txt"
    manifest.write_text(f"{sorted(Path(images).iterdir())[0]}\n")
    ray.init(address="local", num_cpus=3, num_gpus=1, include_dashboard=False)
    try:
        cfg = segment.SegmentConfig(
            input=str(manifest),
            output=str(tmp_path / "out"),
            model=model_file,
            inference=InferenceOptions(gpus_per_actor=1.0),
        )
        with pytest.raises(SystemExit) as stopped:
            run_main(lambda: segment.run(cfg))
    finally:
        ray.shutdown()
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err[-3000:]
    assert re.search(r"^error: node \S+: the actor reserved 1 GPU but CUDA cannot start there", err, re.M), err[-3000:]
    assert "Traceback" not in err and not (tmp_path / "out" / "_SUCCESS").exists()


def device_faults(marker: str) -> Callable[[], None]:
    """A Ray ``worker_process_setup_hook`` that makes every :class:`~maskrcnn.predictor.Predictor`
    fail as a GPU would: out of memory above 2 images a call, and once (in the actor that
    creates ``marker`` first) a lost device context, as after an illegal memory access."""

    def hook() -> None:
        import os

        import torch

        from maskrcnn import predictor

        real = predictor.Predictor.predict

        def predict(self, images, sizes=None):
            if len(images) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return real(self, images, sizes)
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered (injected)")

        predictor.Predictor.predict = predict

    return hook
