"""Command line: ``python -m normcourse COMMAND`` (also installed as the ``normcourse`` script).

Commands: ``student`` (write the student notebooks), ``grade`` (grade submitted notebooks),
``bundle`` (chapters and exercises for a class), ``instructors`` (the book's instructor page).
This module only parses arguments; ``normcourse.exercises.commands`` does the work.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    from normcourse.exercises import commands
    from normcourse.exercises.sandbox import LIMIT_UNITS, Limits

    parser = argparse.ArgumentParser(prog="normcourse", description=__doc__.splitlines()[0])
    subcommands = parser.add_subparsers(dest="command", required=True)

    student = subcommands.add_parser("student", help="write exercises/NN.ipynb from exercises/source/")
    student.add_argument("--root", default=".", help="repository root (default: .)")
    student.add_argument("--check", action="store_true",
                         help="write nothing; exit 1 if a student notebook is out of date")
    student.set_defaults(run=commands.student)

    grade = subcommands.add_parser("grade", help="run and grade submitted exercise notebooks")
    grade.add_argument("notebooks", nargs="+", help="the .ipynb files and folders to grade")
    grade.add_argument("--json", dest="as_json", action="store_true",
                       help="print the reports as JSON")
    grade.add_argument("--csv", metavar="PATH", help="write a gradebook: one row per submission")
    grade.add_argument("--jobs", type=int, default=1, help="notebooks graded at once (default 1)")
    grade.add_argument("--timeout", type=int, default=120, help="seconds per cell (default 120)")
    grade.add_argument("--task-timeout", type=float, default=60,
                       help="seconds per task of the grader's checks (default 60)")
    defaults = Limits()
    for name, unit in LIMIT_UNITS.items():
        grade.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name),
                           help=f"limit: {unit} (default {getattr(defaults, name)})")
    grade.set_defaults(run=commands.grade)

    bundle = subcommands.add_parser("bundle", help="copy chapters and their exercises for a class")
    bundle.add_argument("--chapters", nargs="+", required=True, help="chapter numbers, e.g. 2 3")
    bundle.add_argument("--out", required=True, help="output folder (or zip with --zip)")
    bundle.add_argument("--zip", dest="as_zip", action="store_true", help="write a zip archive")
    bundle.add_argument("--root", default=".", help="repository root (default: .)")
    bundle.add_argument("--format", dest="fmt", choices=("student", "nbgrader"), default="student",
                        help="student: notebooks, chapters, wheel, README (default); nbgrader: an "
                             "nbgrader course folder with source notebooks (with solutions)")
    bundle.set_defaults(run=commands.bundle)

    instructors = subcommands.add_parser("instructors", help="print or write the instructor page")
    instructors.add_argument("--write", metavar="PATH", help="write the page to PATH")
    instructors.add_argument("--dockerfile", metavar="PATH",
                             help="write the grader's container recipe to PATH instead")
    instructors.set_defaults(run=commands.instructors)
    return parser


def main(argv: list[str] | None = None) -> int:
    options = vars(_parser().parse_args(argv))
    command, run = options.pop("command"), options.pop("run")
    try:
        return run(**options)
    except (FileNotFoundError, ValueError) as error:  # missing files, unknown chapters
        print(f"normcourse {command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
