"""Grade one untrusted submission in its sandbox: run the notebook, then the grader's checks.

``grade_submission`` does, for one notebook, in one ``Sandbox`` (a fresh folder holding a copy of
the notebook only, limits, a scrubbed environment):

1. run the notebook top to bottom (``notebook_run``): cell errors and timeouts, what its own
   check cells showed; a killed kernel or a limit (the disk limit kills the run) ends this phase
   only;
2. kill everything phase 1 left behind (forks included), then check every task of the chapter in
   a fresh answer process (``answers``), each task with its own time limit;
3. flag attempts to fake a grade and answers built on the package's solutions (``tampering``).
"""

from __future__ import annotations

import json
import os
import shutil
import threading

from normcourse.exercises.answers import AnswerSession, definitions
from normcourse.exercises.catalog import tasks_for_chapter
from normcourse.exercises.sandbox import Limits, Sandbox
from normcourse.exercises.tampering import (claim_flags, claimed_passes, parse_cells,
                                            reference_flags, source_flags)

__all__ = ["grade_submission"]

RUN = "from normcourse.exercises.notebook_run import main; main()"


def _run_notebook(sandbox: Sandbox, copy: str, timeout: int, cells: int) -> dict:
    """Phase 1; never raises. The whole run may take ``timeout`` per cell plus startup time."""
    from normcourse.exercises.sandbox import CappedReader

    read_end, write_end = os.pipe()
    config = {"notebook": copy, "timeout": timeout, "result_fd": write_end,
              "output_cap": sandbox.limits.output_kb * 1024}
    try:
        process = sandbox.python(RUN, json.dumps(config), pass_fds=(write_end,))
    finally:
        os.close(write_end)
    log = CappedReader(process.stdout, sandbox.limits.output_kb * 1024)
    result_reader = CappedReader(os.fdopen(read_end, "rb"), 64 * 1024 * 1024)
    deadline = 60 + timeout * (cells + 2)
    timer = threading.Timer(deadline, sandbox.kill_all)
    timer.start()
    process.wait()
    timer.cancel()
    raw = result_reader.text()
    try:
        result = json.loads(raw)
        if not isinstance(result, dict):
            raise ValueError("not an object")
        return result
    except ValueError:
        tail = log.text()[-1500:]
        code = process.returncode
        why = f"killed by signal {-code}" if code and code < 0 else f"exit status {code}"
        return {"cell_errors": [], "check_cells": [], "truncated_cells": [],
                "problem": f"the notebook's run ended without a report ({why}; a limit, a killed "
                           f"grader process or an overall time-out); its last output:\n{tail}"}


def grade_submission(path, notebook, chapter: str, timeout: int = 120, task_timeout: float = 60,
                     limits: Limits | None = None, read_only: tuple[str, ...] = ()) -> dict:
    """Grade ``notebook`` (already read from ``path``) for ``chapter``; return report fields."""
    code_cells = [c.source for c in notebook.cells if c.cell_type == "code"]
    trees = parse_cells(code_cells)
    tasks = tasks_for_chapter(chapter)
    with Sandbox(limits, read_only=read_only) as sandbox:
        copy = sandbox.work / os.path.basename(str(path))
        shutil.copyfile(path, copy)
        run = _run_notebook(sandbox, str(copy), timeout, len(notebook.cells))
        hits = sandbox.limit_hits()
        sandbox.kill_all()  # nothing of the student's run survives into the checks
        session = AnswerSession(sandbox, definitions(code_cells), task_timeout)
        results = [session.check(task).to_dict() for task in tasks]
        session.close()
        isolation = sandbox.describe()
        disk_hits = sandbox.disk_hits  # phase 1 and phase 2
    verdicts = {r["task"]: r["status"] for r in results}
    shown = {str(c.get("task")) for c in run["check_cells"] if c.get("status") == "pass"}
    flags = source_flags(trees) + claim_flags(claimed_passes(notebook), shown, verdicts)
    references = reference_flags(trees, {t.id: t.function for t in tasks})
    for result in results:
        if result["task"] in references:
            result["uses_reference"] = references[result["task"]]
            flags.append(f"{result['task']}: the answer uses the package's own solution "
                         f"`{references[result['task']]}`")
    if session.load_error:
        run["cell_errors"].append(f"definitions: {session.load_error}")
    if hits.get("processes"):
        flags.append(f"the notebook reached the limit of {sandbox.limits.processes} processes "
                     f"({hits['processes']} refused forks: a fork bomb?); they were all killed")
    if disk_hits:
        flags.append(f"disk limit exceeded: the files written reached {sandbox.limits.disk_mb} "
                     f"MiB in all ({disk_hits} time{'s' if disk_hits > 1 else ''}); every process "
                     "was killed and the files removed")
    if hits.get("memory"):
        flags.append(f"the notebook reached the memory limit of {sandbox.limits.memory_mb} MiB")
    if run["truncated_cells"]:
        flags.append("output truncated in cells " + ", ".join(map(str, run["truncated_cells"])))
    return {"tasks": results, "cell_errors": run["cell_errors"], "check_cells": run["check_cells"],
            "problem": run["problem"], "flags": flags, "isolation": isolation}
