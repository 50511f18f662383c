"""Grade a submitted exercise notebook: run it, then check every task of its chapter.

The grader does not trust the notebook's own check cells (a student may have edited or deleted
them). It executes the notebook with nbclient (kernel ``python3``, one thread, a timeout per cell,
errors allowed so that one broken cell costs only its own tasks), then appends one cell that looks
up each task's function by name in the kernel's namespace, checks it, and prints the results as
JSON after the marker ``RESULT_MARKER``. The chapter's tasks, points and written questions come
from the catalogue.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

import normcourse
from normcourse.exercises.catalog import Chapter, chapter as find_chapter, tasks_for_chapter
from normcourse.exercises.checks import RESULT_MIME
from normcourse.exercises.diagnosis import Result
from normcourse.exercises.notebooks import ANSWER_PROMPT

__all__ = ["GradeReport", "grade_notebook", "report_namespace", "RESULT_MARKER"]

RESULT_MARKER = "NORMCOURSE-GRADE "


def report_namespace(chapter: str, namespace: dict) -> None:
    """Check each task of ``chapter`` with the function of that name in ``namespace``; print JSON.

    This runs inside the graded notebook's kernel, as its last cell.
    """
    results = []
    for task in tasks_for_chapter(chapter):
        answer = namespace.get(task.function)
        if answer is None:
            result = Result(task.id, task.title, "fail", 0, task.points,
                            f"no function `{task.function}` is defined in the notebook.")
        else:
            result = task.check(answer)
        results.append(result.to_dict())
    print(RESULT_MARKER + json.dumps(results))


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
        }

    def to_text(self) -> str:
        lines = [f"{self.notebook} (chapter {self.chapter})"]
        width = max((len(t["task"]) for t in self.tasks), default=0)
        for t in self.tasks:
            status = {"pass": "PASS", "fail": "FAIL", "not_implemented": "TODO"}[t["status"]]
            lines.append(f"  {t['task']:<{width}}  {t['points']}/{t['max_points']}  {status:<4}  "
                         f"{t['message']}")
        lines.append(f"  total: {self.points}/{self.max_points} points (auto-checked)")
        for w in self.written:
            state = "answered" if w["answered"] else "not answered"
            lines.append(f"  written question {w['question']}: {state} (grade by hand)")
        for error in self.cell_errors:
            lines.append(f"  cell error: {error}")
        if self.problem:
            lines.append(f"  problem: {self.problem}")
        return "\n".join(lines)


def _chapter_of(notebook: nbformat.NotebookNode, path: Path) -> str:
    return notebook.metadata.get("normcourse", {}).get("chapter") or path.stem


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


def _kernel_env() -> dict:
    """The grading kernel's environment: one thread, and this normcourse importable."""
    package_parent = str(Path(normcourse.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": package_parent + (os.pathsep + path if path else ""),
    }


def grade_notebook(path: str | Path, timeout: int = 120) -> GradeReport:
    """Execute the notebook at ``path`` (a copy; the file is not changed) and grade it.

    timeout: seconds allowed per cell. Never raises for a broken notebook: the problem is in the
    report, and the tasks it prevented from being checked get 0 points.
    """
    from nbclient import NotebookClient  # imported here: only the grader needs it

    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    chapter = _chapter_of(notebook, path)
    report = GradeReport(str(path), chapter)
    try:
        report.written = _written_answers(notebook, find_chapter(chapter))
    except ValueError as error:  # neither the metadata nor the file name names a chapter
        report.problem = f"cannot tell which chapter this notebook belongs to: {error}"
        return report
    notebook.cells.append(nbformat.v4.new_code_cell(
        "from normcourse.exercises.grading import report_namespace as _normcourse_report\n"
        f"_normcourse_report({chapter!r}, globals())"
    ))
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", allow_errors=True,
        resources={"metadata": {"path": str(path.parent.resolve())}},
    )
    try:
        client.execute(env=_kernel_env())
    except Exception as error:  # a timeout or a dead kernel: grade what can be graded (nothing)
        report.problem = f"the notebook could not be run to the end: {type(error).__name__}: {error}"
    for index, cell in enumerate(notebook.cells[:-1]):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                report.cell_errors.append(f"cell {index}: {output['ename']}: {output['evalue']}")
            elif RESULT_MIME in output.get("data", {}):
                report.check_cells.append(dict(output["data"][RESULT_MIME]))
    report.tasks = _parse_results(notebook.cells[-1])
    if not report.tasks:
        report.tasks = [
            Result(t.id, t.title, "fail", 0, t.points, "not checked: the notebook did not run to "
                   "the end.").to_dict()
            for t in tasks_for_chapter(chapter)
        ]
    return report


def _parse_results(cell) -> list[dict]:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            for line in output.get("text", "").splitlines():
                if line.startswith(RESULT_MARKER):
                    return json.loads(line[len(RESULT_MARKER):])
    return []
