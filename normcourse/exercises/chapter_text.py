"""A book chapter as a MyST notebook that reads outside the book, for a class bundle.

The chapters (``book/NN_topic.md``) rely on Sphinx to resolve what they point at: the package's
code (``literalinclude`` with ``:pyobject:``), citations (``{cite}``), cross-references
(``{ref}``, ``{numref}``, ``{eq}``, ``{doc}``) and sphinx-exercise's directives. ``standalone``
rewrites one chapter so that none of that is needed: the included code is copied in, references
become text ("chapter 2 (Batch normalization)", "Ioffe and Szegedy (2015)", "(3)"), the cited
works are listed at the end, admonitions and exercises become plain Markdown. The ``code-cell``
blocks and the jupytext header are kept, so the file still opens as a notebook in JupyterLab
(with jupytext) and its experiments can be run there.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BookIndex", "standalone", "pyobject_source", "read_bibliography"]

ROLE = re.compile(r"\{(cite:t|cite:p|cite|ref|numref|eq|doc|download)\}`([^`]*)`", re.S)
DIRECTIVE = re.compile(r"^(`{3,})\{([\w-]+)\}\s*(.*)$")
TARGET = re.compile(r"^\(([\w-]+)\)=\s*$")
EQUATION_LABEL = re.compile(r"^\$\$ \(([\w-]+)\)\s*$")


def pyobject_source(path: Path, name: str) -> str:
    """The source of the top-level function or class ``name`` in ``path`` (with decorators)."""
    text = Path(path).read_text(encoding="utf-8")
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            return "\n".join(text.splitlines()[start - 1:node.end_lineno])
    raise ValueError(f"{path} defines no function or class {name!r}")


def read_bibliography(path: Path) -> dict[str, dict[str, str]]:
    """``{key: {"author": ..., "title": ..., "year": ..., ...}}`` from a BibTeX file (the simple
    one-field-per-line layout of ``book/references.bib``)."""
    entries: dict[str, dict[str, str]] = {}
    current = None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        start = re.match(r"\s*@\w+\{([^,]+),", line)
        if start:
            current = entries.setdefault(start.group(1).strip(), {})
            continue
        item = re.match(r"\s*(\w+)\s*=\s*\{(.*)\},?\s*$", line)
        if current is not None and item:
            current[item.group(1).lower()] = item.group(2).replace("{", "").replace("}", "")
    return entries


def _surnames(entry: dict[str, str]) -> list[str]:
    return [a.split(",")[0].strip() for a in entry.get("author", "?").split(" and ")]


def _author_text(entry: dict[str, str]) -> str:
    names = _surnames(entry)
    if len(names) == 1:
        return names[0]
    return f"{names[0]} and {names[1]}" if len(names) == 2 else f"{names[0]} et al."


@dataclass
class BookIndex:
    """What the chapters' references point at: labels of every page, the bibliography."""

    root: Path
    titles: dict[str, str] = field(default_factory=dict)  # page stem -> title
    labels: dict[str, tuple[str, str]] = field(default_factory=dict)  # label -> (page, text)
    bibliography: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def read(cls, root: str | Path) -> "BookIndex":
        book = Path(root) / "book"
        index = cls(Path(root), bibliography=read_bibliography(book / "references.bib"))
        for page in sorted(book.glob("*.md")):
            lines = page.read_text(encoding="utf-8").splitlines()
            headings = [line.lstrip("#").strip() for line in lines if re.match(r"#+ ", line)]
            index.titles[page.stem] = headings[0] if headings else page.stem
            for number, line in enumerate(lines):
                target = TARGET.match(line)
                if target:
                    following = next((x for x in lines[number + 1:] if x.strip()), "")
                    index.labels[target.group(1)] = (page.stem, following.lstrip("#").strip())
        return index

    def page_text(self, page: str, bundled: set[str] = frozenset()) -> str:
        """``*Batch normalization* (chapter 2)``, as the book's link reads, plus where it is."""
        number = page.split("_")[0]
        title = self.titles.get(page, page)
        if not number.isdigit():
            return f"*{title}* (a page of the book)"
        return f"*{title}* (chapter {int(number)}{'' if page in bundled else ', not in this bundle'})"


class _Chapter:
    """The per-chapter numbering of equations, figures and exercises, and the works cited."""

    def __init__(self, text: str):
        self.equations = {m: i for i, m in enumerate(
            re.findall(r"^\$\$ \(([\w-]+)\)\s*$", text, re.M), start=1)}
        self.figures = {m: i for i, m in enumerate(
            re.findall(r"^\s*name: (fig-[\w-]+)\s*$", text, re.M), start=1)}
        self.exercises = {m: i for i, m in enumerate(
            re.findall(r"^```+\{exercise\}.*\n:label: ([\w-]+)", text, re.M), start=1)}
        self.cited: list[str] = []


def _resolve_role(role: str, content: str, page: str, index: BookIndex, chapter: _Chapter,
                  bundled: set[str]) -> str:
    explicit = re.match(r"(.*?)\s*<([^>]+)>\s*$", content, re.S)
    text, target = (explicit.group(1), explicit.group(2)) if explicit else (None, content.strip())
    text = " ".join(text.split()) if text else None
    if role.startswith("cite"):
        keys = [k.strip() for k in target.split(",")]
        chapter.cited += [k for k in keys if k not in chapter.cited]
        entries = [(index.bibliography.get(k, {"author": k, "year": "?"})) for k in keys]
        if role == "cite:t":
            return "; ".join(f"{_author_text(e)} ({e.get('year', '?')})" for e in entries)
        return "(" + "; ".join(f"{_author_text(e)}, {e.get('year', '?')}" for e in entries) + ")"
    if role == "eq":
        return f"({chapter.equations.get(target, target)})"
    if role == "numref":
        if target in chapter.figures:
            return f"Figure {chapter.figures[target]}"
        return text or "the figure"
    if role == "doc":
        if target == "bibliography":
            return text or "references below"
        return index.page_text(target, bundled) if text is None else f"{text} ({index.page_text(target, bundled)})"
    if role == "download":
        return text or target
    # ref: a section, a chapter or an exercise
    if target in chapter.exercises:
        return text or f"exercise {chapter.exercises[target]}"
    where_page, title = index.labels.get(target, (page, target))
    if where_page == page:
        return text or f"*{title}*"
    elsewhere = index.page_text(where_page, bundled)
    return elsewhere if text is None else f"{text} (in {elsewhere})"


def _reference_list(keys: list[str], index: BookIndex) -> list[str]:
    lines = ["", "## References", ""]
    for key in keys:
        e = index.bibliography.get(key, {})
        venue = e.get("journal") or e.get("booktitle") or e.get("note") or ""
        lines.append(f"- {e.get('author', key).replace(' and ', ', ')} ({e.get('year', '?')}). "
                     f"{e.get('title', key)}." + (f" {venue}." if venue else ""))
    return lines


def standalone(page: str | Path, index: BookIndex, bundled: set[str] = frozenset()) -> str:
    """The chapter ``page`` (a path to ``book/NN_topic.md``) rewritten to read on its own.

    bundled: the slugs of the chapters in the same bundle (references to others say so).
    """
    page = Path(page)
    text = page.read_text(encoding="utf-8")
    chapter = _Chapter(text)
    out: list[str] = []
    open_fences: list[str] = []  # directives being unwrapped
    code_fence = None  # inside a code block (kept as is) closed by this fence
    skip_options = False
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if code_fence:
            out.append(line)
            if line.strip() == code_fence:
                code_fence = None
            continue
        if skip_options:
            if line.startswith(":") and re.match(r":[\w-]+:", line):
                continue
            skip_options = False
        directive = DIRECTIVE.match(line)
        if directive:
            fence, name, argument = directive.groups()
            if name == "code-cell":
                out.append(line)
                code_fence = fence
                continue
            if name == "literalinclude":
                options = {}
                while i < len(lines) and lines[i].strip() != fence:
                    option = re.match(r":([\w-]+):\s*(.*)", lines[i])
                    if option:
                        options[option.group(1)] = option.group(2).strip()
                    i += 1
                i += 1
                source = (page.parent / argument.strip()).resolve()
                code = (pyobject_source(source, options["pyobject"]) if "pyobject" in options
                        else source.read_text(encoding="utf-8").rstrip("\n"))
                relative = source.relative_to(index.root.resolve()) if source.is_relative_to(
                    index.root.resolve()) else source.name
                out += [f"From `{relative}`:", "", "```python", code, "```"]
                continue
            label_line = lines[i] if i < len(lines) else ""
            label = re.match(r":label: ([\w-]+)", label_line)
            if name == "exercise":
                number = chapter.exercises.get(label.group(1)) if label else None
                out.append(f"**Exercise {number}.**" if number else "**Exercise.**")
            elif name in ("solution", "solution-start"):
                number = chapter.exercises.get(argument.strip())
                out.append(f"**Solution of exercise {number}.**" if number else "**Solution.**")
            elif name == "solution-end":
                pass
            else:
                out.append(f"**{argument.strip() or name.capitalize()}**")
            out.append("")
            if name in ("solution-start", "solution-end"):
                # These directives are empty: their fence closes at once.
                while i < len(lines) and lines[i].strip() != fence:
                    i += 1
                i += 1
                continue
            open_fences.append(fence)
            skip_options = True
            continue
        if open_fences and line.strip() == open_fences[-1]:
            open_fences.pop()
            continue
        plain_code = re.match(r"^(`{3,}|~{3,})[\w+-]*\s*$", line)
        if plain_code:
            code_fence = plain_code.group(1)
            out.append(line)
            continue
        if TARGET.match(line):
            continue
        equation = EQUATION_LABEL.match(line)
        if equation:
            out.append(f"$$ ({chapter.equations[equation.group(1)]})")
            continue
        out.append(line)
    body = "\n".join(out)
    body = ROLE.sub(lambda m: _resolve_role(m.group(1), m.group(2), page.stem, index, chapter,
                                            set(bundled)), body)
    if chapter.cited:
        body = body.rstrip("\n") + "\n" + "\n".join(_reference_list(chapter.cited, index))
    return body.rstrip("\n") + "\n"
