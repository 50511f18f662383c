"""``check(task_id, answer)``: what the check cells of the exercise notebooks call.

Each call prints one verdict line (PASS / FAIL / NOT IMPLEMENTED, the points, the diagnosis),
records the result in ``RESULTS`` and, inside Jupyter, also attaches it as machine-readable JSON
under the MIME type ``RESULT_MIME`` (JupyterLab shows the text; the grader can read the JSON).
The tasks come from the catalogue; the checking itself is ``diagnosis.Task.check``.
"""

from __future__ import annotations

from normcourse.exercises.catalog import task
from normcourse.exercises.diagnosis import Result
from normcourse.exercises.result_format import RESULT_MIME

__all__ = ["RESULTS", "RESULT_MIME", "check", "check_answer"]

# Results of this session's check() calls, latest per task.
RESULTS: dict[str, Result] = {}


def check_answer(task_id: str, answer) -> Result:
    """Check ``answer`` against task ``task_id`` and return the Result (prints nothing).

    Raises ValueError naming the tasks for an unknown ``task_id``; never raises on the answer.
    """
    return task(task_id).check(answer)


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
    result = check_answer(task_id, answer)
    RESULTS[task_id] = result
    _show(result)
