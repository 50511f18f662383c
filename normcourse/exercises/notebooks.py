"""Student versions of the exercise notebooks, generated from the sources with solutions.

A source notebook (``exercises/source/NN_name.ipynb``) marks every solution::

    def batchnorm_forward(x, gamma, beta, eps=1e-5):
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

In code cells the region becomes ``raise NotImplementedError(...)`` at the marker's indentation;
in markdown cells (written questions) it becomes an answer prompt. Outputs and execution counts
are cleared and the metadata is reduced to a fixed set, so regenerating is byte-identical (a test
compares the committed student notebooks with freshly generated ones).
"""

from __future__ import annotations

import copy
from pathlib import Path

import nbformat

__all__ = [
    "BEGIN",
    "END",
    "CODE_STUB",
    "ANSWER_PROMPT",
    "SolutionMarkerError",
    "strip_solutions",
    "student_notebook",
    "render",
    "write_student_versions",
    "generate",
    "out_of_date",
]

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
CODE_STUB = 'raise NotImplementedError("Write your solution here, then run the check cell below.")'
ANSWER_PROMPT = "**Your answer:** _write your answer here._"

# Cell metadata kept in the student version (anything else, e.g. "execution" timings or
# "scrolled", depends on whoever last ran the source and would make regeneration non-identical).
KEPT_CELL_METADATA = ("tags", "normcourse")
NOTEBOOK_METADATA = {
    "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


class SolutionMarkerError(ValueError):
    """A BEGIN/END SOLUTION marker without its partner."""


def strip_solutions(source: str, stub: str, where: str = "cell") -> str:
    """Replace every BEGIN/END SOLUTION region of ``source`` with ``stub`` (indented like BEGIN).

    where: names the cell in error messages. Raises SolutionMarkerError for unbalanced markers.
    """
    kept: list[str] = []
    inside = False
    for number, line in enumerate(source.split("\n"), start=1):
        marker = line.strip()
        if marker == BEGIN:
            if inside:
                raise SolutionMarkerError(f"{where}, line {number}: {BEGIN} inside another solution")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            kept.append(indent + stub)
        elif marker == END:
            if not inside:
                raise SolutionMarkerError(f"{where}, line {number}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            kept.append(line)
    if inside:
        raise SolutionMarkerError(f"{where}: {BEGIN} is never closed by {END}")
    return "\n".join(kept)


def student_notebook(source: nbformat.NotebookNode, chapter: str) -> nbformat.NotebookNode:
    """The student version of a source notebook (a new notebook; ``source`` is unchanged)."""
    notebook = copy.deepcopy(source)
    notebook.metadata = copy.deepcopy(NOTEBOOK_METADATA)
    notebook.metadata["normcourse"] = {"chapter": chapter, "version": "student"}
    for index, cell in enumerate(notebook.cells):
        where = f"{chapter}, cell {index}"
        cell.metadata = {k: cell.metadata[k] for k in KEPT_CELL_METADATA if k in cell.metadata}
        if cell.cell_type == "code":
            cell.source = strip_solutions(cell.source, CODE_STUB, where)
            cell.outputs = []
            cell.execution_count = None
        elif cell.cell_type == "markdown":
            cell.source = strip_solutions(cell.source, ANSWER_PROMPT, where)
        cell.pop("attachments", None)
    return notebook


def render(notebook: nbformat.NotebookNode) -> str:
    """The notebook as text, exactly as it is written to disk (nbformat's JSON layout)."""
    nbformat.validate(notebook)
    return nbformat.writes(notebook, version=4) + "\n"


def student_path(source_path: Path, out_dir: Path) -> Path:
    return Path(out_dir) / Path(source_path).name


def generate(source_path: Path) -> str:
    """Read one source notebook and return the text of its student version."""
    source_path = Path(source_path)
    source = nbformat.read(source_path, as_version=4)
    return render(student_notebook(source, source_path.stem))


def write_student_versions(source_dir: Path, out_dir: Path) -> list[Path]:
    """Write the student version of every ``source_dir/*.ipynb`` into ``out_dir``; return paths.

    Files are rewritten only when their content changes (so timestamps stay put).
    """
    written = []
    for source_path in sorted(Path(source_dir).glob("*.ipynb")):
        text = generate(source_path)
        target = student_path(source_path, out_dir)
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
        written.append(target)
    return written


def out_of_date(source_dir: Path, out_dir: Path) -> list[Path]:
    """Student notebooks that are missing or differ from what the sources generate."""
    stale = []
    for source_path in sorted(Path(source_dir).glob("*.ipynb")):
        target = student_path(source_path, out_dir)
        if not target.exists() or target.read_text(encoding="utf-8") != generate(source_path):
            stale.append(target)
    return stale
