"""The tasks of each chapter's exercise notebook, one module per chapter.

A chapter's module is named after its slug, ``ch<slug>.py`` (``ch02_batch_norm.py`` for
``02_batch_norm``), and defines ``TASKS``: a tuple of ``diagnosis.Task`` objects, in notebook
order, whose ids start with the two-digit chapter number (``"02.batchnorm_forward"``). The
catalogue finds the module from the slug (``catalog.Chapter.tasks``); nothing else lists it.
The correct answers are built from ``normcourse.reference`` / ``normcourse.functional`` (never
from a chapter's experiment module); the known mistakes are small wrong variants, built from the
helpers in ``_variants`` on the seeded inputs of ``_inputs``.
"""
