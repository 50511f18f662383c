"""The class bundle: self-contained (chapters that read on their own, a wheel without solutions),
installable into a fresh virtual environment where a student notebook runs; and its nbgrader
format, checked with nbgrader itself when it is installed, else against nbgrader's metadata rules.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import nbformat
import pytest

from normcourse.__main__ import main
from normcourse.exercises.bundle import FORBIDDEN_IN_WHEEL, bundle
from normcourse.exercises.catalog import CHAPTERS, chapter
from normcourse.exercises.nbgrader_source import SCHEMA_VERSION, WRITTEN_POINTS, nbgrader_notebook

ROOT = Path(__file__).resolve().parents[1]
UNRESOLVED = re.compile(r"\{(cite|cite:t|ref|numref|eq|doc)\}`|literalinclude|^\([\w-]+\)=\s*$", re.M)


@pytest.fixture(scope="module")
def student_bundle(tmp_path_factory):
    """Chapters 5 and 2 (given out of order), through the command line, as a zip."""
    out = tmp_path_factory.mktemp("bundle") / "week"
    assert main(["bundle", "--chapters", "5", "2", "--out", str(out), "--zip",
                 "--root", str(ROOT)]) == 0
    folder = out.parent / "unzipped"
    with zipfile.ZipFile(out.with_suffix(".zip")) as archive:
        archive.extractall(folder)
    return folder


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def test_bundle_holds_notebooks_chapters_wheel_requirements_and_readme(student_bundle):
    files = sorted(str(p.relative_to(student_bundle)) for p in student_bundle.rglob("*") if p.is_file())
    wheel = [f for f in files if f.startswith("wheels/")]
    assert len(wheel) == 1 and wheel[0].endswith("-py3-none-any.whl")
    assert sorted(set(files) - set(wheel)) == [
        "README.md", "chapters/02_batch_norm.md", "chapters/05_layer_norm.md",
        "exercises/02_batch_norm.ipynb", "exercises/05_layer_norm.ipynb", "requirements.txt"]
    for slug in ("02_batch_norm", "05_layer_norm"):
        assert (student_bundle / "exercises" / f"{slug}.ipynb").read_bytes() == (
            ROOT / "exercises" / f"{slug}.ipynb").read_bytes()
    readme = (student_bundle / "README.md").read_text()
    assert f"pip install --no-deps {wheel[0]}" in readme and "pip install -e" not in readme
    for c in (chapter(2), chapter(5)):
        assert all(objective in readme for objective in c.objectives)
        assert f"{c.exercise_minutes} min exercises" in readme
        assert all(f"`{t.function}` ({t.points_label})" in readme for t in c.tasks)
    assert readme.index("## 2.") < readme.index("## 5.")
    # Chapter 1 is a prerequisite of chapter 2 and is not in the bundle: the README says so.
    assert "not in this bundle" in readme and "chapter 1 (Input normalization)" in readme
    requirements = (student_bundle / "requirements.txt").read_text().split()
    pinned = dict(line.split("==") for line in requirements)
    assert {"torch", "numpy", "jupyterlab", "jupytext"} <= set(pinned)
    repo = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().split()
                if "==" in line)
    assert all(repo[name] == version for name, version in pinned.items())


def test_bundled_chapters_read_without_the_book(student_bundle):
    text = (student_bundle / "chapters" / "02_batch_norm.md").read_text()
    assert not UNRESOLVED.findall(text)
    # The package's code is copied in, the works cited are named and listed, references are text.
    assert "def batchnorm_forward(" in text and "From `normcourse/reference.py`:" in text
    assert "(Ioffe and Szegedy, 2015)" in text and "## References" in text
    assert "*Input normalization* (chapter 1, not in this bundle)" in text
    assert "$$ (1)" in text and "**Exercise 1.**" in text
    # Still a MyST notebook: jupytext header and code cells kept.
    assert text.startswith("---\njupytext:") and "```{code-cell} ipython3" in text
    assert not UNRESOLVED.findall((student_bundle / "chapters" / "05_layer_norm.md").read_text())


def test_the_wheel_holds_the_package_and_no_solution(student_bundle):
    (wheel,) = (student_bundle / "wheels").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "normcourse/exercises/checks.py" in names and "normcourse/reference.py" in names
    assert not [n for n in names if any(f in n for f in FORBIDDEN_IN_WHEEL)]
    assert all(n.startswith(("normcourse/", "normcourse-")) for n in names)


def test_missing_files_and_unknown_chapters_are_named(tmp_path):
    (tmp_path / "book").mkdir()
    with pytest.raises(FileNotFoundError, match="06_batch_renorm.md"):
        bundle([6], tmp_path / "x", root=tmp_path)
    assert main(["bundle", "--chapters", "11", "--out", str(tmp_path / "y"), "--root", str(ROOT)]) == 2
    with pytest.raises(ValueError, match="unknown bundle format 'moodle'"):
        bundle([2], tmp_path / "z", root=ROOT, fmt="moodle")


def test_a_fresh_venv_installs_the_bundle_and_runs_a_student_notebook(student_bundle, tmp_path):
    """No network and no repository: a new venv sees the shared venv's third-party packages
    through a .pth file (a cheap stand-in for `pip install -r requirements.txt`), installs the
    bundle's wheel, and runs the chapter-5 student notebook from the bundle with nbclient."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "shared_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    env = _clean_env(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}")
    (wheel,) = (student_bundle / "wheels").glob("*.whl")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, env=env, cwd=tmp_path)
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys, nbformat, normcourse\n"
        "from nbclient import NotebookClient\n"
        "nb = nbformat.read('exercises/05_layer_norm.ipynb', as_version=4)\n"
        "NotebookClient(nb, timeout=300, kernel_name='python3', allow_errors=True,\n"
        "               resources={'metadata': {'path': 'exercises'}}).execute()\n"
        "outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]\n"
        "texts = [o.get('text') or o.get('data', {}).get('text/plain', '') for o in outputs]\n"
        "print(json.dumps({'package': normcourse.__file__, 'prefix': sys.prefix,\n"
        "                  'errors': [o.get('ename') for o in outputs if o.output_type == 'error'],\n"
        "                  'texts': texts}))\n")
    done = subprocess.run([str(python), str(script)], capture_output=True, text=True, env=env,
                          cwd=student_bundle, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["package"].startswith(str(site)), result["package"]  # the wheel, not the repo
    assert result["errors"] == []
    verdicts = [t for t in result["texts"] if t.startswith("[")]
    assert len(verdicts) == len(chapter(5).tasks)
    assert all(v.startswith("[NOT IMPLEMENTED] 05.") for v in verdicts), verdicts


# ---------------------------------------------------------------------------------------------
# nbgrader
# ---------------------------------------------------------------------------------------------
def validate_nbgrader_metadata(notebook: nbformat.NotebookNode) -> None:
    """nbgrader's rules for cell metadata, schema version 3 (nbgrader/nbgraderformat/v3.py):
    grade, solution and locked flags; a non-empty, unique grade_id on every grade, solution or
    locked cell; points on grade cells; a markdown cell graded iff it is a solution cell."""
    ids = set()
    for cell in notebook.cells:
        meta = cell.metadata.get("nbgrader")
        if meta is None:
            continue
        assert meta["schema_version"] == SCHEMA_VERSION
        assert {type(meta[k]) for k in ("grade", "solution", "locked", "task")} == {bool}
        if meta["grade"] or meta["solution"] or meta["locked"]:
            assert meta["grade_id"] and meta["grade_id"] not in ids
            ids.add(meta["grade_id"])
        if meta["grade"]:
            assert float(meta["points"]) > 0
        if cell.cell_type == "markdown":
            assert meta["grade"] == meta["solution"]


@pytest.mark.parametrize("slug", [c.slug for c in CHAPTERS])
def test_every_chapter_converts_to_valid_nbgrader_cells(slug):
    c = chapter(slug)
    notebook = nbgrader_notebook(nbformat.read(ROOT / "exercises" / "source" / f"{slug}.ipynb",
                                               as_version=4), c)
    validate_nbgrader_metadata(notebook)
    graded = [cell.metadata["nbgrader"] for cell in notebook.cells
              if cell.metadata.get("nbgrader", {}).get("grade")]
    assert sum(m["points"] for m in graded) == (sum(t.points for t in c.tasks)
                                               + WRITTEN_POINTS * len(c.questions))


def test_nbgrader_bundle_has_graded_cells_for_every_task_and_question(tmp_path):
    archive = bundle([2, 6], tmp_path / "course", root=ROOT, as_zip=True, fmt="nbgrader")
    folder = tmp_path / "course-folder"
    with zipfile.ZipFile(archive) as z:
        z.extractall(folder)
    assert (folder / "nbgrader_config.py").is_file() and list((folder / "wheels").glob("*.whl"))
    for c in (chapter(2), chapter(6)):
        notebook = nbformat.read(folder / "source" / c.slug / f"{c.slug}.ipynb", as_version=4)
        validate_nbgrader_metadata(notebook)
        meta = {cell.metadata["nbgrader"]["grade_id"]: (cell, cell.metadata["nbgrader"])
                for cell in notebook.cells if "nbgrader" in cell.metadata}
        for task in c.tasks:
            solution_cell, solution = meta[task.id.replace(".", "-") + "-solution"]
            assert solution["solution"] and not solution["grade"]
            assert "### BEGIN SOLUTION" in solution_cell.source
            test_cell, test = meta[task.id.replace(".", "-") + "-test"]
            assert test["grade"] and test["locked"] and test["points"] == task.points
            # The test cell's last line is the points earned: nbgrader's partial credit. With the
            # solution cell run first, it gives full marks.
            namespace: dict = {}
            exec(next(cell.source for cell in notebook.cells if cell.cell_type == "code"), namespace)
            exec("\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code"
                           and cell.metadata.get("nbgrader", {}).get("solution")), namespace)
            *body, last = test_cell.source.splitlines()
            exec("\n".join(body), namespace)
            assert eval(last, namespace) == task.points
        for question in c.question_ids:
            cell, answer = meta[question.replace(".", "-")]
            assert cell.cell_type == "markdown" and answer["points"] == WRITTEN_POINTS
    if shutil.which("nbgrader") is None:
        pytest.skip("nbgrader is not installed in this environment (it is no dependency of the "
                    "course); its metadata rules were checked above. Validated by hand with "
                    "nbgrader 0.9.6: generate_assignment and autograde accept the folder.")
    env = _clean_env()
    for c in (chapter(2), chapter(6)):
        done = subprocess.run(["nbgrader", "generate_assignment", c.slug, "--force"], cwd=folder,
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        released = nbformat.read(folder / "release" / c.slug / f"{c.slug}.ipynb", as_version=4)
        assert "### BEGIN SOLUTION" not in json.dumps(released)
