"""Exercises: checks with diagnoses, student notebooks, grading and instructor bundles.

In a notebook::

    from normcourse.exercises import check
    check("02.batchnorm_forward", batchnorm_forward)

From the shell (``python -m normcourse --help``): ``student`` writes the student notebooks from
``exercises/source/``, ``grade`` grades a submitted notebook, ``bundle`` packs chapters for a class.

Modules: ``diagnosis`` (the checking machinery), ``tasks`` (each chapter's tasks and known
mistakes), ``checks`` (``check``), ``notebooks`` (student versions), ``grading``, ``catalog``
(chapters, objectives, times), ``bundle``.
"""

from normcourse.exercises.checks import RESULTS, TASKS, check, evaluate

__all__ = ["check", "evaluate", "TASKS", "RESULTS"]
