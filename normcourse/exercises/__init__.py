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
``diagnosis`` (the checking machinery).
"""

from normcourse.exercises.catalog import TASKS
from normcourse.exercises.checks import RESULTS, check, check_answer

__all__ = ["check", "check_answer", "TASKS", "RESULTS"]
