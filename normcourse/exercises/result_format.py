"""How a check cell hands its verdict to the grader: JSON under one MIME type of its own.

A module of its own, importing nothing, because both ends need it: ``checks`` writes the verdict
(and needs torch to reach it), while the grader's notebook runner (``notebook_run``) only reads
outputs and starts faster without torch.
"""

RESULT_MIME = "application/vnd.normcourse.result+json"
