"""Tests of the exercise system: checkers, diagnoses, student notebooks, grader, instructor page, CLI.

The notebook tests grade every solution notebook and every student notebook in one run of the
grader's command line (each in its sandbox, three at a time): the solutions must get full marks
with every check cell printing PASS, the student versions must run top to bottom and report every
task as not implemented.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from torch import nn

from normcourse.__main__ import main
from normcourse.exercises import RESULTS, TASKS, check, check_answer
from normcourse.exercises import notebooks
from normcourse.exercises.catalog import CHAPTERS, chapter, is_chapter, tasks_for_chapter
from normcourse.exercises.diagnosis import ATOL, RTOL, OutputTask
from normcourse.exercises.grading import grade_notebook
from normcourse.exercises.instructors import instructors_page

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "exercises" / "source"
SLUGS = [c.slug for c in CHAPTERS]


@pytest.fixture(autouse=True)
def _quiet_jupyter(tmp_path_factory, monkeypatch):
    """Keep Jupyter and IPython out of $HOME; one thread in the graded kernels."""
    base = tmp_path_factory.getbasetemp()
    for name in ("JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):
        monkeypatch.setenv(name, str(base / name.lower()))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# ---------------------------------------------------------------------------------------------
# Notebooks: solutions get full marks, student versions run and report "not implemented"
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graded_exercises():
    """Every student and solution notebook graded in one command-line run, three at a time."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["grade", "--json", "--jobs", "3", str(ROOT / "exercises")])
    reports = {Path(r["notebook"]).resolve(): r for r in json.loads(out.getvalue())}
    assert len(reports) == 2 * len(SLUGS)
    return status, reports


@pytest.mark.parametrize("slug", SLUGS)
def test_solution_notebook_passes_every_check_and_gets_full_marks(slug, graded_exercises):
    report = graded_exercises[1][(SOURCES / f"{slug}.ipynb").resolve()]
    assert report["problem"] is None and report["cell_errors"] == [] and report["flags"] == []
    task_ids = [t.id for t in tasks_for_chapter(slug)]
    assert 3 <= len(task_ids) <= 6
    assert [t["task"] for t in report["tasks"]] == task_ids
    assert all(t["status"] == "pass" for t in report["tasks"]), report["tasks"]
    assert report["points"] == report["max_points"] == sum(t.points for t in tasks_for_chapter(slug))
    # The notebook's own check cells, one per task, all printed PASS.
    assert sorted(c["task"] for c in report["check_cells"]) == sorted(task_ids)
    assert {c["status"] for c in report["check_cells"]} == {"pass"}
    assert 1 <= len(report["written"]) <= 3 and all(w["answered"] for w in report["written"])


@pytest.mark.parametrize("slug", SLUGS)
def test_student_notebook_runs_and_reports_not_implemented(slug, graded_exercises):
    # Through the command line, with --json, as an instructor would run it.
    status, reports = graded_exercises
    assert status == 0
    report = reports[(ROOT / "exercises" / f"{slug}.ipynb").resolve()]
    assert report["problem"] is None and report["cell_errors"] == [] and report["flags"] == []
    assert report["points"] == 0 and report["max_points"] > 0
    assert {t["status"] for t in report["tasks"]} == {"not_implemented"}
    assert len(report["check_cells"]) == len(report["tasks"])
    assert {c["status"] for c in report["check_cells"]} == {"not_implemented"}
    assert report["written"] and not any(w["answered"] for w in report["written"])


def test_student_notebooks_are_in_sync_with_the_sources():
    assert sorted(p.stem for p in SOURCES.glob("*.ipynb")) == SLUGS
    assert notebooks.out_of_date(SOURCES, ROOT / "exercises") == []
    assert main(["student", "--check", "--root", str(ROOT)]) == 0


def test_student_notebooks_hold_no_solution_and_no_outputs():
    for slug in SLUGS:
        text = (ROOT / "exercises" / f"{slug}.ipynb").read_text()
        student = nbformat.reads(text, as_version=4)
        source = nbformat.read(SOURCES / f"{slug}.ipynb", as_version=4)
        assert notebooks.BEGIN not in text and notebooks.END not in text
        stubs = sum(c.source.count(notebooks.CODE_STUB) for c in student.cells if c.cell_type == "code")
        assert stubs == sum(c.source.count(notebooks.BEGIN) for c in source.cells
                            if c.cell_type == "code") == len(tasks_for_chapter(slug))
        assert all(c.outputs == [] and c.execution_count is None
                   for c in student.cells if c.cell_type == "code")
        # The first code cell sets one thread and seeds.
        first_code = next(c for c in student.cells if c.cell_type == "code").source
        assert "torch.set_num_threads(1)" in first_code and "seed_everything(" in first_code


# ---------------------------------------------------------------------------------------------
# The catalogue: one entry and one tasks module per chapter, read by everything else
# ---------------------------------------------------------------------------------------------
TASKS_DIR = ROOT / "normcourse" / "exercises" / "tasks"


def test_each_chapter_has_one_tasks_module_named_after_it_and_nothing_else_registers_tasks():
    assert sorted(p.name for p in TASKS_DIR.glob("ch*.py")) == [f"ch{s}.py" for s in SLUGS]
    assert list(TASKS) == [t.id for c in CHAPTERS for t in c.tasks]  # chapter, notebook order
    for c in CHAPTERS:
        assert c.tasks and all(t.id.startswith(f"{c.number:02d}.") for t in c.tasks)
        assert tasks_for_chapter(c.slug) == tasks_for_chapter(c.number) == c.tasks


def test_prerequisite_chapters_are_earlier_chapters_of_the_catalogue():
    for c in CHAPTERS:
        for p in c.prerequisites:
            assert is_chapter(p) == p[:1].isdigit(), p  # a slug-like name that is no chapter
            assert not is_chapter(p) or chapter(p).number < c.number


def test_written_questions_of_the_catalogue_are_those_of_the_notebooks():
    for c in CHAPTERS:
        assert len(c.question_ids) == len(c.questions) >= 1
        for path in (SOURCES / f"{c.slug}.ipynb", ROOT / "exercises" / f"{c.slug}.ipynb"):
            cells = nbformat.read(path, as_version=4).cells
            tagged = [cell.metadata.get("normcourse", {}).get("question") for cell in cells]
            assert tuple(q for q in tagged if q) == c.question_ids, path


def test_task_headings_give_the_catalogue_points_and_their_split():
    """"## Task k: title (4 points: dx 2, dgamma 1, dbeta 1)": the notebook says what the grader gives."""
    for c in CHAPTERS:
        cells = nbformat.read(ROOT / "exercises" / f"{c.slug}.ipynb", as_version=4).cells
        headings = [cell.source.splitlines()[0] for cell in cells
                    if cell.cell_type == "markdown" and cell.source.startswith("## Task ")]
        assert [h[h.rindex("(") + 1:-1] for h in headings] == [t.points_label for t in c.tasks]


def test_exercises_import_no_chapter_experiment_code():
    """Exercises and the chapters' experiment modules are siblings: exercises never import them."""
    for path in (ROOT / "normcourse" / "exercises").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith("normcourse.experiments") for n in names), path


def test_chapter_lookup_takes_numbers_keys_slugs_and_task_ids_and_names_the_chapters():
    assert {chapter(k).slug for k in (2, "2", "02", "02_batch_norm", "02.batchnorm_forward")} == {
        "02_batch_norm"}
    for key in (11, "nope"):  # no chapter 11
        with pytest.raises(ValueError, match=f"unknown chapter {key!r}; choose one of 1, 2"):
            chapter(key)


def test_the_notebook_runner_starts_without_torch_and_still_validates_notebooks(tmp_path):
    # The runner starts before every graded notebook's kernel: it reads verdicts and runs
    # nbclient, and must not spend seconds loading torch or jsonschema's "iri" parsers first.
    bad = tmp_path / "bad.ipynb"
    bad.write_text(json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {},
                               "cells": [{"cell_type": "code", "source": "1", "id": "a",
                                          "metadata": {}, "execution_count": None}]}))
    probe = (
        "import sys, json\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from normcourse.exercises import notebook_run\n"
        "notebook_run._skip_slow_iri_format_checker()\n"
        "import nbformat, nbclient\n"
        "from normcourse.exercises.result_format import RESULT_MIME\n"
        "try:\n"
        f"    nbformat.validate(nbformat.read({str(bad)!r}, as_version=4))\n"
        "    invalid = None\n"
        "except nbformat.ValidationError as error:\n"
        "    invalid = str(error).splitlines()[0]\n"
        "print(json.dumps({'loaded': sorted(m for m in ('torch', 'rfc3987_syntax', "
        "'normcourse.exercises.checks') if sys.modules.get(m)), 'invalid': invalid}))\n"
    )
    done = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["loaded"] == []
    # nbformat still validates against its schema (the code cell has no outputs)
    assert result["invalid"] == "'outputs' is a required property"


def test_the_package_names_its_checks_on_first_use():
    import normcourse.exercises as exercises

    assert exercises.check is check and exercises.TASKS is TASKS
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        exercises.nothing  # noqa: B018


def test_grader_names_a_notebook_of_no_chapter(tmp_path):
    path = tmp_path / "notes.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), path)
    report = grade_notebook(path)
    assert "cannot tell which chapter" in report.problem and "unknown chapter 'notes'" in report.problem
    assert report.tasks == [] and report.points == report.max_points == 0


def test_grader_reports_every_catalogued_question_even_a_deleted_one(tmp_path):
    """A notebook holding one answered question and no code: every task fails, the other
    questions (02.q2, ...) are missing."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(
        "Because...", metadata={"normcourse": {"question": "02.q1"}})])
    notebook.metadata["normcourse"] = {"chapter": "02_batch_norm"}
    nbformat.write(notebook, tmp_path / "submission.ipynb")
    report = grade_notebook(tmp_path / "submission.ipynb")
    assert report.problem is None and report.chapter == "02_batch_norm"
    assert [(w["question"], w["answered"]) for w in report.written] == [
        ("02.q1", True), *((q, False) for q in chapter(2).question_ids[1:])]
    assert len(report.written) >= 2
    assert [t["task"] for t in report.tasks] == [t.id for t in chapter(2).tasks]
    assert report.points == 0 and all("no function" in t["message"] for t in report.tasks)


# ---------------------------------------------------------------------------------------------
# The catalogue of known mistakes: each one gets its own message
# ---------------------------------------------------------------------------------------------
MISTAKES = [(task.id, m) for task in TASKS.values() if isinstance(task, OutputTask)
            for m in task.mistakes]


@pytest.mark.parametrize("task_id, mistake", MISTAKES, ids=[f"{t}-{m.name}" for t, m in MISTAKES])
def test_each_known_mistake_is_diagnosed_by_name(task_id, mistake):
    result = check_answer(task_id, mistake.answer)
    assert result.status == "fail" and result.points < result.max_points
    assert result.mistakes == [mistake.name]
    assert result.message.startswith(mistake.message)
    # Partial credit: exactly the outputs the mistake leaves right on every case earn their points.
    task = TASKS[task_id]
    right = [all(np.allclose(g, w, rtol=RTOL, atol=ATOL) if g.shape == w.shape else False
                 for g, w in zip(*(
                     [task.run(f, case)[i] for case in task.cases] for f in (mistake.answer, task.correct))))
             for i in range(len(task.outputs))]
    earned = sum(p for p, ok in zip(task.output_points, right) if ok) if task.output_points else 0
    assert result.points == earned


@pytest.mark.parametrize("task_id, mistake", MISTAKES, ids=[f"{t}-{m.name}" for t, m in MISTAKES])
def test_each_known_mistake_is_far_outside_the_tolerance(task_id, mistake):
    """A mistake that were within 100x the tolerance on every case could pass as correct."""
    task = TASKS[task_id]
    worst = 0.0
    for case in task.cases:
        want = task.run(task.correct, case)
        try:
            got = task.run(mistake.answer, case)
        except Exception:
            return  # crashing on a case is a visible difference
        for g, w in zip(got, want):
            if g.shape != w.shape:
                return
            worst = max(worst, float(np.max(np.abs(g - w) - 100 * (ATOL + RTOL * np.abs(w)))))
    assert worst > 0


@pytest.mark.parametrize("task_id", sorted(TASKS))
def test_the_correct_answer_passes_and_a_stub_is_not_implemented(task_id):
    task = TASKS[task_id]
    if isinstance(task, OutputTask):
        assert check_answer(task_id, task.correct).status == "pass"

    def stub(*args):
        raise NotImplementedError("Write your solution here")

    result = check_answer(task_id, stub)
    assert (result.status, result.points) == ("not_implemented", 0)


# Student-style wrong answers written independently of the mistake catalogue.
def bn_unbiased(x, gamma, beta, eps=1e-5):
    return gamma * (x - x.mean(0)) / np.sqrt(np.var(x, axis=0, ddof=1) + eps) + beta


def bn_eps_outside(x, gamma, beta, eps=1e-5):
    return gamma * (x - x.mean(0)) / (x.std(0) + eps) + beta


def bn_rows(x, gamma, beta, eps=1e-5):
    mu, var = x.mean(1, keepdims=True), x.var(1, keepdims=True)
    return gamma * (x - mu) / np.sqrt(var + eps) + beta


def bn_no_affine(x, gamma, beta, eps=1e-5):
    return (x - x.mean(0)) / np.sqrt(x.var(0) + eps)


def update_keras(running_mean, running_var, x, momentum=0.1):
    return (momentum * running_mean + (1 - momentum) * x.mean(0),
            momentum * running_var + (1 - momentum) * x.var(0, ddof=1))


def bn_train_only(x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5):
    mu, var = x.mean(0), x.var(0)
    running_mean[:] = (1 - momentum) * running_mean + momentum * mu
    running_var[:] = (1 - momentum) * running_var + momentum * x.var(0, ddof=1)
    return gamma * (x - mu) / np.sqrt(var + eps) + beta


def bn_rebinds(x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5):
    if not training:
        return gamma * (x - running_mean) / np.sqrt(running_var + eps) + beta
    running_mean = (1 - momentum) * running_mean + momentum * x.mean(0)  # rebinds, no update
    return gamma * (x - x.mean(0)) / np.sqrt(x.var(0) + eps) + beta


def gradient_not_restored(f, x, dout, h=1e-5):
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        x[i] += h
        plus = f(x).copy()
        x[i] -= 2 * h
        grad[i] = np.sum((plus - f(x)) * dout) / (2 * h)
    return grad


def ln_over_batch(x, gamma, beta, eps=1e-5):
    return gamma * (x - x.mean(0)) / np.sqrt(x.var(0) + eps) + beta


def fold_without_mean(W, b, gamma, beta, running_mean, running_var, eps=1e-5):
    scale = gamma / np.sqrt(running_var + eps)
    return W * scale[:, None], (0 if b is None else b) * scale + beta


def block_with_bias(i, o):
    return nn.Sequential(nn.Linear(i, o), nn.BatchNorm1d(o), nn.Sigmoid())


def block_bn_after(i, o):
    return nn.Sequential(nn.Linear(i, o, bias=False), nn.Sigmoid(), nn.BatchNorm1d(o))


def train_step_no_train(model, x, y, optimizer):
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def evaluate_no_grad_only(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def freeze_requires_grad(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.weight.requires_grad = False
            m.bias.requires_grad = False


def renorm_r_inverted(batch_mean, batch_std, running_mean, running_std, rmax, dmax):
    return (np.clip(running_std / batch_std, 1 / rmax, rmax),
            np.clip((batch_mean - running_mean) / running_std, -dmax, dmax))


STUDENT_MISTAKES = [
    ("02.batchnorm_forward", bn_unbiased, "unbiased_variance"),
    ("02.batchnorm_forward", bn_eps_outside, "eps_outside_root"),
    ("02.batchnorm_forward", bn_rows, "wrong_axis"),
    ("02.batchnorm_forward", bn_no_affine, "forgot_gamma_beta"),
    ("04.update_running_stats", update_keras, "keras_momentum"),
    ("04.batchnorm_forward", bn_train_only, "ignores_training_flag"),
    ("04.batchnorm_forward", bn_rebinds, "no_update"),
    ("04.fold_batchnorm_into_linear", fold_without_mean, "forgot_mean"),
    ("05.layernorm_forward", ln_over_batch, "batch_axis"),
    ("03.linear_bn_sigmoid", block_with_bias, "redundant_bias"),
    ("03.linear_bn_sigmoid", block_bn_after, "norm_after_activation"),
    ("03.train_step", train_step_no_train, "forgot_train_mode"),
    ("03.evaluate", evaluate_no_grad_only, "forgot_eval_mode"),
    ("03.freeze_batchnorm", freeze_requires_grad, "requires_grad_only"),
    ("06.renorm_r_d", renorm_r_inverted, "inverted_r"),
]


@pytest.mark.parametrize("task_id, answer, name", STUDENT_MISTAKES,
                         ids=[f"{t}-{n}" for t, _, n in STUDENT_MISTAKES])
def test_student_written_mistakes_are_named(task_id, answer, name):
    result = check_answer(task_id, answer)
    assert result.status == "fail"
    assert result.mistakes == [name], result.message


def test_a_gradient_check_that_does_not_restore_x_is_told_so():
    result = check_answer("02.numerical_gradient", gradient_not_restored)
    assert result.status == "fail" and "restore" in result.message


# ---------------------------------------------------------------------------------------------
# The checker never crashes on an answer
# ---------------------------------------------------------------------------------------------
def _raises_value_error(*args):
    raise ValueError("operands could not be broadcast together with shapes (8,5) (8,)")


ODD_ANSWERS = [
    (lambda *a: None, "None"),
    (lambda *a: "hello", "str"),
    (lambda *a: {"out": 1}, "dict"),
    (_raises_value_error, "shape mismatch"),
    (lambda x: x, "TypeError"),  # wrong number of parameters
    (lambda *a: np.zeros(3), "shape"),
    (lambda x, gamma, beta, eps: np.full_like(x, np.nan), "NaN"),
    (42, "int"),
    (None, "None"),
]


@pytest.mark.parametrize("answer, phrase", ODD_ANSWERS, ids=[p for _, p in ODD_ANSWERS])
def test_odd_answers_become_messages(answer, phrase):
    result = check_answer("02.batchnorm_forward", answer)
    assert result.status == "fail" and result.points == 0
    assert phrase in result.message


def test_wrong_tuples_and_tensors():
    assert "expected 3" in check_answer("02.batchnorm_backward", lambda *a: (1, 2)).message
    assert "tuple" in check_answer("02.batchnorm_backward", lambda *a: np.zeros(3)).message
    # Correct values as float64 torch tensors pass: only the numbers matter. In float32 they are
    # a named failure (the course computes in float64), even where the numbers are close enough.
    task = TASKS["02.batchnorm_forward"]
    as_tensor = lambda *a: torch.tensor(task.correct(*a))  # noqa: E731
    assert check_answer("02.batchnorm_forward", as_tensor).status == "pass"
    as_float32 = lambda *a: torch.tensor(task.correct(*a), dtype=torch.float32)  # noqa: E731
    result = check_answer("02.batchnorm_forward", as_float32)
    assert (result.status, result.mistakes, result.points) == ("fail", ["float32"], 0)
    assert result.message.startswith("`out` is float32: the exercises compute in float64")
    # Modifying an input in place is named.
    def in_place(x, gamma, beta, eps=1e-5):
        x -= x.mean(0)
        return gamma * x / np.sqrt(x.var(0) + eps) + beta
    assert "changed its input `x` in place" in check_answer("02.batchnorm_forward", in_place).message


def test_module_tasks_survive_odd_answers():
    for answer in (lambda i, o: None, lambda i, o: nn.Linear(i, o), lambda i, o: 1 / 0):
        assert check_answer("03.linear_bn_sigmoid", answer).status == "fail"
    returns_tensor = lambda model, x, y, opt: torch.tensor(1.0)  # noqa: E731
    assert "tensor" in check_answer("03.train_step", returns_tensor).message


def test_unknown_task_raises_a_clear_error():
    with pytest.raises(ValueError, match="unknown exercise task '02.nope'; choose one of"):
        check_answer("02.nope", lambda: None)


def test_check_prints_records_and_keeps_the_random_stream(capsys):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    check("03.train_step", TASKS["03.train_step"].correct)
    assert torch.equal(torch.rand(1), expected_next)  # checking did not consume the RNG
    line = capsys.readouterr().out.strip()
    assert line.startswith("[PASS] 03.train_step") and "2/2 points" in line
    assert RESULTS["03.train_step"].status == "pass"
    first = check_answer("02.batchnorm_forward", bn_unbiased).message
    assert check_answer("02.batchnorm_forward", bn_unbiased).message == first  # deterministic


# ---------------------------------------------------------------------------------------------
# Student-version generator
# ---------------------------------------------------------------------------------------------
def test_strip_solutions_keeps_indentation_and_code_around():
    source = "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\n\nz = 2"
    stripped = notebooks.strip_solutions(source, notebooks.CODE_STUB)
    assert stripped == f"def f(x):\n    y = 1\n    {notebooks.CODE_STUB}\n\nz = 2"
    namespace = {}
    exec(stripped, namespace)
    with pytest.raises(NotImplementedError):
        namespace["f"](1)


@pytest.mark.parametrize("source", [
    "### BEGIN SOLUTION\nx = 1",
    "x = 1\n### END SOLUTION",
    "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION",
])
def test_unbalanced_markers_are_rejected(source):
    with pytest.raises(notebooks.SolutionMarkerError):
        notebooks.strip_solutions(source, "stub", where="test cell")


def test_student_notebook_replaces_written_answers_and_normalizes_metadata():
    source = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("### BEGIN SOLUTION\nThe answer.\n### END SOLUTION",
                                      metadata={"normcourse": {"question": "09.q1"}}),
        nbformat.v4.new_code_cell("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION",
                                  metadata={"scrolled": True,
                                            "execution": {"iopub.status.idle": "2025-01-01T00:00:00Z"}},
                                  execution_count=7,
                                  outputs=[nbformat.v4.new_output("stream", text="1")]),
    ])
    source.metadata["language_info"] = {"name": "python", "version": "3.11.9"}
    student = notebooks.student_notebook(source, "09_demo")
    assert student.cells[0].source == notebooks.ANSWER_PROMPT
    assert student.cells[0].metadata == {"normcourse": {"question": "09.q1"}}
    assert student.cells[1].outputs == [] and student.cells[1].execution_count is None
    assert student.cells[1].metadata == {}
    assert student.metadata["normcourse"] == {"chapter": "09_demo", "version": "student"}
    assert student.metadata["language_info"] == {"name": "python"}
    assert source.cells[1].execution_count == 7  # the source is left alone
    assert notebooks.render(student) == notebooks.render(notebooks.student_notebook(source, "09_demo"))


# ---------------------------------------------------------------------------------------------
# Instructor tools
# ---------------------------------------------------------------------------------------------
# The class bundle (student and nbgrader formats) is tested in tests/test_exercise_bundle.py.


def test_instructor_page_is_in_sync_and_links_every_chapter_and_notebook():
    page = (ROOT / "book" / "instructors.md").read_text()
    assert page == instructors_page()
    for c in CHAPTERS:
        assert f"{{doc}}`{c.slug}`" in page
        assert f"<../exercises/{c.slug}.ipynb>" in page
        assert all(objective in page for objective in c.objectives)
        assert all(f"`{t.function}` ({t.points_label})" in page for t in tasks_for_chapter(c.slug))
    assert "splits its points per output" in page
    # The class workflow, bundle to gradebook, and the nbgrader route with what was tested.
    steps = ["**Bundle.**", "**Students.**", "**Collect.**", "**Grade.**", "**Gradebook.**"]
    assert all(step in page for step in steps)
    assert [page.index(step) for step in steps] == sorted(page.index(step) for step in steps)
    assert "--format nbgrader" in page and "What was tested:" in page
