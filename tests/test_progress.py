"""Progress on long work (normcourse.progress): a bar per sweep in a Jupyter kernel, none in the
built book.

In a kernel the bar is tqdm's notebook widget: the test runs a real (tiny) learning-rate sweep of
chapter 3 in a kernel started by nbclient and reads the widgets' final state, which nbclient
stores in the notebook's metadata as JupyterLab would show it. The Makefile's ``book`` target
sets ``NORMCOURSE_PROGRESS=0``; the same sweep in a kernel with that setting shows nothing, and
the built chapter pages hold no progress output.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import nbformat
import pytest

from normcourse import progress
from normcourse.progress import progress_bar, sweep

REPO = Path(__file__).resolve().parent.parent
HTML = REPO / "_build" / "html"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

SWEEP_CELL = """\
import torch
from normcourse.data import load_mnist
from normcourse.experiments import ch03_training_with_batch_norm as bt

torch.set_num_threads(1)
tensors = bt.mnist_tensors(load_mnist("embedded"))
runs = bt.lr_sweep(tensors, [0.1, 0.5, 1.0], norms=("batch",), steps=3)
print(sorted(runs))
"""


def test_sweep_yields_every_setting_in_order():
    assert list(sweep([("batch", 0.1), ("none", 0.5)], "norm, lr")) == [("batch", 0.1), ("none", 0.5)]
    # A sweep inside another (chapter 5's comparison per batch size) works and both end.
    pairs = [(b, n) for b in sweep([4, 128], "batch size") for n in sweep(["batch", "layer"], "norm")]
    assert pairs == [(4, "batch"), (4, "layer"), (128, "batch"), (128, "layer")]
    assert progress._open_sweeps == 0


def test_text_bar_only_when_someone_watches(monkeypatch):
    monkeypatch.delenv(progress.ENV_VAR, raising=False)  # whatever the caller's shell sets
    # A stream that is not a terminal (a log file, pytest's capture) gets nothing.
    log = io.StringIO()
    with progress_bar(range(3), file=log) as bar:
        list(bar)
    assert log.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    shown = Terminal()
    with progress_bar(range(3), desc="steps", file=shown) as bar:
        list(bar)
    assert "steps: 100%" in shown.getvalue() and "3/3" in shown.getvalue()

    monkeypatch.setenv(progress.ENV_VAR, "0")
    hidden = Terminal()
    with progress_bar(range(3), desc="steps", file=hidden) as bar:
        list(bar)
    assert hidden.getvalue() == ""


def run_in_kernel(code: str, tmp_path: Path) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    NotebookClient(notebook, kernel_name="python3", timeout=300, store_widget_state=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    return notebook


def widget_models(notebook) -> list[dict]:
    state = notebook.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    return [model["state"] for model in state.values()]


@pytest.mark.slow
def test_a_sweep_shows_one_progress_widget_in_a_kernel(tmp_path, monkeypatch):
    monkeypatch.delenv(progress.ENV_VAR, raising=False)  # the kernel inherits the environment
    notebook = run_in_kernel(SWEEP_CELL, tmp_path)
    outputs = notebook.cells[0].outputs
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if o.get("name") == "stderr"], "a text bar went to stderr"
    # One widget for the sweep (train() runs with progress=False inside experiments).
    assert len([o for o in outputs if WIDGET_VIEW in o.get("data", {})]) == 1
    models = widget_models(notebook)
    bars = [m for m in models if m.get("_model_name") == "FloatProgressModel"]
    assert len(bars) == 1
    assert bars[0]["value"] == bars[0]["max"] == 3  # runs done / runs total
    texts = " ".join(m.get("value", "") for m in models if m.get("_model_name") == "HTMLModel")
    texts = texts.replace("\u2007", " ")  # the widget pads with figure spaces
    assert "norm, learning rate" in texts and "3/3" in texts


@pytest.mark.slow
def test_progress_off_shows_nothing_in_a_kernel(tmp_path, monkeypatch):
    # What the book build does (the Makefile's book target sets the variable).
    monkeypatch.setenv(progress.ENV_VAR, "0")
    notebook = run_in_kernel(SWEEP_CELL, tmp_path)
    outputs = notebook.cells[0].outputs
    assert [o.output_type for o in outputs] == ["stream"]
    assert outputs[0].name == "stdout" and "('batch', 0.1)" in outputs[0].text
    assert not widget_models(notebook)


# What a progress bar leaves in a page: a widget view or its text fallback, or a text bar.
PROGRESS_OUTPUT = re.compile(
    r"application/vnd\.jupyter\.widget|HBox\(children=|FloatProgress|\|\s*\d+/\d+ \[\d+:\d+"
)


def chapter_pages() -> list[Path]:
    return sorted((HTML / "book").glob("0*.html")) if HTML.is_dir() else []


def test_the_built_chapters_hold_no_progress_output():
    pages = chapter_pages()
    if not pages:
        pytest.skip(f"the book is not built ({HTML}): run `make book` first")
    found = {p.name: m.group(0) for p in pages
             if (m := PROGRESS_OUTPUT.search(p.read_text(encoding="utf-8")))}
    assert not found, f"progress output in built pages: {found}"


def test_the_book_target_turns_progress_off():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(rf"^book: export {progress.ENV_VAR} := 0$", makefile, re.M)
