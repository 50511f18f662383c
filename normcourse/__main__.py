"""Command line: ``python -m normcourse COMMAND`` (also installed as the ``normcourse`` script).

Commands: ``student`` (write the student notebooks), ``grade`` (grade submitted notebooks),
``bundle`` (chapters and exercises for a class), ``instructors`` (the book's instructor page).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _student(args) -> int:
    from normcourse.exercises import notebooks

    source, out = Path(args.root) / "exercises" / "source", Path(args.root) / "exercises"
    if args.check:
        stale = notebooks.out_of_date(source, out)
        for path in stale:
            print(f"out of date: {path}")
        return 1 if stale else 0
    for path in notebooks.write_student_versions(source, out):
        print(f"wrote {path}")
    return 0


def _grade(args) -> int:
    from normcourse.exercises.gradebook import grade_all, write_csv
    from normcourse.exercises.sandbox import LIMIT_UNITS, Limits

    limits = Limits(**{name: getattr(args, name) for name in LIMIT_UNITS})
    reports = grade_all(args.notebooks, jobs=args.jobs, timeout=args.timeout,
                        task_timeout=args.task_timeout, limits=limits)
    if args.csv:
        write_csv(reports, args.csv)
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=1))
    else:
        print("\n\n".join(r.to_text() for r in reports))
    errors = [r for r in reports if r.error]
    for r in errors:
        print(f"normcourse grade: {r.notebook}: {r.error}", file=sys.stderr)
    return 1 if errors else 0


def _bundle(args) -> int:
    from normcourse.exercises.bundle import bundle

    written = bundle(args.chapters, args.out, root=args.root, as_zip=args.zip)
    print(f"wrote {written}")
    return 0


def _instructors(args) -> int:
    from normcourse.exercises.bundle import instructors_page

    if args.dockerfile:
        from normcourse.exercises.grading_guide import DOCKERFILE

        Path(args.dockerfile).write_text(DOCKERFILE, encoding="utf-8")
        print(f"wrote {args.dockerfile}")
        return 0
    page = instructors_page()
    if args.write:
        Path(args.write).write_text(page, encoding="utf-8")
        print(f"wrote {args.write}")
    else:
        print(page, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    from normcourse.exercises.sandbox import LIMIT_UNITS, Limits

    parser = argparse.ArgumentParser(prog="normcourse", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    student = commands.add_parser("student", help="write exercises/NN.ipynb from exercises/source/")
    student.add_argument("--root", default=".", help="repository root (default: .)")
    student.add_argument("--check", action="store_true",
                         help="write nothing; exit 1 if a student notebook is out of date")
    student.set_defaults(run=_student)

    grade = commands.add_parser("grade", help="run and grade submitted exercise notebooks")
    grade.add_argument("notebooks", nargs="+", help="the .ipynb files and folders to grade")
    grade.add_argument("--json", action="store_true", help="print the reports as JSON")
    grade.add_argument("--csv", metavar="PATH", help="write a gradebook: one row per submission")
    grade.add_argument("--jobs", type=int, default=1, help="notebooks graded at once (default 1)")
    grade.add_argument("--timeout", type=int, default=120, help="seconds per cell (default 120)")
    grade.add_argument("--task-timeout", type=float, default=60,
                       help="seconds per task of the grader's checks (default 60)")
    defaults = Limits()
    for name, unit in LIMIT_UNITS.items():
        grade.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name),
                           help=f"limit: {unit} (default {getattr(defaults, name)})")
    grade.set_defaults(run=_grade)

    bundle = commands.add_parser("bundle", help="copy chapters and their exercises for a class")
    bundle.add_argument("--chapters", nargs="+", required=True, help="chapter numbers, e.g. 2 3")
    bundle.add_argument("--out", required=True, help="output folder (or zip with --zip)")
    bundle.add_argument("--zip", action="store_true", help="write a zip archive")
    bundle.add_argument("--root", default=".", help="repository root (default: .)")
    bundle.set_defaults(run=_bundle)

    instructors = commands.add_parser("instructors", help="print or write the instructor page")
    instructors.add_argument("--write", metavar="PATH", help="write the page to PATH")
    instructors.add_argument("--dockerfile", metavar="PATH",
                             help="write the grader's container recipe to PATH instead")
    instructors.set_defaults(run=_instructors)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, KeyError) as error:
        print(f"normcourse {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
