"""The grader on untrusted submissions: a class folder of hostile notebooks and one honest one.

One run of ``python -m normcourse grade FOLDER --jobs 3 --csv --json`` (module fixture) grades
every notebook below, each in its own sandbox; each test asserts that one kind of attack was
contained and reported, and that the honest notebook in the same run got full marks. The fork
bomb runs only where the sandbox's process limit is enforced (a pids cgroup, or a non-root user
for whom RLIMIT_NPROC counts); ``test_process_limit_holds`` checks that limit first with a small
probe.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import nbformat
import pytest

from normcourse.__main__ import main
from normcourse.exercises.answers import _record, check_task, definitions
from normcourse.exercises.catalog import TASKS, tasks_for_chapter
from normcourse.exercises.checks import RESULT_MIME
from normcourse.exercises.diagnosis import OutputTask
from normcourse.exercises.sandbox import Limits, Sandbox, isolation

ROOT = Path(__file__).resolve().parents[1]
SLUG = "01_input_normalization"
SOLUTION = nbformat.read(ROOT / "exercises" / "source" / f"{SLUG}.ipynb", as_version=4)
STUDENT = nbformat.read(ROOT / "exercises" / f"{SLUG}.ipynb", as_version=4)
TASK_IDS = [t.id for t in tasks_for_chapter(SLUG)]
FULL = sum(t.points for t in tasks_for_chapter(SLUG))
SLUG_03 = "03_training_with_batch_norm"
SOLUTION_03 = nbformat.read(ROOT / "exercises" / "source" / f"{SLUG_03}.ipynb", as_version=4)
FULL_03 = sum(t.points for t in tasks_for_chapter(SLUG_03))
DISK_MB = 256  # the run's limit on all files of a submission together
TIMEOUT = 40  # per cell: importing torch in a loaded 2-core machine can take 20 s
FORK_BOMB = isolation()["process_limit_enforced"]


def _with_cells(base, *sources, at=None, **metadata):
    notebook = copy.deepcopy(base)
    cells = [nbformat.v4.new_code_cell(s) for s in sources]
    at = len(notebook.cells) if at is None else at
    notebook.cells[at:at] = cells
    notebook.metadata["normcourse"].update(metadata)
    return notebook


def _function_cell(notebook, name):
    return next(c for c in notebook.cells
                if c.cell_type == "code" and c.source.startswith(f"def {name}("))


def _cheater():
    """Stubs, plus every way of faking a PASS: none may earn a mark, each is flagged."""
    notebook = _with_cells(
        STUDENT,
        "def check(task_id, answer):  # the check cells now call this\n"
        "    print(f'[PASS] {task_id}: all points')",
        "import normcourse.exercises.diagnosis as diagnosis\n"
        "diagnosis.OutputTask.diagnose = lambda self, answer: ('pass', 'Correct.', [])",
        at=2)
    notebook.cells += [nbformat.v4.new_code_cell(
        "from normcourse.exercises import checks\n"
        "checks.check('01.standardize', standardize)  # the real check, patched: displays PASS\n"
        "print('[PASS] 01.standardize_fit (mean and std): 2/2 points. Correct.')")]
    _function_cell(notebook, "largest_stable_lr").source = (
        "def largest_stable_lr(x):\n"
        "    import normcourse.exercises.diagnosis as d  # patches the answer process at run time\n"
        "    d._same = lambda a, b: True\n"
        "    d.OutputTask.diagnose = lambda self, answer: ('pass', 'Correct.', [])\n"
        "    return 0.0")
    # Edited outputs: the stored check output of the first task claims a pass.
    check_cell = next(c for c in notebook.cells if "check(\"01.standardize_fit\"" in c.source)
    check_cell.outputs = [nbformat.v4.new_output(
        "display_data", data={"text/plain": "[PASS] 01.standardize_fit: 2/2 points.",
                              RESULT_MIME: {"task": "01.standardize_fit", "status": "pass"}})]
    return notebook


def _block_faker():
    """Chapter 3 with a wrong block whose verdict is faked wherever the definitions are loaded:
    a class body runs at definition time, in the notebook's kernel and in the answer process."""
    notebook = copy.deepcopy(SOLUTION_03)
    _function_cell(notebook, "linear_bn_sigmoid").source = (
        "class _Grader:  # patches the block's checker as soon as the definitions load\n"
        "    import normcourse.exercises.tasks.ch03_training_with_batch_norm as ch03\n"
        "    ch03.BlockTask.diagnose = lambda self, answer: ('pass', 'Correct.', [])\n"
        "    ch03.BlockTask.judge = lambda self, description: ('pass', 'Correct.', [])\n\n\n"
        "def linear_bn_sigmoid(in_features, out_features):\n"
        "    return nn.Linear(in_features, out_features)")
    return notebook


def _disk_filler():
    """The solution plus a cell that writes files of 16 MiB (a quarter of the per-file limit)
    until far beyond the disk limit."""
    return _with_cells(SOLUTION, "for i in range(100):\n"
                       "    with open(f'part{i}.bin', 'wb') as f:\n"
                       "        f.write(b'0' * (16 * 1024**2))", at=2)


def _resources(sentinel: Path, other: Path, port: int):
    """The solution plus cells that hit every limit and try to destroy files."""
    return _with_cells(
        SOLUTION,
        "x = bytearray(8 * 1024**3)  # beyond the address-space limit",
        "with open('big.bin', 'wb') as f:\n    f.write(b'0' * (200 * 1024**2))  # beyond 64 MiB",
        "while True:\n    print('spam ' * 200)",
        "while True:\n    pass",
        "raise ValueError('a check in a cell that is not a task')",
        "import os, shutil\n"
        "shutil.rmtree(os.path.expanduser('~'))\n"
        "for name in os.listdir('.'):\n    os.remove(name)  # the notebook's copy too\n"
        f"open({str(sentinel)!r}, 'w').write('overwritten')",
        f"import os\nos.remove({str(other)!r})",
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=10)",
    )


def _task_limits():
    """Right answers except: exit(), os._exit, an endless loop, and the package's solution.

    The loop is in the last task, which no other task calls, and the kernel dies (os._exit) in
    the cell before its check: it costs one task timeout, where a loop in a function the other
    tasks use would cost a timeout for each of them and one for the notebook's cell.
    """
    notebook = copy.deepcopy(SOLUTION)
    del notebook.metadata["normcourse"]  # lost metadata: the chapter comes from the file name
    _function_cell(notebook, "standardize_fit").source = (
        "def standardize_fit(x_train, eps=1e-8):\n"
        "    from normcourse.reference import standardize_fit as fit\n"
        "    return fit(x_train, eps)")
    _function_cell(notebook, "standardize_backward").source = (
        "def standardize_backward(dout, mean, std):\n    exit()")
    _function_cell(notebook, "largest_stable_lr").source = (
        "def largest_stable_lr(x):\n    import os\n    os._exit(3)")
    _function_cell(notebook, "lr_sweep").source = (
        "def lr_sweep(x, y, factors, tol=1e-6, max_steps=3000):\n    while True:\n        pass")
    return notebook


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("class")
    sentinel = folder / "instructor_notes.txt"
    sentinel.write_text("grades so far")
    server = socket.create_server(("127.0.0.1", 0))  # a service of the grading machine
    server.setblocking(False)
    notebooks = {
        "honest": SOLUTION,
        "cheater": _cheater(),
        # first in name order, which is the grader's: with its two cell timeouts it runs longest
        "attacker": _resources(sentinel, folder / "honest.ipynb", server.getsockname()[1]),
        "killed": _with_cells(SOLUTION, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
                              at=2),
        f"bob_{SLUG}": _task_limits(),
        "honest_03": SOLUTION_03,
        "faker_03": _block_faker(),
        "diskfill": _disk_filler(),
    }
    if FORK_BOMB:
        notebooks["forkbomb"] = _with_cells(SOLUTION, "import os\nwhile True:\n    os.fork()")
    for name, notebook in notebooks.items():
        nbformat.write(notebook, folder / f"{name}.ipynb")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    gradebook = tmp_path_factory.mktemp("out") / "grades.csv"
    # This run's sandboxes live under their own folder, so that the leftover-process check
    # below sees only them and not the sandboxes other tests run at the same time.
    sandboxes, default_tempdir = tmp_path_factory.mktemp("sandboxes"), tempfile.tempdir
    out = io.StringIO()
    start = time.perf_counter()
    tempfile.tempdir = str(sandboxes)
    try:
        with contextlib.redirect_stdout(out):
            status = main(["grade", str(folder), "--jobs", "3", "--json", "--csv", str(gradebook),
                           "--timeout", str(TIMEOUT), "--task-timeout", "30", "--processes", "128",
                           "--memory-mb", "3072", "--disk-mb", str(DISK_MB)])
    finally:
        tempfile.tempdir = default_tempdir
    seconds = time.perf_counter() - start
    reports = {Path(r["notebook"]).stem: r for r in json.loads(out.getvalue())}
    try:
        server.accept()
        reached = True
    except BlockingIOError:
        reached = False
    server.close()
    return {"status": status, "sandboxes": sandboxes, "reached_server": reached, "reports": reports,
            "folder": folder, "before": before,
            "gradebook": gradebook, "seconds": seconds}


def _flags(report) -> str:
    return "\n".join(report["flags"])


def test_every_submission_is_graded_and_the_honest_one_gets_full_marks(graded):
    reports = graded["reports"]
    assert graded["status"] == 0, {k: r["error"] for k, r in reports.items()}
    assert len(reports) == (9 if FORK_BOMB else 8)
    for name, full in (("honest", FULL), ("honest_03", FULL_03)):
        honest = reports[name]
        assert honest["points"] == honest["max_points"] == full
        assert honest["flags"] == [] and honest["cell_errors"] == [] and honest["problem"] is None
    for report in reports.values():  # every task of every submission has a verdict
        assert [t["task"] for t in report["tasks"]] == [
            t.id for t in tasks_for_chapter(report["chapter"])]
    print(f"graded {len(reports)} notebooks in {graded['seconds']:.0f} s with 3 jobs")


def test_faked_passes_earn_nothing_and_are_flagged(graded):
    report = graded["reports"]["cheater"]
    assert report["points"] == 0, report["tasks"]
    flags = _flags(report)
    assert "defines its own `check`" in flags
    assert "assigns into `normcourse.exercises.diagnosis" in flags
    assert "writes a verdict-like text" in flags
    assert "the submitted file's outputs show PASS for 01.standardize_fit" in flags
    # The patched checker really displayed PASS inside the notebook's own run.
    assert "displayed PASS for 01.standardize while the grader ran it" in flags


def test_a_faked_block_verdict_earns_nothing_and_is_flagged(graded):
    """03.linear_bn_sigmoid returns a module; its verdict, too, is computed by the grader."""
    report = graded["reports"]["faker_03"]
    by_task = {t["task"]: t for t in report["tasks"]}
    block = by_task["03.linear_bn_sigmoid"]
    assert (block["status"], block["points"], block["mistakes"]) == ("fail", 0, ["no_batchnorm"])
    assert report["points"] == FULL_03 - 1  # the other tasks are right
    flags = _flags(report)
    assert "assigns into `normcourse.exercises.tasks.ch03_training_with_batch_norm" in flags
    assert "displayed PASS for 03.linear_bn_sigmoid while the grader ran it" in flags


def test_the_disk_limit_holds_for_many_files_under_the_file_size_limit(graded):
    report = graded["reports"]["diskfill"]
    assert f"disk limit exceeded: the files written reached {DISK_MB} MiB" in _flags(report)
    assert "ended without a report" in report["problem"]  # the run was killed
    assert report["points"] == FULL  # the grader's checks ran in the emptied folder
    assert report["isolation"]["limits"]["disk_mb"] == DISK_MB


@pytest.mark.parametrize("tmpfs", [True, False], ids=["tmpfs", "watchdog"])
def test_the_disk_limit_kills_the_writer_and_empties_the_folder(tmpfs):
    # A disk filler keeps writing. 200 MiB of files is more than a full tmpfs takes; without one,
    # a quiet machine writes 200 MiB within one DISK_POLL round, before the watchdog looks, so
    # that writer goes on up to 1000 MiB (it is killed long before: see the peak below).
    files = 200 if tmpfs else 1000
    code = (f"for i in range({files}):\n    open(f'f{{i}}', 'wb').write(b'0' * 2**20)\n"
            "print('wrote them all', flush=True)")
    with Sandbox(Limits(disk_mb=20), tmpfs=tmpfs) as sandbox:
        if tmpfs and not sandbox.tmpfs:
            pytest.skip("no mounts here: the disk limit is the watchdog's alone")
        process = sandbox.python(code)
        out = process.communicate(timeout=60)[0].decode()
        time.sleep(0.5)  # the watchdog's next round, where the writer stopped on a full tmpfs
        assert "wrote them all" not in out
        assert sandbox.limit_hits()["disk"] >= 1
        assert list(sandbox.work.iterdir()) == []
        # A tmpfs stops the writes at the limit; the watchdog alone lets a fast writer overshoot
        # by what it writes in DISK_POLL seconds.
        assert sandbox.disk_peak <= (21 if tmpfs else 200) * 2**20
        print(f"tmpfs={tmpfs}: peak {sandbox.disk_peak / 2**20:.0f} MiB for a 20 MiB limit")


def test_limits_contain_memory_disk_output_and_loops(graded):
    report = graded["reports"]["attacker"]
    assert report["points"] == FULL  # the answers are right; nothing the cells did changed that
    errors = "\n".join(report["cell_errors"])
    assert "MemoryError" in errors
    assert "File too large" in errors or "OSError" in errors
    assert errors.count("CellTimeoutError") == 2  # the output flood and the endless loop
    assert "ValueError: a check in a cell that is not a task" in errors
    assert "output truncated" in _flags(report)


@pytest.mark.skipif(not isolation()["read_only_mounts"],
                    reason="no mount namespace here: files outside the sandbox are not protected")
def test_files_outside_the_sandbox_are_untouched(graded):
    folder = graded["folder"]
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert after == graded["before"]
    assert "Read-only file system" in "\n".join(graded["reports"]["attacker"]["cell_errors"])


@pytest.mark.skipif(not isolation()["own_network"],
                    reason="no network namespace here: submissions can use the network")
def test_submissions_cannot_reach_the_grading_machine(graded):
    errors = "\n".join(graded["reports"]["attacker"]["cell_errors"])
    assert "ConnectionRefusedError" in errors or "OSError: [Errno 101]" in errors
    assert not graded["reached_server"]


def test_a_killed_kernel_costs_no_marks_for_right_answers(graded):
    report = graded["reports"]["killed"]
    assert "kernel died" in report["problem"]
    assert report["points"] == FULL


def test_each_task_has_its_own_limits_and_reference_use_is_flagged(graded):
    report = graded["reports"][f"bob_{SLUG}"]
    assert f"{SLUG} inferred from the file name" in _flags(report)
    by_task = {t["task"]: t for t in report["tasks"]}
    assert by_task["01.standardize_fit"]["status"] == "pass"
    assert by_task["01.standardize_fit"]["uses_reference"].startswith("normcourse.reference")
    assert "uses the package's own solution" in _flags(report)
    assert by_task["01.standardize"]["status"] == "pass"
    assert "SystemExit" in by_task["01.standardize_backward"]["message"]
    assert "died" in by_task["01.largest_stable_lr"]["message"]
    assert "did not finish within 30 s" in by_task["01.lr_sweep"]["message"]
    points = {t.id: t.points for t in tasks_for_chapter(SLUG)}
    assert report["points"] == points["01.standardize_fit"] + points["01.standardize"]


@pytest.mark.skipif(not FORK_BOMB, reason="root without a writable pids cgroup: a fork bomb "
                    "cannot be contained here (see the instructors' page)")
def test_a_fork_bomb_is_contained_and_leaves_no_process(graded):
    report = graded["reports"]["forkbomb"]
    assert report["points"] == FULL
    assert "reached the limit of 128 processes" in _flags(report)
    left = [pid for pid in os.listdir("/proc") if pid.isdigit() and _in(graded["sandboxes"], pid)]
    assert not left


def _in(sandboxes: Path, pid: str) -> bool:
    """Whether process ``pid`` belongs to a sandbox under ``sandboxes`` (its HOME is there)."""
    try:
        return str(sandboxes).encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def test_gradebook_has_one_row_per_submission(graded):
    with open(graded["gradebook"], newline="") as f:
        rows = {row["student"]: row for row in csv.DictReader(f)}
    assert set(rows) == set(graded["reports"])
    assert rows["honest"]["total"] == str(FULL) and rows["cheater"]["total"] == "0"
    assert rows["honest_03"]["total"] == str(FULL_03) and rows["honest"]["03.train_step"] == ""
    assert [rows["honest"][t] for t in TASK_IDS] == [str(t.points) for t in tasks_for_chapter(SLUG)]
    assert "defines its own `check`" in rows["cheater"]["flags"]


def test_process_limit_holds():
    """A probe: 40 sleeping children under a limit of 16 processes; at most 16 start.

    The children do not hold the output pipe (DEVNULL), so the probe's output ends when the
    probe does; the sandbox kills the sleepers on leaving.
    """
    if not FORK_BOMB:
        pytest.skip("root without a writable pids cgroup: RLIMIT_NPROC is not enforced for root")
    code = ("import subprocess, sys\nstarted = []\nfor _ in range(40):\n    try:\n"
            "        started.append(subprocess.Popen(['sleep', '30'], stdout=subprocess.DEVNULL,\n"
            "                                        stderr=subprocess.DEVNULL))\n"
            "    except OSError:\n        break\nprint('started', len(started), flush=True)")
    with Sandbox(Limits(processes=16)) as sandbox:
        process = sandbox.start([shutil.which("python3") or "/usr/bin/python3", "-c", code])
        out = process.communicate(timeout=60)[0].decode()
    assert "started" in out
    assert 0 < int(out.split("started")[1]) < 16


def test_unknown_chapter_is_an_error(tmp_path, capsys):
    notebook = copy.deepcopy(STUDENT)
    del notebook.metadata["normcourse"]
    nbformat.write(notebook, tmp_path / "mystery.ipynb")
    assert main(["grade", str(tmp_path / "mystery.ipynb")]) == 1
    assert "cannot tell which chapter" in capsys.readouterr().err
    notebook.metadata["normcourse"] = {"chapter": "42_quantum"}
    nbformat.write(notebook, tmp_path / "mystery.ipynb")
    assert main(["grade", "--json", str(tmp_path)]) == 1
    (report,) = json.loads(capsys.readouterr().out)
    assert "unknown chapter" in report["error"]


def _container_tool() -> tuple[str | None, str]:
    """(a container tool whose daemon answers, or None; why none is usable, precisely)."""
    why = []
    for tool in ("docker", "podman"):
        path = shutil.which(tool)
        if path is None:
            why.append(f"no {tool} command")
            continue
        try:
            info = subprocess.run([tool, "info"], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            why.append(f"{path} is installed but `{tool} info` did not answer within 60 s")
            continue
        if info.returncode == 0:
            return tool, ""
        said = (info.stderr.strip().splitlines() or ["no message"])[-1]
        why.append(f"the {tool} CLI is installed ({path}) but `{tool} info` fails, no daemon to "
                   f"build with: {said}")
    return None, "; ".join(why) + " (the recipe is documented on the instructors' page)"


CONTAINER_TOOL, NO_CONTAINER = _container_tool()


@pytest.mark.skipif(CONTAINER_TOOL is None, reason=NO_CONTAINER)
def test_the_grading_image_builds(tmp_path):
    recipe = tmp_path / "grader.Dockerfile"
    assert main(["instructors", "--dockerfile", str(recipe)]) == 0
    subprocess.run([CONTAINER_TOOL, "build", "-f", str(recipe), "-t", "normcourse-grader-test",
                    str(ROOT)], check=True, timeout=1800)
    version = subprocess.run([CONTAINER_TOOL, "run", "--rm", "--network", "none",
                              "normcourse-grader-test", "--help"], capture_output=True, text=True)
    assert "--task-timeout" in version.stdout


# ---- the pieces, without a kernel -----------------------------------------------------------
def test_only_definitions_reach_the_answer_process():
    code = definitions([
        "import numpy as np\nfrom normcourse import reference",
        "EPS = 1e-5\nrate = np.float64(0.1)\nprint('PASS')\nreference.batchnorm_forward = None",
        "%matplotlib inline\ndef f(x):\n    return x + EPS\nclass A:\n    pass",
        "def broken(:",
    ])
    assert code.split("\n\n") == ["import numpy as np", "from normcourse import reference",
                                  "EPS = 1e-05", "def f(x):\n    return x + EPS",
                                  "class A:\n    pass"]


def _stub(*args):
    raise NotImplementedError("Write your solution here")


ANSWERS = [(task, name, answer) for task in TASKS.values()
           for name, answer in [("correct", task.correct), ("exit", lambda *a: exit()),
                                ("stub", _stub), *[(m.name, m.answer) for m in task.mistakes]]]


@pytest.mark.parametrize("task, name, answer", ANSWERS,
                         ids=[f"{t.id}-{n}" for t, n, _ in ANSWERS])
def test_a_verdict_from_recorded_outputs_equals_the_direct_check(task, name, answer):
    """The grader's replay of the answer process's data gives the notebook's own verdict."""
    record = json.loads(json.dumps(_record(task, {task.function: answer})))
    replayed = check_task(task, record).to_dict()
    if name == "exit":  # the notebook's check lets SystemExit through; the grader does not
        assert replayed["status"] == "fail" and "raised SystemExit" in replayed["message"]
        return
    assert replayed == task.check(answer).to_dict()


def test_no_task_is_judged_inside_the_submission():
    """Every task's record is data (outputs, or a description of a module), never a verdict."""
    for task in TASKS.values():
        record = _record(task, {task.function: task.correct})
        assert set(record) == ({"cases"} if isinstance(task, OutputTask) else {"description"})
        assert check_task(task, json.loads(json.dumps(record))).status == "pass"


def test_a_forged_block_description_fails():
    """A description that claims the right layers without their behaviour is judged wrong."""
    task = TASKS["03.linear_bn_sigmoid"]
    record = json.loads(json.dumps(_record(task, {task.function: task.correct})))
    for mode in ("eval", "train"):
        record["description"][mode]["data"] = [0.5] * 40
    result = check_task(task, record)
    assert (result.status, result.mistakes) == ("fail", ["extra_layer"])
    record["description"]["layers"] = "garbage"  # AnswerSession reports this as "garbled"
    with pytest.raises(TypeError):
        check_task(task, record)


def test_missing_and_non_callable_answers():
    task = TASKS["02.batchnorm_forward"]
    assert "no function `batchnorm_forward` is defined" in check_task(
        task, _record(task, {})).message
    assert "is a int, not a function" in check_task(
        task, _record(task, {"batchnorm_forward": 3})).message
