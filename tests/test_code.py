"""The codebase stays readable in an afternoon: no module over 400 lines, no function over
60, and ruff's lint and format hold (``make lint`` runs the same before the tests)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

SOURCES = sorted(p for d in ("maskrcnn", "jobs", "scripts", "benchmarks", "tests") for p in (REPO / d).glob("*.py"))
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_modules_and_functions_stay_short(path: Path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path.name} is over {MAX_MODULE_LINES} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name} is {length} lines"


def test_ruff_check_and_format_pass():
    ruff = [sys.executable, "-m", "ruff"]
    for args in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run([*ruff, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def _imports(path: Path) -> set[str]:
    """The ``maskrcnn`` modules a module imports, anywhere in it (functions and
    ``TYPE_CHECKING`` blocks included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("maskrcnn"):
            found.add(node.module)
            found.update(f"maskrcnn.{a.name}" for a in node.names if node.module == "maskrcnn")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("maskrcnn."))
    return found


def test_no_import_circle_in_the_library():
    graph = {f"maskrcnn.{p.stem}": _imports(p) for p in (REPO / "maskrcnn").glob("*.py")}

    def circle(start: str, node: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return [*path, nxt]
            if nxt not in path and (found := circle(start, nxt, [*path, nxt])):
                return found
        return None

    for module in sorted(graph):
        assert circle(module, module, [module]) is None, " -> ".join(circle(module, module, [module]))


def test_one_flag_system_and_one_actor_pool():
    """Every job's flags come from config dataclasses (maskrcnn/cli.py), and inference on Ray
    runs on Ray Data's actor pool (maskrcnn/inference.py), nowhere by hand."""
    for path in (REPO / "jobs").glob("*.py"):
        text = path.read_text()
        assert "add_argument(" not in text and "ArgumentParser(" not in text, path.name
    for path in (REPO / "maskrcnn").glob("*.py"):
        assert "ActorPool(" not in path.read_text().replace("ActorPoolStrategy(", ""), path.name


# Names that meant two things, renamed (issue 36), and where the old meaning went. None of
# them may come back in that place; old flag names keep working through ``was=``.
RENAMED = [
    ("maskrcnn/labelling.py", "", "prelabels.py (Label Studio and CVAT files): labels.py is Parquet labels"),
    ("maskrcnn/data.py", "class CocoDataset", "coco.CocoIndex, the indexed file (export.CocoDataset writes one)"),
    ("maskrcnn/segment.py", "log_every", "--progress-seconds: --log-every counts training steps"),
    ("maskrcnn/export.py", "def job_record", "output.read_job: an output is read and described in output.py"),
    ("maskrcnn/segment.py", "def job_record", "output.job_record, beside output.read_job"),
    ("maskrcnn/prelabels.py", "def image_uri", "coco.image_uri: what comes back is read in coco.py"),
    (
        "maskrcnn/keypoints.py",
        "class RandomHorizontalFlip",
        "transforms.RandomHorizontalFlip: keypoints.py has no torch",
    ),
    ("maskrcnn/checkpoint.py", "def init_model", "model.init_model: checkpoint.py is the file format on top"),
    ("maskrcnn/checkpoint.py", "def read(", "weights.read: sources and state dicts are read in weights.py"),
    ("maskrcnn/model.py", "def is_path", "weights.is_path: model.py builds modules, weights.py finds sources"),
    ("maskrcnn/model.py", "def torchvision_weights", "weights.torchvision_weights"),
    ("maskrcnn/checkpoint.py", "def load_safely", "weights.load_safely"),
    ("maskrcnn/checkpoint.py", "def initial_weights", "model.initial_weights"),
    ("maskrcnn/export.py", "def to_results", "metric.to_results: the COCO metric owns the results format"),
    ("maskrcnn/incremental.py", "def runs(", "output.runs: an output's files are named in output.py"),
    ("maskrcnn/labels.py", "def _ground_truth_uris", "output.ground_truth_uris"),
    ("maskrcnn/metric.py", "def evaluate(", "metric.score: evaluate is the job (maskrcnn/evaluate.py)"),
    ("maskrcnn/metric.py", "def iou_types", "model.iou_types: what an architecture predicts; metric.py has no torch"),
]


@pytest.mark.parametrize("path, name, now", RENAMED, ids=[f"{p}:{n}" for p, n, _ in RENAMED])
def test_renamed_names_do_not_come_back(path: str, name: str, now: str):
    """``name`` "" stands for the whole module: it must not exist again."""
    if not name:
        assert not (REPO / path).exists(), f"{path} is back; it is {now}"
    else:
        assert name not in (REPO / path).read_text(), f"{path} has {name!r} again; it is {now}"


def test_a_flag_means_one_thing_in_every_job():
    """A flag that two jobs share takes the same kind of value in both: ``--log-every`` once
    counted steps in training and seconds in segmentation (now ``--progress-seconds``)."""
    from maskrcnn.cli import load_parser

    seen: dict[str, tuple[str, object]] = {}
    for job in sorted((REPO / "jobs").glob("*.py")):
        for action in load_parser(str(job))._actions:
            for flag in (f for f in action.option_strings if f.startswith("--") and action.help != "==SUPPRESS=="):
                first = seen.setdefault(flag, (job.name, action.type))
                assert first[1] == action.type, f"{flag}: {first[0]} takes {first[1]}, {job.name} {action.type}"


def test_library_modules_declare_configs_without_the_command_line():
    """maskrcnn/ takes config dataclasses (maskrcnn/config.py declares their fields); only the
    jobs and scripts parse a command line (maskrcnn/cli.py)."""
    for path in (REPO / "maskrcnn").glob("*.py"):
        if path.name != "cli.py":
            assert "maskrcnn.cli" not in _imports(path), f"{path.name} imports maskrcnn.cli"


def test_loading_a_model_reads_top_down():
    """Source and state dict (weights.py), then module (model.py), then the checkpoint file
    (checkpoint.py): each layer imports only the ones below it, so loading never crosses back."""
    layers = ["maskrcnn.weights", "maskrcnn.model", "maskrcnn.checkpoint"]
    for i, name in enumerate(layers):
        above = set(layers[i + 1 :])
        path = REPO / "maskrcnn" / f"{name.split('.')[1]}.py"
        assert not _imports(path) & above, f"{path.name} imports {sorted(_imports(path) & above)}"


def _library_references(path: Path) -> list[tuple[str, str, int]]:
    """``(module, name, line)`` for each ``from maskrcnn.m import name`` in ``path``, and each
    ``m.name`` where ``m`` is bound to a ``maskrcnn`` module by an import."""
    tree, found, bound = ast.parse(path.read_text()), [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("maskrcnn"):
            for alias in node.names:
                if node.module == "maskrcnn":
                    bound[alias.asname or alias.name] = f"maskrcnn.{alias.name}"
                else:
                    found.append((node.module, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            bound.update({a.asname: a.name for a in node.names if a.name.startswith("maskrcnn.") and a.asname})
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            found.append((bound[node.value.id], node.attr, node.lineno))
    return found


@pytest.mark.parametrize(
    "path", [p for p in SOURCES if p.parent.name in ("benchmarks", "scripts")], ids=lambda p: p.name
)
def test_benchmarks_and_scripts_use_names_the_library_has(path: Path):
    """No test runs the benchmarks; this catches one that still calls a moved or removed name."""
    import importlib

    for module, name, line in _library_references(path):
        assert hasattr(importlib.import_module(module), name), f"{path.name}:{line}: {module} has no {name}"


# Modules that the converter, Ray Data's CPU tasks and the COCO metric load: torch (about
# 700 MiB and 2 s a process) is not among what they import when loaded.
TORCH_FREE = ("coco", "keypoints", "metric", "loading", "convert", "output", "labels", "storage", "images", "masks")


def _loaded_on_import(path: Path) -> set[str]:
    """What importing ``path`` runs: its module-level imports (not those inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"maskrcnn.{a.name}" for a in node.names if node.module == "maskrcnn")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


@pytest.mark.parametrize("module", TORCH_FREE)
def test_modules_that_need_no_torch_do_not_load_it(module: str):
    seen, todo = set(), [f"maskrcnn.{module}"]
    while todo:
        name = todo.pop()
        seen.add(name)
        for imported in _loaded_on_import(REPO / "maskrcnn" / f"{name.split('.')[1]}.py"):
            assert imported.split(".")[0] not in ("torch", "torchvision"), f"{name} imports {imported}"
            if imported.startswith("maskrcnn.") and imported not in seen:
                todo.append(imported)
