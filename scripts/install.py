"""``make install``'s installer: ``python scripts/install.py VENV_PYTHON ARGS...`` runs
``uv pip install ARGS`` into that venv, with the package sources pip is configured with
(its index URLs, find-links and constraints, from pip's config files and ``PIP_*``
variables), so both find the same releases. uv unpacks torch's CUDA wheels and their
NVIDIA libraries (some 5 GB) in a fraction of pip's time; if uv cannot be installed, pip
installs ARGS itself.

uv compiles the venv's bytecode, as pip does (``--compile-bytecode``; uv's default leaves
none). Where ``PYTHONDONTWRITEBYTECODE`` is set, as on this project's machines, nothing
caches it later either, and every process, each Ray worker among them, would compile
torch, torchvision (which imports ``torch._dynamo``) and Ray from source at import: 6.3 s
a process on 2 cores, against 2.1 s with the bytecode (about 20 s more install)."""

from __future__ import annotations

import subprocess
import sys

# pip setting -> uv flag; each may hold several space-separated values.
FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links"}


def main(python: str, args: list[str]) -> int:
    quiet = ["--quiet", "--disable-pip-version-check"]
    # -qq: pip's warnings about configured sources that lack uv (a find-links folder of other
    # wheels) are noise here; if uv cannot be had, the line below says so.
    if subprocess.run([python, "-m", "pip", "install", *quiet, "--quiet", "uv"]).returncode != 0:
        print("install: uv could not be installed; pip installs the packages instead", file=sys.stderr)
        return subprocess.run([python, "-m", "pip", "install", *quiet, *args]).returncode
    uv = [python, "-m", "uv", "pip", "install", "--quiet", "--compile-bytecode", "--python", python]
    uv += uv_sources(python)
    return subprocess.run([*uv, *args]).returncode


def uv_sources(python: str) -> list[str]:
    """pip's configured sources as uv flags. With several indexes, uv picks the best version
    across all of them, as pip does (uv's default is the first index that has the package)."""
    settings = pip_settings(python)
    flags = [f for name, flag in FLAGS.items() for value in settings.get(name, []) for f in (flag, value)]
    flags += [f for value in settings.get("constraint", []) for f in ("--constraint", value)]
    if settings.get("extra-index-url"):
        flags += ["--index-strategy", "unsafe-best-match"]
    return flags


def pip_settings(python: str) -> dict[str, list[str]]:
    """``pip config list`` as {setting: values}; a ``PIP_*`` variable wins over the files."""
    listed = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    settings: dict[str, list[str]] = {}
    for line in listed.splitlines():  # e.g. global.find-links='/opt/wheels' or :env:.find-links='...'
        key, _, value = line.partition("=")
        source, _, name = key.rpartition(".")
        values = value.strip().strip("'\"").split()
        if source == ":env:" or name not in settings:
            settings[name] = values
    return settings


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
