"""scripts/execute_chapters.py: the book's chapters executed in parallel into the jupyter-cache
that the Sphinx build reads. Tiny throwaway books in a temporary folder, never the real chapters."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml
from conftest import load_execute_chapters

REPO = Path(__file__).resolve().parent.parent
execute_chapters = load_execute_chapters()

HEADER = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# A tiny chapter

Some prose.
"""


def page(*cells: str) -> str:
    """A MyST Markdown notebook with these code cells."""
    return HEADER + "".join(f"\n```{{code-cell}} ipython3\n{cell}\n```\n" for cell in cells)


def make_book(root: Path, chapters: dict[str, str], plain=("intro",)) -> Path:
    """A book at ``root``: plain Markdown pages, then the chapters (name -> page text)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "_config.yml").write_text(yaml.safe_dump({
        "title": "tiny",
        "execute": {"execute_notebooks": "cache", "timeout": 120, "run_in_temp": False,
                    "allow_errors": False},
    }))
    for name in plain:
        (root / f"{name}.md").write_text(f"# {name}\n\nNo code here.\n")
    for name, text in chapters.items():
        (root / f"{name}.md").write_text(text)
    write_toc(root, [*plain[1:], *chapters], plain[0])
    return root


def write_toc(root: Path, files: list[str], first: str = "intro") -> None:
    (root / "_toc.yml").write_text(yaml.safe_dump({
        "format": "jb-book", "root": first,
        "parts": [{"caption": "Chapters", "chapters": [{"file": f} for f in files]}],
    }))


def cache_of(root: Path):
    from jupyter_cache import get_cache

    return get_cache(str(root / "_build" / ".jupyter_cache"))


class RecordingLogger:
    """Stands in for myst-nb's Sphinx logger: keeps the messages."""

    def __init__(self):
        self.messages: list[str] = []

    def _record(self, message, *args, **kwargs):
        self.messages.append(str(message))

    info = warning = debug = error = _record


def myst_nb_client(root: Path, name: str, cache_path: Path):
    """myst-nb's cache client for a page, configured as the Sphinx build configures it."""
    from myst_nb.core.config import NbParserConfig
    from myst_nb.core.execute.cache import NotebookClientCache

    settings = execute_chapters.read_settings(root)
    path = root / f"{name}.md"
    notebook = execute_chapters.read_chapter(path, settings).notebook
    config = NbParserConfig(execution_mode="cache", execution_cache_path=str(cache_path),
                            execution_timeout=120, execution_in_temp=False)
    logger = RecordingLogger()
    return NotebookClientCache(notebook, path, config, logger), logger


def code_outputs(notebook) -> list:
    return [cell.get("outputs") for cell in notebook["cells"] if cell["cell_type"] == "code"]


DETERMINISTIC = page(
    "import numpy as np\nrng = np.random.default_rng(0)\nx = rng.normal(size=5)\nprint(x.round(6))",
    "x.sum().round(6)",
)


def test_the_chapters_are_the_notebook_pages_of_the_table_of_contents(tmp_path):
    root = make_book(tmp_path, {"a": page("1"), "b": page("2")}, plain=("intro", "appendix"))
    nested = {"format": "jb-book", "root": "intro", "parts": [{"caption": "C", "chapters": [
        {"file": "a", "sections": [{"file": "b"}]}, {"file": "appendix"}]}]}
    (root / "_toc.yml").write_text(yaml.safe_dump(nested))
    settings = execute_chapters.read_settings(root)
    assert [p.name for p in execute_chapters.toc_pages(root)] == [
        "intro.md", "a.md", "b.md", "appendix.md"]
    assert [c.path.name for c in execute_chapters.book_chapters(root, settings)] == [
        "a.md", "b.md"]
    nested["parts"][0]["chapters"].append({"file": "missing"})
    (root / "_toc.yml").write_text(yaml.safe_dump(nested))
    with pytest.raises(FileNotFoundError, match="missing"):
        execute_chapters.toc_pages(root)


def test_stale_chapters_run_once_and_a_warm_run_executes_nothing(tmp_path, monkeypatch, capsys):
    root = make_book(tmp_path, {"a": page("print('a')"), "b": page("print('b')")})
    outcomes = execute_chapters.run(root, jobs=2, log=lambda *_: None)
    assert sorted(o.path.name for o in outcomes) == ["a.md", "b.md"]
    assert all(o.error is None for o in outcomes)
    records = {r.pk: r.created for r in cache_of(root).list_cache_records()}
    assert len(records) == 2

    lines = []
    assert execute_chapters.run(root, jobs=2, log=lines.append) == []
    assert lines == ["all 2 chapters are in the execution cache: nothing to execute"]
    assert {r.pk: r.created for r in cache_of(root).list_cache_records()} == records

    # A changed cell makes its chapter stale, and only that one.
    (root / "b.md").write_text(page("print('b, changed')"))
    outcomes = execute_chapters.run(root, jobs=2, log=lambda *_: None)
    assert [o.path.name for o in outcomes] == ["b.md"]

    # A changed environment (here a NORMCOURSE_ variable; an edited package file the same way)
    # makes every chapter stale although its code is the same: the cached outputs came from
    # what is no longer there. --list names them; --executed-list tells make book that they ran
    # (it then has Sphinx re-read every page), and is empty when nothing ran.
    monkeypatch.setenv("NORMCOURSE_DATA", str(tmp_path / "elsewhere"))
    execute_chapters.environment_fingerprint.cache_clear()
    capsys.readouterr()
    assert execute_chapters.main(["--root", str(root), "--list"]) == 0
    assert sorted(capsys.readouterr().out.split()) == ["a.md", "b.md"]
    executed = tmp_path / "executed.txt"
    assert execute_chapters.main(["--root", str(root), "--executed-list", str(executed)]) == 0
    assert sorted(executed.read_text().split()) == ["a.md", "b.md"]
    assert execute_chapters.main(["--root", str(root), "--executed-list", str(executed)]) == 0
    assert executed.read_text() == ""
    assert len(cache_of(root).list_cache_records()) == 3  # a, b and the b of before its edit
    monkeypatch.delenv("NORMCOURSE_DATA")
    execute_chapters.environment_fingerprint.cache_clear()


def test_a_chapter_added_to_the_table_of_contents_is_picked_up(tmp_path, capsys):
    root = make_book(tmp_path, {"a": page("1")})
    execute_chapters.run(root, jobs=2, log=lambda *_: None)
    (root / "c.md").write_text(page("3"))
    write_toc(root, ["a", "c"])
    assert execute_chapters.main(["--root", str(root), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["c.md"]


def test_myst_nb_finds_the_executed_chapter_in_the_cache_with_the_same_outputs(tmp_path):
    root = make_book(tmp_path, {"a": DETERMINISTIC})
    # The serial route: myst-nb's own client executes the page into another cache.
    serial, serial_log = myst_nb_client(root, "a", tmp_path / "serial_cache")
    with serial:
        serial_outputs = code_outputs(serial.notebook)
    assert any(m.startswith("Executed notebook") for m in serial_log.messages)

    execute_chapters.run(root, jobs=2, log=lambda *_: None)
    client, log = myst_nb_client(root, "a", root / "_build" / ".jupyter_cache")
    with client:
        outputs = code_outputs(client.notebook)
    assert any(m.startswith("Using cached notebook") for m in log.messages), log.messages
    assert not any(m.startswith("Executing notebook") for m in log.messages), log.messages
    assert outputs == serial_outputs
    assert "[ 0.12573" in outputs[0][0]["text"]  # it ran: the seeded draw is printed


def test_a_failing_cell_fails_with_the_chapter_and_cell_named(tmp_path, capsys):
    failing = page("x = 1", "assert x + 1 == 3, 'the check failed'", "print('never')")
    root = make_book(tmp_path, {"a": page("print('fine')"), "b": failing})
    assert execute_chapters.main(["--root", str(root), "--jobs", "2"]) == 1
    err = capsys.readouterr().err
    line = failing.splitlines().index("assert x + 1 == 3, 'the check failed'") + 1
    assert (f"chapter b.md failed: cell 3 (line {line}), starting "
            "\"assert x + 1 == 3, 'the check failed'\": AssertionError: the check failed") in err
    assert "1 chapter(s) failed to execute" in err
    # The good chapter is cached, the failing one is not: the next run executes only it.
    assert [p.name for p in map(Path, (r.uri for r in cache_of(root).list_cache_records()))] == [
        "a.md"]
    assert execute_chapters.main(["--root", str(root), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["b.md"]


def test_chapters_execute_at_the_same_time(tmp_path):
    # Each chapter announces itself, then waits for the other: run one after the other, the
    # first would give up after a minute and fail.
    def waits_for(me, other):
        return page(
            "import pathlib, time\n"
            f"pathlib.Path('{me}.started').touch()\n"
            "deadline = time.monotonic() + 60\n"
            f"while not pathlib.Path('{other}.started').exists():\n"
            "    assert time.monotonic() < deadline, 'the other chapter never started'\n"
            "    time.sleep(0.05)")

    root = make_book(tmp_path, {"a": waits_for("a", "b"), "b": waits_for("b", "a")})
    outcomes = execute_chapters.run(root, jobs=2, log=lambda *_: None)
    assert [o.error for o in outcomes] == [None, None]


def test_make_book_executes_the_chapters_before_the_sphinx_build():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    recipe = makefile.split("\nbook:", 1)[1].split("\n\n", 1)[0]
    assert recipe.index("scripts/execute_chapters.py") < recipe.index("jupyter-book build")


# tests/test_notebooks.py reads a chapter's run from the cache (tests/conftest.py) only when the
# cache holds this script's clean run of exactly its code, made in the current environment.
def cached_runs(root: Path) -> dict:
    """Chapter name -> the cache record the notebook tests would read, None where they execute."""
    from conftest import cached_chapter_runs

    settings = execute_chapters.read_settings(root)
    found = cached_chapter_runs(root, settings, sys.executable)
    return {chapter.path.name: found.get(chapter.path.resolve(), (None, None))[1]
            for chapter in execute_chapters.book_chapters(root, settings)}


def test_a_chapter_is_read_from_the_cache_only_while_its_code_and_environment_are_unchanged(
        tmp_path, monkeypatch):
    root = make_book(tmp_path, {"a": page("print('a')"), "b": page("print('b')")})
    assert cached_runs(root) == {"a.md": None, "b.md": None}  # nothing executed yet: nbval
    execute_chapters.run(root, jobs=2, log=lambda *_: None)
    runs = cached_runs(root)
    assert all(record is not None for record in runs.values())
    settings = execute_chapters.read_settings(root)
    for chapter in execute_chapters.book_chapters(root, settings):
        executed = cache_of(root).get_cache_bundle(runs[chapter.path.name].pk).nb
        assert execute_chapters.execution_problems(chapter, executed) == []

    # Stale code: the changed chapter executes again, the other one is still read.
    (root / "b.md").write_text(page("print('b, changed')"))
    assert cached_runs(root)["b.md"] is None and cached_runs(root)["a.md"] is not None

    # Stale environment (here a NORMCOURSE_ variable; an edited package file or another
    # distribution changes the fingerprint the same way): nothing is read from the cache.
    monkeypatch.setenv("NORMCOURSE_DATA", str(tmp_path / "elsewhere"))
    execute_chapters.environment_fingerprint.cache_clear()
    assert cached_runs(root) == {"a.md": None, "b.md": None}
    monkeypatch.delenv("NORMCOURSE_DATA")
    monkeypatch.setenv("NORMCOURSE_PROGRESS", "0")  # display only: the runs still count
    execute_chapters.environment_fingerprint.cache_clear()
    assert cached_runs(root)["a.md"] is not None


def test_the_fingerprint_covers_every_file_of_the_package_the_kernel_imports(tmp_path):
    # A stand-in package on the kernel's path: editing any of its files changes the fingerprint.
    package = tmp_path / "site" / "normcourse"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data.py").write_text(
        "from pathlib import Path\ndef default_cache_dir():\n    return Path('/nonexistent')\n")
    (package / "nn.py").write_text("X = 1\n")
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\nPYTHONPATH={tmp_path / 'site'} exec {sys.executable} \"$@\"\n")
    script.chmod(0o755)

    def fingerprint():
        execute_chapters.environment_fingerprint.cache_clear()
        return execute_chapters.environment_fingerprint(str(script), str(tmp_path))

    before = fingerprint()
    assert fingerprint() == before
    (package / "nn.py").write_text("X = 2\n")
    assert fingerprint() != before
    (package / "nn.py").write_text("X = 1\n")
    assert fingerprint() == before
    assert fingerprint() != execute_chapters.environment_fingerprint(sys.executable, str(tmp_path))


def test_the_fingerprint_does_not_depend_on_how_often_a_distribution_is_found(
        tmp_path, monkeypatch):
    # make book runs without PYTHONPATH, pytest with PYTHONPATH=repo, where the editable
    # install's metadata is found a second time: the same distributions, the same fingerprint.
    for folder in ("a", "b"):
        info = tmp_path / folder / "demo_dist-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-dist\nVersion: 1.0\n")

    def fingerprint(path):
        monkeypatch.setenv("PYTHONPATH", path)
        execute_chapters.environment_fingerprint.cache_clear()
        return execute_chapters.environment_fingerprint(sys.executable, str(tmp_path))

    once = fingerprint(str(tmp_path / "a"))
    twice = fingerprint(os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    assert once == twice
    (tmp_path / "b" / "demo_dist-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: demo-dist\nVersion: 2.0\n")
    assert fingerprint(os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")])) != once


def test_a_failing_chapter_never_passes_through_the_cache(tmp_path):
    failing = page("x = 1", "assert x == 2, 'the check failed'", "print('after')")
    root = make_book(tmp_path, {"a": failing})
    execute_chapters.run(root, jobs=1, log=lambda *_: None)
    assert cached_runs(root) == {"a.md": None}  # not cached, so nbval executes it (and fails)

    # Even a run cached with its error (allow_errors: true) is read as a failure.
    config = yaml.safe_load((root / "_config.yml").read_text())
    config["execute"]["allow_errors"] = True
    (root / "_config.yml").write_text(yaml.safe_dump(config))
    execute_chapters.run(root, jobs=1, log=lambda *_: None)
    record = cached_runs(root)["a.md"]
    assert record is not None
    chapter = execute_chapters.book_chapters(root, execute_chapters.read_settings(root))[0]
    executed = cache_of(root).get_cache_bundle(record.pk).nb
    assert execute_chapters.execution_problems(chapter, executed) == [
        "code cell 2 raised AssertionError: the check failed"]

    # A run that stopped part-way (a cell never executed) fails too, errors or not.
    executed.cells[-2].outputs = []
    executed.cells[-1].execution_count = None
    assert execute_chapters.execution_problems(chapter, executed) == [
        "code cell 3 has execution count None, not 3: it did not run in order"]
    # And a record of other code never stands in for the chapter.
    executed.cells[-1].source = "print('something else')"
    assert execute_chapters.execution_problems(chapter, executed) == [
        "the cached run has other code cells than a.md"]
