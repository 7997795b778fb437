"""The front pages point at what is there, and every run's folder says how it was made."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FRONT_PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
FRONT_PAGES += sorted((ROOT / "docs").glob("*.md"))
# A path in backticks that starts at one of the repository's folders (benchmarks/README.md
# names its results folder from inside benchmarks/), or a Markdown link to a local file.
QUOTED_PATH = re.compile(r"`((?:hw2jax|benchmarks|experiments|tests|docs|results)/[^`\s]*)`")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
PLACEHOLDER = re.compile(r"[<>*{}$]")  # `results/<cpu>/`, `tests/test_*.py`: not one file


def named_paths(page: Path) -> list[tuple[int, str, Path]]:
    """(line, as written, where it points) for each repository path the page names."""
    found = []
    for number, line in enumerate(page.read_text().splitlines(), 1):
        for written in QUOTED_PATH.findall(line):
            base = page.parent if written.startswith("results/") else ROOT
            found.append((number, written, base / written))
        for written in LINK.findall(line):
            if not written.startswith(("http://", "https://", "mailto:")):
                found.append((number, written, page.parent / written))
    return [(n, w, p) for n, w, p in found if not PLACEHOLDER.search(w)]


@pytest.mark.parametrize("page", FRONT_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_front_pages_name_only_files_that_exist(page):
    missing = [f"line {n}: {w}" for n, w, path in named_paths(page) if not path.exists()]
    assert not missing, f"{page.relative_to(ROOT)} names what is not there: {missing}"


def test_a_missing_file_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("See `hw2jax/no_such_module.py`, [there](gone/) and `results/<cpu>/`.\n")
    assert [(n, w) for n, w, p in named_paths(page) if not p.exists()] == [
        (1, "hw2jax/no_such_module.py"),
        (1, "gone/"),
    ]


RUN_FOLDERS = sorted(p.parent for p in (ROOT / "experiments" / "results").glob("*/README.md"))
SWEEPS = {"mqar", "mqar_variants"}  # a table of runs, each run's history beside it
# A Markdown table whose header names epochs: "| epoch | ...", "| ... | epoch time (s) |".
EPOCH_TABLE = re.compile(r"^\|[^\n]*\bepochs?\b[^\n]*\|[ \t]*\n\|[-| :]+\|", re.M | re.I)


@pytest.mark.parametrize("folder", RUN_FOLDERS, ids=lambda p: p.name)
def test_every_run_folder_says_how_the_run_was_made(folder):
    """A run's folder gives its command, date, machine, versions and per-epoch table."""
    text = (folder / "README.md").read_text()
    lacks = []
    if not re.search(r"`[^`]*(hw2jax |experiments/|make run)[^`]*`", text):
        lacks.append("the command")
    if not re.search(r"\b20\d\d-\d\d-\d\d\b", text):
        lacks.append("the date")
    if not re.search(r"EPYC|Xeon|H100|H200", text):
        lacks.append("the machine")
    if not re.search(r"\bjax\b[^|\n]{0,12}\b0\.\d+", text):
        lacks.append("jax's version")
    if folder.name not in SWEEPS and not EPOCH_TABLE.search(text):
        lacks.append("the per-epoch table")
    assert not lacks, f"{folder.relative_to(ROOT)}/README.md lacks {', '.join(lacks)}"
    assert (
        (folder / "config.json").exists()
        or list(folder.glob("*/config.json"))
        or (folder.name in SWEEPS or folder.name == "gpu_h100")
    ), f"{folder.relative_to(ROOT)} keeps no config.json"


def test_the_readme_example_runs_and_computes_what_its_comments_say():
    """The README's Python example, as a user would paste it (T = 256 in place of 4,096, so
    that Pallas's interpreter takes seconds): each commented value holds."""
    import ast

    import jax
    import numpy as np

    readme = (ROOT / "README.md").read_text()
    example = re.search(r"## API by example\n\n```python\n(.*?)```", readme, re.S)
    assert example, "README.md has no '## API by example' heading with a Python block under it"
    block = example.group(1)
    assert "(1, 4096, 4, 64)" in block
    block = block.replace("(1, 4096, 4, 64)", "(1, 256, 4, 64)")
    names: dict = {}
    values = {}  # each bare expression's source line: its value
    for statement in ast.parse(block).body:
        source = ast.get_source_segment(block, statement)
        if isinstance(statement, ast.Expr):
            values[source] = jax.block_until_ready(eval(source, names))
        else:
            exec(compile(ast.Module([statement], []), "README.md", "exec"), names)
            if source.startswith("params = vit.init"):  # before the sentiment model's params
                vit_params = names["params"]

    def value(start: str):
        (found,) = [v for source, v in values.items() if source.startswith(start)]
        return found

    def said(pattern: str) -> float:  # the number a comment of the example gives
        return float(re.search(pattern, block).group(1).replace(",", ""))

    assert float(names["h"][-1]) == said(r"# h\[-1\] = [^=\n]+= (-?\d+)")
    assert float(value("recurrence.final_state_closed_form")) == said(
        r"final_state_closed_form\(.*# [^=\n]+= (-?\d+)"
    )
    np.testing.assert_allclose(value("attention.self_attention(x)"), names["x"], atol=1e-5)
    assert sum(p.size for p in jax.tree.leaves(names["params"]["bert"])) > 0
    assert sum(p.size for p in jax.tree.leaves(vit_params)) == said(r"([\d,]+) parameters")
    assert names["logits"].shape == (8, 10)
    assert names["hidden"].shape == (1, 4, 384) and names["pooled"].shape == (1, 384)
    assert names["logit"].shape == (1,)
    assert {"softmax", "linear"} <= set(value("attention.registry.names()"))


def shell_commands(page: Path) -> list[str]:
    """Each ``hw2jax ...`` command in the page's bash blocks: continued lines joined, comments
    dropped, optional parts (``[--json]``) taken."""
    commands, fence, pending = [], None, ""
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else (line[3:].strip() or "text")
            continue
        if fence != "bash":
            continue
        line = pending + re.sub(r"\s+#.*$", "", line).strip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        if re.match(r"(\.venv/bin/)?hw2jax ", line):
            commands.append(re.sub(r"\[([^\]]*)\]", r"\1", line.split("hw2jax ", 1)[1]))
    return commands


def assert_parses(args: list[str], where: str, capsys) -> None:
    """``hw2jax ARGS`` names commands and options the command line has; else the test fails
    with argparse's message and ``where`` the command was shown."""
    from hw2jax.cli import build_parser

    try:
        build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: `hw2jax {' '.join(args)}`: {capsys.readouterr().err}")


@pytest.mark.parametrize("page", FRONT_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_the_pages_show_parses(page, capsys):
    """The commands the pages show name commands and options the command line has."""
    import shlex

    for command in shell_commands(page):
        assert_parses(shlex.split(command), str(page.relative_to(ROOT)), capsys)


def test_the_shown_commands_are_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nhw2jax not_a_command\n```\n"
        "```bash\nhw2jax theory [--json]   # a comment\n.venv/bin/hw2jax vit train \\\n"
        "  --epochs 2\nmake run\n```\n"
    )
    assert shell_commands(page) == ["theory --json", "vit train --epochs 2"]


CONFIGS = sorted(p for p in (ROOT / "experiments").glob("*.py") if p.name != "common.py")


def docstring(config: Path) -> str:
    return config.read_text().split('"""')[1]


def config_command(config: Path) -> str:
    """The command a config's docstring opens with (``Command:``), continued lines joined, up
    to an aside in brackets or the next heading."""
    lines = docstring(config).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Command:"))
    parts = [lines[start].removeprefix("Command:")]
    for line in lines[start + 1 :]:
        if re.match(r"\w+:", line) or line.strip().startswith("("):
            break
        parts.append(line)
    command = " ".join(part.strip().rstrip("\\") for part in parts).split("  (")[0]
    return re.sub(r"^nice -n \d+ ", "", " ".join(command.split()))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_opens_with_its_own_command_and_it_parses(config, capsys):
    import shlex

    command = config_command(config)
    args = shlex.split(command)
    assert args[0] == "hw2jax", command
    assert args[args.index("--config") + 1] == f"experiments/{config.name}", command
    assert_parses(args[1:], config.name, capsys)


def recorded_test_accuracies(folder: Path = ROOT / "experiments" / "results") -> set[float]:
    """Every test accuracy, in %, that a run under ``folder`` recorded: its results.json, or
    its history's epochs."""
    import json

    found = set()
    for path in folder.rglob("*.json"):
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            continue
        epochs = record.get("epochs") if isinstance(record.get("epochs"), list) else []
        for entry in [record, *epochs]:
            if isinstance(entry.get("test_accuracy"), float):
                found.add(round(100 * entry["test_accuracy"], 2))
    return found


def test_every_expected_accuracy_in_a_config_was_recorded_by_a_run():
    """A config's ``Expected:`` test accuracy is one a run wrote, not a figure typed in."""
    recorded = recorded_test_accuracies()
    for config in CONFIGS:
        doc = docstring(config)
        expected = doc[doc.index("Expected:") :]
        for figure in re.findall(r"(\d+\.\d\d) % test", expected):
            assert float(figure) in recorded, f"{config.name}: {figure} % is in no run's files"


def test_every_test_accuracy_on_the_front_page_was_recorded_by_a_run_it_links():
    readme = (ROOT / "README.md").read_text()
    assert "## Results" in readme and "## API by example" in readme, "README's headings moved"
    results = readme[readme.index("## Results") : readme.index("## API by example")]
    rows = [line for line in results.splitlines() if re.search(r"\d %\*{0,2} test acc", line)]
    assert len(rows) >= 10
    for row in rows:
        recorded = set()
        for link in re.findall(r"\]\((experiments/results/[^)]+)\)", row):
            recorded |= recorded_test_accuracies(ROOT / link)
        for figure in re.findall(r"(\d+\.\d\d) %\*{0,2} test acc", row):
            assert float(figure) in recorded, f"{figure} % test acc is in no run the row links"
