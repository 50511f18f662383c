"""The book's instructor page, ``book/instructors.md``, rendered from the catalogue.

Written by ``python -m normcourse instructors --write book/instructors.md``; a test keeps the
committed page in sync with ``instructors_page()``.
"""

from __future__ import annotations

from normcourse.exercises.catalog import CHAPTERS, is_chapter

__all__ = ["instructors_page"]


def instructors_page() -> str:
    """The MyST source of ``book/instructors.md``."""
    total_tasks = sum(len(c.tasks) for c in CHAPTERS)
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
            f"{{doc}}`{p}`" if is_chapter(p) else p for p in c.prerequisites)
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
        "python -m normcourse grade --json submissions/*.ipynb > grades.json",
        "python -m normcourse bundle --chapters 2 3 --out class-week-1     # or --zip",
        "```",
        "",
        "- The sources with solutions are `exercises/source/NN_name.ipynb`; each solution sits "
        "between `### BEGIN SOLUTION` and `### END SOLUTION`. The student versions replace it "
        "with `raise NotImplementedError(...)` (code) or an answer prompt (written questions), "
        "and the test suite checks that the committed student versions are up to date.",
        "- The grader executes a copy of the notebook (one thread, a timeout per cell, errors "
        "allowed), then checks every task's function by name itself, so edited or deleted check "
        "cells do not change the grade. It reports per-task points, the diagnoses, which written "
        "questions were answered, and the cells that raised.",
        "- The bundle holds the chosen chapters' MyST sources, their student notebooks and a "
        "README with the objectives, times and prerequisites below.",
        "",
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
        for task in c.tasks:
            mistakes = getattr(task, "mistakes", ())
            recognised = ", ".join(m.name.replace("_", " ") for m in mistakes) or "structure rules"
            lines.append(f"- `{task.function}` ({task.points} pt): {task.title}; recognises: "
                         f"{recognised}")
        lines += ["", "Written questions (graded by hand):", ""]
        lines += [f"- {q}: {topic}" for q, topic in zip(c.question_ids, c.questions)]
        lines.append("")
    return "\n".join(lines)
