"""Execute the book's chapters in parallel, into the execution cache that the book build reads.

`make book` runs this before `jupyter-book build`. Jupyter Book executes the chapters one after
another (`execute_notebooks: cache` in _config.yml); this script executes every chapter whose
code is not yet in the cache, or was run there in another environment (see below), one kernel
per chapter and as many at once as the machine has cores (each kernel runs on one thread: the
Makefile exports OMP_NUM_THREADS=1), and stores the executed notebooks in the same jupyter-cache
(_build/.jupyter_cache). The Sphinx build then finds
every chapter cached and executes none. Nothing changed, nothing runs: a chapter is matched to
the cache by the hash of its code cells, exactly as myst-nb matches it (myst-nb's own reader
reads the page).

The chapters are the pages listed in _toc.yml that are notebooks (MyST Markdown with a jupytext
header, or .ipynb): a chapter added to the table of contents is picked up without a change here.
The longest chapters start first (their time in the cache from an earlier build, else their size).

A chapter whose cell raises is not cached; every chapter still runs, then the script names each
failing chapter, its cell (number and line in the page) and the error, and exits with status 1,
which fails `make book`. Options of _config.yml's `execute:` section that it honours: `cache`,
`timeout`, `allow_errors`, `run_in_temp`, `execute_notebooks` (anything but `cache`: nothing to
do).

Each cached chapter also records the environment it ran in (`environment_fingerprint`: the
kernel's Python and installed distributions, every file of the course package it imports, the
MNIST files it finds, the thread settings). jupyter-cache's key is the code cells alone, so a
cached run counts (`cached_run`) only while that fingerprint is still the current one: this
script executes the chapter again otherwise (an edited package changes what the chapters print),
and tests/test_notebooks.py checks the cached run (`execution_problems`) instead of executing
the chapter only then.

    python scripts/execute_chapters.py [--root .] [--jobs N] [--list] [--executed-list FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

DEFAULT_CACHE = "_build/.jupyter_cache"  # myst-nb's default: beside the html output folder
ENVIRONMENT_KEY = "environment"  # where a cache record keeps its environment_fingerprint
# Environment variables that decide a chapter's numbers. Every NORMCOURSE_* counts too, except
# these two: the progress display (make book turns it off; it changes no result) and the claim
# tests' CI switch, which no chapter reads.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
IGNORED_VARIABLES = frozenset({"NORMCOURSE_PROGRESS", "NORMCOURSE_REQUIRE_FULL"})
# Run by the kernel's own Python, in the chapter's folder: what a chapter's `import normcourse`
# finds, the distributions installed beside it, and the MNIST folder load_mnist() reads.
_ENVIRONMENT_PROBE = """
import importlib.metadata, importlib.util, json, sys
spec = importlib.util.find_spec("normcourse")
package = list(spec.submodule_search_locations)[0] if spec else None
data = None
if package:
    from normcourse.data import default_cache_dir
    data = str(default_cache_dir())
print(json.dumps({
    "python": sys.version, "prefix": sys.prefix, "executable": sys.executable,
    # a set: one distribution is listed once per path entry that finds it (an editable
    # install is also found through PYTHONPATH=repo, which pytest sets and make book does not)
    "distributions": sorted({f"{d.metadata['Name']}=={d.version}"
                             for d in importlib.metadata.distributions()}),
    "package": package, "data": data,
}))
"""


@dataclass(frozen=True)
class ExecutionSettings:
    """The `execute:` and `parse:` settings of _config.yml that decide how a chapter runs."""

    mode: str = "cache"
    cache: Path = Path(DEFAULT_CACHE)
    timeout: int = 30
    allow_errors: bool = False
    run_in_temp: bool = False
    myst_extensions: tuple[str, ...] = ()


@dataclass
class Chapter:
    """One notebook page of the book, read as myst-nb reads it."""

    path: Path
    notebook: dict
    expected_seconds: float = 0.0


@dataclass
class Outcome:
    """What executing one chapter gave: the executed notebook, or the failure to report."""

    path: Path
    notebook: dict | None
    seconds: float  # wall-clock
    error: str | None = None
    cpu_seconds: float = 0.0  # the kernel's CPU time (and its children's): the load-free cost
    traceback: str = field(default="", repr=False)


def read_settings(root: Path) -> ExecutionSettings:
    """The execution settings of the book at ``root`` (its _config.yml)."""
    config = yaml.safe_load((root / "_config.yml").read_text(encoding="utf-8")) or {}
    execute = config.get("execute") or {}
    parse = config.get("parse") or {}
    mode = execute.get("execute_notebooks", "auto")
    return ExecutionSettings(
        mode="off" if mode is False else str(mode),  # YAML reads `off` as False
        cache=root / (execute.get("cache") or DEFAULT_CACHE),
        timeout=int(execute.get("timeout", 30)),
        allow_errors=bool(execute.get("allow_errors", False)),
        run_in_temp=bool(execute.get("run_in_temp", False)),
        myst_extensions=tuple(parse.get("myst_enable_extensions") or ()),
    )


def toc_pages(root: Path) -> list[Path]:
    """Every page file listed in _toc.yml (its root, parts, chapters and sections), in order."""
    toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
    names: list[str] = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                names.append(entry["file"])
            for key in ("parts", "chapters", "sections"):
                walk(entry.get(key))

    walk([{key: toc.get(key)} for key in ("parts", "chapters", "sections")])
    pages = []
    for name in names:
        candidates = [root / name] + [(root / name).with_suffix(s) for s in (".md", ".ipynb")]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"_toc.yml lists {name}, but no such page exists")
        pages.append(found)
    return pages


def read_chapter(path: Path, settings: ExecutionSettings) -> Chapter | None:
    """The page as a notebook, read by myst-nb's reader; None for a page that is not one."""
    from myst_nb.core.config import NbParserConfig
    from myst_nb.core.read import create_nb_reader
    from myst_parser.config.main import MdParserConfig

    text = path.read_text(encoding="utf-8")
    md_config = MdParserConfig(enable_extensions=set(settings.myst_extensions))
    reader = create_nb_reader(str(path), md_config, NbParserConfig(), text)
    if reader is None:
        return None
    return Chapter(path, reader.read(text))


def book_chapters(root: Path, settings: ExecutionSettings) -> list[Chapter]:
    """The notebook pages of the table of contents."""
    chapters = (read_chapter(page, settings) for page in toc_pages(root))
    return [chapter for chapter in chapters if chapter is not None]


def stale_chapters(chapters: list[Chapter], cache, settings: ExecutionSettings) -> list[Chapter]:
    """The chapters without a run of their current code in the current environment in the cache
    (``cached_run``), longest expected run first.

    The environment counts too: the Sphinx build matches a page by its code alone, so after an
    edit to the package a chapter whose code is unchanged would otherwise be shown with the
    outputs of the old package."""
    seconds_by_uri: dict[str, float] = {}
    for record in sorted(cache.list_cache_records(), key=lambda r: r.created):
        seconds = (record.data or {}).get("execution_seconds")
        if seconds is not None:
            seconds_by_uri[str(Path(record.uri).resolve())] = float(seconds)
    stale = []
    for chapter in chapters:
        if cached_run(chapter, settings, cache) is None:
            # A chapter never timed (new, or its cache was removed) ranks by its size: 1 s per kB.
            size_guess = chapter.path.stat().st_size / 1e3
            chapter.expected_seconds = seconds_by_uri.get(str(chapter.path.resolve()), size_guess)
            stale.append(chapter)
    return sorted(stale, key=lambda c: c.expected_seconds, reverse=True)


def kernel_python(kernel_name: str) -> str:
    """The Python executable that jupyter_client starts for the kernel ``kernel_name``."""
    from jupyter_client.kernelspec import KernelSpecManager

    command = KernelSpecManager().get_kernel_spec(kernel_name).argv[0]
    # jupyter_client runs a spec's bare "python" (ipykernel's own spec) as sys.executable.
    version = sys.version_info
    if command in {"python", f"python{version[0]}", f"python{version[0]}.{version[1]}"}:
        return sys.executable
    return command


def _files_digest(folder: Path, stat_only: bool) -> list[str]:
    """Every file under ``folder`` (caches left out): its path and content hash, or size and mtime."""
    entries = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        name = str(path.relative_to(folder))
        if stat_only:  # large data files: their size and time stand for them, as for make
            stat = path.stat()
            entries.append(f"{name} {stat.st_size} {stat.st_mtime_ns}")
        else:
            entries.append(f"{name} {hashlib.sha256(path.read_bytes()).hexdigest()}")
    return entries


@lru_cache(maxsize=None)
def environment_fingerprint(python: str, cwd: str) -> str:
    """A hash of what, besides its code, decides whether a chapter run by ``python`` in ``cwd``
    runs cleanly and what it prints.

    The kernel's Python (version, prefix) and installed distributions; the content of every file
    of the normcourse package that its ``import normcourse`` finds (so an edit to the package
    changes it, although jupyter-cache's key, the code cells alone, stays the same); the
    MNIST folder that ``load_mnist()`` reads (file names, sizes and times); the thread settings
    and the NORMCOURSE_* variables (but ``IGNORED_VARIABLES``). Not in it: the matplotlib
    backend (inline in the book, Agg under pytest), which changes how figures are shown only.
    """
    probe = subprocess.run([python, "-c", _ENVIRONMENT_PROBE], cwd=cwd, capture_output=True,
                           text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    facts = json.loads(probe.stdout)
    if facts["package"]:
        facts["package_files"] = _files_digest(Path(facts["package"]), stat_only=False)
    if facts["data"] and Path(facts["data"]).is_dir():
        facts["data_files"] = _files_digest(Path(facts["data"]), stat_only=True)
    facts["variables"] = {
        name: value for name, value in sorted(os.environ.items())
        if name in THREAD_VARIABLES
        or (name.startswith("NORMCOURSE_") and name not in IGNORED_VARIABLES)
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def chapter_fingerprint(chapter: Chapter, settings: ExecutionSettings, python: str) -> str:
    """``environment_fingerprint`` for this chapter's kernel in the folder it runs in."""
    if settings.run_in_temp:  # a fresh temporary folder each time: nothing of it to compare
        return environment_fingerprint(python, tempfile.gettempdir())
    return environment_fingerprint(python, str(chapter.path.parent.resolve()))


def notebook_kernel(notebook: dict) -> str:
    return (notebook.get("metadata", {}).get("kernelspec") or {}).get("name", "python3")


def failing_cell(notebook: dict) -> str:
    """'cell K (line L)' of the first cell with an error output (L: the line in the page)."""
    source_map = notebook.get("metadata", {}).get("source_map") or []
    for index, cell in enumerate(notebook.get("cells", [])):
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if errors:
            where = f"cell {index + 1}"
            if index < len(source_map):
                where += f" (line {source_map[index] + 1})"
            first_line = (cell.get("source") or "").strip().splitlines()[:1]
            if first_line:
                where += f", starting {first_line[0][:60]!r}"
            return f"{where}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    return "no cell recorded an error"


def execute_chapter(chapter: Chapter, settings: ExecutionSettings) -> Outcome:
    """Run one chapter in its own kernel, in its folder (or a temporary one), as myst-nb does."""
    from jupyter_cache.executors.utils import single_nb_execution

    # ipykernel 7 warns on every start that its local TCP sockets are not encrypted (the kernel
    # listens on 127.0.0.1 only); that line, once per chapter, would bury the build's messages.
    quiet = {"extra_arguments": ["--IPKernelApp.log_level=ERROR"]}
    started, cpu_before = time.perf_counter(), _children_cpu_seconds()
    try:
        if settings.run_in_temp:
            with tempfile.TemporaryDirectory() as folder:
                result = single_nb_execution(
                    chapter.notebook, cwd=folder, timeout=settings.timeout,
                    allow_errors=settings.allow_errors, meta_override=True, **quiet,
                )
        else:
            result = single_nb_execution(
                chapter.notebook, cwd=str(chapter.path.parent.resolve()),
                timeout=settings.timeout, allow_errors=settings.allow_errors,
                meta_override=True, **quiet,
            )
    except Exception as error:  # the kernel died or would not start
        return Outcome(chapter.path, None, time.perf_counter() - started,
                       f"the kernel failed: {type(error).__name__}: {error}")
    cpu = _children_cpu_seconds() - cpu_before
    if result.err is not None:
        return Outcome(chapter.path, None, result.time, failing_cell(result.nb),
                       cpu_seconds=cpu, traceback=result.exc_string or "")
    return Outcome(chapter.path, result.nb, result.time, cpu_seconds=cpu)


def cached_run(chapter: Chapter, settings: ExecutionSettings, cache, python: str | None = None):
    """The cache record of a run of exactly this chapter's code (jupyter-cache's key, as the book
    build matches it) that this script made in the environment a kernel of ``python`` (default:
    the chapter's own kernel) has now; None when there is none (never executed, code changed, or
    environment changed)."""
    try:
        record = cache.match_cache_notebook(chapter.notebook)
    except KeyError:
        return None
    recorded = (record.data or {}).get(ENVIRONMENT_KEY)
    python = python or kernel_python(notebook_kernel(chapter.notebook))
    if recorded is None or recorded != chapter_fingerprint(chapter, settings, python):
        return None
    return record


def execution_problems(chapter: Chapter, executed: dict) -> list[str]:
    """What keeps ``executed`` from being a clean run of every code cell of ``chapter``, in order,
    in one kernel: [] when it is one. A cell with an error output counts as failed even where
    the run allowed errors."""
    wanted = [c for c in chapter.notebook["cells"] if c["cell_type"] == "code"]
    cells = [c for c in executed.get("cells", []) if c.get("cell_type") == "code"]
    if [c["source"] for c in cells] != [c["source"] for c in wanted]:
        return [f"the cached run has other code cells than {chapter.path.name}"]
    problems = []
    for number, cell in enumerate(cells, start=1):
        if cell.get("execution_count") != number:
            problems.append(f"code cell {number} has execution count "
                            f"{cell.get('execution_count')}, not {number}: it did not run in order")
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                problems.append(f"code cell {number} raised {output.get('ename')}: "
                                f"{output.get('evalue')}")
    return problems


def _children_cpu_seconds() -> float:
    """CPU time of this process's finished children: the kernels, once shut down."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def run(root: Path, jobs: int | None = None, log=print) -> list[Outcome]:
    """Execute the stale chapters of the book at ``root`` into its cache; the outcomes."""
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    settings = read_settings(root)
    if settings.mode != "cache":
        log(f"execute_notebooks is {settings.mode!r}, not 'cache': nothing to execute here")
        return []
    chapters = book_chapters(root, settings)
    cache = get_cache(str(settings.cache))
    stale = stale_chapters(chapters, cache, settings)
    if not stale:
        log(f"all {len(chapters)} chapters are in the execution cache: nothing to execute")
        return []
    jobs = max(1, min(jobs or len(os.sched_getaffinity(0)), len(stale)))
    log(f"executing {len(stale)} of {len(chapters)} chapters, {jobs} at a time")
    started = time.perf_counter()
    # Taken before the kernels start: a file changed while they run makes the record stale.
    fingerprints = {
        chapter.path: chapter_fingerprint(
            chapter, settings, kernel_python(notebook_kernel(chapter.notebook)))
        for chapter in stale
    }
    outcomes = []
    # fork: the workers inherit the notebooks already read; the cache is written here only
    # (one process writes its SQLite database).
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(execute_chapter, chapter, settings) for chapter in stale]
        for future in as_completed(futures):
            outcome = future.result()
            outcomes.append(outcome)
            name = _relative(outcome.path, root)
            if outcome.error is None:
                cache.cache_notebook_bundle(
                    CacheBundleIn(outcome.notebook, str(outcome.path.resolve()),
                                  data={"execution_seconds": outcome.seconds,
                                        "cpu_seconds": outcome.cpu_seconds,
                                        ENVIRONMENT_KEY: fingerprints[outcome.path]}),
                    check_validity=False, overwrite=True,
                )
                log(f"  {outcome.seconds:6.1f} s ({outcome.cpu_seconds:6.1f} s CPU)  {name}")
            else:
                log(f"  {outcome.seconds:6.1f} s ({outcome.cpu_seconds:6.1f} s CPU)  {name}  FAILED")
    wall = sum(o.seconds for o in outcomes)
    cpu = sum(o.cpu_seconds for o in outcomes)
    log(f"executed in {time.perf_counter() - started:.1f} s wall, {jobs} at a time "
        f"(sum of chapter times {wall:.1f} s wall, {cpu:.1f} s CPU)")
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="the book's folder (default: .)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="chapters executed at once (default: the number of cores)")
    parser.add_argument("--list", action="store_true",
                        help="print the chapters that would be executed, execute nothing")
    parser.add_argument("--executed-list", metavar="FILE", default=None,
                        help="write the chapters this run executed to FILE, one per line "
                             "(empty: none), for make book to tell Sphinx to re-read the pages")
    options = parser.parse_args(argv)
    root = Path(options.root)
    if options.list:
        settings = read_settings(root)
        from jupyter_cache import get_cache

        for chapter in stale_chapters(book_chapters(root, settings), get_cache(str(settings.cache)),
                                      settings):
            print(_relative(chapter.path, root))
        return 0
    outcomes = run(root, options.jobs)
    if options.executed_list:
        Path(options.executed_list).write_text(
            "".join(f"{_relative(o.path, root)}\n" for o in outcomes if o.error is None))
    failures = [o for o in outcomes if o.error is not None]
    for outcome in failures:
        print(f"\n{outcome.traceback}", file=sys.stderr)
    for outcome in failures:
        print(f"chapter {_relative(outcome.path, root)} failed: {outcome.error}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} chapter(s) failed to execute; the book was not built",
              file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
