"""Exercises: checks with diagnoses, student notebooks, grading and instructor bundles.

In a notebook::

    from normcourse.exercises import check
    check("02.batchnorm_forward", batchnorm_forward)

From the shell (``python -m normcourse --help``): ``student`` writes the student notebooks from
``exercises/source/``, ``grade`` grades a submitted notebook, ``bundle`` packs chapters for a class,
``instructors`` writes the instructor page.

Modules, one job each (arrows point down): ``commands`` (what each shell command does) ->
``grading``, ``bundle`` (with ``chapter_text``, chapters that read outside the book, and
``nbgrader_source``, notebooks in nbgrader's format), ``instructors`` (the instructor page),
``notebooks`` (student versions) -> ``checks`` (``check``, ``check_answer``) -> ``catalog`` (chapters, tasks, points, written
questions, prerequisites) -> ``tasks.chNN_topic`` (each chapter's tasks and known mistakes) ->
``diagnosis`` (the checking machinery); ``result_format`` (the verdicts' MIME type) imports nothing.
"""

__all__ = ["check", "check_answer", "TASKS", "RESULTS"]


def __getattr__(name: str):
    """``check``, ``check_answer``, ``RESULTS`` and ``TASKS``, imported on first use: importing a
    submodule imports this package first, and the grader's notebook runner (``notebook_run``)
    would otherwise load torch, which only the checks need, before each notebook's kernel."""
    if name == "TASKS":
        from normcourse.exercises.catalog import TASKS

        return TASKS
    if name in ("check", "check_answer", "RESULTS"):
        from normcourse.exercises import checks

        return getattr(checks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
