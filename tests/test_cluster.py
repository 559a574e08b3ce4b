"""The cluster configs in cluster/: they parse, Ray accepts the launcher config, the
KubeRay manifests name entrypoints and flags the jobs really have, and the runtime_env
package built from this repository stays far under Ray's size limit."""

from __future__ import annotations

import copy
import re
import shlex
import zipfile

import pytest
import yaml

from tests.helpers import REPO, check_command

CLUSTER = REPO / "cluster"
RAYJOBS = sorted((CLUSTER / "kuberay").glob("rayjob-*.yaml"))
MUST_EXCLUDE = {".git", ".venv", "data", "runs"}


def test_every_yaml_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def _launcher() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def test_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_launcher())
    validate_config(config)  # what `ray up` runs before touching AWS
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert (nodes["gpu_workers"]["min_workers"], nodes["gpu_workers"]["max_workers"]) == (0, 8)
    assert nodes["cpu_workers"]["resources"]["decode_node"] > 0
    for node in nodes.values():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    assert any("constraints.txt" in c for c in config["setup_commands"])

    broken = copy.deepcopy(_launcher())
    broken["available_node_types"]["gpu_workers"]["max_wrokers"] = 8
    with pytest.raises(Exception, match="max_wrokers"):
        validate_config(prepare_config(broken))  # the validation is real: a typo fails it


def test_launcher_never_opens_the_dashboard_or_gcs_to_the_internet():
    config = _launcher()
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        world = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
        assert not (world and rule.get("FromPort", 0) <= 8265 <= rule.get("ToPort", 65535)), rule
        assert not (world and rule.get("FromPort", 0) <= 6379 <= rule.get("ToPort", 65535)), rule


def _manifest(name: str) -> dict:
    return yaml.safe_load((CLUSTER / "kuberay" / name).read_text())


def test_raycluster_has_gpu_and_cpu_groups_with_requests_and_limits():
    spec = _manifest("raycluster.yaml")["spec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu-workers", "cpu-workers"}
    gpu = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1" and groups["gpu-workers"]["minReplicas"] == 0
    assert "gpu_node" in groups["gpu-workers"]["rayStartParams"]["resources"]
    assert "decode_node" in groups["cpu-workers"]["rayStartParams"]["resources"]
    for container in [spec["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in groups.values()
    ]:
        assert container["resources"]["requests"] and container["resources"]["limits"]
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_entrypoints_name_real_scripts_and_flags(path):
    job = yaml.safe_load(path.read_text())
    assert job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == _manifest("raycluster.yaml")["metadata"]["name"]
    check_command(shlex.split(job["spec"]["entrypoint"]))  # as the submitter's shell splits it


def test_both_jobs_have_a_rayjob():
    scripts = {shlex.split(yaml.safe_load(p.read_text())["spec"]["entrypoint"])[1] for p in RAYJOBS}
    assert scripts == {"jobs/train.py", "jobs/segment_bucket.py"}
    train = shlex.split(_manifest("rayjob-train.yaml")["spec"]["entrypoint"])
    assert train[train.index("--storage") + 1].startswith("s3://")


def _runtime_envs() -> dict[str, dict]:
    envs = {"runtime_env.yaml": yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())}
    for path in RAYJOBS:
        envs[path.name] = yaml.safe_load(yaml.safe_load(path.read_text())["spec"]["runtimeEnvYAML"])
    return envs


@pytest.mark.parametrize("name", ["runtime_env.yaml", *(p.name for p in RAYJOBS)])
def test_runtime_env_package_excludes_history_envs_and_data_and_stays_small(name, tmp_path):
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package

    env = _runtime_envs()[name]
    assert MUST_EXCLUDE <= set(env["excludes"]), env["excludes"]
    # Package this checkout (which has .git, .venv and maybe demo output) with Ray's own
    # packaging code and the config's excludes, without .gitignore's help.
    package = tmp_path / "pkg.zip"
    create_package(str(REPO), package, include_gitignore=False, excludes=env["excludes"])
    names = zipfile.ZipFile(package).namelist()
    assert "jobs/segment_bucket.py" in names and "maskrcnn/segment.py" in names
    assert not [n for n in names if re.match(r"(\.git|\.venv|data|runs)/", n)]
    size = package.stat().st_size
    assert size < 5 * 2**20 < GCS_STORAGE_MAX_SIZE, f"{size} bytes"


def test_every_copy_of_the_excludes_is_the_runtime_env_list():
    """runtime_env.yaml holds the one list; the other formats cannot include it, so they copy it."""
    source = _runtime_envs()["runtime_env.yaml"]["excludes"]
    copies = {
        ".dockerignore": [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()],
        "aws.yaml rsync_exclude": _launcher()["rsync_exclude"],
        **{name: env["excludes"] for name, env in _runtime_envs().items() if name != "runtime_env.yaml"},
    }
    assert len(copies) == 4
    for name, copy_ in copies.items():
        assert copy_ == source, f"{name} differs from cluster/runtime_env.yaml's excludes"
