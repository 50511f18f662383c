"""The book's instructor page, ``book/instructors.md``, rendered from the catalogue.

Written by ``python -m normcourse instructors --write book/instructors.md``; a test keeps the
committed page in sync with ``instructors_page()``.
"""

from __future__ import annotations

from normcourse.exercises.catalog import CHAPTERS, is_chapter
from normcourse.exercises.diagnosis import GENERAL_MISTAKES
from normcourse.exercises.grading_guide import grading_section

__all__ = ["instructors_page"]


def _workflow() -> list[str]:
    """The class workflow, bundle to gradebook, and the nbgrader route."""
    return [
        "## Class workflow, end to end",
        "",
        "1. **Bundle.** `python -m normcourse bundle --chapters 2 5 --out week-1 --zip` writes "
        "`week-1.zip` (see above). Hand it out as is.",
        "2. **Students.** They unzip it and follow its README: a virtual environment, "
        "`pip install -r requirements.txt`, `pip install --no-deps wheels/normcourse-*.whl`, "
        "then `jupyter lab`. They read `chapters/`, work in `exercises/`, and each check cell "
        "gives them the verdict and diagnosis at once. They hand in the notebook file "
        "(`exercises/NN_topic.ipynb`).",
        "3. **Collect.** Put the submissions in one folder, one notebook per student and "
        "chapter, named after the student (`submissions/alice-02_batch_norm.ipynb`); the grader "
        "reads the chapter from the notebook's metadata, so a renamed file is still graded.",
        "4. **Grade.** `python -m normcourse grade submissions/ --jobs 4 --csv gradebook.csv "
        "--json > grades.json` executes every notebook in its own sandboxed kernel, one thread, with a time "
        "limit per task, and checks every task's function itself (edited or deleted check cells "
        "do not change the grade). Each report gives the points per task with the per-output "
        "split, the diagnosis, which written questions were answered, the cells that raised, and "
        "flags answers that call the package's own reference solutions.",
        "5. **Gradebook.** `gradebook.csv` has one row per submission (student or file, chapter, "
        "points per task, total); `grades.json` holds the full reports, including the written "
        "answers to grade by hand.",
        "",
        "With nbgrader (JupyterHub courses): `python -m normcourse bundle --chapters 2 5 --out "
        "course --format nbgrader` writes an nbgrader course folder: `source/<chapter>/` holds "
        "nbgrader source notebooks (solution cells; locked autograder test cells worth the task's "
        "points, which print the verdict and end with the points earned, nbgrader's partial "
        "credit; written answers graded by hand in the formgrader), plus the chapters, the wheel "
        "and the requirements. Install the wheel where nbgrader and the students' kernels run, "
        "then `nbgrader generate_assignment 02_batch_norm`, release, collect, "
        "`nbgrader autograde 02_batch_norm`, grade the written answers, `nbgrader export`.",
        "",
        "What was tested: the test suite checks the nbgrader metadata against nbgrader's rules "
        "(schema version 3: flags, unique grade ids, points on graded cells, markdown answers "
        "both graded and solution) and that each test cell gives full marks to the solution; it "
        "runs `nbgrader generate_assignment` itself only where nbgrader is installed, which the "
        "course's environment does not require (nbgrader is no dependency). By hand, with "
        "nbgrader 0.9.6 in a separate Python 3.11 environment: `generate_assignment` accepted "
        "chapters 2, 5 and 6, and `autograde` of chapter 2 gave a solution notebook 9 of 9 "
        "auto-graded points and a submission with a wrong `dx` and one task not done 5 of 9 (the backward pass "
        "2 of 4 by partial credit).",
        "",
    ]


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
        "Scoring. A task whose function returns several outputs (`dx`, `dgamma`, `dbeta`) "
        "splits its points per output, as listed below (`4 points: dx 2, dgamma 1, dbeta 1`): "
        "each output earns its share when it is right on every test case, so a wrong `dx` with "
        "right `dgamma` and `dbeta` earns 2 of 4. Other tasks are all or nothing. Besides each "
        "task's own mistakes, every task recognises: "
        + "; ".join(f"{description} (`{name}`)" for name, description in GENERAL_MISTAKES.items())
        + ". Float32 is a failure, not a warning: the course computes in float64 (its gradient "
        "checks compare at 1e-7, beyond float32's 7 digits), so an output that is float32, or "
        "carries float32 rounding errors, earns no points and is named. A wrong output that no "
        "known mistake explains is reported with the outputs that are right and the largest "
        "relative error of each wrong one.",
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
        "python -m normcourse grade submissions/ --jobs 2 --csv grades.csv  # a class",
        "python -m normcourse bundle --chapters 2 3 --out class-week-1     # or --zip",
        "python -m normcourse bundle --chapters 2 3 --out course --format nbgrader",
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
        "- The bundle is self-contained: the student notebooks; the chapters as MyST notebooks "
        "that read outside the book (the package code they show copied in, citations and "
        "cross-references turned into text, the works cited listed; they still open as notebooks "
        "in JupyterLab to run the experiments); a wheel of the package built by the command from "
        "`normcourse/` alone (checked to hold no notebook and nothing of `exercises/source`); "
        "the pinned requirements; and a README with the install steps and the objectives, times, "
        "tasks and prerequisites below. No clone of the repository and no `make book` is needed. "
        "The wheel does contain the checker's correct answers (`normcourse/exercises/tasks`, "
        "built on `normcourse.reference`, which the chapters show anyway): the graded work is "
        "writing the functions, and the notebooks' solutions are never shipped.",
        "",
        *_workflow(),
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
        for task in c.tasks:
            mistakes = getattr(task, "mistakes", ())
            recognised = ", ".join(m.name.replace("_", " ") for m in mistakes) or "structure rules"
            lines.append(f"- `{task.function}` ({task.points_label}): {task.title}; recognises: "
                         f"{recognised}")
        lines += ["", "Written questions (graded by hand):", ""]
        lines += [f"- {q}: {topic}" for q, topic in zip(c.question_ids, c.questions)]
        lines.append("")
    return "\n".join(lines)
