"""A class bundle: chosen chapters and their exercises, self-contained and without the solutions.

``bundle(...)`` writes a folder (or a zip) that students use without the repository:

- ``exercises/NN_topic.ipynb``: the student notebooks;
- ``chapters/NN_topic.md``: the chapters as MyST notebooks that read on their own (the included
  package code copied in, citations and cross-references resolved, see ``chapter_text``); they
  open as notebooks in JupyterLab (jupytext) to run the experiments;
- ``wheels/normcourse-*.whl``: the package, built by this command from ``normcourse/`` alone, so
  installing it never touches ``exercises/source/`` (the notebooks with solutions). The wheel does
  hold the checker's correct answers (``normcourse/exercises/tasks``), built from
  ``normcourse.reference``: the course's reference implementation, shown in the chapters, so
  students can read it anyway; the graded work is writing it themselves;
- ``requirements.txt`` (the pinned versions students need) and a ``README.md`` (install, then
  objectives, times, tasks and prerequisites from the catalogue).

``fmt="nbgrader"`` writes instead an nbgrader course folder: ``source/<slug>/<slug>.ipynb``
(nbgrader source notebooks, *with* solutions: for the instructor) plus the same chapters, wheel
and requirements, and a README with the nbgrader commands.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import nbformat

from normcourse.exercises.catalog import Chapter, chapter, is_chapter
from normcourse.exercises.chapter_text import BookIndex, standalone
from normcourse.exercises.nbgrader_source import WRITTEN_POINTS, nbgrader_notebook

__all__ = ["bundle", "bundle_readme", "build_wheel", "student_requirements", "FORMATS",
           "STUDENT_PACKAGES"]

FORMATS = ("student", "nbgrader")
# What a student's environment needs: the package's dependencies, JupyterLab, and jupytext with
# jupyterlab-myst to open the chapters as notebooks. Versions come from requirements.txt.
STUDENT_PACKAGES = ("torch", "numpy", "matplotlib", "tqdm", "jupyterlab", "ipykernel",
                    "jupytext", "jupyterlab-myst")
# A wheel holding any of these would give the solutions away or carry the repository along.
FORBIDDEN_IN_WHEEL = (".ipynb", "exercises/source", "/source/")


def _prerequisite_text(item: str) -> str:
    return f"chapter {chapter(item).number} ({chapter(item).title})" if is_chapter(item) else item


def student_requirements(root: str | Path) -> str:
    """The lines of ``root/requirements.txt`` that a student needs (``STUDENT_PACKAGES``)."""
    lines = []
    for line in (Path(root) / "requirements.txt").read_text(encoding="utf-8").splitlines():
        name = line.split("==")[0].split(">=")[0].strip().lower()
        if name in STUDENT_PACKAGES:
            lines.append(line.strip())
    missing = set(STUDENT_PACKAGES) - {line.split("==")[0].lower() for line in lines}
    if missing:
        raise FileNotFoundError(f"requirements.txt does not pin {', '.join(sorted(missing))}")
    return "\n".join(lines) + "\n"


def build_wheel(root: str | Path, out_dir: str | Path) -> Path:
    """Build the package's wheel from ``root/normcourse`` and ``root/pyproject.toml`` only (in a
    scratch copy: nothing is written into the repository), check that it holds no notebook and no
    solution, and return its path in ``out_dir``. Offline: no build isolation, no index."""
    root, out_dir = Path(root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "normcourse-src"
        shutil.copytree(root / "normcourse", copy / "normcourse",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copyfile(root / name, copy / name)
        built = Path(scratch) / "wheel"
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                   "--no-index", "-q", str(copy), "-w", str(built)]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(built.glob("normcourse-*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(f"building the normcourse wheel failed: {done.stderr[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            bad = [n for n in wheel.namelist() if any(f in n for f in FORBIDDEN_IN_WHEEL)
                   or not n.startswith(("normcourse/", "normcourse-"))]
        if bad:
            raise RuntimeError(f"the wheel would ship files it must not: {', '.join(bad[:5])}")
        target = out_dir / wheels[0].name
        shutil.copyfile(wheels[0], target)
        return target


def bundle_readme(chapters: list[Chapter], fmt: str = "student", wheel: str = "wheels/normcourse-*.whl") -> str:
    """The README of a class bundle: how to install, what is in it, objectives, times,
    prerequisites."""
    chosen = {c.slug for c in chapters}
    install = [
        "## Install (once)",
        "",
        "Python 3.11; no clone of the course repository is needed. In this folder:",
        "",
        "```bash",
        "python3.11 -m venv .venv && source .venv/bin/activate",
        "pip install -r requirements.txt",
        f"pip install --no-deps {wheel}",
        "jupyter lab",
        "```",
        "",
    ]
    if fmt == "student":
        lines = [
            "# normcourse: class bundle",
            "",
            "Chapters of the normcourse book with their exercise notebooks. Read a chapter in "
            "`chapters/` (Markdown; in JupyterLab, right-click > Open With > Notebook runs its "
            "code), then open its notebook in `exercises/`. Each task is a function whose body is "
            "`raise NotImplementedError(...)`: write it, run the cell, then run the check cell "
            "under it, which prints PASS, FAIL with a diagnosis, or NOT IMPLEMENTED. Tasks with "
            "several outputs give points per output (the task's heading says the split). Work "
            "in float64: float32 results fail.",
            "",
            *install,
            "Hand in the notebook file (`exercises/NN_topic.ipynb`) as your instructor asks.",
            "",
        ]
    else:
        lines = [
            "# normcourse: nbgrader course folder",
            "",
            "The chosen chapters' exercise notebooks as nbgrader source notebooks, with "
            "solutions: this folder is for the instructor. `source/<chapter>/<chapter>.ipynb` "
            "holds solution cells, locked autograder test cells worth the task's points (they "
            "print the checker's verdict and end with the points earned, which nbgrader takes "
            f"as partial credit) and manually graded written answers ({WRITTEN_POINTS} point "
            "each). The student notebooks, the grader and the students' kernels need the "
            "package: install it where nbgrader runs and in the students' image as below.",
            "",
            *install,
            "Then, in this folder (with `pip install nbgrader` done):",
            "",
            "```bash",
            "nbgrader generate_assignment 02_batch_norm   # writes release/02_batch_norm/",
            "nbgrader collect 02_batch_norm               # or place submissions in submitted/",
            "nbgrader autograde 02_batch_norm",
            "nbgrader export                              # grades.csv",
            "```",
            "",
            "The chapters for the students are in `chapters/`.",
            "",
        ]
    for c in chapters:
        points = sum(t.points for t in c.tasks)
        notebook = (f"exercises/{c.slug}.ipynb" if fmt == "student"
                    else f"source/{c.slug}/{c.slug}.ipynb")
        lines += [
            f"## {c.number}. {c.title}",
            "",
            f"- Chapter: `chapters/{c.slug}.md`; exercises: `{notebook}` "
            f"({len(c.tasks)} auto-checked tasks, {points} points, plus "
            f"{len(c.questions)} written questions)",
            f"- Time: about {c.reading_minutes} min reading, {c.exercise_minutes} min exercises",
            "- Prerequisites: " + "; ".join(_prerequisite_text(p) for p in c.prerequisites),
            "",
            "Learning objectives:",
            "",
            *[f"- {objective}" for objective in c.objectives],
            "",
            "Tasks:",
            "",
            *[f"- `{t.function}` ({t.points_label}): {t.title}" for t in c.tasks],
            "",
        ]
    missing = sorted({p for c in chapters for p in c.prerequisites if is_chapter(p)} - chosen)
    if missing:
        lines += ["## Prerequisite chapters not in this bundle", "",
                  *[f"- {_prerequisite_text(p)}" for p in missing], ""]
    return "\n".join(lines)


def bundle(chapter_keys, out: str | Path, root: str | Path = ".", as_zip: bool = False,
           fmt: str = "student") -> Path:
    """Write a class bundle of the chosen chapters into ``out`` (see the module docstring).

    chapter_keys: numbers or slugs, e.g. ``[2, 5]``. root: the repository (``book/``,
    ``exercises/``, ``normcourse/``, ``pyproject.toml``, ``requirements.txt``). as_zip: write
    ``out`` as a zip archive instead of a folder (``.zip`` is added if missing). fmt: ``"student"``
    or ``"nbgrader"``. Returns the folder or zip written. Raises FileNotFoundError naming any
    missing file, ValueError for an unknown chapter or format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown bundle format {fmt!r}; choose one of {', '.join(FORMATS)}")
    root = Path(root)
    chapters = sorted({chapter(k) for k in chapter_keys}, key=lambda c: c.number)
    notebooks_dir = "exercises" if fmt == "student" else "exercises/source"
    needed = [root / "book" / f"{c.slug}.md" for c in chapters]
    needed += [root / notebooks_dir / f"{c.slug}.ipynb" for c in chapters]
    needed += [root / "book" / "references.bib", root / "requirements.txt",
               root / "pyproject.toml", root / "normcourse" / "__init__.py"]
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        raise FileNotFoundError("cannot bundle, missing: " + ", ".join(missing))
    index = BookIndex.read(root)
    bundled = {c.slug for c in chapters}

    def write(folder: Path) -> None:
        (folder / "chapters").mkdir(parents=True, exist_ok=True)
        for c in chapters:
            text = standalone(root / "book" / f"{c.slug}.md", index, bundled)
            (folder / "chapters" / f"{c.slug}.md").write_text(text, encoding="utf-8")
            source = root / notebooks_dir / f"{c.slug}.ipynb"
            if fmt == "student":
                (folder / "exercises").mkdir(exist_ok=True)
                shutil.copyfile(source, folder / "exercises" / f"{c.slug}.ipynb")
            else:
                target = folder / "source" / c.slug / f"{c.slug}.ipynb"
                target.parent.mkdir(parents=True, exist_ok=True)
                nbformat.write(nbgrader_notebook(nbformat.read(source, as_version=4), c), target)
        if fmt == "nbgrader":
            (folder / "nbgrader_config.py").write_text(
                'c = get_config()  # noqa: F821 (nbgrader defines it)\n'
                'c.CourseDirectory.course_id = "normcourse"\n', encoding="utf-8")
        wheel = build_wheel(root, folder / "wheels")
        (folder / "requirements.txt").write_text(student_requirements(root), encoding="utf-8")
        (folder / "README.md").write_text(
            bundle_readme(chapters, fmt, f"wheels/{wheel.name}"), encoding="utf-8")

    out = Path(out)
    if not as_zip:
        out.mkdir(parents=True, exist_ok=True)
        write(out)
        return out
    base = out.with_suffix("") if out.suffix == ".zip" else out
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        return Path(shutil.make_archive(str(base), "zip", tmp))
