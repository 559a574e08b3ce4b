"""The command line every job shares: flags built from a config dataclass, usage errors
for bad values and combinations, docs/flags.md's tables, and one-line errors with exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import pytest

from maskrcnn import cli, config
from maskrcnn.errors import UserError
from tests.helpers import REPO, assert_no_library_warnings, run_job


@dataclass(kw_only=True)
class _Config:
    """Jobs/x.py: a test job.

    Examples:
      python jobs/x.py --path p"""

    path: str = config.option("where to read", group="io")
    sizes: tuple[int, ...] | None = config.option(
        "shortest sides", None, group="io", default_text="800", type=config.ints
    )
    workers: int = config.option("workers", 2, group="run")
    gpu: bool = config.option("use a GPU", False, group="run")
    amp: bool = config.option("disable AMP", True, group="run", flag="--no-amp")
    ratio: float = config.option("a fraction; 0 disables", 0.0, group="run")

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")


def _parser() -> argparse.ArgumentParser:
    return cli.add_options(cli.job_parser("jobs/x.py", _Config.__doc__), _Config)


def test_the_parser_and_the_config_come_from_one_declaration():
    cfg = cli.parse_config(_parser(), _Config, ["--path", "p", "--sizes", "640,800", "--gpu", "--no-amp"])
    assert cfg == _Config(path="p", sizes=(640, 800), workers=2, gpu=True, amp=False, ratio=0.0)
    assert cli.parse_config(_parser(), _Config, ["--path", "p"]) == _Config(path="p")
    declared = {f.name for f in dataclasses.fields(_Config)}
    assert {a.dest for a in _parser()._actions} - {"help"} == declared
    groups = [g.title for g in _parser()._action_groups]
    assert groups[-2:] == ["io", "run"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sizes", "a,b"], "--sizes: expected comma-separated integers, got 'a,b'"),
        (["--workers", "0"], "--workers must be at least 1, got 0"),
        ([], "the following arguments are required: --path"),
    ],
)
def test_bad_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_config(_parser(), _Config, ["--path", "p", *argv] if argv else [])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_help_gives_every_default_once():
    text = _parser().format_help()
    assert "workers (default: 2)" in text and "(default: 0.0)" in text
    assert "shortest sides (default: 800)" in text and text.count("default: 800") == 1
    assert "use a GPU (default" not in text and "disable AMP (default" not in text


def test_a_default_is_declared_never_written_into_the_help():
    with pytest.raises(TypeError, match="declare the default"):
        config.option("shortest sides (default: 800)", None, group="io")


def test_the_flag_table_is_the_help():
    table = cli.flag_table(_parser()).splitlines()
    assert table[:2] == ["| flag | default | meaning |", "|---|---|---|"]
    assert "| `--path` | required | where to read |" in table
    assert "| `--sizes` | 800 | shortest sides |" in table
    assert "| `--workers` | 2 | workers |" in table
    assert "| `--no-amp` | off | disable AMP |" in table


@dataclass(kw_only=True)
class _Shared:
    actors: tuple[int, int] = config.option(
        "actors", (1, 1), group="pool", type=config.pool_size, was={"--workers": None}
    )
    gpus: float = config.option("GPUs per actor", 0.0, group="pool", was={"--gpu": 1.0})
    threshold: float = config.option("score threshold", 0.5, group="pool")


@dataclass(kw_only=True)
class _Job:
    path: str = config.option("where to read", group="io")
    pool: _Shared = config.embed(_Shared, threshold=0.05)


def test_shared_options_are_declared_once_and_embedded_with_the_jobs_defaults(capsys):
    parser = cli.add_options(cli.job_parser("jobs/x.py", _Config.__doc__), _Job)
    assert cli.parse_config(parser, _Job, ["--path", "p"]) == _Job(path="p", pool=_Shared(threshold=0.05))
    cfg = cli.parse_config(parser, _Job, ["--path", "p", "--actors", "1,4", "--threshold", "0.3"])
    assert cfg.pool == _Shared(actors=(1, 4), threshold=0.3)
    assert "score threshold (default: 0.05)" in parser.format_help()
    assert [g.title for g in parser._action_groups].count("pool") == 1
    assert capsys.readouterr().err == ""


def test_an_old_flag_name_still_works_and_says_the_new_one(capsys):
    parser = cli.add_options(cli.job_parser("jobs/x.py", _Config.__doc__), _Job)
    cfg = cli.parse_config(parser, _Job, ["--path", "p", "--workers", "2", "--gpu"])
    assert cfg.pool.actors == (2, 2) and cfg.pool.gpus == 1.0
    assert capsys.readouterr().err.splitlines() == [
        "warning: --workers is now --actors",
        "warning: --gpu is now --gpus 1.0",
    ]
    assert "--workers" not in parser.format_help() and "--workers" not in cli.flag_table(parser)


@pytest.mark.parametrize(
    "parse, text, expected",
    [
        (config.pool_size, "4", (4, 4)),
        (config.pool_size, "1,16", (1, 16)),
        (config.extensions, "JPG, .png", (".jpg", ".png")),
        (config.extensions, "*", None),
        (config.names, "person, dog ,", ["person", "dog"]),
        (config.resources, '{"gpu_node": 1}', {"gpu_node": 1.0}),
        (config.floats, "0.026,0.1", (0.026, 0.1)),
    ],
)
def test_flag_values_parse(parse, text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize(
    "parse, text",
    [
        (config.pool_size, "3,1"),
        (config.pool_size, "0"),
        (config.resources, "[1]"),
        (config.resources, "{"),
        (config.floats, "0.1,x"),
        (config.floats, "0.1,0"),
    ],
)
def test_bad_flag_values_say_what_was_expected(parse, text):
    with pytest.raises(argparse.ArgumentTypeError, match=f"expected .*, got {re.escape(repr(text))}$"):
        parse(text)


class _Wrapped(Exception):
    def __init__(self, cause: BaseException):
        super().__init__("the wrapper's own text")
        self.cause = cause


def _wrapped_by_ray(raised: BaseException) -> Callable[[], None]:
    def main() -> None:
        try:
            raise raised
        except Exception as err:
            raise RuntimeError("wrapped by Ray") from err

    return main


@pytest.mark.parametrize(
    "raised, line",
    [
        (UserError("cannot read s3://b/x: no such file"), "error: cannot read s3://b/x: no such file"),
        (_Wrapped(ValueError("bad --classes\nsecond line")), "error: bad --classes"),
    ],
)
def test_run_main_prints_an_expected_errors_root_cause_on_one_line(raised, line, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(_wrapped_by_ray(raised))
    assert exit_.value.code == 2 and capsys.readouterr().err == line + "\n"


def test_run_main_prints_a_defects_one_line_then_its_traceback(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(_wrapped_by_ray(_Wrapped(KeyError("x"))))
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert err.splitlines()[0] == "error: KeyError: 'x'"
    assert "Traceback (most recent call last)" in err and "RuntimeError: wrapped by Ray" in err
    assert "raise raised" in err  # the frame that raised it


@pytest.mark.parametrize("cause, code", [(UserError("the listing changed"), 2), (KeyError("x"), 1)])
def test_an_error_in_a_ray_task_is_reported_as_its_cause_is(cause, code, capsys):
    """A RayTaskError carries the task's exception and its remote traceback: a user's error
    is one line; a defect's report shows the frame in the task that raised it."""
    from ray.exceptions import RayTaskError

    remote = 'Traceback (most recent call last):\n  File "/w/maskrcnn/inference.py", line 9, in fetch_and_decode\n'

    def main() -> None:
        raise RayTaskError("fetch_and_decode", remote + repr(cause), cause).as_instanceof_cause()

    with pytest.raises(SystemExit) as exit_:
        cli.run_main(main)
    err = capsys.readouterr().err
    assert exit_.value.code == code
    if code == 2:
        assert err == "error: the listing changed\n"
    else:
        assert err.startswith("error: KeyError: 'x'\nTraceback (most recent call last):\n")
        assert 'File "/w/maskrcnn/inference.py", line 9, in fetch_and_decode' in err


@pytest.mark.parametrize("cause, code", [("devices.DeviceError", 2), ("predictor.DeviceLost", 1)])
def test_an_error_in_an_actors_init_is_reported_as_its_cause_is(cause, code, capsys):
    """Ray keeps only the text of an exception an actor's __init__ raised: one of ours a user
    can fix (a GPU node that cannot start CUDA) is still one line; anything else, a report."""
    import importlib

    from ray.exceptions import ActorDiedError, RayTaskError

    module, name = cause.split(".")
    kind = getattr(importlib.import_module(f"maskrcnn.{module}"), name)
    remote = f"Traceback (most recent call last):\n  File ...\nmaskrcnn.{cause}: node n: no CUDA"

    def main() -> None:
        raise ActorDiedError(RayTaskError("__init__", remote, kind("node n: no CUDA")))

    with pytest.raises(SystemExit) as exit_:
        cli.run_main(main)
    err = capsys.readouterr().err
    assert exit_.value.code == code
    assert (err == "error: node n: no CUDA\n") == (code == 2), err


def test_a_jobs_defect_keeps_its_traceback(tmp_path):
    """A bug in a real job (here a KeyError from a dict lookup, patched into the conversion)
    is not reported as a user's error: its one line, then the traceback, exit status 1."""
    (tmp_path / "gt.json").write_text("{}")
    argv = ["jobs/coco_to_parquet.py", "--annotations", str(tmp_path / "gt.json"), "--images", str(tmp_path)]
    code = (
        "import runpy, sys\n"
        "import maskrcnn.convert\n"
        "def categories(uri):\n"
        "    return {}['x']\n"
        "maskrcnn.convert._categories = categories\n"
        f"sys.argv = {[*argv, '--output', str(tmp_path / 'out')]!r}\n"
        "runpy.run_path('jobs/coco_to_parquet.py', run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert lines[0] == "error: KeyError: 'x'" and lines[1] == "Traceback (most recent call last):"
    assert "in categories" in lines[-2] and lines[-1] == "KeyError: 'x'"  # the frame that raised it
    assert_no_library_warnings(done.stdout + done.stderr)


def test_a_bad_path_is_one_line_without_a_traceback(tmp_path):
    missing = tmp_path / "missing.json"
    done = run_job("coco_to_parquet.py", "--annotations", str(missing), "--images", ".", "--output", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr == f"error: annotation file not found: {missing}\n"


def test_reporting_an_error_imports_neither_torch_nor_ray():
    code = "import sys, maskrcnn.cli; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.stdout.strip() == "[]", result.stderr
