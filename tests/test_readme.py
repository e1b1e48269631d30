"""The README is a first page that stays true: its annotated tree matches the files, it stays short,
and no page of the documentation cites an issue number a reader of the repository cannot follow.

The tree is the fenced block under "## Repository": one entry per line, indented two spaces per
level, a folder ending in "/", then its description.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 250
PACKAGE_FOLDERS = ("", "runtime", "runtime/backends", "serving", "export", "plugins", "train")
"""Folders of the import package whose every module the tree must list ("" = the root)."""
NOT_REPOSITORY_FOLDERS = re.compile(r"^(\..*|__pycache__|.*\.egg-info|build|dist|out)$")
"""Top-level folders that are not part of the repository: hidden ones and build or run outputs."""
DOCUMENTATION = ("README.md", "docs/*.md", "benchmarks/results/README.md", "models/*/README.md")


def tree_block(text: str) -> list[str]:
    """The lines of the fenced block that follows the "## Repository" heading."""
    match = re.search(r"^## Repository\n.*?^```\n(.*?)^```", text, re.S | re.M)
    if match is None:
        raise AssertionError("README.md has no fenced tree under a '## Repository' heading")
    return match.group(1).splitlines()


def tree_paths(lines: list[str]) -> list[str]:
    """Repository-relative paths named by the tree's lines (folders end in '/')."""
    paths, parents = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        if indent % 2:
            raise AssertionError(f"README.md tree line {number} is indented by an odd {indent} spaces: {line!r}")
        depth = indent // 2
        if depth > len(parents):
            raise AssertionError(f"README.md tree line {number} is nested under no folder: {line!r}")
        del parents[depth:]
        name = line.split()[0]
        path = "".join(parents) + name
        paths.append(path)
        if name.endswith("/"):
            parents.append(name)
    return paths


@pytest.fixture(scope="module")
def listed() -> set[str]:
    return set(tree_paths(tree_block(README.read_text(encoding="utf-8"))))


def test_tree_parser_reads_nesting():
    lines = ["a/                 folder", "  b.py             module", "  c/               sub", "    d.py  x",
             "e.py               top"]
    assert tree_paths(lines) == ["a/", "a/b.py", "a/c/", "a/c/d.py", "e.py"]


def test_every_listed_path_exists(listed):
    missing = sorted(path for path in listed if not (ROOT / path).exists())
    assert not missing, f"README.md's tree names paths that do not exist: {missing}"


@pytest.mark.parametrize("folder", PACKAGE_FOLDERS)
def test_every_package_module_is_listed(listed, folder):
    modules = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / folder).glob("*.py")
                     if path.name != "__init__.py" or folder == "")
    assert modules, f"no modules found in {folder or 'the root'}"
    unlisted = [module for module in modules if module not in listed]
    assert not unlisted, (f"README.md's tree lacks {', '.join(unlisted)}: add one line for each under "
                          f"{folder + '/' if folder else 'the root'} in the '## Repository' block")


def test_every_top_level_folder_is_listed(listed):
    folders = sorted(path.name + "/" for path in ROOT.iterdir()
                     if path.is_dir() and not NOT_REPOSITORY_FOLDERS.match(path.name))
    unlisted = [folder for folder in folders if folder not in listed]
    assert not unlisted, f"README.md's tree lacks the top-level folders {unlisted}"


def test_readme_is_a_first_page():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines, more than {MAX_README_LINES}"


ISSUE_REFERENCE = re.compile(r"(?<![\w&/])#\d+\b|\b(?:issue|pull request|PR)s?\s*#?\d+\b", re.I)


def test_no_issue_numbers_in_documentation():
    pages = sorted({page for pattern in DOCUMENTATION for page in ROOT.glob(pattern)})
    assert README in pages and len(pages) > 1
    cited = [f"{page.relative_to(ROOT)}:{number}: {match.group(0)!r}"
             for page in pages
             for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
             for match in ISSUE_REFERENCE.finditer(line)]
    assert not cited, f"documentation cites issue numbers nobody can follow: {cited}"


def test_issue_reference_pattern():
    for cited in ("see #22", "issue 26", "Issue #3", "PR 12", "issues 4"):
        assert ISSUE_REFERENCE.search(cited), cited
    for fine in ("[probes](#health-probes-and-fault-recovery)", "§3.4", "rank{r}", "0x1F", "C#1", "issue a request"):
        assert not ISSUE_REFERENCE.search(fine), fine
