"""The checking machinery: run a student's function, compare it with the right answer, name the mistake.

A task is checked on a few small, seeded, float64 test cases. For every case the checker calls

- the *correct* implementation (derived from ``normcourse.reference``),
- the student's function,
- and, if they disagree, each *known mistake*: a named wrong implementation with a message.

A mistake is diagnosed when the student's output equals the mistake's output on the first case
where the student is wrong. Outputs are compared component by component (``dx``, ``dgamma``,
``dbeta`` separately), so that two mistakes in different outputs are both named.

Nothing a student writes may crash the checker: exceptions, ``None``, strings, tensors, lists and
wrong shapes all become sentences. ``NotImplementedError`` (the stub in the student notebooks) is
reported as "not implemented yet".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

__all__ = [
    "Mistake",
    "Case",
    "Result",
    "Task",
    "OutputTask",
    "AnswerProblem",
    "RTOL",
    "ATOL",
]

# Tolerances: loose enough for a student who computes in float32, tight enough that every known
# mistake is far outside them on the test cases (tests/test_exercises.py checks the margin).
RTOL = 1e-5
ATOL = 1e-8


class AnswerProblem(Exception):
    """Raised while reading a student's answer; its message is shown to the student as is."""


@dataclass(frozen=True)
class Mistake:
    """A named wrong implementation, with the sentence that explains it to the student.

    name: short identifier used in results and tests, e.g. ``"unbiased_variance"``.
    message: what the student did and how to fix it.
    answer: a function with the student's signature that makes exactly this mistake.
    """

    name: str
    message: str
    answer: Callable


@dataclass(frozen=True)
class Case:
    """One test case: ``make()`` returns fresh keyword arguments for the function under test.

    ``make`` is called once per function call, so an answer that modifies its inputs cannot affect
    the reference's inputs (and the inputs are seeded, so every call gets the same values).
    """

    description: str
    make: Callable[[], dict]


@dataclass
class Result:
    """The outcome of checking one task; JSON-serialisable through ``to_dict``."""

    task: str
    title: str
    status: str  # "pass", "fail" or "not_implemented"
    points: int
    max_points: int
    message: str
    mistakes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "title": self.title,
            "status": self.status,
            "points": self.points,
            "max_points": self.max_points,
            "message": self.message,
            "mistakes": list(self.mistakes),
        }

    def line(self) -> str:
        """The one-line verdict printed under a check cell."""
        label = {"pass": "PASS", "fail": "FAIL", "not_implemented": "NOT IMPLEMENTED"}[self.status]
        return (
            f"[{label}] {self.task} ({self.title}): {self.points}/{self.max_points} "
            f"point{'s' if self.max_points != 1 else ''}. {self.message}"
        )


@dataclass
class Task:
    """An exercise task: an id like ``"02.batchnorm_forward"``, the function name students define.

    Subclasses implement ``diagnose(answer) -> (status, message, mistake_names)``.
    """

    id: str
    title: str
    function: str
    points: int = 1

    @property
    def chapter(self) -> str:
        return self.id.split(".")[0]

    def check(self, answer) -> Result:
        """Check ``answer`` and return a Result; never raises."""
        try:
            if answer is None:
                status, message, names = "fail", f"got None instead of your function `{self.function}`.", []
            elif not callable(answer):
                status, message, names = (
                    "fail",
                    f"expected your function `{self.function}`, got a {type(answer).__name__}.",
                    [],
                )
            else:
                # fork_rng: checking must not change the random stream of the student's notebook.
                with torch.random.fork_rng(devices=[]):
                    status, message, names = self.diagnose(answer)
        except Exception as error:  # a bug in a checker must not stop a student's notebook
            status, message, names = "fail", f"the checker itself failed ({error!r}); please report it.", []
        points = self.points if status == "pass" else 0
        return Result(self.id, self.title, status, points, self.points, message, names)

    def diagnose(self, answer) -> tuple[str, str, list[str]]:
        raise NotImplementedError


def _describe_exception(error: BaseException, function: str) -> str:
    text = f"`{function}` raised {type(error).__name__}: {error}"
    lowered = str(error).lower()
    if "broadcast" in lowered or "must match the size" in lowered:
        text += (
            " (a shape mismatch: check the axes you reduce over (keepdims=True keeps them for "
            "broadcasting) and that per-feature or per-channel vectors line up with the right axis)"
        )
    elif "nonetype" in lowered:
        text += " (one of the inputs is None in this test case: handle it)"
    return text


def to_array(value, name: str) -> np.ndarray:
    """Convert one returned value to a float64 array, or raise AnswerProblem saying why not."""
    if value is None:
        raise AnswerProblem(f"`{name}` is None: did you forget a `return`?")
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    if isinstance(value, (str, bytes, dict, set)) or callable(value):
        raise AnswerProblem(f"`{name}` is a {type(value).__name__}, expected numbers")
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise AnswerProblem(f"`{name}` could not be read as an array of numbers ({error})") from None
    return array


def split_outputs(returned, names: tuple[str, ...]) -> list:
    """Split a returned value into the expected number of outputs, or raise AnswerProblem."""
    if len(names) == 1:
        return [returned]
    wanted = "(" + ", ".join(names) + ")"
    if returned is None:
        raise AnswerProblem(f"returned None, expected the tuple {wanted}: did you forget a `return`?")
    if not isinstance(returned, (tuple, list)):
        raise AnswerProblem(f"returned a {type(returned).__name__}, expected the tuple {wanted}")
    if len(returned) != len(names):
        raise AnswerProblem(f"returned {len(returned)} values, expected {len(names)}: {wanted}")
    return list(returned)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=False))


def _largest_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want) / np.maximum(1e-8, np.abs(got) + np.abs(want))))


def _snapshot(kwargs: dict) -> dict:
    """Copies of the array inputs, to detect answers that modify an input in place."""
    return {k: np.array(v, copy=True) for k, v in kwargs.items() if isinstance(v, np.ndarray)}


@dataclass
class OutputTask(Task):
    """A task checked by comparing outputs with the correct answer and with known mistakes.

    correct: the right implementation, with the student's signature.
    cases: the test cases (keyword arguments for the function).
    outputs: names of the outputs, e.g. ``("dx", "dgamma", "dbeta")``; the function returns one
        value, or a tuple of them.
    collect: optional ``collect(kwargs, returned) -> tuple`` turning a call into the compared
        outputs (for functions that update inputs in place, or return a model); its length must
        equal ``len(outputs)``. It may raise AnswerProblem.
    mutable: names of inputs the function is allowed (or required) to modify in place.
    mistakes: the known mistakes, most specific first.
    """

    correct: Callable = None
    cases: tuple[Case, ...] = ()
    outputs: tuple[str, ...] = ("out",)
    collect: Callable | None = None
    mutable: tuple[str, ...] = ()
    mistakes: tuple[Mistake, ...] = ()
    mutation_message: str = (
        "`{function}` changed its input `{name}` in place; work on new arrays "
        "(e.g. `{name} - mean` rather than `{name} -= mean`)"
    )

    def run(self, function: Callable, case: Case) -> list[np.ndarray]:
        """Call ``function`` on a fresh copy of the case's inputs; return the outputs as arrays.

        Exceptions raised by ``function`` propagate; unreadable answers raise AnswerProblem.
        """
        kwargs = case.make()
        before = _snapshot(kwargs)
        # Positional call: a student who renames a parameter is not penalised.
        returned = function(*kwargs.values())
        for name, original in before.items():
            if name in self.mutable:
                continue
            now = kwargs[name]
            if not isinstance(now, np.ndarray) or now.shape != original.shape or not np.array_equal(
                now, original, equal_nan=True
            ):
                raise AnswerProblem(self.mutation_message.format(function=self.function, name=name))
        values = self.collect(kwargs, returned) if self.collect else split_outputs(returned, self.outputs)
        return [to_array(v, n) for v, n in zip(values, self.outputs)]

    def _mistake_outputs(self, mistake: Mistake, case: Case) -> list[np.ndarray] | None:
        try:
            return self.run(mistake.answer, case)
        except Exception:  # a mistake may legitimately crash on some case (e.g. b=None)
            return None

    def diagnose(self, answer):
        # Run every case first: when several mistakes explain the first wrong case, the other
        # cases tell them apart.
        runs = []  # (case, expected, got) for the cases the answer survived
        first_wrong = None
        for case in self.cases:
            expected = self.run(self.correct, case)
            try:
                got = self.run(answer, case)
            except NotImplementedError:
                return "not_implemented", f"`{self.function}` is not implemented yet.", []
            except AnswerProblem as problem:
                if first_wrong is None:
                    return "fail", f"{problem} (test case: {case.description}).", []
                break
            except Exception as error:
                if first_wrong is None:
                    message = _describe_exception(error, self.function)
                    return "fail", f"{message} (test case: {case.description}).", []
                break
            runs.append((case, expected, got))
            if first_wrong is None and any(not _same(g, e) for g, e in zip(got, expected)):
                first_wrong = len(runs) - 1
        if first_wrong is None:
            count = len(self.cases)
            return "pass", f"Correct on {count} test case{'s' if count != 1 else ''}.", []
        return self._explain(runs, first_wrong)

    def _reproduces(self, mistake: Mistake, case: Case, got: list[np.ndarray]) -> bool:
        outputs = self._mistake_outputs(mistake, case)
        return outputs is not None and all(_same(g, o) for g, o in zip(got, outputs))

    def _explain(self, runs, first_wrong) -> tuple[str, str, list[str]]:
        case, expected, got = runs[first_wrong]
        wrong = [i for i, (g, e) in enumerate(zip(got, expected)) if not _same(g, e)]
        names: list[str] = []
        messages: list[str] = []
        mistake_outputs = {m.name: self._mistake_outputs(m, case) for m in self.mistakes}
        # A mistake that reproduces every output explains the answer completely; if several do,
        # prefer the one that also reproduces the answer on the other cases.
        whole = [m for m in self.mistakes if self._reproduces(m, case, got)]
        if whole:
            consistent = [m for m in whole
                          if all(self._reproduces(m, c, g) for c, _, g in runs)]
            mistake = (consistent or whole)[0]
            return "fail", f"{mistake.message} (test case: {case.description}).", [mistake.name]
        # Otherwise explain each wrong output by the first mistake that reproduces it.
        for i in wrong:
            for mistake in self.mistakes:
                outputs = mistake_outputs[mistake.name]
                if outputs is None or _same(outputs[i], expected[i]) or not _same(got[i], outputs[i]):
                    continue
                if mistake.name not in names:
                    names.append(mistake.name)
                    messages.append(mistake.message)
                break
        if names:
            return "fail", " ".join(messages) + f" (test case: {case.description}).", names
        # No known mistake matches: say which output is wrong and how.
        details = []
        for i in wrong:
            g, e, n = got[i], expected[i], self.outputs[i]
            if g.shape != e.shape:
                details.append(f"`{n}` has shape {g.shape}, expected {e.shape}")
            elif not np.all(np.isfinite(g)):
                details.append(f"`{n}` contains NaN or inf")
            else:
                details.append(f"`{n}` is wrong (largest relative error {_largest_error(g, e):.2g})")
        return "fail", "; ".join(details) + f" (test case: {case.description}).", []

