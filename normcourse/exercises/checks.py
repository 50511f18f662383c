"""``check(task_id, answer)``: what the check cells of the exercise notebooks call.

Each call prints one verdict line (PASS / FAIL / NOT IMPLEMENTED, the points, the diagnosis),
records the result in ``RESULTS`` and, inside Jupyter, also attaches it as machine-readable JSON
under the MIME type ``RESULT_MIME`` (JupyterLab shows the text; the grader can read the JSON).
"""

from __future__ import annotations

import json

from normcourse.exercises.diagnosis import Result, Task
from normcourse.exercises.tasks import ch01, ch02, ch03, ch04, ch05, ch06

__all__ = ["TASKS", "RESULTS", "RESULT_MIME", "check", "tasks_for_chapter", "evaluate"]

RESULT_MIME = "application/vnd.normcourse.result+json"

TASKS: dict[str, Task] = {
    task.id: task
    for module in (ch01, ch02, ch03, ch04, ch05, ch06)
    for task in module.TASKS
}

# Results of this session's check() calls, latest per task.
RESULTS: dict[str, Result] = {}


def tasks_for_chapter(chapter: str) -> list[Task]:
    """The tasks of a chapter, given as ``"02"`` or ``"02_batch_norm"``, in notebook order."""
    number = chapter[:2]
    return [task for task in TASKS.values() if task.chapter == number]


def evaluate(task_id: str, answer) -> Result:
    """Check ``answer`` against task ``task_id`` and return the Result (prints nothing)."""
    if task_id not in TASKS:
        known = ", ".join(sorted(TASKS))
        raise KeyError(f"unknown exercise task {task_id!r}; the tasks are: {known}")
    return TASKS[task_id].check(answer)


def _show(result: Result) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # plain Python
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display({"text/plain": result.line(), RESULT_MIME: result.to_dict()}, raw=True)
    else:
        print(result.line())


def check(task_id: str, answer) -> None:
    """Check a student's function, print the verdict and record it. Never raises on the answer.

    task_id: e.g. ``"02.batchnorm_forward"``; answer: the function the student wrote.
    """
    result = evaluate(task_id, answer)
    RESULTS[task_id] = result
    _show(result)


def results_json() -> str:
    """All recorded results as a JSON list (what the grader collects)."""
    return json.dumps([r.to_dict() for r in RESULTS.values()])
