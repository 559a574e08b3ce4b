"""The cluster configs in cluster/: they parse, Ray accepts the launcher config, the
KubeRay manifests name entrypoints and flags the jobs really have, every node type sizes
/dev/shm and its object store, GPU nodes have several GPUs and a driver that runs the
pinned torch, the images' CUDA is that torch's, and the runtime_env package built from
this repository stays far under Ray's size limit."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import re
import shlex
import zipfile

import pytest
import yaml

from tests.helpers import REPO, check_command

CLUSTER = REPO / "cluster"
RAYJOBS = sorted((CLUSTER / "kuberay").glob("rayjob-*.yaml"))
MUST_EXCLUDE = {".git", ".venv", "data", "runs"}
GiB = 2**30
# EC2 instance types the launcher config may name: (vCPUs, memory GiB, GPUs), from AWS's
# instance type pages. A type not here fails the tests until it is added.
INSTANCE_TYPES = {
    "m6i.2xlarge": (8, 32, 0),
    "c6i.4xlarge": (16, 32, 0),
    "c6i.16xlarge": (64, 128, 0),
    "g5.2xlarge": (8, 32, 1),
    "g5.12xlarge": (48, 192, 4),
    "g5.24xlarge": (96, 384, 4),
    "g5.48xlarge": (192, 768, 8),
    "g6.12xlarge": (48, 192, 4),
    "g6.48xlarge": (192, 768, 8),
    "g6e.12xlarge": (48, 384, 4),
    "p4d.24xlarge": (96, 1152, 8),
    "p5.48xlarge": (192, 2048, 8),
}
# A CUDA 13 torch needs NVIDIA driver >= 580; CUDA 12 builds run on >= 525.
MIN_DRIVER = {12: 525, 13: 580}
RAY_IMAGE = re.compile(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-(?P<python>py\d+)-(?P<platform>cpu|gpu|cu\d+)$")


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
    assert nodes[config["head_node_type"]]["resources"]["CPU"] == 0
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
    assert gpu["limits"]["nvidia.com/gpu"] == gpu["requests"]["nvidia.com/gpu"]
    assert groups["gpu-workers"]["minReplicas"] == 0
    assert "gpu_node" in groups["gpu-workers"]["rayStartParams"]["resources"]
    assert "decode_node" in groups["cpu-workers"]["rayStartParams"]["resources"]
    for container in [spec["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in groups.values()
    ]:
        assert container["resources"]["requests"] and container["resources"]["limits"]
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"


def _quantity(size: str) -> int:
    """A Kubernetes quantity (16Gi, 4G, 1024) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]i?)?", str(size)).groups()
    scale = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    scale.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40})
    return int(number) * scale[unit]


def _docker_shm(options: list[str]) -> int:
    """The --shm-size in a list of docker run options, in bytes (Docker's k, m, g are binary)."""
    sizes = [m.groups() for o in options for m in [re.search(r"--shm-size[= ]+'?(\d+)([bkmg]?)", o)] if m]
    assert len(sizes) == 1, options
    number, unit = sizes[0]
    return int(number) * {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit]


def _launcher_node_run_options(config: dict, name: str) -> list[str]:
    """The docker run options a node type's container starts with, merged as Ray merges them:
    run_options plus head_run_options, or the node type's docker over the global one
    (StandardAutoscaler._get_node_specific_docker_config) plus worker_run_options."""
    docker = copy.deepcopy(config["docker"])
    if name == config["head_node_type"]:
        return docker.get("run_options", []) + docker.get("head_run_options", [])
    docker.update(config["available_node_types"][name].get("docker", {}))
    return docker.get("run_options", []) + docker.get("worker_run_options", [])


def _launcher_node_image(config: dict, name: str) -> str:
    docker = copy.deepcopy(config["docker"])
    if name == config["head_node_type"]:
        return docker.get("head_image", docker.get("image"))
    docker.update(config["available_node_types"][name].get("docker", {}))
    return docker.get("worker_image", docker.get("image"))


def test_every_launcher_node_type_sizes_shm_and_sets_an_object_store_that_fits(monkeypatch):
    from ray._private import ray_constants
    from ray._private.resource_and_label_spec import ResourceAndLabelSpec

    config = _launcher()
    assert not [o for o in config["docker"].get("run_options", []) if "--shm-size" in o], "size it per node type"
    for name, node in config["available_node_types"].items():
        memory = INSTANCE_TYPES[node["node_config"]["InstanceType"]][1] * GiB
        shm = _docker_shm(_launcher_node_run_options(config, name))
        store = node["resources"]["object_store_memory"]
        assert GiB <= store < shm <= memory // 2, (name, store, shm, memory)
        # The launcher hands a node type's resources to `ray start` in RAY_OVERRIDE_RESOURCES;
        # Ray takes object_store_memory from there as the node's object store size.
        monkeypatch.setenv(ray_constants.RESOURCES_ENVIRONMENT_VARIABLE, json.dumps(node["resources"]))
        _, _, _, object_store, _ = ResourceAndLabelSpec._merge_resources(ResourceAndLabelSpec._load_env_resources(), {})
        assert object_store == store, name


def _groups() -> dict[str, dict]:
    """The RayCluster's pod groups, head included, by name."""
    spec = _manifest("raycluster.yaml")["spec"]
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}


def test_every_raycluster_group_mounts_shm_as_memory_and_sets_an_object_store_that_fits():
    groups = _groups()
    assert {"head", "gpu-workers", "cpu-workers"} <= set(groups)
    for name, group in groups.items():
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert "/dev/shm" in mounts, f"{name} has no /dev/shm mount"
        volume = {v["name"]: v for v in pod.get("volumes", [])}[mounts["/dev/shm"]]
        assert volume["emptyDir"]["medium"] == "Memory", name
        shm = _quantity(volume["emptyDir"]["sizeLimit"])
        store = int(group["rayStartParams"]["object-store-memory"])
        limit = _quantity(container["resources"]["limits"]["memory"])
        # The memory emptyDir counts against the pod's limit, the object store lives in it.
        assert GiB <= store < shm <= limit // 2, (name, store, shm, limit)


def _ray_resources(group: dict) -> dict:
    """A group's rayStartParams resources: a JSON string quoted once more for the shell."""
    return json.loads(json.loads(group["rayStartParams"]["resources"]))


def _gpus_needed(argv: list[str]) -> int:
    """The GPUs a job's command line asks for at most."""
    flags = dict(zip(argv, argv[1:]))
    if argv[1] == "jobs/train.py":
        return int(flags["--num-workers"]) if "--gpu" in argv else 0
    return math.ceil(int(flags["--actors"].split(",")[-1]) * float(flags.get("--gpus-per-actor", 0)))


def test_gpu_nodes_have_several_gpus_and_a_driver_that_runs_the_pinned_torch():
    """Fewer, larger GPU nodes: DDP's per-step all-reduce (~176 MB of fp32 gradients) stays on
    PCIe/NVLink inside a node instead of TCP between nodes."""
    from ray.autoscaler._private.aws.config import DEFAULT_AMI

    cuda_major = _torch_cuda()[0]
    jobs = [shlex.split(yaml.safe_load(p.read_text())["spec"]["entrypoint"]) for p in RAYJOBS]
    needed = max(_gpus_needed(argv) for argv in jobs)
    assert needed >= 8

    config = _launcher()
    gpu_types = {
        n: t for n, t in config["available_node_types"].items() if INSTANCE_TYPES[t["node_config"]["InstanceType"]][2]
    }
    assert set(gpu_types) == {"gpu_workers"}
    for name, node in gpu_types.items():
        gpus = INSTANCE_TYPES[node["node_config"]["InstanceType"]][2]
        assert gpus >= 4, f"{name}: {gpus} GPU(s) a node"
        assert node["resources"]["gpu_node"] == gpus  # one unit a GPU, as decode_node is one a CPU
        assert node["max_workers"] * gpus >= needed
        # Ray's default AMI (a CUDA 11.2 Deep Learning AMI) has a driver far below 580: name one.
        image = node["node_config"].get("ImageId", "")
        assert image and image not in DEFAULT_AMI.values() and image.lower() != "latest_dlami", image
        assert "--gpus all" in _launcher_node_run_options(config, name)

    groups = _groups()
    gpu_groups = {
        n: g
        for n, g in groups.items()
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    }
    assert set(gpu_groups) == {"gpu-workers"}
    for name, group in gpu_groups.items():
        pod = group["template"]["spec"]
        gpus = int(pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus >= 4, f"{name}: {gpus} GPU(s) a pod"
        assert int(group["rayStartParams"].get("num-gpus", gpus)) == gpus
        assert _ray_resources(group)["gpu_node"] == gpus
        assert group["maxReplicas"] * gpus >= needed
        # The pod lands only on nodes whose driver (GPU Feature Discovery's label) runs CUDA 13.
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        for term in terms:
            driver = [e for e in term["matchExpressions"] if e["key"] == "nvidia.com/cuda.driver-version.major"]
            assert driver and driver[0]["operator"] == "Gt", term
            assert int(driver[0]["values"][0]) + 1 >= MIN_DRIVER[cuda_major], driver


def _pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return {
        n.strip().lower(): v.strip()
        for n, v in (ln.split("==", 1) for ln in lines if "==" in ln and not ln.startswith("#"))
    }


def _torch_cuda() -> tuple[int, int]:
    """The CUDA (major, minor) of the torch pinned in constraints.txt: that of the CUDA runtime
    wheels its CUDA builds pull in (cuda-toolkit from CUDA 13, nvidia-cuda-runtime-cu12 before)."""
    pins = _pins()
    assert "torch" in pins
    runtime = pins.get("cuda-toolkit") or next(
        v for n, v in pins.items() if re.fullmatch(r"nvidia-cuda-runtime(-cu\d+)?", n)
    )
    major, minor = runtime.split(".")[:2]
    return int(major), int(minor)


def _dockerfile_base() -> str:
    froms = re.findall(r"^FROM\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), flags=re.M)
    assert len(froms) == 1, froms
    return froms[0]


def test_the_images_cuda_is_the_cuda_of_the_pinned_torch():
    major, minor = _torch_cuda()
    cuda = f"cu{major}{minor}"  # as Ray's image tags name it
    # The installed torch, where it is the pinned one, pulls in the same CUDA runtime.
    pins = _pins()
    if importlib.metadata.version("torch") == pins["torch"]:
        requires = importlib.metadata.requires("torch") or []
        runtime = [r for r in requires if re.match(r"(cuda-toolkit|nvidia-cuda-runtime)\b", r)]
        assert runtime and all(f"=={major}.{minor}." in r for r in runtime), runtime

    config = _launcher()
    images = {"Dockerfile": _dockerfile_base()}
    images.update({f"aws.yaml {n}": _launcher_node_image(config, n) for n in config["available_node_types"]})
    tags = {}
    for where, image in images.items():
        match = RAY_IMAGE.fullmatch(image)
        assert match, f"{where}: {image} is not a rayproject/ray version-python-platform tag"
        tags[where] = match.groupdict()
        # -gpu is an alias whose CUDA Ray chooses (CUDA 12.1 for Ray 2.x): name the CUDA.
        assert tags[where]["platform"] != "gpu", f"{where}: {image}"
        assert tags[where]["platform"] in ("cpu", cuda), f"{where}: {image} is not {cuda}, the pinned torch's CUDA"
        assert tags[where]["ray"] == pins["ray"], f"{where}: {image} is not Ray {pins['ray']}"
    assert tags["Dockerfile"]["platform"] == cuda
    assert tags["aws.yaml gpu_workers"]["platform"] == cuda
    assert len({t["python"] for t in tags.values()}) == 1, tags
    assert _manifest("raycluster.yaml")["spec"]["rayVersion"] == pins["ray"]


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
