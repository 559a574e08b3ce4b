"""Every command in the docs (README.md, every page under docs/, cluster/README.md), and
every command `make demo` runs, names a script that exists and flags its parser accepts,
so none of them can rot; every link and anchor between the pages resolves; the README
stays a front page; and the configuration reference (docs/flags.md) lists every flag the
jobs have."""

from __future__ import annotations

import ast
import dataclasses
import re
import shlex
from collections import Counter
from pathlib import Path

import pytest

from maskrcnn import synthetic
from maskrcnn.cli import default_shown, load_parser
from tests.helpers import REPO, assert_no_library_warnings, check_command, load_script, ray_head

README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
DOCS = [README, *PAGES, REPO / "cluster" / "README.md"]  # every document: its commands parse, its links resolve
# The project commands each document shows at least (today's count), so that a page cannot
# lose its examples unnoticed; a page not named here may have none (formats, flags, ...).
COMMANDS = {
    "README.md": 11,
    "docs/getting-started.md": 3,
    "docs/training.md": 9,
    "docs/segmenting.md": 5,
    "docs/labelling.md": 3,
    "docs/keypoints.md": 7,
    "docs/cluster.md": 2,
    "cluster/README.md": 4,
}
JOBS = sorted(f"jobs/{p.name}" for p in (REPO / "jobs").glob("*.py"))  # every job, so none is left out
DEMO = ["jobs/train.py", "jobs/evaluate.py", "jobs/segment_bucket.py", "jobs/export.py", "jobs/predict.py"]


def shell_commands(path: Path) -> list[list[str]]:
    """The commands in a document's ```bash and ```cron blocks (continuation lines joined,
    comments dropped) and in its inline code that starts with ``python`` or ``.venv/bin/python``."""
    text = path.read_text()
    inline = [shlex.split(c) for c in re.findall(r"`((?:\.venv/bin/)?python [^`]+)`", text)]
    # a mention such as `python jobs/train.py --help` or `python -m maskrcnn.synthetic` is not a command line
    commands = [c for c in inline if any(t.startswith("--") and t != "--help" for t in c)]
    for block in re.findall(r"```(?:bash|cron)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                redirect = next((i for i, t in enumerate(argv) if t[:1] in "<>|" or t[:2] in ("1>", "2>")), len(argv))
                if argv[:redirect]:
                    commands.append(argv[:redirect])
    return commands


def project_command(argv: list[str]) -> list[str] | None:
    """``python jobs/X.py ...`` or ``python -m maskrcnn.synthetic ...`` inside ``argv``
    (which may be a ``ray job submit ... --`` line), normalised to start with ``python``."""
    for i, token in enumerate(argv):
        if token.startswith("jobs/") and token.endswith(".py"):
            return ["python", *argv[i:]]
        if token == "-m" and argv[i + 1].startswith("maskrcnn."):
            return ["python", "-m", *argv[i + 1 :]]
    return None


def check(argv: list[str]) -> None:
    if argv[1] == "-m":
        assert argv[2] == "maskrcnn.synthetic", argv
        synthetic.parser().parse_args(argv[3:])
    else:
        check_command(argv)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_documented_command_parses(doc):
    found = [c for c in map(project_command, shell_commands(doc)) if c]
    assert len(found) >= COMMANDS.get(str(doc.relative_to(REPO)), 0)
    for argv in found:
        check(argv)


def test_every_job_has_a_documented_command():
    assert set(COMMANDS) <= {str(doc.relative_to(REPO)) for doc in DOCS}
    shown = {c[1] for doc in DOCS for c in map(project_command, shell_commands(doc)) if c and c[1] != "-m"}
    assert set(JOBS) <= shown, f"no page shows a command of {sorted(set(JOBS) - shown)}"


def test_the_readme_is_a_front_page_whose_index_lists_every_page():
    """README.md stays short enough to read in ten minutes; every docs page it links exists,
    and every page under docs/ is in its index."""
    text = README.read_text()
    assert len(text.splitlines()) <= 200, "README.md is a front page: move detail into docs/"
    linked = {t.partition("#")[0] for t in relative_links(README) if t.startswith("docs/")}
    assert linked, "the README links no docs page"
    for target in linked:
        assert (REPO / target).is_file(), f"README.md links {target}, which does not exist"
    assert {f"docs/{page.name}" for page in PAGES} <= linked, "a docs page is missing from the README's index"


def test_documented_make_targets_exist():
    makefile = (REPO / "Makefile").read_text()
    targets = {c[1] for doc in DOCS for c in shell_commands(doc) if c[0] == "make" and len(c) > 1}
    assert {"demo", "test"} <= targets
    for target in targets:
        assert re.search(rf"(?m)^{re.escape(target)}:", makefile), target


def test_configuration_reference_is_the_parsers_flag_tables():
    """Each job's table in docs/flags.md is rendered from its parser (scripts/flag_tables.py),
    so the page lists exactly the flags --help does, with the same defaults and help."""
    tables = load_script("scripts/flag_tables.py")
    assert sorted(tables.JOBS) == sorted(JOBS)
    assert tables.REFERENCE == str(REPO / "docs" / "flags.md")
    reference = (REPO / "docs" / "flags.md").read_text()
    assert tables.rendered(reference) == reference, "run python scripts/flag_tables.py"
    for script in JOBS:
        for action in load_parser(str(REPO / script))._actions:
            for flag in (f for f in action.option_strings if f.startswith("--") and f != "--help"):
                assert f"`{flag}" in reference, f"{script} {flag} is missing from docs/flags.md"


def test_defaults_stated_in_prose_are_the_declared_ones():
    """A page that states a flag's default in prose, as "`--lease-ttl` (600 s)" or
    "`--review-by uncertain` (the default)", states the parser's (docs/flags.md's tables are
    checked above)."""
    declared: dict[str, set[str]] = {}
    for script in JOBS:
        for action in load_parser(str(REPO / script))._actions:
            for flag in action.option_strings:
                declared.setdefault(flag, set()).add(default_shown(action) or "")
    number = re.compile(r"`(--[\w-]+)[^`]*`[^`()\n]{0,12}\((\d+(?:\.\d+)?)(?: px| s)?\)")
    word = re.compile(r"`(--[\w-]+) ([\w-]+)` \(the default\)")
    stated = 0
    for doc in DOCS:
        prose = _prose(doc.read_text())
        for flag, value in number.findall(prose):
            assert flag in declared, f"{doc.name}: {flag} is no job's flag"
            assert any(re.fullmatch(r"\d+(\.\d+)?", d) and float(d) == float(value) for d in declared[flag]), (
                f"{doc.name}: {flag} ({value}), but its default is {declared[flag]}"
            )
            stated += 1
        for flag, value in word.findall(prose):
            assert value in declared.get(flag, set()), f"{doc.name}: {flag} {value} is not its default"
            stated += 1
    assert stated >= 4


def test_readme_and_demo_agree_on_its_time_and_promise():
    demo, readme = load_script("scripts/demo.py"), README.read_text()
    started = (REPO / "docs" / "getting-started.md").read_text()
    keypoints = (REPO / "docs" / "keypoints.md").read_text()
    shapes, figures = demo.SHAPES, demo.FIGURES
    assert f"segment an archive, draw the masks (CPU, at most {shapes.minutes} min)" in readme
    for page in (readme, started):
        assert f"at most {shapes.minutes} minutes on 2 cores" in page
        assert f"mask AP of at least {shapes.promised_ap}" in page
    assert f"draw skeletons (CPU, ~{figures.minutes} min)" in keypoints
    assert f"It promises keypoint AP ≥ {figures.promised_ap} on its val split" in keypoints


@pytest.mark.parametrize("recipe", ["SHAPES", "FIGURES"])
def test_the_demo_runs_only_commands_that_parse(recipe, tmp_path, monkeypatch):
    """The demo's command lines, captured instead of run (the demo itself takes minutes)."""
    demo = load_script("scripts/demo.py")
    monkeypatch.setattr(demo, "RECIPE", getattr(demo, recipe))
    ran: list[list[str]] = []
    monkeypatch.setattr(demo, "run", lambda *args: ran.append(["python", *args]))
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "_summary.json").write_text('{"instances": 3}')  # what the segmentation step leaves
    demo.demo(str(tmp_path), tmp_path)
    assert [a[1] if a[1] != "-m" else a[2] for a in ran] == ["maskrcnn.synthetic", *DEMO]
    for argv in ran:
        check(argv)
    assert "--contact-sheet" in ran[-2] and "--html" in ran[-2]


@pytest.mark.slow
def test_the_demo_runs_every_step_with_no_library_warning(tmp_path, monkeypatch, capfd):
    """The demo's five real commands, on a dataset small enough for a test: its output (every
    job's, through the terminal) has no library warning, and it ends with its summary."""
    demo = load_script("scripts/demo.py")
    tiny = dataclasses.replace(
        demo.SHAPES,
        data=demo.SHAPES.data.replace("--train 400 --val 48 --archive 40", "--train 16 --val 4 --archive 4"),
        train=demo.SHAPES.train.replace("--epochs 4", "--epochs 1").replace("--eval-every 4", "--eval-every 1"),
    )
    monkeypatch.setattr(demo, "RECIPE", tiny)
    monkeypatch.setattr(demo, "EPOCHS", "1")
    for name, value in ray_head().items():  # its jobs join the session's Ray, as run_job's do
        monkeypatch.setenv(name, value)  # the summary does not hold a one-epoch run to the promise
    demo.report(demo.demo(str(tmp_path), tmp_path), 60.0)
    out = capfd.readouterr()
    assert_no_library_warnings(out.out + out.err)
    assert "[demo] summary" in out.out and "mask AP (val)" in out.out
    assert "wall time:" in out.out


def test_segmentation_and_evaluation_show_the_same_inference_options():
    def inference_group(job: str) -> list[tuple[list[str], str]]:
        parser = load_parser(str(REPO / job))
        group = next(g for g in parser._action_groups if g.title == "inference")
        return [(a.option_strings, a.help) for a in group._group_actions]

    segment = inference_group("jobs/segment_bucket.py")
    assert inference_group("jobs/evaluate.py") == segment
    assert [flags[0] for flags, _ in segment] == [
        "--score-threshold",
        "--max-detections",
        "--classes",
        "--no-amp",
        "--batch-size",
        "--actors",
        "--gpus-per-actor",
        "--cpus-per-actor",
        "--actor-resources",
    ]


def test_every_ray_job_submit_uses_the_runtime_env_file():
    """The docs and every job's --help submit the same way: with cluster/runtime_env.yaml,
    whose excludes keep history, environments and data out of the upload."""
    texts = {str(doc.relative_to(REPO)): doc.read_text() for doc in DOCS}
    texts |= {job: ast.get_docstring(ast.parse((REPO / job).read_text())) for job in JOBS}
    submits = [(name, line) for name, text in texts.items() for line in re.findall(r"ray job submit .*? -- ", text)]
    assert len(submits) >= 10
    for name, line in submits:
        assert "--runtime-env cluster/runtime_env.yaml" in line, f"{name}: {line}"


def _prose(text: str) -> str:
    """Markdown without its fenced code blocks (a ``# comment`` there is no heading)."""
    return re.sub(r"(?ms)^```.*?^```[^\n]*$", "", text)


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a document's headings: the heading's text (a link's text only),
    lower case, without punctuation but hyphens and underscores, spaces as hyphens; a repeated
    one gets -1, -2, ..."""
    anchors: set[str] = set()
    seen: Counter = Counter()
    for heading in re.findall(r"(?m)^#{1,6}[ \t]+(.*?)[ \t#]*$", _prose(path.read_text())):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return anchors


def relative_links(path: Path) -> list[str]:
    """The targets of a document's markdown links and images that are not URLs (no scheme
    such as https: or mailto:); code is not searched."""
    prose = re.sub(r"`[^`\n]*`", "", _prose(path.read_text()))
    targets = re.findall(r"\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)", prose)
    return [t for t in targets if not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", t)]


def test_the_anchor_rules_are_githubs():
    doc = REPO / "docs" / "benchmarks.md"
    assert "self-training-benchmarksself_trainingpy" in heading_anchors(doc)
    assert "keypoint-learning-check-make-demo-keypoints" in heading_anchors(doc)
    assert "label-a-growing-archive-every-night---incremental" in heading_anchors(REPO / "docs" / "segmenting.md")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(doc):
    links = relative_links(doc)
    broken = []
    for target in links:
        path, _, anchor = target.partition("#")
        file = (doc.parent / path) if path else doc
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{doc.relative_to(REPO)}: " + "; ".join(broken)
