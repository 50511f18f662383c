"""Shared test set-up: one thread, Jupyter state kept in the repository, and the book's chapters
collected as notebooks.

The chapters are MyST Markdown notebooks (``book/NN_name.md``). nbval only collects ``.ipynb``
files, so ``tests/test_notebooks.py`` is collected by ``BookChapters`` below, which yields one
nbval notebook per chapter, read through jupytext. Each code cell is one test item, run in order
in one kernel whose working directory is ``book/`` (as in JupyterLab and in the book build).
Cells are not compared with stored outputs (the chapters store none): a chapter passes when
every cell, including its ``assert`` check cells, runs without raising.

``make test`` builds the book first, and the build has already executed every chapter
(scripts/execute_chapters.py, into the execution cache ``_build/.jupyter_cache``; a failing cell
fails the build). A chapter whose cache holds that script's run of exactly its current code
(jupyter-cache's key, as the book build matches it) made in the same environment (the kernel's
Python and distributions, every file of the normcourse package, the MNIST files, the thread
settings: ``execute_chapters.environment_fingerprint``) is not executed again: its one test,
``tests/test_notebooks.py::NN_topic[execution cache]``, checks that recorded run instead (every
code cell ran, in order, none with an error output). Every other chapter (no built book, code or
package changed since the build, pytest on its own) runs through nbval, one test per cell
(``book/NN_topic.md::Cell K``). The summary line "book chapters: ..." says which did which.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / ".local"

# Same environment as the Makefile, for runs of pytest outside make. Set before any kernel starts:
# kernels inherit it.
for _name, _value in {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
    "JUPYTER_CONFIG_DIR": str(REPO / "jupyter_config"),
    "JUPYTER_DATA_DIR": str(LOCAL / "jupyter" / "data"),
    "JUPYTER_RUNTIME_DIR": str(LOCAL / "jupyter" / "runtime"),
    "JUPYTERLAB_SETTINGS_DIR": str(LOCAL / "jupyter" / "lab" / "user-settings"),
    "JUPYTERLAB_WORKSPACES_DIR": str(LOCAL / "jupyter" / "lab" / "workspaces"),
    "IPYTHONDIR": str(LOCAL / "ipython"),
    "MPLCONFIGDIR": str(LOCAL / "matplotlib"),
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",
}.items():
    os.environ.setdefault(_name, _value)
# Kernels import the package from this checkout even where it is not pip-installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
)

import torch  # noqa: E402  (after OMP_NUM_THREADS is set)

torch.set_num_threads(1)

CHAPTERS = sorted((REPO / "book").glob("[0-9][0-9]_*.md"))

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (make test installs it when it can)
# From the toolchain notes: headless, and no background traffic of Chromium's own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def chromium_options() -> dict:
    """Keyword arguments for playwright's ``chromium.launch*``; skips without chromium."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package "
                    "(make test does when it runs as root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright python package is not installed (see requirements.txt)")
    return {"executable_path": str(CHROMIUM), "headless": True, "args": CHROMIUM_ARGS}
# The claim tests (tests/test_claims_chNN_topic.py) run on both data sets a reader can have: the
# embedded subset that ships with the package (what `make test` uses on a fresh clone) always,
# and full MNIST when it is available (NORMCOURSE_DATA, or the default cache). A claim that only
# holds on one of them is not a claim; a data set that is missing is a visible skip, never silence.
DATA_SOURCES = ("embedded", "full")


@pytest.fixture(scope="session", params=DATA_SOURCES)
def claims_mnist(request):
    """The MNIST of one data source (test id ``[embedded]`` or ``[full]``), loaded once per process.

    ``full`` skips, with the reason, when full MNIST is not there; a corrupt copy fails loudly.
    Run only the full-MNIST claims with ``pytest tests/test_claims_ch*.py -k full``.
    """
    from normcourse.data import MNISTNotFoundError, load_mnist

    try:
        mnist = load_mnist(source=request.param)
    except MNISTNotFoundError as err:
        if os.environ.get("NORMCOURSE_REQUIRE_FULL") == "1":  # .ci/run's second step
            pytest.fail(f"NORMCOURSE_REQUIRE_FULL=1 but full MNIST is not available: {err}")
        pytest.skip(f"full MNIST is not available, so its claim tests do not run: {err}")
    print(f"\ndata: {mnist.source}")
    return mnist


NOTEBOOK_TESTS = "test_notebooks.py"


def _nbval_file_class():
    """nbval's notebook collector, subclassed to read MyST Markdown through jupytext."""
    import jupytext
    import nbval.plugin

    class MystNotebook(nbval.plugin.IPyNbFile):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # --nbval-lax semantics without the global flag: run every cell, compare nothing.
            self.compare_outputs = False

        def collect(self):
            # IPyNbFile.collect reads the file with nbformat.read, which only parses .ipynb JSON;
            # hand it the notebook jupytext parsed instead. pytest consumes the generator at
            # once, so the patch is active for this file's collection only.
            notebook = jupytext.read(self.path)
            with mock.patch.object(nbval.plugin.nbformat, "read", lambda *a, **k: notebook):
                yield from super().collect()

    return MystNotebook


def load_execute_chapters():
    """scripts/execute_chapters.py as a module (scripts/ is not a package)."""
    name = "execute_chapters"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, REPO / "scripts" / "execute_chapters.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses and worker processes look it up
        spec.loader.exec_module(module)
    return sys.modules[name]


CACHED = "[execution cache]"  # the test id suffix of a chapter checked in the execution cache


def cached_chapter_runs(root: Path, settings, python: str | None) -> dict:
    """chapter path -> (Chapter, cache record) for each chapter of the book at ``root`` (its
    ``execute_chapters.read_settings``) whose clean run in this environment is in the book's
    execution cache; see the module docstring."""
    execute_chapters = load_execute_chapters()
    if settings.mode != "cache" or not settings.cache.is_dir():
        return {}
    from jupyter_cache import get_cache

    cache = get_cache(str(settings.cache))
    found = {}
    for chapter in execute_chapters.book_chapters(root, settings):
        try:
            record = execute_chapters.cached_run(chapter, settings, cache, python)
        except subprocess.CalledProcessError:  # the kernel's Python cannot even import the
            return {}  # package: let nbval execute every chapter and show the error
        if record is not None:
            found[chapter.path.resolve()] = (chapter, record)
    return found


class CachedChapterRun(pytest.Item):
    """One chapter, checked in the run that the book build recorded instead of run again."""

    def __init__(self, *, chapter, record, cache_path, **kwargs):
        super().__init__(**kwargs)
        self.chapter, self.record, self.cache_path = chapter, record, cache_path

    def runtest(self):
        from jupyter_cache import get_cache

        executed = get_cache(str(self.cache_path)).get_cache_bundle(self.record.pk).nb
        problems = load_execute_chapters().execution_problems(self.chapter, executed)
        if problems:
            raise AssertionError(
                f"the recorded run of {self.chapter.path.name} (execution cache record "
                f"{self.record.pk}) is not clean:\n" + "\n".join(problems))

    def reportinfo(self):
        return (self.chapter.path, None,
                f"{self.chapter.path.name}: executed by the book build, read from the "
                f"execution cache (record {self.record.pk})")


class BookChapters(pytest.File):
    """Stands for tests/test_notebooks.py: per book chapter, its run in the execution cache, or
    one nbval notebook executed here."""

    def collect(self):
        if not CHAPTERS:
            pytest.skip("no chapters in book/ yet")
        notebook_class = _nbval_file_class()
        # The Python of the kernel nbval would start: this one with --nbval-current-env
        # (pyproject.toml), else the kernel named by --nbval-kernel-name or by the chapter.
        kernel_name = self.config.getoption("nbval_kernel_name")
        python = (sys.executable if self.config.getoption("nbval_current_env")
                  else load_execute_chapters().kernel_python(kernel_name) if kernel_name
                  else None)
        settings = load_execute_chapters().read_settings(REPO)
        cached = cached_chapter_runs(REPO, settings, python)
        for path in CHAPTERS:
            if path.resolve() in cached:
                chapter, record = cached[path.resolve()]
                yield CachedChapterRun.from_parent(
                    self, name=f"{path.stem}{CACHED}", chapter=chapter, record=record,
                    cache_path=settings.cache)
            else:
                yield notebook_class.from_parent(self, path=path)


def pytest_terminal_summary(terminalreporter):
    """Says how many chapters were checked in the execution cache and how many executed."""
    reports = [r for key in ("passed", "failed", "error", "skipped")
               for r in terminalreporter.stats.get(key, [])
               if getattr(r, "when", "call") == "call"]
    from_cache = {r.nodeid for r in reports if r.nodeid.endswith(CACHED)}
    executed = {r.nodeid.split("::")[0] for r in reports
                if r.nodeid.startswith("book/") and r.nodeid.split("::")[0].endswith(".md")}
    if from_cache or executed:
        terminalreporter.write_line(
            f"book chapters: {len(from_cache)} checked in the execution cache (executed by the "
            f"book build), {len(executed)} executed through nbval")


def pytest_pycollect_makemodule(module_path, parent):
    if module_path.name == NOTEBOOK_TESTS and module_path.parent == REPO / "tests":
        return BookChapters.from_parent(parent, path=module_path)
    return None


# ---------------------------------------------------------------------------------------------
# Scheduling under `pytest -n 2 --dist loadfile` (make test, .ci/run)
# ---------------------------------------------------------------------------------------------
# xdist hands out whole files, the files with the most tests first, so the claim files (few
# tests, minutes each) came last and one worker ran the last of them while the other idled.
# These files are handed out first, longest first (CPU time measured for issue 18); every other
# file follows in xdist's order. The order changes which worker runs a file, never a result.
LONGEST_FIRST = (
    "tests/test_exercises.py",
    "tests/test_claims_ch04_test_time_statistics.py",  # with ch05 and ch06: SHARED_RUNS
    "tests/test_grading_sandbox.py",
    "tests/test_claims_ch03_training_with_batch_norm.py",
    "tests/test_claims_ch09_normalization_in_transformers.py",
    "tests/test_claims_ch08_normalization_without_the_batch.py",
    "tests/test_claims_ch07_why_batch_norm_works.py",
    "tests/test_claims_ch10_batch_norm_across_devices.py",
    "tests/test_sync_batch_norm.py",
)
# The claim files of chapters 4-6 share trained runs (tests/claim_runs.py, kept per process):
# one work unit, so that no run is trained on both workers.
SHARED_RUNS = (
    "tests/test_claims_ch04_test_time_statistics.py",
    "tests/test_claims_ch05_layer_norm.py",
    "tests/test_claims_ch06_batch_renorm.py",
)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile with LONGEST_FIRST and SHARED_RUNS; any other mode as xdist does it."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongestFirst(LoadFileScheduling):
        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SHARED_RUNS[0] if scope in SHARED_RUNS else scope

        def _assign_work_unit(self, node) -> None:
            if not self.ordered:  # the queue is complete before the first unit goes out
                for scope in reversed(LONGEST_FIRST):
                    if scope in self.workqueue:
                        self.workqueue.move_to_end(scope, last=False)
                self.ordered = True
            super()._assign_work_unit(node)

    return LongestFirst(config, log)
