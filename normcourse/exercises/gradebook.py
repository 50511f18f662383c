"""Grade a class: every notebook in the given files and folders, in parallel, into a gradebook.

``find_notebooks(paths)`` lists the ``.ipynb`` files (folders searched recursively, checkpoints
skipped); ``grade_all(paths, jobs=N, ...)`` grades them, N at a time, each in its own sandbox
(one submission's failure is in its own report only); ``write_csv`` writes one row per submission:
student (the file name without ``.ipynb``), file, chapter, the points of each task, total, maximum,
flags and errors.
"""

from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from normcourse.exercises.grading import GradeReport, grade_notebook

__all__ = ["find_notebooks", "grade_all", "write_csv"]


def find_notebooks(paths) -> list[Path]:
    """The notebooks named, and those in the folders named, sorted; FileNotFoundError if none."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*.ipynb")
                            if ".ipynb_checkpoints" not in p.parts and p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    if not found:
        raise FileNotFoundError("no .ipynb notebooks in " + ", ".join(map(str, paths)))
    return list(dict.fromkeys(found))


def grade_all(paths, jobs: int = 1, **options) -> list[GradeReport]:
    """Grade every notebook in ``paths`` (files and folders), ``jobs`` at a time, in order.

    options: passed to ``grade_notebook`` (timeout, task_timeout, limits). The folders holding the
    notebooks are mounted read-only for the submissions where this machine allows it.
    """
    notebooks = find_notebooks(paths)
    folders = tuple(sorted({str(p.resolve().parent) for p in notebooks} | {str(Path.cwd())}))
    options.setdefault("read_only", folders)

    def grade(path):
        try:
            return grade_notebook(path, **options)
        except Exception as error:  # noqa: BLE001 - one submission never stops the class
            report = GradeReport(str(path), "")
            report.error = f"the grader failed on this notebook: {type(error).__name__}: {error}"
            return report

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(grade, notebooks))


def write_csv(reports: list[GradeReport], path) -> None:
    """One row per submission; a column per task id of any graded chapter (empty if not its)."""
    task_ids = list(dict.fromkeys(t["task"] for r in reports for t in r.tasks))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "file", "chapter", *task_ids, "total", "max_points",
                         "flags", "error"])
        for r in reports:
            points = {t["task"]: t["points"] for t in r.tasks}
            writer.writerow([Path(r.notebook).stem, r.notebook, r.chapter,
                             *[points.get(t, "") for t in task_ids], r.points, r.max_points,
                             " | ".join(r.flags), r.error or r.problem or ""])
