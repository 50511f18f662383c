"""Run a submitted notebook top to bottom inside a sandbox, recording what it did (no marks).

``python -I -c ... notebook_run CONFIG`` is started by the grader in a ``Sandbox``; it executes the
notebook's copy with nbclient (kernel ``python3``, errors allowed, a per-cell time limit after
which the cell is interrupted and the next one runs, each cell's output capped) and writes one
JSON object to the file descriptor ``result_fd`` that only it holds (the kernel does not inherit
it): the cells that raised or timed out, the verdicts the notebook's own check cells displayed,
and a problem if the kernel died. Marks never come from here: see ``answers``.
"""

from __future__ import annotations

import json
import os
import sys

__all__ = ["run", "main"]

TRUNCATED = "\n[output truncated by the grader]\n"


def _client_class():
    from nbclient import NotebookClient

    class CappedClient(NotebookClient):
        """Keeps at most ``output_cap`` characters of output per cell."""

        output_cap = 256 * 1024

        def output(self, outs, msg, display_id, cell_index):
            used = sum(len(json.dumps(o)) for o in outs)
            if used > self.output_cap and msg["msg_type"] != "error":
                if not outs or outs[-1].get("text") != TRUNCATED:
                    outs.append({"output_type": "stream", "name": "stderr", "text": TRUNCATED})
                self.truncated.add(cell_index)
                return None
            return super().output(outs, msg, display_id, cell_index)

        async def _async_handle_timeout(self, timeout, cell=None):
            self.timed_out.update(i for i, c in enumerate(self.nb.cells) if c is cell)
            return await super()._async_handle_timeout(timeout, cell)

    return CappedClient


def _skip_slow_iri_format_checker() -> None:
    """Have jsonschema, which nbformat imports, leave out its "iri" format checker.

    With the rfc3987-syntax package installed (jsonschema's format-nongpl extra pulls it in),
    ``import jsonschema`` builds some 35 Earley parsers for that one format: 1 to 3 s in every
    graded notebook's runner, for a format that no notebook schema uses
    (python-jsonschema/jsonschema#1428). A module marked missing in ``sys.modules`` fails to
    import, and jsonschema then skips that checker, as it does when the package is absent.
    """
    sys.modules.setdefault("rfc3987_syntax", None)


def run(path: str, timeout: int, output_cap: int) -> dict:
    """Execute the notebook at ``path``; return what the grader's report needs from the run."""
    _skip_slow_iri_format_checker()
    import nbformat
    from nbclient.exceptions import DeadKernelError

    from normcourse.exercises.result_format import RESULT_MIME

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:  # stored outputs are the student's, not this run's
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = _client_class()(
        notebook, timeout=timeout, kernel_name="python3", allow_errors=True,
        interrupt_on_timeout=True, shutdown_kernel="immediate",
        resources={"metadata": {"path": os.getcwd()}},
    )
    client.output_cap, client.truncated, client.timed_out = output_cap, set(), set()
    problem = None
    try:
        client.execute()
    except DeadKernelError:
        problem = ("the kernel died (killed, out of memory, or exit()); the cells after it did "
                   "not run")
    except Exception as error:  # noqa: BLE001 - any failure of the run is reported, not raised
        problem = f"the notebook could not be run to the end: {type(error).__name__}: {error}"
    errors, checks = [], []
    for index, cell in enumerate(notebook.cells):
        if index in client.timed_out:
            errors.append(f"cell {index}: CellTimeoutError: the cell ran longer than {timeout} s "
                          "and was interrupted")
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error" and output["ename"] == "KeyboardInterrupt" \
                    and index in client.timed_out:
                continue  # nobody presses Ctrl-C here: the grader's interrupt at the time limit
            if output.get("output_type") == "error":
                errors.append(f"cell {index}: {output['ename']}: {output['evalue']}"[:500])
            elif RESULT_MIME in output.get("data", {}):
                checks.append(dict(output["data"][RESULT_MIME]))
    return {"cell_errors": errors, "check_cells": checks, "problem": problem,
            "truncated_cells": sorted(client.truncated)}


def main() -> None:
    config = json.loads(sys.argv[1])
    fd = config["result_fd"]
    os.set_inheritable(fd, False)  # the kernel must not be able to write our result
    result = run(config["notebook"], config["timeout"], config["output_cap"])
    with os.fdopen(fd, "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    main()
