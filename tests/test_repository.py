"""The repository's promises: two set-up commands, pinned requirements, no big or data files
committed, and a table of contents whose pages exist."""

from __future__ import annotations

import gzip
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
MAX_FILE_BYTES = 5 * 1024 * 1024
# First four bytes of an IDX file: two zero bytes, the type (0x08 = unsigned byte), the rank.
IDX_MAGICS = {b"\x00\x00\x08\x01", b"\x00\x00\x08\x03"}


def readme_commands() -> list[str]:
    """The commands of the README's fenced block under its "Two commands" heading."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^#+ .*two commands.*?\n```[a-z]*\n(.*?)```", text, re.I | re.M | re.S)
    assert match, "README.md has no heading containing 'two commands' followed by a code block"
    return [
        line.strip() for line in match.group(1).splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def repository_files() -> list[Path]:
    """Files that are or would be committed: tracked, or untracked and not git-ignored."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, capture_output=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"not a git checkout, cannot tell committed files apart: {error}")
    paths = (REPO / name for name in listing.decode().split("\0") if name)
    return [p for p in paths if p.is_file()]


def test_readme_names_exactly_the_two_commands():
    assert readme_commands() == ["make book", "make test"]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    test_command = readme_commands()[1]
    assert ci.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in ci
    commands = [
        shlex.split(line) for line in ci.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ["exec", *shlex.split(test_command)] in commands or shlex.split(test_command) in commands
    assert (REPO / ".ci" / "run").stat().st_mode & 0o111, ".ci/run is not executable"


def requirement_lines() -> list[str]:
    lines = (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_requirements_pin_torch_first_and_keep_jupyter_book_1():
    lines = requirement_lines()
    # A CPU wheel of exactly this version is on the course machines; anything else downloads GBs.
    assert lines[0] == "torch==2.13.0"
    books = [Requirement(line) for line in lines if Requirement(line).name == "jupyter-book"]
    assert len(books) == 1, "requirements.txt must name jupyter-book once"
    # Jupyter Book 2 is a different tool that ignores _config.yml and _toc.yml.
    assert not books[0].specifier.contains("2.0.0", prereleases=True)
    assert books[0].specifier.contains("1.0.4.post1")


def test_no_large_files():
    large = {
        str(p.relative_to(REPO)): p.stat().st_size
        for p in repository_files() if p.stat().st_size > MAX_FILE_BYTES
    }
    assert not large, f"files over {MAX_FILE_BYTES} bytes: {large}"


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":  # gzip: look at the decompressed start
        try:
            with gzip.open(path, "rb") as f:
                return f.read(4)
        except OSError:
            return head
    return head


def test_mnist_idx_files_are_not_committed():
    # Users download MNIST (with checksums); CI reads ../shared. Only the package's small
    # embedded subset (an .npz) is part of the repository.
    idx = [
        str(p.relative_to(REPO)) for p in repository_files()
        if "idx1-ubyte" in p.name or "idx3-ubyte" in p.name or _head(p) in IDX_MAGICS
    ]
    assert not idx, f"MNIST IDX files must not be committed: {idx}"


def toc_files(entries) -> list[str]:
    found = []
    for entry in entries:
        if "file" in entry:
            found.append(entry["file"])
        for key in ("parts", "chapters", "sections"):
            found.extend(toc_files(entry.get(key, [])))
    return found


def test_every_page_of_the_table_of_contents_exists():
    toc = yaml.safe_load((REPO / "_toc.yml").read_text(encoding="utf-8"))
    pages = [toc["root"], *toc_files(toc.get("parts", []) + toc.get("chapters", []))]
    missing = [
        page for page in pages
        if not any((REPO / page).with_suffix(s).is_file() for s in (".md", ".ipynb"))
    ]
    assert not missing, f"pages listed in _toc.yml that do not exist: {missing}"


def test_only_the_bibliography_page_lists_references():
    # sphinxcontrib-bibtex writes a key once per book: a second {bibliography} that lists a key
    # cited elsewhere too is a "duplicate citation" warning, which fails the -W build. Chapters
    # cite with {cite}; their citations link to book/bibliography.md.
    pages = [
        str(p.relative_to(REPO)) for p in (REPO / "book").glob("*.md")
        if p.name != "bibliography.md" and "```{bibliography}" in p.read_text(encoding="utf-8")
    ]
    assert not pages, f"pages with their own {{bibliography}} directive: {pages}"


def test_the_test_scheduling_names_existing_files_and_every_user_of_the_shared_runs():
    # conftest.py hands LONGEST_FIRST out first and keeps SHARED_RUNS on one worker: a renamed
    # file would silently fall out of both, and a new user of tests/claim_runs.py on another
    # worker would train the shared runs a second time.
    from conftest import LONGEST_FIRST, SHARED_RUNS

    for name in (*LONGEST_FIRST, *SHARED_RUNS):
        assert (REPO / name).is_file(), name
    users = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if re.search(r"^from claim_runs import|^import claim_runs",
                                p.read_text(encoding="utf-8"), re.M))
    assert users == sorted(SHARED_RUNS)
