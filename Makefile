# normcourse: every target sets up what it needs, from nothing (a fresh Debian with Python 3.11).
#   make book       build the book into _build/html
#   make test       build the book, then run every test
#   make lab        open the course in JupyterLab
#   make benchmark  run the speed and memory benchmarks
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Written once requirements are installed; redone when requirements.txt or pyproject.toml change.
STAMP := $(VENV)/.normcourse-installed
LOCAL := $(CURDIR)/.local
PYTEST_WORKERS ?= 2

# One thread per process: faster and reproducible on small machines (see the toolchain notes).
export OMP_NUM_THREADS := 1
export MKL_NUM_THREADS := 1
# Jupyter, IPython and matplotlib keep their state in the repository, never in $HOME.
# The committed jupyter_config/ holds the course's Jupyter settings; everything written at run
# time goes to the git-ignored .local/.
export JUPYTER_CONFIG_DIR := $(CURDIR)/jupyter_config
export JUPYTER_DATA_DIR := $(LOCAL)/jupyter/data
export JUPYTER_RUNTIME_DIR := $(LOCAL)/jupyter/runtime
export JUPYTERLAB_SETTINGS_DIR := $(LOCAL)/jupyter/lab/user-settings
export JUPYTERLAB_WORKSPACES_DIR := $(LOCAL)/jupyter/lab/workspaces
export IPYTHONDIR := $(LOCAL)/ipython
export MPLCONFIGDIR := $(LOCAL)/matplotlib
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1

# pip repeats a harmless "Location ... is ignored" line for each package when an index in its
# configuration does not exist; keep the output readable.
PIP_FILTER := sed -u -e '/is ignored: it is neither a file nor a directory/d'
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: help venv book test lab benchmark clean distclean

help:
	@echo "make book       build the book into _build/html (sets up .venv first)"
	@echo "make test       build the book, then run all tests"
	@echo "make lab        open the course in JupyterLab"
	@echo "make benchmark  run benchmarks/run.py, compiled.py and page_faults.py"
	@echo "make clean      remove _build;  make distclean: also .venv and .local"

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11 (python3.11 or python3) is needed" >&2; exit 1; }
	@if [ ! -x $(BIN)/python ]; then \
	  echo "Creating $(VENV) with $(PYTHON) ($$($(PYTHON) --version))"; \
	  $(PYTHON) -m venv $(VENV); \
	fi
	@echo "Installing requirements.txt into $(VENV) (a few minutes the first time)"
	@$(BIN)/python -m pip install -q -r requirements.txt 2>&1 | $(PIP_FILTER)
	@$(BIN)/python -m pip install -q -e . --no-deps 2>&1 | $(PIP_FILTER)
	@mkdir -p $(LOCAL)
	@touch $@

# Sphinx re-reads only changed pages, so the warnings (failed cells included) of a failed build
# would not come back on the next one: after a failed build, re-read every page. Chapters that
# executed cleanly come from the execution cache either way.
# NORMCOURSE_PROGRESS=0: no progress bars while the chapters execute (normcourse/progress.py): a
# built page must not hold a progress widget, and a text bar on stderr would fail the -W build.
BOOK_OK := _build/.book-built-cleanly
# Before Sphinx reads the pages, scripts/execute_chapters.py executes every chapter that is not
# in the execution cache, BOOK_JOBS chapters at once (default: one per core), into the cache the
# build reads; Sphinx then executes nothing. A failing cell fails here, naming chapter and cell.
# A chapter executed again with unchanged code (the package or the environment changed) has
# new outputs that Sphinx, which re-reads only edited pages, would not pick up: after any chapter
# ran (the script lists them in EXECUTED), Sphinx re-reads them all.
BOOK_JOBS ?=
EXECUTED := _build/.executed-chapters
book: export NORMCOURSE_PROGRESS := 0
book: $(STAMP)
	@if [ -f $(BOOK_OK) ]; then all=; else all=--all; fi; \
	rm -f $(BOOK_OK); \
	mkdir -p _build; \
	echo "$(BIN)/python scripts/execute_chapters.py $(if $(BOOK_JOBS),--jobs $(BOOK_JOBS) )--executed-list $(EXECUTED)"; \
	$(BIN)/python scripts/execute_chapters.py $(if $(BOOK_JOBS),--jobs $(BOOK_JOBS)) \
	  --executed-list $(EXECUTED); \
	if [ -s $(EXECUTED) ]; then all=--all; fi; \
	echo "$(BIN)/jupyter-book build . -W -n --keep-going $$all"; \
	$(BIN)/jupyter-book build . -W -n --keep-going $$all; \
	touch $(BOOK_OK)

# tests/test_notebooks.py checks each chapter's run that `make book` just recorded in the
# execution cache instead of executing it again (when the code and environment are unchanged;
# see tests/conftest.py). The longest test files go to the workers first (conftest.py).
test: book
	@bash scripts/ensure_chromium.sh
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -rs

lab: $(STAMP)
	$(BIN)/jupyter lab --ServerApp.root_dir=$(CURDIR) $(ALLOW_ROOT)

benchmark: $(STAMP)
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/compiled.py
	$(BIN)/python benchmarks/page_faults.py

clean:
	rm -rf _build

distclean: clean
	rm -rf $(VENV) $(LOCAL)
