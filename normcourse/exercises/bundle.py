"""A class bundle: the chosen chapters and their student notebooks, with a README.

``bundle(...)`` copies the chosen chapters' MyST sources and student notebooks into a folder (or a
zip) with a README listing, from the catalogue, the objectives, times, tasks and prerequisites.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from normcourse.exercises.catalog import Chapter, chapter, is_chapter

__all__ = ["bundle", "bundle_readme"]


def _prerequisite_text(item: str) -> str:
    return f"chapter {chapter(item).number} ({chapter(item).title})" if is_chapter(item) else item


def bundle_readme(chapters: list[Chapter]) -> str:
    """The README of a class bundle: what is in it, objectives, times, prerequisites."""
    chosen = {c.slug for c in chapters}
    lines = [
        "# normcourse: class bundle",
        "",
        "Chapters of the normcourse book with their exercise notebooks. Install the companion "
        "package (`pip install -e .` in a clone of the normcourse repository), then open the "
        "notebooks in `exercises/` with JupyterLab. Each task ends with a check cell that prints "
        "PASS, FAIL with a diagnosis, or NOT IMPLEMENTED.",
        "",
        "Instructors grade a submitted notebook with `python -m normcourse grade NOTEBOOK.ipynb` "
        "(add `--json` for machine-readable output).",
        "",
    ]
    for c in chapters:
        points = sum(t.points for t in c.tasks)
        lines += [
            f"## {c.number}. {c.title}",
            "",
            f"- Chapter: `chapters/{c.slug}.md`; exercises: `exercises/{c.slug}.ipynb` "
            f"({len(c.tasks)} auto-checked tasks, {points} points, plus "
            f"{len(c.questions)} written questions)",
            f"- Time: about {c.reading_minutes} min reading, {c.exercise_minutes} min exercises",
            "- Prerequisites: " + "; ".join(_prerequisite_text(p) for p in c.prerequisites),
            "",
            "Learning objectives:",
            "",
            *[f"- {objective}" for objective in c.objectives],
            "",
        ]
    missing = sorted({p for c in chapters for p in c.prerequisites if is_chapter(p)} - chosen)
    if missing:
        lines += ["## Prerequisite chapters not in this bundle", "",
                  *[f"- {_prerequisite_text(p)}" for p in missing], ""]
    return "\n".join(lines)


def bundle(chapter_keys, out: str | Path, root: str | Path = ".", as_zip: bool = False) -> Path:
    """Copy the chosen chapters and their student notebooks, with a README, into ``out``.

    chapter_keys: numbers or slugs, e.g. ``[2, 3]``. root: the repository (holding ``book/`` and
    ``exercises/``). as_zip: write ``out`` as a zip archive instead of a folder (``.zip`` is added
    if missing). Returns the folder or zip written. Raises FileNotFoundError naming any missing file.
    """
    root = Path(root)
    chapters = sorted({chapter(k) for k in chapter_keys}, key=lambda c: c.number)
    files = []
    for c in chapters:
        files.append((root / "book" / f"{c.slug}.md", Path("chapters") / f"{c.slug}.md"))
        files.append((root / "exercises" / f"{c.slug}.ipynb", Path("exercises") / f"{c.slug}.ipynb"))
    missing = [str(source) for source, _ in files if not source.is_file()]
    if missing:
        raise FileNotFoundError("cannot bundle, missing: " + ", ".join(missing))

    def write(folder: Path) -> None:
        for source, relative in files:
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, folder / relative)
        (folder / "README.md").write_text(bundle_readme(chapters), encoding="utf-8")

    out = Path(out)
    if not as_zip:
        out.mkdir(parents=True, exist_ok=True)
        write(out)
        return out
    base = out.with_suffix("") if out.suffix == ".zip" else out
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        return Path(shutil.make_archive(str(base), "zip", tmp))
