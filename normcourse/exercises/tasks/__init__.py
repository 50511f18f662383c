"""The tasks of each chapter's exercise notebook, one module per chapter.

Each module defines ``TASKS``: a tuple of ``diagnosis.Task`` objects whose ids start with the
chapter number (``"02.batchnorm_forward"``). The correct answers are built from
``normcourse.reference`` / ``normcourse.functional``; the known mistakes are small wrong variants.
"""
