"""The checking machinery: run a student's function, compare it with the right answer, name the mistake.

A task is checked on a few small, seeded, float64 test cases. For every case the checker calls

- the *correct* implementation (derived from ``normcourse.reference``),
- the student's function,
- and, if they disagree, each *known mistake*: a named wrong implementation with a message.

A mistake is diagnosed when the student's output equals the mistake's output on the first case
where the student is wrong. Outputs are compared component by component (``dx``, ``dgamma``,
``dbeta`` separately), so that two mistakes in different outputs are both named, and a task whose
catalogue entry splits its points per output (``output_points``) gives partial credit: each
output earns its points when it is right on every case. Besides the task's own mistakes, some
are recognised for every task (their names are in ``GENERAL_MISTAKES``): outputs returned in the
wrong order, ``(out, cache)`` returned where ``out`` is asked, float32 results (the course
computes in float64: a float32 output is a named failure and earns no points), and a wrong helper
from an earlier task that the answer calls ("fix `renorm_r_d` first"). A wrong output that no
mistake explains is reported with the largest relative error of each output.

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
    "GENERAL_MISTAKES",
    "points_text",
    "precision_of",
]

# Tolerances: loose enough for a student who computes in float32, tight enough that every known
# mistake is far outside them on the test cases (tests/test_exercises.py checks the margin).
RTOL = 1e-5
ATOL = 1e-8


# Mistakes recognised for every task, besides each task's own ``mistakes``.
GENERAL_MISTAKES = {
    "wrong_order": "the right outputs returned in another order",
    "out_and_cache": "(out, cache) returned where only out is asked",
    "float32": "float32 (or lower) results where float64 is asked",
    "wrong_helper": "a wrong function from an earlier task, called by this one",
}

FLOAT32_MESSAGE = (
    "{what}: the exercises compute in float64 (the inputs are float64, and a float32 result "
    "keeps only about 7 digits, too few for the course's float64 gradient checks at 1e-7). Keep "
    "the inputs' dtype: no `.astype(np.float32)`, no float32 torch tensors."
)
# An output computed in float32 and converted back is recognised by its error: at most this many
# times the error of the correct answer computed from float32 inputs.
FLOAT32_ERROR_FACTOR = 10.0


class AnswerProblem(Exception):
    """Raised while reading a student's answer; its message is shown to the student as is.

    name: the diagnosis' name when the problem is a recognised mistake (e.g. ``out_and_cache``).
    """

    def __init__(self, message: str, name: str | None = None):
        super().__init__(message)
        self.names = [name] if name else []


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
    # Partial credit: [{"output": "dx", "points": 0, "max_points": 2}, ...] when the task splits
    # its points per output; empty otherwise.
    parts: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "title": self.title,
            "status": self.status,
            "points": self.points,
            "max_points": self.max_points,
            "message": self.message,
            "mistakes": list(self.mistakes),
            "parts": [dict(p) for p in self.parts],
        }

    def line(self) -> str:
        """The one-line verdict printed under a check cell."""
        label = {"pass": "PASS", "fail": "FAIL", "not_implemented": "NOT IMPLEMENTED"}[self.status]
        return f"[{label}] {self.task} ({self.title}): {points_text(self.to_dict())}. {self.message}"


def points_text(result: dict) -> str:
    """``"2/4 points (dx 0/2, dgamma 1/1, dbeta 1/1)"`` from a ``Result.to_dict()``; the split is
    shown only when it matters (some but not all points earned)."""
    points, most = result["points"], result["max_points"]
    text = f"{points}/{most} point{'s' if most != 1 else ''}"
    parts = result.get("parts") or []
    if parts and 0 < points < most:
        text += " (" + ", ".join(f"{p['output']} {p['points']}/{p['max_points']}" for p in parts) + ")"
    return text


@dataclass
class Task:
    """An exercise task: an id like ``"02.batchnorm_forward"``, the function name students define.

    Subclasses implement ``diagnose(answer) -> (status, message, mistake_names)``, or, where an
    answer's outputs cannot travel as data (a module), ``describe(answer) -> data`` (JSON: what
    the answer is and does) and ``judge(data) -> (status, message, mistake_names)``: the grader
    runs ``describe`` in the submission's sandbox and ``judge`` in its own process.
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
        credit = None
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
                    status, message, names, *rest = self.diagnose(answer)
                credit = rest[0] if rest else None
        except Exception as error:  # a bug in a checker must not stop a student's notebook
            status, message, names = "fail", f"the checker itself failed ({error!r}); please report it.", []
        parts = self.parts(status, credit)
        points = self.points if status == "pass" else sum(p["points"] for p in parts)
        return Result(self.id, self.title, status, points, self.points, message, names, parts)

    def diagnose(self, answer) -> tuple:
        """``(status, message, mistake_names)``, optionally followed by ``credit`` (one bool per
        output: right on every case)."""
        return self.judge(self.describe(answer))

    def describe(self, answer) -> dict:
        raise NotImplementedError(f"{type(self).__name__} defines neither diagnose nor describe")

    def judge(self, description: dict):
        raise NotImplementedError(f"{type(self).__name__} defines neither diagnose nor judge")

    @property
    def points_label(self) -> str:
        """``"4 points: dx 2, dgamma 1, dbeta 1"`` (the split, where the task has one), as in the
        notebooks' task headings and the instructor page."""
        return f"{self.points} point{'s' if self.points != 1 else ''}"

    def parts(self, status: str, credit: list[bool] | None) -> list[dict]:
        """The partial credit per output (empty: all or nothing). credit: which outputs were right
        on every case (None: none can be credited)."""
        return []


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


def precision_of(value) -> str | None:
    """The name of ``value``'s floating dtype if it is below float64 (``"float32"``...), else None."""
    if isinstance(value, torch.Tensor):
        low = (torch.float32, torch.float16, torch.bfloat16)
        return str(value.dtype).removeprefix("torch.") if value.dtype in low else None
    dtype = getattr(value, "dtype", None)
    if isinstance(dtype, np.dtype) and dtype.kind == "f" and dtype.itemsize < 8:
        return dtype.name
    return None


def _listing(names: list[str]) -> str:
    quoted = [f"`{n}`" for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


@dataclass
class OutputTask(Task):
    """A task checked by comparing outputs with the correct answer and with known mistakes.

    correct: the right implementation, with the student's signature.
    cases: the test cases (keyword arguments for the function).
    outputs: names of the outputs, e.g. ``("dx", "dgamma", "dbeta")``; the function returns one
        value, or a tuple of them.
    output_points: points per output (partial credit), summing to ``points``; None: all or
        nothing.
    collect: optional ``collect(kwargs, returned) -> tuple`` turning a call into the compared
        outputs (for functions that update inputs in place, or return a model); its length must
        equal ``len(outputs)``. It may raise AnswerProblem.
    mutable: names of inputs the function is allowed (or required) to modify in place.
    mistakes: the known mistakes, most specific first.
    uses: tasks of earlier cells whose functions this one may call (``06.renorm_r_d`` for the
        batch renorm passes): when the answer fails and calls a wrong one, it is named first.
    """

    correct: Callable = None
    cases: tuple[Case, ...] = ()
    outputs: tuple[str, ...] = ("out",)
    output_points: tuple[int, ...] | None = None
    collect: Callable | None = None
    mutable: tuple[str, ...] = ()
    mistakes: tuple[Mistake, ...] = ()
    uses: tuple[Task, ...] = ()
    mutation_message: str = (
        "`{function}` changed its input `{name}` in place; work on new arrays "
        "(e.g. `{name} - mean` rather than `{name} -= mean`)"
    )
    # The outputs of the task's own functions (the correct answer, the known mistakes) on its own
    # cases, computed once per process (see ``run``).
    _own_outputs: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.output_points is not None and (
                len(self.output_points) != len(self.outputs) or sum(self.output_points) != self.points):
            raise ValueError(f"{self.id}: output_points {self.output_points} must give one number "
                             f"per output {self.outputs} and sum to points={self.points}")

    @property
    def points_label(self) -> str:
        label = super().points_label
        if self.output_points is None:
            return label
        return label + ": " + ", ".join(f"{n} {p}" for n, p in zip(self.outputs, self.output_points))

    def parts(self, status, credit):
        if self.output_points is None:
            return []
        return [{"output": name, "max_points": most,
                 "points": most if status == "pass" or (credit and credit[i]) else 0}
                for i, (name, most) in enumerate(zip(self.outputs, self.output_points))]

    def values(self, function: Callable, case: Case) -> tuple[object, list]:
        """Call ``function`` on a fresh copy of the case's inputs: ``(returned, outputs)``, the
        outputs as returned (before conversion to arrays).

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
        return returned, list(values)

    def run(self, function: Callable, case: Case) -> list[np.ndarray]:
        """Call ``function`` on a fresh copy of the case's inputs; return the outputs as arrays.

        Exceptions raised by ``function`` propagate; unreadable answers raise AnswerProblem.
        The task's own functions (``correct``, each mistake's ``answer``) on its own cases run once
        per process and later calls get copies: their inputs are seeded, so they give the same
        outputs every time, and an experiment task's reference trains networks, which every
        check (and every mistake it compares) would otherwise do again. An answer always runs.
        """
        own = function is self.correct or any(function is m.answer for m in self.mistakes)
        if not own or not any(case is c for c in self.cases):
            return self._run(function, case)
        key = (id(function), id(case))  # both are held by the task, so the ids stay theirs
        if key not in self._own_outputs:
            self._own_outputs[key] = self._run(function, case)
        return [v.copy() for v in self._own_outputs[key]]

    def _run(self, function: Callable, case: Case) -> list[np.ndarray]:
        return [to_array(v, n) for v, n in zip(self.values(function, case)[1], self.outputs)]

    def _out_and_cache(self, returned, expected: list[np.ndarray]) -> AnswerProblem | None:
        """A tuple whose first value has the shape of the one asked output: the CS231n
        ``(out, cache)`` habit."""
        if self.collect or len(self.outputs) != 1 or not isinstance(returned, tuple) or len(returned) < 2:
            return None
        try:
            first = to_array(returned[0], self.outputs[0])
        except AnswerProblem:
            return None
        if first.shape != expected[0].shape:
            return None
        name = self.outputs[0]
        return AnswerProblem(
            f"You returned a tuple of {len(returned)} values, like the layers' `(out, cache)`; "
            f"this task asks for `{name}` alone: return `{name}`", "out_and_cache")

    def _mistake_outputs(self, mistake: Mistake, case: Case) -> list[np.ndarray] | None:
        try:
            return self.run(mistake.answer, case)
        except Exception:  # a mistake may legitimately crash on some case (e.g. b=None)
            return None

    def diagnose(self, answer):
        status, message, names, credit = self._diagnose(answer)
        if status == "fail":
            blame = self._wrong_helper(answer)
            if blame:  # the helper's mistake explains this answer's; name that one only
                message, names = blame, ["wrong_helper"]
        return status, message, names, credit

    def _wrong_helper(self, answer) -> str | None:
        """Name a function of an earlier task that ``answer`` calls by name and that is wrong."""
        code, namespace = getattr(answer, "__code__", None), getattr(answer, "__globals__", {})
        for task in self.uses:
            helper = namespace.get(task.function)
            if code is None or task.function not in code.co_names or not callable(helper):
                continue
            result = task.check(helper)
            if result.status == "fail":
                return (f"Fix `{task.function}` first: `{self.function}` calls your "
                        f"`{task.function}`, which fails its own check: {result.message}")
        return None

    def _diagnose(self, answer):
        # Run every case first: when several mistakes explain the first wrong case, the other
        # cases tell them apart.
        runs = []  # (case, expected, got, low-precision output indices) for the cases survived
        first_wrong = None
        for case in self.cases:
            expected = self.run(self.correct, case)
            try:
                returned, values = self.values(answer, case)
                problem = self._out_and_cache(returned, expected)
                if problem:
                    raise problem
                got = [to_array(v, n) for v, n in zip(values, self.outputs)]
            except NotImplementedError:
                return "not_implemented", f"`{self.function}` is not implemented yet.", [], None
            except AnswerProblem as problem:
                if first_wrong is None:
                    return "fail", f"{problem} (test case: {case.description}).", problem.names, None
                break
            except Exception as error:
                if first_wrong is None:
                    message = _describe_exception(error, self.function)
                    return "fail", f"{message} (test case: {case.description}).", [], None
                break
            low = {i: precision_of(v) for i, v in enumerate(values) if precision_of(v)}
            runs.append((case, expected, got, low))
            if first_wrong is None and (low or any(not _same(g, e) for g, e in zip(got, expected))):
                first_wrong = len(runs) - 1
        if first_wrong is None:
            count = len(self.cases)
            return "pass", f"Correct on {count} test case{'s' if count != 1 else ''}.", [], None
        credit = None
        if len(runs) == len(self.cases):
            credit = [all(_same(got[i], expected[i]) and i not in low for _, expected, got, low in runs)
                      for i in range(len(self.outputs))]
        return ("fail", *self._explain(runs, first_wrong), credit)

    def _reproduces(self, mistake: Mistake, case: Case, got: list[np.ndarray]) -> bool:
        outputs = self._mistake_outputs(mistake, case)
        return outputs is not None and all(_same(g, o) for g, o in zip(got, outputs))

    def _wrong_order(self, runs, wrong) -> dict[int, int]:
        """{slot: the output whose right value sits there on every case} for outputs returned
        out of order."""
        if self.collect or len(self.outputs) < 2:
            return {}
        return {i: j for i in wrong for j in range(len(self.outputs))
                if j != i and all(_same(got[i], expected[j]) for _, expected, got, _ in runs)}

    def _explain(self, runs, first_wrong) -> tuple[str, list[str]]:
        case, expected, got, low = runs[first_wrong]
        where = f" (test case: {case.description})."
        wrong = [i for i, (g, e) in enumerate(zip(got, expected)) if not _same(g, e)]
        names: list[str] = []
        messages: list[str] = []
        if low:
            dtypes = " and ".join(sorted(set(low.values())))
            names.append("float32")
            messages.append(FLOAT32_MESSAGE.format(
                what=f"{_listing([self.outputs[i] for i in low])} "
                     f"{'is' if len(low) == 1 else 'are'} {dtypes}"))
        moved = self._wrong_order(runs, wrong)
        if moved:
            returned = ", ".join(self.outputs[moved.get(i, i)] if i in moved or i not in wrong
                                 else "(a wrong value)" for i in range(len(self.outputs)))
            names.append("wrong_order")
            messages.append(f"Your outputs are in the wrong order: you returned ({returned}); "
                            f"return ({', '.join(self.outputs)}).")
            wrong = [i for i in wrong if i not in moved]
        if not wrong:
            return " ".join(messages) + where, names
        # A mistake that reproduces every output explains the answer completely; if several do,
        # prefer the one that also reproduces the answer on the other cases.
        whole = [m for m in self.mistakes if self._reproduces(m, case, got)] if not names else []
        if whole:
            consistent = [m for m in whole
                          if all(self._reproduces(m, c, g) for c, _, g, _ in runs)]
            mistake = (consistent or whole)[0]
            return mistake.message + where, [mistake.name]
        # Otherwise explain each wrong output by the first mistake that reproduces it.
        mistake_outputs = {m.name: self._mistake_outputs(m, case) for m in self.mistakes}
        unexplained = []
        for i in wrong:
            for mistake in self.mistakes:
                outputs = mistake_outputs[mistake.name]
                if outputs is None or _same(outputs[i], expected[i]) or not _same(got[i], outputs[i]):
                    continue
                if mistake.name not in names:
                    names.append(mistake.name)
                    messages.append(mistake.message)
                break
            else:
                unexplained.append(i)
        rounded = self._float32_rounding(case, got, expected, unexplained)
        if rounded:
            names.append("float32")
            error = max(_largest_error(got[i], expected[i]) for i in rounded)
            messages.append(FLOAT32_MESSAGE.format(
                what=f"{_listing([self.outputs[i] for i in rounded])} "
                     f"{'has' if len(rounded) == 1 else 'have'} the rounding errors of a float32 "
                     f"computation (largest relative error {error:.2g})"))
            unexplained = [i for i in unexplained if i not in rounded]
        if unexplained:
            messages.append(self._describe_outputs(got, expected, unexplained, low))
        return " ".join(messages) + where, names

    def _float32_rounding(self, case, got, expected, wrong) -> list[int]:
        """The outputs among ``wrong`` whose error is that of a float32 computation: no more than
        FLOAT32_ERROR_FACTOR times the error of the correct answer computed from float32 inputs."""
        if self.collect or not wrong:
            return []
        inputs = {k: v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.float64
                  else v for k, v in case.make().items()}
        try:
            returned = self.correct(*inputs.values())
            single = split_outputs(returned, self.outputs)
            in_float32 = [to_array(v, n) for v, n in zip(single, self.outputs)]
        except Exception:  # a correct answer that insists on float64
            return []
        rounded = []
        for i in wrong:
            if got[i].shape != expected[i].shape or not np.all(np.isfinite(got[i])):
                continue
            scale = np.max(np.abs(in_float32[i] - expected[i]))
            if 0 < np.max(np.abs(got[i] - expected[i])) <= FLOAT32_ERROR_FACTOR * scale:
                rounded.append(i)
        return rounded

    def _describe_outputs(self, got, expected, wrong, low) -> str:
        """Which outputs are right and which wrong, with the largest relative error of each."""
        details = []
        for i in wrong:
            g, e, n = got[i], expected[i], self.outputs[i]
            if g.shape != e.shape:
                details.append(f"`{n}` has shape {g.shape}, expected {e.shape}")
            elif not np.all(np.isfinite(g)):
                details.append(f"`{n}` contains NaN or inf")
            else:
                details.append(f"`{n}` is wrong (largest relative error {_largest_error(g, e):.2g})")
        right = [n for i, n in enumerate(self.outputs)
                 if i not in wrong and i not in low and _same(got[i], expected[i])]
        text = "; ".join(details)
        if right and not self.collect:
            text = f"{_listing(right)} {'is' if len(right) == 1 else 'are'} right; " + text
        elif right:
            text += f"; {_listing(right)} {'is' if len(right) == 1 else 'are'} right"
        return text[0].upper() + text[1:]
