"""Grade a submitted exercise notebook: run it, then check every task of its chapter.

The grader trusts nothing the notebook prints, stores or computes about itself: it runs the
notebook in a sandbox (``sandbox``, ``submission``), then checks each task's function with its own
checks, computing the verdict outside the submission's processes (``answers``). ``GradeReport``
holds per-task points and diagnoses, written answers, cell errors, flags and the isolation used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from normcourse.exercises.catalog import CHAPTERS, Chapter, chapter
from normcourse.exercises.diagnosis import points_text
from normcourse.exercises.notebooks import ANSWER_PROMPT
from normcourse.exercises.sandbox import Limits

__all__ = ["GradeReport", "grade_notebook"]


@dataclass
class GradeReport:
    """Per-task points and diagnoses for one notebook, plus its written answers and cell errors."""

    notebook: str
    chapter: str
    tasks: list[dict] = field(default_factory=list)
    written: list[dict] = field(default_factory=list)
    cell_errors: list[str] = field(default_factory=list)
    check_cells: list[dict] = field(default_factory=list)  # what the notebook's own checks showed
    problem: str | None = None  # the notebook could not be run to the end
    flags: list[str] = field(default_factory=list)  # attempts to fake a grade, solutions used
    isolation: dict = field(default_factory=dict)  # the sandbox's limits and protections
    error: str | None = None  # not graded at all (unreadable, unknown chapter)

    @property
    def points(self) -> int:
        return sum(t["points"] for t in self.tasks)

    @property
    def max_points(self) -> int:
        return sum(t["max_points"] for t in self.tasks)

    def to_dict(self) -> dict:
        return {
            "notebook": self.notebook,
            "chapter": self.chapter,
            "points": self.points,
            "max_points": self.max_points,
            "tasks": self.tasks,
            "written": self.written,
            "cell_errors": self.cell_errors,
            "check_cells": self.check_cells,
            "problem": self.problem,
            "flags": self.flags,
            "isolation": self.isolation,
            "error": self.error,
        }

    def to_text(self) -> str:
        lines = [f"{self.notebook} (chapter {self.chapter})"]
        width = max((len(t["task"]) for t in self.tasks), default=0)
        for t in self.tasks:
            status = {"pass": "PASS", "fail": "FAIL", "not_implemented": "TODO"}[t["status"]]
            lines.append(f"  {t['task']:<{width}}  {points_text(t)}  {status:<4}  {t['message']}")
        lines.append(f"  total: {self.points}/{self.max_points} points (auto-checked)")
        for w in self.written:
            state = "answered" if w["answered"] else "not answered"
            lines.append(f"  written question {w['question']}: {state} (grade by hand)")
        for error in self.cell_errors:
            lines.append(f"  cell error: {error}")
        if self.problem:
            lines.append(f"  problem: {self.problem}")
        for flag in self.flags:
            lines.append(f"  FLAG: {flag}")
        if self.error:
            lines.append(f"  ERROR, not graded: {self.error}")
        return "\n".join(lines)


def _chapter_of(notebook: nbformat.NotebookNode, path: Path) -> tuple[str, str | None]:
    """(chapter slug, note): from the metadata, else inferred from the file name (noted).

    An unknown chapter gives ("", the error message).
    """
    meta = notebook.metadata.get("normcourse", {})
    given = meta.get("chapter") if isinstance(meta, dict) else None
    found = [c.slug for c in CHAPTERS if c.slug in path.name]
    try:
        if given:
            return chapter(str(given)).slug, None
        if len(found) == 1:
            return found[0], (f"the notebook's metadata has no chapter; {found[0]} inferred "
                              "from the file name")
        if found:
            raise ValueError(f"the file name names several chapters: {', '.join(found)}")
        slug = chapter(path.stem).slug  # raises, naming the chapters, unless a chapter key
        return slug, f"the notebook's metadata has no chapter; {slug} inferred from the file name"
    except ValueError as error:
        where = "its metadata" if given else "its metadata (none) and file name"
        return "", f"cannot tell which chapter this notebook belongs to from {where}: {error}"


def _written_answers(notebook: nbformat.NotebookNode, chapter: Chapter) -> list[dict]:
    """The answer to each of the chapter's written questions (in the catalogue's order): the
    markdown cell tagged with metadata ``normcourse.question``; a deleted cell is not answered."""
    texts = {}
    for cell in notebook.cells:
        question = cell.metadata.get("normcourse", {}).get("question")
        if cell.cell_type == "markdown" and question:
            texts[question] = cell.source.strip()
    answers = []
    for question in chapter.question_ids:
        text = texts.get(question, "")
        answered = bool(text) and ANSWER_PROMPT not in text
        answers.append({"question": question, "answered": answered, "answer": text})
    return answers


def grade_notebook(path: str | Path, timeout: int = 120, task_timeout: float = 60,
                   limits: Limits | None = None, read_only: tuple[str, ...] = ()) -> GradeReport:
    """Grade the notebook at ``path`` in a sandbox (``submission``); the file is not changed.

    timeout: seconds per cell of the notebook's run (a longer cell is interrupted, the next one
    runs). task_timeout: seconds per task of the grader's checks. limits: the sandbox's resource
    limits. read_only: folders the submission must not change (mounted read-only where this
    machine allows). Never raises for a broken notebook: the problem is in the report; a notebook
    whose chapter is unknown gets ``error`` set.
    """
    from normcourse.exercises.submission import grade_submission

    path = Path(path)
    report = GradeReport(str(path), "")
    try:
        notebook = nbformat.read(path, as_version=4)
    except Exception as error:  # noqa: BLE001 - not JSON, not a notebook, unreadable
        report.error = f"cannot read the notebook: {type(error).__name__}: {error}"
        return report
    report.chapter, note = _chapter_of(notebook, path)
    if not report.chapter:
        report.error = report.problem = note
        return report
    if note:
        report.flags.append(note)
    report.written = _written_answers(notebook, chapter(report.chapter))
    found = grade_submission(path, notebook, report.chapter, timeout=timeout,
                             task_timeout=task_timeout, limits=limits, read_only=read_only)
    for key, value in found.items():
        setattr(report, key, value if key != "flags" else report.flags + value)
    return report


