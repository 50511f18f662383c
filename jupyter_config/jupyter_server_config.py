"""Jupyter server settings of the course (the Makefile points JUPYTER_CONFIG_DIR here).

Committed, read-only at run time: what Jupyter writes (user settings, workspaces, runtime files)
goes to the git-ignored .local/ (see the Makefile).
"""

from pathlib import Path

c = get_config()  # noqa: F821 (provided by traitlets when it loads this file)

# JupyterLab reads overrides.json (default settings: MyST .md files open as notebooks) from here.
c.LabApp.app_settings_dir = str(Path(__file__).resolve().parent / "lab" / "settings")

# Work offline: no news feed, no update check.
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.NeverCheckForUpdate"
