"""Sphinx extension: write each inline or linked script once per page.

sphinx-thebe (loaded by Jupyter Book whether or not thebe is used) registers its configuration
script twice with Sphinx 7; the second ``const THEBE_JS_URL = ...`` then throws
"Identifier 'THEBE_JS_URL' has already been declared" in every reader's browser console.
Dropping exact repeats (same file or same inline body, same attributes) fixes it and changes
nothing else.
"""

from __future__ import annotations


def _key(script) -> tuple:
    # An inline script's filename is None or "" depending on how it was registered.
    return (str(script.filename or ""), tuple(sorted(script.attributes.items())))


def drop_repeated_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple] = set()
    unique = []
    for script in scripts:
        key = _key(script)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    # Late priority: after every other extension has added its scripts for this page.
    app.connect("html-page-context", drop_repeated_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
