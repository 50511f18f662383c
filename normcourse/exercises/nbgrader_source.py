"""Exercise notebooks in nbgrader's format, for courses that grade with nbgrader on JupyterHub.

``nbgrader_notebook`` turns a source notebook (with solutions) into an nbgrader *source*
notebook, whose cells carry nbgrader's metadata (schema version 3):

- each task's solution cell (``### BEGIN SOLUTION`` ... ``### END SOLUTION``, the same markers
  nbgrader uses): an autograded answer cell, ``solution: true``;
- each task's check cell: a locked autograder test cell worth the task's points. It prints the
  checker's verdict and ends with the points earned, which nbgrader takes as partial credit (a
  number as a test cell's last output), so the per-output split of the catalogue carries over;
- each written question's answer cell: a manually graded answer cell worth ``WRITTEN_POINTS``.

``nbgrader generate_assignment`` then writes the student version (nbgrader's own stubs) and
``nbgrader autograde`` grades it; the test cells need ``normcourse`` installed where they run.
"""

from __future__ import annotations

import copy
import re

import nbformat

from normcourse.exercises.catalog import Chapter
from normcourse.exercises.notebooks import BEGIN, NOTEBOOK_METADATA

__all__ = ["nbgrader_notebook", "WRITTEN_POINTS", "SCHEMA_VERSION", "test_cell_source"]

SCHEMA_VERSION = 3
WRITTEN_POINTS = 1  # per written question, graded by hand in nbgrader's formgrader
CHECK_CALL = re.compile(r"""check\(\s*["'](\d\d\.\w+)["']\s*,\s*(\w+)\s*\)""")


def test_cell_source(task_id: str, function: str) -> str:
    """The autograder test cell of one task: the verdict, then the points earned."""
    return (
        "# Autograded by nbgrader: prints the checker's verdict; the number on the last line is\n"
        "# the points earned (partial credit).\n"
        "from normcourse.exercises import check_answer\n\n"
        f"_result = check_answer({task_id!r}, {function})\n"
        "print(_result.line())\n"
        "_result.points"
    )


def _metadata(grade_id: str, grade: bool, solution: bool, locked: bool, points=None) -> dict:
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked,
            "schema_version": SCHEMA_VERSION, "solution": solution, "task": False}
    if points is not None:
        meta["points"] = points
    return meta


def _safe(identifier: str) -> str:
    return identifier.replace(".", "-")


def nbgrader_notebook(source: nbformat.NotebookNode, chapter: Chapter) -> nbformat.NotebookNode:
    """The nbgrader source version of a source notebook (a new notebook; ``source`` unchanged)."""
    notebook = copy.deepcopy(source)
    notebook.metadata = copy.deepcopy(NOTEBOOK_METADATA)
    notebook.metadata["normcourse"] = {"chapter": chapter.slug, "version": "nbgrader"}
    tasks = {t.function: t for t in chapter.tasks}
    untied = 0
    for cell in notebook.cells:
        normcourse_meta = cell.metadata.get("normcourse")
        cell.metadata = {"normcourse": normcourse_meta} if normcourse_meta else {}
        cell.pop("attachments", None)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            check_call = CHECK_CALL.search(cell.source)
            if BEGIN in cell.source:
                defined = re.findall(r"^def (\w+)\(", cell.source, re.M)
                task = next((tasks[name] for name in defined if name in tasks), None)
                untied += task is None  # a solution cell of no task still needs its own id
                grade_id = f"{_safe(task.id)}-solution" if task else f"{chapter.slug}-solution-{untied}"
                cell.metadata["nbgrader"] = _metadata(grade_id, False, True, False)
            elif check_call:
                task_id, function = check_call.groups()
                task = next(t for t in chapter.tasks if t.id == task_id)
                cell.source = test_cell_source(task_id, function)
                cell.metadata["nbgrader"] = _metadata(f"{_safe(task_id)}-test", True, False, True,
                                                      task.points)
        elif cell.cell_type == "markdown" and normcourse_meta and normcourse_meta.get("question"):
            cell.metadata["nbgrader"] = _metadata(_safe(normcourse_meta["question"]), True, True,
                                                  False, WRITTEN_POINTS)
    nbformat.validate(notebook)
    return notebook
