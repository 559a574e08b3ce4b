"""The configuration reference, docs/flags.md: one table per job, rendered from the job's
parser, so docs/flags.md and ``--help`` cannot disagree.

    python scripts/flag_tables.py          # rewrite the tables in docs/flags.md
    python scripts/flag_tables.py --check  # exit 1 if they are out of date (tests/test_docs.py checks this)
"""

from __future__ import annotations

import argparse
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from maskrcnn.cli import flag_table, load_parser, renamed_table

JOBS = [
    "jobs/train.py",
    "jobs/segment_bucket.py",
    "jobs/coco_to_parquet.py",
    "jobs/evaluate.py",
    "jobs/export.py",
    "jobs/predict.py",
]
REFERENCE = os.path.join(REPO, "docs", "flags.md")


def rendered(page: str) -> str:
    """``page`` (docs/flags.md's text) with its tables rendered again: the renamed flags' under
    ``## Renamed flags``, and each job's under its ``### `jobs/X.py``` heading."""
    parsers = {job: load_parser(os.path.join(REPO, job)) for job in JOBS}
    renamed = renamed_table({job.removeprefix("jobs/"): parser for job, parser in parsers.items()})
    page = _replace(page, "## Renamed flags\n", renamed)
    for job, parser in parsers.items():
        page = _replace(page, f"### `{job}`\n", flag_table(parser))
    return page


def _replace(page: str, heading: str, table: str) -> str:
    """``page`` with the first markdown table after ``heading`` (prose may come between) replaced by ``table``."""
    pattern = re.compile("(" + re.escape(heading) + r"(?:[^|\n][^\n]*\n|\n)*?)\|.*?(?=\n\n|\n?\Z)", re.S)
    if not pattern.search(page):
        raise SystemExit(f"docs/flags.md has no table under {heading.strip()}")
    return pattern.sub(lambda m: m.group(1) + table, page, count=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check; exit 1 if docs/flags.md is out of date")
    args = p.parse_args()
    with open(REFERENCE) as f:
        current = f.read()
    wanted = rendered(current)
    if args.check:
        if wanted != current:
            raise SystemExit("docs/flags.md's flag tables differ from the parsers: run python scripts/flag_tables.py")
        return
    with open(REFERENCE, "w") as f:
        f.write(wanted)


if __name__ == "__main__":
    main()
