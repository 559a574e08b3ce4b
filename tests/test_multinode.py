"""The segmentation job on a simulated multi-node cluster (Ray's own ``cluster_utils``):
decoding lands on the CPU node, inference on the "gpu"-labelled node, and losing the
inference node mid-job still leaves every image in the output exactly once; and the
README's `ray job submit --runtime-env cluster/runtime_env.yaml` to a real local head."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import pytest

from tests.helpers import MARKER, REPO, free_port, kill_marked, small_model_file, token_auth

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_port": free_port()}
    )
    yield c
    ray.shutdown()
    c.shutdown()


def _parts(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet")) if out.exists() else []


def _placement(address: str) -> tuple[set[str], set[str], int]:
    """Node ids that ran decode tasks and inference actors, and the actors' restart count."""
    import ray
    from ray.util.state import list_actors, list_tasks

    ray.init(address=address)
    tasks = list_tasks(filters=[("name", "=", "MapBatches(fetch_and_decode)")], detail=True, limit=10_000)
    actors = [a for a in list_actors(detail=True, limit=10_000) if "InferenceActor" in (a.class_name or "")]
    return (
        {t.node_id for t in tasks if t.node_id},
        {a.node_id for a in actors if a.node_id},
        sum(a.num_restarts for a in actors),
    )


def test_stages_land_on_their_node_groups_and_a_lost_gpu_node_loses_no_image(cluster, shared_data, tmp_path):
    cpu_node = cluster.add_node(num_cpus=2, resources={"decode_node": 2})
    gpu_node = cluster.add_node(num_cpus=1, resources={"gpu_node": 1})
    cluster.wait_for_nodes()
    archive, out = tmp_path / "archive", tmp_path / "out"
    archive.mkdir()
    for src in sorted((shared_data / "coco_small" / "images").iterdir())[:40]:
        shutil.copy(src, archive / src.name)
    args = [
        "--input",
        str(archive),
        "--output",
        str(out),
        "--model",
        small_model_file(tmp_path / "m.pt", min_size=128, max_size=192),
        "--rows-per-file",
        "4",
        "--batch-size",
        "2",
        "--score-threshold",
        "0.3",
        "--progress-seconds",
        "2",
        "--actor-resources",
        '{"gpu_node": 1}',
        "--decode-resources",
        '{"decode_node": 1}',
    ]
    env = dict(os.environ, RAY_ADDRESS=cluster.address)
    job = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "segment_bucket.py"), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while len(_parts(out)) < 2:  # mid-job: some part files written, most not
        assert job.poll() is None and time.time() < deadline, job.communicate()[0][-3000:]
        time.sleep(0.2)
    cluster.remove_node(gpu_node, allow_graceful=False)  # the inference node dies (a lost spot instance)
    assert len(_parts(out)) < 10
    replacement = cluster.add_node(num_cpus=1, resources={"gpu_node": 1})  # the autoscaler replaces it
    log, _ = job.communicate(timeout=400)
    assert job.returncode == 0, log[-3000:]

    table = pq.read_table(out)
    uris = table.column("uri").to_pylist()
    assert len(uris) == len(set(uris)) == 40 and set(uris) == {str(p) for p in archive.iterdir()}
    assert len(_parts(out)) == 10 and (out / "_SUCCESS").exists()
    for part in _parts(out):
        assert pq.read_metadata(part).num_rows == 4

    decode_nodes, actor_nodes, restarts = _placement(cluster.address)
    assert decode_nodes == {cpu_node.node_id}
    assert actor_nodes <= {gpu_node.node_id, replacement.node_id} and replacement.node_id in actor_nodes
    assert restarts >= 1


@contextlib.contextmanager
def _ray_head(ray: str, env: dict[str, str]) -> Iterator[int]:
    """``ray start --head`` on loopback; yields the dashboard port, and kills the head after.

    Not ``ray stop``, which stops every Ray on the machine (another test's too); every
    process of this head inherits a marker variable, and :func:`kill_marked` finds them by it.
    The head's address file goes too, as ``ray stop`` removes it: Ray's own processes in
    later jobs (Ray Train's placement-group cleaner) would otherwise look for this head."""
    from ray._common.utils import reset_ray_address

    marker = uuid.uuid4().hex
    env = dict(env, **{MARKER: marker})
    port, dashboard = free_port(), free_port()
    started = subprocess.run(
        [
            ray,
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard),
            "--num-cpus",
            "4",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        yield dashboard
    finally:
        kill_marked(marker)
        reset_ray_address()


def test_real_ray_job_submit_to_a_local_head(shared_data, tmp_path):
    """`ray start --head` on loopback, then `ray job submit --runtime-env cluster/runtime_env.yaml`
    from the repository root, as in the README."""
    model_file = small_model_file(tmp_path / "small.pt")
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, **token_auth(), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    ray = str(bin_dir / "ray")
    with _ray_head(ray, env) as dashboard:
        out = tmp_path / "out"
        submitted = subprocess.run(
            [
                ray,
                "job",
                "submit",
                "--address",
                f"http://127.0.0.1:{dashboard}",
                "--submission-id",
                "seg-e2e",
                "--runtime-env",
                "cluster/runtime_env.yaml",
                "--",
                "python",
                "jobs/segment_bucket.py",
                "--input",
                str(shared_data / "photos"),
                "--output",
                str(out),
                "--model",
                model_file,
                "--score-threshold",
                "0.3",
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-3000:]
        status = subprocess.run(
            [ray, "job", "status", "--address", f"http://127.0.0.1:{dashboard}", "seg-e2e"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "Job 'seg-e2e' succeeded" in status.stdout + status.stderr  # how the CLI says SUCCEEDED
        df = pq.read_table(out).to_pandas()
        assert sorted(df.uri) == sorted(str(p) for p in (shared_data / "photos").iterdir()) and df.error.isna().all()
        assert (out / "_SUCCESS").exists()
