"""The command line, the same for every job: flags declared once, as config fields; an error
the user can fix as one line naming the problem (exit status 2), a defect with its traceback
(exit status 1).

A job's config is a dataclass whose fields are made by :func:`maskrcnn.config.option`: the
field's type, default and help text are the flag's, so :func:`add_options` builds the parser
from the dataclass and :func:`parse_config` builds the dataclass from the parsed flags. Nothing is
written twice: --help and docs/flags.md's tables (:func:`flag_table`) show the
declared defaults (:func:`default_shown`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import traceback
import types
import typing
from typing import Any, Callable

from maskrcnn.config import REQUIRED
from maskrcnn.errors import EXPECTED, root_cause


def add_options(
    parser: argparse.ArgumentParser, config: type, defaults: dict[str, Any] | None = None
) -> argparse.ArgumentParser:
    """Add a flag for every :func:`option` field of the dataclass ``config`` (and of the
    options it :func:`embed`s), in field order, in argument groups by the fields' ``group``."""
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        meta = field.metadata
        if "options" in meta:
            add_options(parser, meta["options"], meta["defaults"])
            continue
        if "help" not in meta:
            continue
        group = next((g for g in parser._action_groups if g.title == meta["group"]), None)
        group = group or parser.add_argument_group(meta["group"])
        flag = meta["flag"] or "--" + field.name.replace("_", "-")
        default = (defaults or {}).get(field.name, field.default)
        kwargs: dict[str, Any] = {"dest": field.name, "help": meta["help"], **meta["argparse"]}
        kind = _base_type(hints[field.name])
        if kind is bool:
            kwargs.update(action="store_false" if default else "store_true", default=default)
        elif default is REQUIRED:
            kwargs.update(required=True, type=kwargs.get("type", kind))
        else:
            kwargs.update(default=default, type=kwargs.get("type", kind))
        action = group.add_argument(flag, **kwargs)
        action.default_text = meta["default_text"]  # read by default_shown
        for old, value in meta["was"].items():
            parser.add_argument(old, action=_Renamed, dest=field.name, new=flag, value=value, type=kwargs.get("type"))
    return parser


def parse_config(parser: argparse.ArgumentParser, config: type, argv: list[str] | None = None) -> Any:
    """Parse the flags into the dataclass ``config``. A ``ValueError`` from its checks
    (``__post_init__``) is a usage error: printed with the usage, exit status 2."""
    args = parser.parse_args(argv)
    try:
        return _build(config, args)
    except ValueError as err:
        parser.error(str(err))


def parse_loosely(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """The flags given, none of them required: for a job's modes that need only some
    (``jobs/segment_bucket.py --status``). The job's own checks still come from :func:`parse_config`."""
    required = [action for action in parser._actions if action.required]
    for action in required:
        action.required = False
    try:
        return parser.parse_known_args(argv)[0]
    finally:
        for action in required:
            action.required = True


def _build(config: type, args: argparse.Namespace) -> Any:
    values = {}
    for field in dataclasses.fields(config):
        if "options" in field.metadata:
            values[field.name] = _build(field.metadata["options"], args)
        elif "help" in field.metadata:
            values[field.name] = getattr(args, field.name)
    return config(**values)


class _Renamed(argparse.Action):
    """An earlier name of a flag: it sets the flag's field, and says the new name."""

    def __init__(self, option_strings: list[str], dest: str, new: str, value: Any, type: Any = None, **kwargs: Any):
        takes = value is None
        super().__init__(
            option_strings, dest, nargs=None if takes else 0, type=type if takes else None, help=argparse.SUPPRESS
        )
        self.new, self.value = new, value

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None):
        takes = self.value is None or isinstance(self.value, bool)
        print(f"warning: {option_string} is now {self.new if takes else f'{self.new} {self.value}'}", file=sys.stderr)
        setattr(namespace, self.dest, values if self.value is None else self.value)


def _base_type(hint: Any) -> Any:
    """``int | None`` -> ``int``; a type argparse can call on the text, or ``str``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint if hint in (bool, int, float, str) else str


# ---------------------------------------------------------------- the parser and the exit


def job_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A job's parser: the docstring's first paragraph as the description, the rest
    (the examples) after the flags."""
    return argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=_HelpFormatter,
    )


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag with a default says so, ``(default: X)``, from its declaration (:func:`default_shown`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", default_shown(action)
        if default in (None, "required", "off", "none"):
            return text
        return f"{text} (default: {default.replace('%', '%%')})"


def default_shown(action: argparse.Action) -> str | None:
    """A flag's default as --help and docs/flags.md show it: its declared ``default_text``,
    else its value; "required", "off" for a switch, "none" for None; None for a hidden flag."""
    if action.help == argparse.SUPPRESS or action.default == argparse.SUPPRESS:
        return None
    if getattr(action, "default_text", None):
        return action.default_text
    if action.required:
        return "required"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off"
    if action.default is None:
        return "none"
    if isinstance(action.default, (tuple, list)):
        return ",".join(str(v).lstrip(".") for v in action.default)
    return str(action.default)


def flag_table(parser: argparse.ArgumentParser) -> str:
    """The parser's flags as docs/flags.md's markdown table: flag, default, meaning."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for action in parser._actions:
        if not action.option_strings or action.option_strings[0] == "-h" or action.help == argparse.SUPPRESS:
            continue
        metavar = f" {action.metavar}" if action.metavar else ""
        default, text = _cell(default_shown(action) or "none"), _cell((action.help or "").replace("%%", "%"))
        rows.append(f"| `{action.option_strings[0]}{metavar}` | {default} | {text} |")
    return "\n".join(rows)


def renamed_table(parsers: dict[str, argparse.ArgumentParser]) -> str:
    """The earlier names of flags (``was=``) that still work, as docs/flags.md's markdown
    table: old name, the jobs that take it, what it now is."""
    jobs: dict[tuple[str, str], list[str]] = {}
    for job, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, _Renamed):
                now = (
                    action.new
                    if action.value is None or isinstance(action.value, bool)
                    else f"{action.new} {action.value}"
                )
                jobs.setdefault((action.option_strings[0], now), []).append(job)
    rows = ["| old name | in | now |", "|---|---|---|"]
    rows += [f"| `{old}` | {', '.join(names)} | `{now}` |" for (old, now), names in sorted(jobs.items())]
    return "\n".join(rows)


def _cell(text: str) -> str:
    return text.replace("|", r"\|")


def load_parser(path: str) -> argparse.ArgumentParser:
    """The parser of the job script at ``path``, loaded from the file as Ray would run it."""
    spec = importlib.util.spec_from_file_location(f"job_{path.rsplit('/', 1)[-1][:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a job's config dataclass looks its module up there
    spec.loader.exec_module(module)
    return module.parser()


def run_main(main: Callable[[], None]) -> None:
    """Run a job's ``main`` as a command-line program. An error the user can fix
    (:data:`~maskrcnn.errors.EXPECTED`) is one line naming it, exit status 2 (or the error's
    own ``exit_status``: 3 for a run over its error budget, 75 for a dataset another run
    holds, which a scheduler retries). Anything else
    is a defect: its one line, then the traceback (also in the job's log, which under ``ray
    job submit`` is this stderr), exit status 1."""
    try:
        main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # the top of a command-line program
        cause = root_cause(err)
        line, kind = _first_line(cause), type(cause).__name__
        if isinstance(cause, EXPECTED):
            print(f"error: {line or kind}", file=sys.stderr)
            sys.exit(getattr(cause, "exit_status", 2))
        print(f"error: {kind}: {line}" if line else f"error: {kind}", file=sys.stderr)
        # The whole chain: Ray's wrappers carry the remote traceback of a task or worker.
        traceback.print_exception(err, file=sys.stderr)
        sys.exit(1)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""
