"""The package code that the chapters include fits the book's code column, without a browser.

The chapters show the package's real code with ``literalinclude`` and ``:pyobject:``. The theme
CSS (book/_static/normcourse.css) gives code blocks about 117 characters at a 1280-px window;
tests/test_browser.py measures the rendered blocks, and this test catches a too-long line in an
included object before the book is built (and where chromium is missing).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_CHARACTERS = 115  # the column's ~117 characters, less a margin for fonts slightly wider
INCLUDE = re.compile(r"```\{literalinclude\} \.\./(?P<path>\S+)\n:pyobject: (?P<name>\S+)")


def included_objects() -> list[tuple[str, str, str]]:
    """(chapter, file, object name) for every literalinclude with :pyobject: in book/."""
    return [(md.name, m["path"], m["name"])
            for md in sorted((REPO / "book").glob("*.md"))
            for m in INCLUDE.finditer(md.read_text(encoding="utf-8"))]


def object_lines(path: str, name: str) -> list[tuple[int, str]]:
    """The numbered source lines of the top-level or nested def/class ``name`` in ``path``."""
    source = (REPO / path).read_text(encoding="utf-8")
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            return [(n, lines[n - 1]) for n in range(start, node.end_lineno + 1)]
    raise AssertionError(f"{path} has no def or class named {name}")


def test_the_chapters_include_package_code():
    assert len(included_objects()) >= 10


def test_included_package_code_fits_the_code_column():
    too_long = [f"{chapter}: {path}:{n} ({len(line)} characters)"
                for chapter, path, name in included_objects()
                for n, line in object_lines(path, name) if len(line) > MAX_CHARACTERS]
    assert not too_long, "lines wider than the book's code column: " + "; ".join(too_long)
