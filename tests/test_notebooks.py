"""The book's chapters, run cell by cell as notebooks (nbval, through jupytext).

This module holds no test functions: tests/conftest.py collects this file as one nbval notebook
per chapter (``book/0*.md``). Every code cell is a test item, run in order in one kernel started
in ``book/``; a chapter fails when any cell raises, in particular a check cell's ``assert``.
Run one chapter with, for example, ``pytest tests/test_notebooks.py -k 01_input``.
"""
