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


def grade(notebooks: list[str], timeout: int = 120, as_json: bool = False) -> int:
    """Grade each notebook; print the reports as text, or as one JSON list with ``as_json``."""
    from normcourse.exercises.grading import grade_notebook

    reports = [grade_notebook(path, timeout=timeout) for path in notebooks]
    if as_json:
        print(json.dumps([r.to_dict() for r in reports], indent=1))
    else:
        print("\n\n".join(r.to_text() for r in reports))
    return 0


def bundle(chapters: list[str], out: str, root: str = ".", as_zip: bool = False) -> int:
    """Write a class bundle of ``chapters`` (numbers or slugs) to ``out``."""
    from normcourse.exercises.bundle import bundle as write_bundle

    written = write_bundle(chapters, out, root=root, as_zip=as_zip)
    print(f"wrote {written}")
    return 0


def instructors(write: str | None = None) -> int:
    """Print the instructor page, or write it to the path ``write``."""
    from normcourse.exercises.instructors import instructors_page

    page = instructors_page()
    if write:
        Path(write).write_text(page, encoding="utf-8")
        print(f"wrote {write}")
    else:
        print(page, end="")
    return 0
