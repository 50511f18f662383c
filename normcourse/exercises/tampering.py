"""Flags for the grading report: attempts to fake a grade, and answers built on the package.

None of these changes a mark (marks come only from the grader's own checks, see ``answers``);
they tell the instructor what to look at. ``source_flags`` reads the notebook's code: a cell that
redefines the checker, assigns into the package or ``sys.modules``, or prints a verdict line.
``reference_flags`` names the tasks whose function (or a helper it calls) uses
``normcourse.reference``, ``normcourse.functional`` or ``normcourse.gradcheck``.
``claim_flags`` compares what the notebook's outputs claim (stored in the file, or shown while the
grader ran it) with the grader's verdicts.
"""

from __future__ import annotations

import ast
import re

__all__ = ["parse_cells", "source_flags", "reference_flags", "claim_flags", "claimed_passes"]

CHECKER_NAMES = {"check", "check_answer", "report_namespace", "grade_notebook", "RESULTS",
                 "TASKS", "tasks_for_chapter"}
SOLUTION_MODULES = ("normcourse.reference", "normcourse.functional", "normcourse.gradcheck")
VERDICT = re.compile(r"\bPASS\b|NORMCOURSE-GRADE|application/vnd\.normcourse")


def parse_cells(code_cells: list[str]) -> list[ast.Module]:
    """Each code cell parsed (IPython magics blanked); a cell that does not parse is skipped."""
    from normcourse.exercises.answers import _without_magics

    trees = []
    for source in code_cells:
        try:
            trees.append(ast.parse(_without_magics(source)))
        except SyntaxError:
            continue
    return trees


def _imported_modules(trees) -> dict[str, str]:
    """Local name -> the module (or module.attribute) it was imported as."""
    names = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    names[alias.asname or alias.name.split(".")[0]] = (
                        alias.name if alias.asname else alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, imported: dict[str, str]) -> str | None:
    """``a.b.c`` with ``a`` replaced by the module it names, or None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([imported.get(node.id, node.id), *reversed(parts)])


def source_flags(trees) -> list[str]:
    """Sentences naming each attempt to redefine, patch or imitate the checker."""
    imported = _imported_modules(trees)
    flags = []
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                    and node.name in CHECKER_NAMES:
                flags.append(f"defines its own `{node.name}` (the checker's name)")
            targets = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id in CHECKER_NAMES:
                    flags.append(f"assigns the checker's name `{target.id}`")
                elif isinstance(target, (ast.Attribute, ast.Subscript)):
                    dotted = _dotted(target.value, imported) or ""
                    if dotted.startswith(("normcourse", "sys.modules")):
                        flags.append(f"assigns into `{dotted}` (patches the checker or the "
                                     "package)")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("setattr", "delattr") and node.args:
                dotted = _dotted(node.args[0], imported) or ""
                if dotted.startswith("normcourse"):
                    flags.append(f"calls {node.func.id} on `{dotted}` (patches the package)")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and VERDICT.search(node.value):
                flags.append(f"writes a verdict-like text {node.value[:60]!r}")
    return sorted(set(flags))


def reference_flags(trees, functions: dict[str, str]) -> dict[str, str]:
    """Task id -> the solution module its function uses (directly or through helpers)."""
    imported = _imported_modules(trees)
    defs = {}
    for tree in trees:
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defs[node.name] = node

    def uses(name: str, seen: set) -> str | None:
        if name in seen or name not in defs:
            return None
        seen.add(name)
        local = {**imported, **_imported_modules([defs[name]])}
        for node in ast.walk(defs[name]):
            if isinstance(node, (ast.Name, ast.Attribute)):
                dotted = _dotted(node, local) or ""
                if dotted.startswith(SOLUTION_MODULES):
                    return dotted
            if isinstance(node, ast.ImportFrom) \
                    and (node.module or "").startswith(SOLUTION_MODULES):
                return node.module
            if isinstance(node, ast.Name) and node.id in defs:
                found = uses(node.id, seen)
                if found:
                    return found
        return None

    return {task: found for task, function in functions.items()
            if (found := uses(function, set()))}


def claimed_passes(notebook) -> set[str]:
    """Task ids whose stored outputs in the submitted file show a PASS verdict."""
    from normcourse.exercises.result_format import RESULT_MIME

    claimed = set()
    for cell in notebook.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            data = output.get("data", {})
            result = data.get(RESULT_MIME)
            if isinstance(result, dict) and result.get("status") == "pass":
                claimed.add(str(result.get("task")))
            text = output.get("text", "") or data.get("text/plain", "")
            for line in (text if isinstance(text, str) else "".join(text)).splitlines():
                if line.startswith("[PASS] "):
                    claimed.add(line.split()[1])
    return claimed


def claim_flags(claimed: set[str], shown: set[str], verdicts: dict[str, str]) -> list[str]:
    """Flags for the PASS claims (stored in the file, or shown in the run) the grader rejects."""
    flags = []
    for task in sorted(claimed):
        if verdicts.get(task) != "pass":
            flags.append(f"the submitted file's outputs show PASS for {task}, but the grader's "
                         "check does not pass it (outputs edited, or from older code)")
    for task in sorted(shown):
        if verdicts.get(task) != "pass":
            flags.append(f"the notebook displayed PASS for {task} while the grader ran it, but "
                         "the grader's check does not pass it (a patched or imitated checker)")
    return flags
