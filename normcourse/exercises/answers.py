"""The grader's own checks: the submission's functions run in a sandboxed process, verdicts here.

Why two processes: code that runs in a process can change anything in it (the checker, numpy,
``print``), so a verdict computed in the process that ran the student's code proves nothing. Here

- the *answer process* (``serve``, started in the submission's ``Sandbox``) imports the package
  first, then executes only the notebook's definitions (``definitions``: imports, functions,
  classes and constant assignments; no other top-level statement runs), and for each task calls the
  student's function on the task's test cases and sends back *data*: the outputs as arrays, or
  the exception it raised;
- the *grader's process* (``check_task``) computes the right answers and the known mistakes
  itself and diagnoses the recorded outputs with the same ``Task.diagnose`` the notebooks use.
  Nothing received is unpickled or executed; a forged reply can only be a forged *output*, which
  is what an answer computes anyway.

Each task has its own time limit; a task that runs past it, or kills its process, costs that task
only (``AnswerSession`` starts a fresh process for the next task). A task whose answer cannot
travel as data (``03.linear_bn_sigmoid`` returns a module) has a ``describe(answer)`` that the
answer process runs, recording what the answer is and does as data, and a ``judge(description)``
that gives the verdict here; no task is judged inside the submission's process.
"""

from __future__ import annotations

import ast
import json
import queue
import re
import sys
import threading

import numpy as np
import torch

from normcourse.exercises.diagnosis import (AnswerProblem, OutputTask, Result, Task, precision_of,
                                           to_array)

__all__ = ["definitions", "serve", "AnswerSession", "check_task", "MAX_ELEMENTS"]

MAX_ELEMENTS = 1_000_000  # larger returned arrays travel as their shape only
MAX_REPLY = 64 * 1024 * 1024


def _without_magics(source: str) -> str:
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                     for line in source.split("\n"))


def _is_constant(node: ast.AST) -> bool:
    try:
        ast.literal_eval(node)
        return True
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False


def definitions(code_cells: list[str]) -> str:
    """The statements of the code cells the answer process runs: imports, defs, constants."""
    kept = []
    for source in code_cells:
        try:
            tree = ast.parse(_without_magics(source))
        except SyntaxError:
            continue
        for node in tree.body:
            keep = isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef,
                                     ast.AsyncFunctionDef, ast.ClassDef))
            if isinstance(node, ast.Assign):
                keep = (all(isinstance(t, ast.Name) for t in node.targets)
                        and _is_constant(node.value))
            if keep:
                kept.append(ast.unparse(node))
    return "\n\n".join(kept)


# ---- inside the sandbox ---------------------------------------------------------------------
def _encode(array: np.ndarray) -> dict:
    if array.size > MAX_ELEMENTS:
        return {"shape": list(array.shape), "too_large": True}
    return {"shape": list(array.shape), "data": array.ravel().tolist()}


def _encode_value(value, name: str) -> dict:
    """One returned output as data: its numbers as float64 and, below float64, its precision
    (the grader's float32 diagnosis needs it)."""
    item = _encode(to_array(value, name))
    precision = precision_of(value)
    if precision:
        item["precision"] = precision
    return item


def _record_case(task: OutputTask, answer, case) -> dict:
    record = {}
    try:
        returned, values = task.values(answer, case)
        if len(task.outputs) == 1 and isinstance(returned, tuple) and len(returned) >= 2:
            # kept for the grader's "(out, cache) returned where out is asked" diagnosis
            try:
                first = _encode_value(returned[0], task.outputs[0])
            except AnswerProblem:
                first = None
            record["returned_tuple"] = {"length": len(returned), "first": first}
        record["outputs"] = [_encode_value(v, n) for v, n in zip(values, task.outputs)]
        return record
    except NotImplementedError:
        return {"error": "not_implemented"}
    except AnswerProblem as problem:
        return {**record, "error": "answer_problem", "message": str(problem)[:2000]}
    except BaseException as error:  # noqa: BLE001 - SystemExit (exit()) and the rest are data
        return {"error": "exception", "type": type(error).__name__, "message": str(error)[:2000]}


def _record(task: Task, namespace: dict) -> dict:
    answer = namespace.get(task.function)
    if answer is None or not callable(answer):
        return {"missing": type(answer).__name__}
    if not isinstance(task, OutputTask):  # a module, say: what it is and does, as data
        try:
            return {"description": task.describe(answer)}
        except BaseException as error:  # noqa: BLE001 - SystemExit (exit()) and the rest are data
            return {"raised": type(error).__name__, "message": str(error)[:2000]}
    return {"cases": [_record_case(task, answer, case) for case in task.cases]}


def serve() -> None:
    """The answer process: read the definitions, then answer one task id per line of stdin."""
    import os

    from normcourse.exercises.catalog import TASKS

    torch.set_num_threads(1)
    channel = os.fdopen(os.dup(1), "w")  # replies; the student's prints go nowhere
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    code = json.loads(sys.stdin.readline())
    namespace = {"__name__": "__submission__"}
    try:
        exec(compile(code, "<submission>", "exec"), namespace)  # noqa: S102 - sandboxed
        loaded = None
    except BaseException as error:  # noqa: BLE001
        loaded = f"{type(error).__name__}: {error}"[:500]
    channel.write(json.dumps({"loaded": loaded}) + "\n")
    channel.flush()
    for line in sys.stdin:
        task = TASKS[line.strip()]
        with torch.random.fork_rng(devices=[]):
            reply = _record(task, namespace)
        channel.write(json.dumps(reply) + "\n")
        channel.flush()


SERVE = "from normcourse.exercises.answers import serve; serve()"


# ---- in the grader's process ----------------------------------------------------------------
def _decode(item):
    """An output as the answer returned it: float64 numbers, or a tensor of its lower precision."""
    if item is None:
        return None
    shape = tuple(int(n) for n in item["shape"])
    if item.get("too_large"):
        return np.broadcast_to(np.nan, shape)
    array = np.asarray(item["data"], dtype=np.float64).reshape(shape)
    if item.get("precision"):  # exact: the numbers were this precision's to begin with
        return torch.from_numpy(array).to(getattr(torch, item["precision"]))
    return array


def _exception(record: dict) -> BaseException:
    if record["error"] == "not_implemented":
        return NotImplementedError()
    if record["error"] == "answer_problem":
        return AnswerProblem(str(record["message"]))
    name = re.sub(r"\W", "", str(record.get("type", "Exception"))) or "Exception"
    return type(name, (Exception,), {})(str(record.get("message", "")))


class _Replay:
    """Stands for the student's function: ``check_task`` answers its calls from the records."""

    def __call__(self, *args):  # pragma: no cover - never called, only identified
        raise AssertionError("a replayed answer is not called")


def check_task(task: Task, record: dict) -> Result:
    """The grader's verdict on one task from the answer process's record of it."""
    if "missing" in record:
        found = "" if record["missing"] == "NoneType" else f" (`{task.function}` is a " \
            f"{str(record['missing'])[:40]}, not a function)"
        return Result(task.id, task.title, "fail", 0, task.points,
                      f"no function `{task.function}` is defined in the notebook{found}.")
    if "raised" in record:
        return Result(task.id, task.title, "fail", 0, task.points,
                      f"`{task.function}` raised {str(record['raised'])[:80]}: "
                      f"{str(record.get('message', ''))[:2000]}")
    if "description" in record:  # judged here, from the data alone
        status, message, names = task.judge(record["description"])
        points = task.points if status == "pass" else 0
        return Result(task.id, task.title, status, points, task.points, message, names)
    cases = {id(case): entry for case, entry in zip(task.cases, record["cases"])}
    replay = _Replay()

    class Replayed(type(task)):
        def values(self, function, case):
            if function is not replay:
                return super().values(function, case)
            entry = cases[id(case)]
            if "returned_tuple" in entry:
                shape = entry["returned_tuple"]
                returned = (_decode(shape["first"]),) + (None,) * (shape["length"] - 1)
                return returned, [returned]
            if "error" in entry:
                raise _exception(entry)
            outputs = [_decode(item) for item in entry["outputs"]]
            return (outputs[0] if len(outputs) == 1 else tuple(outputs)), outputs

    replayed = Replayed.__new__(Replayed)
    replayed.__dict__.update(task.__dict__)
    return replayed.check(replay)


def _timeout_result(task: Task, message: str) -> Result:
    return Result(task.id, task.title, "fail", 0, task.points, message)


class AnswerSession:
    """The answer process of one submission; ``check(task)`` answers within ``task_timeout``."""

    def __init__(self, sandbox, code: str, task_timeout: float):
        self.sandbox, self.code, self.task_timeout = sandbox, code, task_timeout
        self.process = None
        self.load_error: str | None = None

    def _start(self) -> None:
        import subprocess

        self.process = self.sandbox.python(SERVE, stdin=subprocess.PIPE)
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(self.process.stdout, self.replies),
                         daemon=True).start()
        self._send(json.dumps(self.code))
        loaded = self._reply(self.task_timeout)
        self.load_error = loaded.get("loaded") if isinstance(loaded, dict) else None

    @staticmethod
    def _read(stream, replies) -> None:
        try:
            while line := stream.readline(MAX_REPLY):
                replies.put(line)
        except (OSError, ValueError):
            pass
        replies.put(None)

    def _send(self, line: str) -> None:
        self.process.stdin.write((line + "\n").encode())
        self.process.stdin.flush()

    def _reply(self, timeout: float):
        try:
            line = self.replies.get(timeout=timeout)
        except queue.Empty:
            return "timeout"
        if line is None:
            return "died"
        try:
            return json.loads(line)
        except ValueError:
            return "garbled"

    def _stop(self) -> None:
        self.sandbox.kill_all()
        self.process = None

    def check(self, task: Task) -> Result:
        if self.process is None:
            self._start()
        try:
            self._send(task.id)
            reply = self._reply(self.task_timeout)
        except (BrokenPipeError, OSError):
            reply = "died"
        if isinstance(reply, dict) and {"cases", "description", "raised", "missing"} & set(
                reply):
            try:
                return check_task(task, reply)
            except Exception as error:  # noqa: BLE001 - a forged reply must not stop the grader
                reply = f"garbled ({error})"
        self._stop()
        if reply == "timeout":
            return _timeout_result(task, f"`{task.function}` did not finish within "
                                   f"{self.task_timeout:g} s (an endless loop?); it was stopped.")
        return _timeout_result(task, f"the process checking `{task.function}` {reply} "
                               "(exit(), a killed process or a limit); the next task is checked "
                               "in a fresh one.")

    def close(self) -> None:
        if self.process is not None:
            self._stop()
