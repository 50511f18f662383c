"""JupyterLab as `make lab` sets it up: the course opens, MyST chapters open as notebooks, and a
kernel of this environment runs the course's code.

Starts ``jupyter lab`` on 127.0.0.1 with a random port and token, talks to its REST and
websocket APIs (no browser), and always shuts the server down.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
import websocket

REPO = Path(__file__).resolve().parent.parent
CHAPTER = "book/01_input_normalization.md"
STARTUP_TIMEOUT = 90  # seconds; the server answers in about 4 s on the course machines
CELL_TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A running JupyterLab server and the token to talk to it."""

    def __init__(self, log_path: Path):
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [
            str(Path(sys.executable).with_name("jupyter")),
            "lab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            f"--ServerApp.token={self.token}",
            f"--ServerApp.root_dir={REPO}",
            "--ServerApp.port_retries=0",
        ]
        if os.geteuid() == 0:
            command.append("--allow-root")
        self._log = open(log_path, "wb")
        # The environment comes from tests/conftest.py (the Makefile's): Jupyter state in .local/,
        # settings from the committed jupyter_config/.
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def get(self, path: str, **params):
        response = requests.get(
            self.url + path, params=params, headers=self.headers, timeout=30
        )
        assert response.status_code == 200, f"GET {path}: {response.status_code}\n{self.log_tail()}"
        return response

    def post(self, path: str, body: dict):
        response = requests.post(self.url + path, json=body, headers=self.headers, timeout=30)
        assert response.status_code in (200, 201), f"POST {path}: {response.status_code}\n{self.log_tail()}"
        return response.json()

    @property
    def headers(self) -> dict:
        return {"Authorization": f"token {self.token}"}

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"jupyter lab exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/api", headers=self.headers, timeout=2).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        pytest.fail(f"jupyter lab did not answer /api within {STARTUP_TIMEOUT} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # the server shuts its kernels down on SIGTERM
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    server = Lab(tmp_path_factory.mktemp("jupyterlab") / "server.log")
    try:
        server.wait_until_ready()
        yield server
    finally:
        server.stop()


def names(listing: dict) -> set[str]:
    return {item["name"] for item in listing["content"]}


def test_course_folders_are_listed(lab):
    book = lab.get("/api/contents/book").json()
    chapters = {p.name for p in (REPO / "book").glob("[0-9][0-9]_*.md")}
    assert chapters, "book/ holds no chapter"
    assert chapters <= names(book)

    # The exercise notebooks, when their author has generated them, are all visible.
    exercises = lab.get("/api/contents/exercises").json()
    on_disk = {p.name for p in (REPO / "exercises").glob("*.ipynb")}
    assert on_disk <= names(exercises)


def test_myst_chapter_opens_as_a_notebook(lab):
    model = lab.get(f"/api/contents/{CHAPTER}", type="notebook", content=1).json()
    assert model["type"] == "notebook"
    notebook = model["content"]
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code, "jupytext found no code cell in the chapter"
    assert "torch.set_num_threads(1)" in code[0]["source"]


def test_lab_opens_markdown_notebooks_as_notebooks(lab):
    # The committed overrides (jupyter_config/lab/settings) make the jupytext notebook view the
    # default for .md files, and the two extensions that provide it are loaded.
    settings = lab.get("/lab/api/settings/@jupyterlab/docmanager-extension:plugin").json()
    viewers = settings["schema"]["properties"]["defaultViewers"]["default"]
    assert viewers.get("markdown") == "Jupytext Notebook", viewers
    page = lab.get("/lab").text
    assert "jupyterlab-jupytext" in page
    assert "jupyterlab-myst" in page


def execute(ws, session_id: str, code: str) -> tuple[str, list[str]]:
    """Run ``code`` in the kernel behind ``ws``; returns (stdout, error tracebacks)."""
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": session_id,
                   "username": "test", "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": True,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
    }))
    stdout, errors = [], []
    deadline = time.monotonic() + CELL_TIMEOUT
    while time.monotonic() < deadline:
        ws.settimeout(max(1.0, deadline - time.monotonic()))
        message = json.loads(ws.recv())
        if message.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind = message["header"]["msg_type"]
        if kind == "stream" and message["content"]["name"] == "stdout":
            stdout.append(message["content"]["text"])
        elif kind == "error":
            errors.append("\n".join(message["content"]["traceback"]))
        elif kind == "status" and message["content"]["execution_state"] == "idle":
            return "".join(stdout), errors
    pytest.fail(f"the kernel did not finish within {CELL_TIMEOUT} s:\n{code}")


def test_chapter_runs_in_the_course_kernel(lab):
    # Open the chapter as JupyterLab does: a session starts a python3 kernel in book/.
    session = lab.post("/api/sessions", {
        "path": CHAPTER, "name": Path(CHAPTER).name, "type": "notebook",
        "kernel": {"name": "python3"},
    })
    kernel_id = session["kernel"]["id"]
    notebook = lab.get(f"/api/contents/{CHAPTER}", type="notebook", content=1).json()["content"]
    setup_cell = next(c["source"] for c in notebook["cells"] if c["cell_type"] == "code")

    ws = websocket.create_connection(
        f"ws://127.0.0.1:{lab.port}/api/kernels/{kernel_id}/channels?token={lab.token}",
        timeout=30,
    )
    try:
        session_id = uuid.uuid4().hex
        _, errors = execute(ws, session_id, setup_cell)
        assert not errors, errors[0]
        stdout, errors = execute(ws, session_id, (
            "import json, os, sys, torch, normcourse\n"
            "print(json.dumps({'prefix': sys.prefix, 'cwd': os.getcwd(),\n"
            "                  'threads': torch.get_num_threads(),\n"
            "                  'package': normcourse.__file__}))"
        ))
        assert not errors, errors[0]
    finally:
        ws.close()
        requests.delete(f"{lab.url}/api/sessions/{session['id']}", headers=lab.headers, timeout=30)

    facts = json.loads(stdout.strip().splitlines()[-1])
    # The kernel runs in this environment (the course's .venv under make), not in another one.
    assert Path(facts["prefix"]) == Path(sys.prefix)
    assert Path(facts["cwd"]).resolve() == (REPO / "book").resolve()
    assert facts["threads"] == 1
    assert Path(facts["package"]).resolve().is_relative_to(REPO / "normcourse")


@pytest.mark.browser
def test_lab_shows_a_chapter_as_a_notebook(lab, chromium_options):
    # What a student sees: the chapter opens in JupyterLab's notebook view with the course's
    # kernel, and JupyterLab fetches nothing from other hosts (no news, no update check).
    from playwright.sync_api import sync_playwright

    foreign = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(**chromium_options)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.on("request", lambda r: urlsplit(r.url).hostname not in ("127.0.0.1", None)
                    and foreign.append(r.url))
            page.goto(f"{lab.url}/lab/tree/{CHAPTER}?token={lab.token}")
            panel = page.locator(".jp-NotebookPanel")
            panel.locator(".jp-CodeCell").first.wait_for(timeout=60_000)
            kernel_name = panel.locator(".jp-Toolbar-kernelName").first
            kernel_name.wait_for(timeout=30_000)
            page.wait_for_function(
                "el => el.textContent.includes('Python 3')", arg=kernel_name.element_handle(),
                timeout=30_000,
            )
            assert panel.locator(".jp-MarkdownCell").count() > 0
        finally:
            browser.close()
    assert not foreign, f"JupyterLab requested other hosts: {foreign}"


# The exercise notebook the UI test runs, with the solution of its first task pasted in.
EXERCISE = "02_batch_norm.ipynb"
SOLVED_TASK = "02.batchnorm_forward"
UI_TEST_LIMIT = 420  # seconds for the whole UI test; it takes about a minute on a quiet machine
SCREENSHOTS = REPO / "_build" / "screenshots" / "lab"
WORKSPACE = f"ui-test-{uuid.uuid4().hex[:8]}"


def notebook_with_one_solution(folder: Path) -> tuple[Path, str]:
    """A copy of the student notebook in ``folder`` whose first task holds its solution (the
    function cell of exercises/source/); returns (path, the solved function's name)."""
    student = json.loads((REPO / "exercises" / EXERCISE).read_text())
    source = json.loads((REPO / "exercises" / "source" / EXERCISE).read_text())
    name = SOLVED_TASK.split(".", 1)[1]
    definition = f"def {name}("
    solution = next(c for c in source["cells"] if "".join(c["source"]).startswith(definition))
    stub = next(c for c in student["cells"] if "".join(c["source"]).startswith(definition))
    assert "NotImplementedError" in "".join(stub["source"])
    stub["source"] = solution["source"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / EXERCISE
    path.write_text(json.dumps(student, indent=1))
    return path, name


class Deadline:
    """One time limit for a whole test: every wait gets what is left of it."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def ms(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            pytest.fail("the test ran past its time limit")
        return left * 1000


# The notebook panel on screen (JupyterLab keeps other tabs in the page, hidden).
CURRENT_PANEL_JS = ("[...document.querySelectorAll('.jp-NotebookPanel')]"
                    ".find(p => !p.classList.contains('lm-mod-hidden'))")


def open_in_lab(page, lab, path: str, deadline: "Deadline"):
    """Open ``path`` alone in a fresh JupyterLab workspace (no tabs restored from an earlier
    session) in the notebook view, and wait until its kernel is idle."""
    page.goto(f"{lab.url}/lab/workspaces/{WORKSPACE}/tree/{path}?reset&token={lab.token}",
              timeout=deadline.ms())
    panel = page.locator(".jp-NotebookPanel:visible")
    panel.locator(".jp-CodeCell").first.wait_for(timeout=deadline.ms())
    page.wait_for_function(
        f"""() => {{
          const panel = {CURRENT_PANEL_JS};
          return panel?.querySelector('.jp-Toolbar-kernelName')?.textContent.includes('Python 3')
                 && panel.querySelector('.jp-Notebook-ExecutionIndicator')?.dataset.status === 'idle';
        }}""",
        timeout=deadline.ms(),
    )
    return panel


@pytest.mark.browser
def test_lab_ui_runs_an_exercise_notebook(lab, chromium_options):
    # A student in JupyterLab: opens a chapter, then an exercise notebook with task 1 solved,
    # runs all its cells from the Run menu, and reads the check cells' verdicts.
    from playwright.sync_api import sync_playwright

    deadline = Deadline(UI_TEST_LIMIT)
    chapter_file = REPO / "book" / "02_batch_norm.md"
    chapter_bytes = chapter_file.read_bytes()
    folder = REPO / "_build" / "lab_ui_test" / uuid.uuid4().hex[:8]  # inside the server's root
    notebook_path, solved = notebook_with_one_solution(folder)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(**chromium_options)
            try:
                page = browser.new_page(viewport={"width": 1440, "height": 1000})

                chapter = open_in_lab(page, lab, "book/02_batch_norm.md", deadline)
                # jupyterlab-myst renders the markdown cells (the title is the first one's h1).
                title = chapter.locator(".jp-MarkdownCell h1").first
                title.wait_for(timeout=deadline.ms())
                assert title.inner_text().strip() == "Batch normalization"
                page.screenshot(path=str(SCREENSHOTS / "chapter_02.png"))
                # A reference to another chapter is a link to its file (a MyST {ref} to a label
                # in another file would show "target not found" and a warning icon).
                link = chapter.locator("a[href*='01_input_normalization.md']").first
                # jupyterlab-myst renders a cell again once it has read the whole notebook,
                # which replaces the link element: wait for the final one, then scroll to it.
                page.wait_for_function(
                    f"() => {CURRENT_PANEL_JS}?.querySelector(\"a[href*='01_input_normalization"
                    ".md']\")?.isConnected", timeout=deadline.ms())
                page.wait_for_timeout(1000)
                link.evaluate("a => a.scrollIntoView({block: 'center'})", timeout=deadline.ms())
                assert link.inner_text(timeout=deadline.ms()).strip() == "Input normalization"
                page.screenshot(path=str(SCREENSHOTS / "chapter_02_link.png"))

                relative = notebook_path.relative_to(REPO).as_posix()
                panel = open_in_lab(page, lab, relative, deadline)
                cells = json.loads(notebook_path.read_text())["cells"]
                code_cells = sum(c["cell_type"] == "code" for c in cells)
                page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
                page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
                # Done when every code cell shows an execution count ([n]: rather than [*]:).
                page.wait_for_function(
                    f"""n => {{
                      const prompts = [...{CURRENT_PANEL_JS}
                                          .querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
                      return prompts.length === n
                             && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
                    }}""",
                    arg=code_cells, timeout=deadline.ms(),
                )
                panel.locator(".jp-OutputArea-output", has_text="[PASS]").first \
                    .scroll_into_view_if_needed(timeout=deadline.ms())
                page.screenshot(path=str(SCREENSHOTS / "exercise_02_run_all.png"))
                errors = panel.locator(
                    ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
                error_texts = [errors.nth(i).inner_text() for i in range(errors.count())]
                verdicts = [
                    t for t in panel.locator(".jp-CodeCell .jp-OutputArea-output").all_inner_texts()
                    if t.startswith("[")
                ]
            finally:
                browser.close()
    finally:
        shutil.rmtree(folder)  # the copy, and any checkpoint JupyterLab saved beside it
        requests.delete(f"{lab.url}/lab/api/workspaces/{WORKSPACE}", headers=lab.headers,
                        timeout=30)

    # Opening a chapter must not rewrite it (jupytext would save it in its own layout).
    assert chapter_file.read_bytes() == chapter_bytes, "JupyterLab rewrote the chapter file"
    assert not error_texts, "cells showed errors:\n" + "\n".join(error_texts)
    # The solved task passes; every task that still holds its stub says so in its check cell.
    solved_verdicts = [v for v in verdicts if f"] {SOLVED_TASK} " in v]
    assert len(solved_verdicts) == 1 and solved_verdicts[0].startswith("[PASS]"), verdicts
    others = [v for v in verdicts if v not in solved_verdicts]
    assert others and all(v.startswith("[NOT IMPLEMENTED]") for v in others), verdicts
