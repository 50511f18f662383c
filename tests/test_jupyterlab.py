"""JupyterLab as `make lab` sets it up: the course opens, MyST chapters open as notebooks, and a
kernel of this environment runs the course's code.

Starts ``jupyter lab`` on 127.0.0.1 with a random port and token, talks to its REST and
websocket APIs (no browser), and always shuts the server down.
"""

from __future__ import annotations

import json
import os
import secrets
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
