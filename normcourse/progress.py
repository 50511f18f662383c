"""Progress bars for long work: tqdm's widget in JupyterLab, a text bar in a terminal, and
nothing where no one is watching.

``for lr in sweep(lrs, "learning rates"):`` shows one bar for the whole sweep: runs done / runs
total, with the current setting in the description. ``progress_bar`` is the tqdm bar underneath
(``train`` uses it for its steps).

Where a bar appears (``tqdm.auto``): in a Jupyter kernel, as a notebook widget; elsewhere, as a
text bar on stderr, and only when stderr is a terminal (a log file or pytest's capture gets
nothing). The environment variable ``NORMCOURSE_PROGRESS=0`` turns every bar off: the Makefile's
``book`` target sets it, because a built page must not hold a progress widget (and a text bar on
stderr would fail the ``-W`` build).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

from tqdm.auto import tqdm

__all__ = ["ENV_VAR", "describe", "enabled", "progress_bar", "sweep", "write"]

ENV_VAR = "NORMCOURSE_PROGRESS"
_OFF = ("0", "false", "no", "off")
_open_sweeps = 0  # how many sweeps are running; a sweep inside another gets a transient bar


def enabled() -> bool:
    """False when ``NORMCOURSE_PROGRESS`` is 0 (or false, no, off)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


def progress_bar(iterable: Iterable | None = None, *, show: bool = True, **tqdm_kwargs) -> tqdm:
    """A ``tqdm.auto`` bar, disabled when ``show`` is False or progress is turned off.

    ``disable=None`` is tqdm's "only on a terminal" for the text bar (the widget ignores it).
    """
    disable = None if show and enabled() else True
    return tqdm(iterable, disable=disable, **tqdm_kwargs)


def describe(setting) -> str:
    """A setting as the bar shows it: a tuple's items joined by commas, else ``str``."""
    return ", ".join(map(str, setting)) if isinstance(setting, tuple) else str(setting)


def sweep(settings: Iterable, desc: str, describe: Callable[[object], str] = describe) -> Iterator:
    """Yield each setting of a sweep while one bar counts the runs done.

    settings: one item per run (listed first, for the total); desc: what is swept, e.g.
    ``"learning rate"``; the bar reads ``desc: <describe(current setting)>``. A sweep started
    inside another (a comparison per batch size) gets a bar that disappears when it ends.
    """
    global _open_sweeps
    settings = list(settings)
    with progress_bar(total=len(settings), desc=desc, unit="run", leave=_open_sweeps == 0) as bar:
        _open_sweeps += 1
        try:
            for setting in settings:
                bar.set_description(f"{desc}: {describe(setting)}")
                yield setting
                bar.update()
            bar.set_description(desc)
        finally:
            _open_sweeps -= 1


def write(line: str) -> None:
    """Print a line without breaking a text bar that is on screen (tqdm.write)."""
    tqdm.write(line)
