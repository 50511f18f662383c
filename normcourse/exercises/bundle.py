"""Instructor tools: a class bundle of chosen chapters, and the book's instructor page.

``bundle(...)`` copies the chosen chapters' MyST sources and student notebooks into a folder (or a
zip) with a README listing objectives, times and prerequisites. ``instructors_page()`` renders
``book/instructors.md`` from the same catalogue (a test keeps the committed page in sync).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from normcourse.exercises.catalog import CHAPTERS, Chapter, chapter
from normcourse.exercises.checks import tasks_for_chapter
from normcourse.exercises.grading_guide import grading_section

__all__ = ["bundle", "bundle_readme", "instructors_page"]


def _prerequisite_text(item: str) -> str:
    return f"chapter {int(item[:2])} ({chapter(item).title})" if item[:2].isdigit() else item


def bundle_readme(chapters: list[Chapter]) -> str:
    """The README of a class bundle: what is in it, objectives, times, prerequisites."""
    chosen = {c.slug for c in chapters}
    lines = [
        "# normcourse: class bundle",
        "",
        "Chapters of the normcourse book with their exercise notebooks. Install the companion "
        "package (`pip install -e .` in a clone of the normcourse repository), then open the "
        "notebooks in `exercises/` with JupyterLab. Each task ends with a check cell that prints "
        "PASS, FAIL with a diagnosis, or NOT IMPLEMENTED.",
        "",
        "Instructors grade a submitted notebook with `python -m normcourse grade NOTEBOOK.ipynb` "
        "(add `--json` for machine-readable output).",
        "",
    ]
    for c in chapters:
        tasks = tasks_for_chapter(c.slug)
        points = sum(t.points for t in tasks)
        lines += [
            f"## {c.number}. {c.title}",
            "",
            f"- Chapter: `chapters/{c.slug}.md`; exercises: `exercises/{c.slug}.ipynb` "
            f"({len(tasks)} auto-checked tasks, {points} points, plus written questions)",
            f"- Time: about {c.reading_minutes} min reading, {c.exercise_minutes} min exercises",
            "- Prerequisites: " + "; ".join(_prerequisite_text(p) for p in c.prerequisites),
            "",
            "Learning objectives:",
            "",
            *[f"- {objective}" for objective in c.objectives],
            "",
        ]
    missing = sorted({p for c in chapters for p in c.prerequisites if p[:2].isdigit()} - chosen)
    if missing:
        lines += ["## Prerequisite chapters not in this bundle", "",
                  *[f"- {_prerequisite_text(p)}" for p in missing], ""]
    return "\n".join(lines)


def bundle(chapter_keys, out: str | Path, root: str | Path = ".", as_zip: bool = False) -> Path:
    """Copy the chosen chapters and their student notebooks, with a README, into ``out``.

    chapter_keys: numbers or slugs, e.g. ``[2, 3]``. root: the repository (holding ``book/`` and
    ``exercises/``). as_zip: write ``out`` as a zip archive instead of a folder (``.zip`` is added
    if missing). Returns the folder or zip written. Raises FileNotFoundError naming any missing file.
    """
    root = Path(root)
    chapters = sorted({chapter(k) for k in chapter_keys}, key=lambda c: c.number)
    files = []
    for c in chapters:
        files.append((root / "book" / f"{c.slug}.md", Path("chapters") / f"{c.slug}.md"))
        files.append((root / "exercises" / f"{c.slug}.ipynb", Path("exercises") / f"{c.slug}.ipynb"))
    missing = [str(source) for source, _ in files if not source.is_file()]
    if missing:
        raise FileNotFoundError("cannot bundle, missing: " + ", ".join(missing))

    def write(folder: Path) -> None:
        for source, relative in files:
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, folder / relative)
        (folder / "README.md").write_text(bundle_readme(chapters), encoding="utf-8")

    out = Path(out)
    if not as_zip:
        out.mkdir(parents=True, exist_ok=True)
        write(out)
        return out
    base = out.with_suffix("") if out.suffix == ".zip" else out
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        return Path(shutil.make_archive(str(base), "zip", tmp))


def instructors_page() -> str:
    """The MyST source of ``book/instructors.md``."""
    total_tasks = sum(len(tasks_for_chapter(c.slug)) for c in CHAPTERS)
    lines = [
        "# For instructors",
        "",
        "This page is generated from `normcourse/exercises/catalog.py` by "
        "`python -m normcourse instructors --write book/instructors.md`; edit the catalogue, not "
        "this page.",
        "",
        "Every chapter has an exercise notebook with auto-checked coding tasks and written "
        f"questions ({total_tasks} auto-checked tasks in all). Students open "
        "`exercises/NN_name.ipynb` in JupyterLab; after each task a check cell runs the "
        "student's function on small float64 test cases, compares it with the package's "
        "reference implementation and with a catalogue of typical wrong implementations, and "
        "names the mistake it recognises (biased against unbiased variance, `eps` outside the "
        "root, the wrong axis, the Keras momentum sense, a forgotten `gamma`/`beta`, a wrong "
        "shape, a forgotten eval mode, ...). Written questions are graded by hand.",
        "",
        "## Overview",
        "",
        "| Chapter | Reading | Exercises | Prerequisites | Exercise notebook |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in CHAPTERS:
        prerequisites = "; ".join(
            f"{{doc}}`{p}`" if p[:2].isdigit() else p for p in c.prerequisites)
        lines.append(
            f"| {{doc}}`{c.slug}` | {c.reading_minutes} min | {c.exercise_minutes} min | "
            f"{prerequisites} | {{download}}`{c.slug}.ipynb <../exercises/{c.slug}.ipynb>` |"
        )
    lines += [
        "",
        "## Tools",
        "",
        "All commands run from the repository root (`normcourse` is also installed as a console "
        "script):",
        "",
        "```bash",
        "python -m normcourse student            # regenerate exercises/*.ipynb from exercises/source/",
        "python -m normcourse grade exercises/02_batch_norm.ipynb          # per-task points",
        "python -m normcourse grade submissions/ --jobs 2 --csv grades.csv  # a class",
        "python -m normcourse bundle --chapters 2 3 --out class-week-1     # or --zip",
        "```",
        "",
        "- The sources with solutions are `exercises/source/NN_name.ipynb`; each solution sits "
        "between `### BEGIN SOLUTION` and `### END SOLUTION`. The student versions replace it "
        "with `raise NotImplementedError(...)` (code) or an answer prompt (written questions), "
        "and the test suite checks that the committed student versions are up to date.",
        "- The grader runs each submission in a sandbox, then checks every task's function by "
        "name with its own checks, so edited, deleted or faked check cells do not change the "
        "grade (see Grading a class below). It reports per-task points, the diagnoses, which "
        "written questions were answered, the cells that raised, and flags.",
        "- The bundle holds the chosen chapters' MyST sources, their student notebooks and a "
        "README with the objectives, times and prerequisites below.",
        "",
        *grading_section(),
    ]
    for c in CHAPTERS:
        lines += [
            f"## {c.number}. {c.title}",
            "",
            f"Chapter {{doc}}`{c.slug}`; about {c.reading_minutes} min reading and "
            f"{c.exercise_minutes} min of exercises.",
            "",
            "Learning objectives:",
            "",
            *[f"- {objective}" for objective in c.objectives],
            "",
            "Auto-checked tasks (function to write, points, mistakes the checker recognises):",
            "",
        ]
        for task in tasks_for_chapter(c.slug):
            mistakes = getattr(task, "mistakes", ())
            recognised = ", ".join(m.name.replace("_", " ") for m in mistakes) or "structure rules"
            lines.append(f"- `{task.function}` ({task.points} pt): {task.title}; recognises: "
                         f"{recognised}")
        lines.append("")
    return "\n".join(lines)
