"""What each ``python -m normcourse`` command does: plain arguments in, printed output, exit status.

``normcourse/__main__.py`` only parses the command line and calls one of these functions.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["student", "grade", "bundle", "instructors"]


def student(root: str = ".", check: bool = False) -> int:
    """Write ``exercises/NN.ipynb`` from ``exercises/source/`` under ``root``.

    check: write nothing; print the out-of-date student notebooks and return 1 if there are any.
    """
    from normcourse.exercises import notebooks

    source, out = Path(root) / "exercises" / "source", Path(root) / "exercises"
    if check:
        stale = notebooks.out_of_date(source, out)
        for path in stale:
            print(f"out of date: {path}")
        return 1 if stale else 0
    for path in notebooks.write_student_versions(source, out):
        print(f"wrote {path}")
    return 0


def grade(notebooks: list[str], timeout: int = 120, task_timeout: float = 60,
          as_json: bool = False, csv: str | None = None, jobs: int = 1, **limits) -> int:
    """Grade each notebook (files or folders), ``jobs`` at a time, each in a sandbox.

    Prints the reports as text, or as one JSON list with ``as_json``; ``csv``: also write a
    gradebook there. limits: the ``sandbox.Limits`` fields. Returns 1 if a notebook could not be
    graded at all (unreadable, unknown chapter), else 0.
    """
    import sys

    from normcourse.exercises.gradebook import grade_all, write_csv
    from normcourse.exercises.sandbox import Limits

    reports = grade_all(notebooks, jobs=jobs, timeout=timeout, task_timeout=task_timeout,
                        limits=Limits(**limits))
    if csv:
        write_csv(reports, csv)
    if as_json:
        print(json.dumps([r.to_dict() for r in reports], indent=1))
    else:
        print("\n\n".join(r.to_text() for r in reports))
    for r in reports:
        if r.error:
            print(f"normcourse grade: {r.notebook}: {r.error}", file=sys.stderr)
    return 1 if any(r.error for r in reports) else 0


def bundle(chapters: list[str], out: str, root: str = ".", as_zip: bool = False,
           fmt: str = "student") -> int:
    """Write a class bundle of ``chapters`` (numbers or slugs) to ``out``, in format ``fmt``."""
    from normcourse.exercises.bundle import bundle as write_bundle

    written = write_bundle(chapters, out, root=root, as_zip=as_zip, fmt=fmt)
    print(f"wrote {written}")
    return 0


def instructors(write: str | None = None, dockerfile: str | None = None) -> int:
    """Print the instructor page, or write it to the path ``write``; or write the grader's
    container recipe to the path ``dockerfile``."""
    from normcourse.exercises.instructors import instructors_page

    if dockerfile:
        from normcourse.exercises.grading_guide import DOCKERFILE

        Path(dockerfile).write_text(DOCKERFILE, encoding="utf-8")
        print(f"wrote {dockerfile}")
        return 0
    page = instructors_page()
    if write:
        Path(write).write_text(page, encoding="utf-8")
        print(f"wrote {write}")
    else:
        print(page, end="")
    return 0
