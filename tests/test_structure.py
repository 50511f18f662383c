"""The package's shape: chapters independent of each other, and arrows that point down.

The import graph is read from the source (``ast``, imports inside functions included), not by
importing anything. ``python tests/test_structure.py`` prints it (module -> what it imports).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "normcourse"
CHAPTER_MODULE = re.compile(r"^normcourse\.experiments\.ch\d\d_\w+$")

# Each layer: regular expressions for module names. Lower layers never import higher ones;
# imports within one layer are allowed (the graph must still be acyclic). Every module of the
# package must match one pattern, so that a new module is placed deliberately.
LAYERS: list[tuple[str, ...]] = [
    ("normcourse", "normcourse.validation", "normcourse.data", "normcourse.utils",
     "normcourse.launch", "normcourse.progress"),
    ("normcourse.reference", "normcourse.functional", "normcourse.gradcheck"),
    ("normcourse.nn", "normcourse.sync_batch_norm"),
    ("normcourse.models", "normcourse.recurrent", "normcourse.benchmarking",
     "normcourse.kernel_passes", "normcourse.page_faults", "normcourse.figures"),
    ("normcourse.train", "normcourse.distributed", "normcourse.landscape"),
    ("normcourse.experiments", "normcourse.experiments.runner"),
    (r"normcourse.experiments.ch\d\d_\w+",),
    (r"normcourse.exercises(\.\w+)*",),
    ("normcourse.__main__",),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(source: str, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The package modules that ``source`` (module ``name``) imports, anywhere in the file.

    ``from normcourse import nn`` names the module ``normcourse.nn``; ``from normcourse.train
    import evaluate`` names ``normcourse.train``. Modules outside the package are left out.
    """
    found = set()
    here = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {
        name: imported_modules(path.read_text(encoding="utf-8"), name,
                               path.name == "__init__.py", known)
        for name, path in modules.items()
    }


def layer_of(module: str) -> int:
    for rank, patterns in enumerate(LAYERS):
        if any(re.fullmatch(pattern, module) for pattern in patterns):
            return rank
    raise LookupError(f"{module} is in no layer of tests/test_structure.py's LAYERS: place it")


def format_graph(graph: dict[str, set[str]]) -> str:
    return "\n".join(f"{m} -> {', '.join(sorted(graph[m])) or '(nothing)'}" for m in sorted(graph))


def chapter_cross_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} imports {d}" for m in sorted(graph) if CHAPTER_MODULE.match(m)
            for d in sorted(graph[m]) if CHAPTER_MODULE.match(d)]


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


# ---------------------------------------------------------------------------------------------
def test_the_graph_is_read_from_every_module_and_printed():
    graph = import_graph()
    print("\n" + format_graph(graph))
    assert len(graph) >= 30
    # a few edges everybody relies on, to show the parser sees real imports
    chapter4 = graph["normcourse.experiments.ch04_test_time_statistics"]
    assert "normcourse.experiments.runner" in chapter4
    assert "normcourse.functional" in graph["normcourse.nn"]
    assert "normcourse.exercises.commands" in graph["normcourse.__main__"]  # inside a function


def test_chapter_experiment_modules_do_not_import_each_other():
    graph = import_graph()
    chapters = [m for m in graph if CHAPTER_MODULE.match(m)]
    assert len(chapters) >= 5, chapters
    assert chapter_cross_imports(graph) == []


def test_the_checks_catch_a_chapter_import_a_cycle_and_an_unplaced_module():
    known = {"normcourse.experiments.ch04_a", "normcourse.experiments.ch05_b", "normcourse.train",
             "normcourse.experiments"}
    source = "from normcourse.experiments import ch04_a as x\nimport normcourse.train\n"
    deps = imported_modules(source, "normcourse.experiments.ch05_b", False, known)
    assert deps == {"normcourse.experiments.ch04_a", "normcourse.train"}
    relative = imported_modules("from .ch04_a import f\n", "normcourse.experiments.ch05_b",
                                False, known)
    assert relative == {"normcourse.experiments.ch04_a"}
    assert chapter_cross_imports({"normcourse.experiments.ch05_b": deps}) == [
        "normcourse.experiments.ch05_b imports normcourse.experiments.ch04_a"]
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    with pytest.raises(LookupError, match="place it"):
        layer_of("normcourse.somewhere_new")


def test_lower_layers_never_import_higher_ones_and_there_is_no_cycle():
    graph = import_graph()
    upward = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
              for m in sorted(graph) for d in sorted(graph[m]) if layer_of(d) > layer_of(m)]
    assert upward == []
    assert cycle_in(graph) is None


def test_the_layers_are_as_documented():
    assert layer_of("normcourse.validation") < layer_of("normcourse.reference")
    assert layer_of("normcourse.functional") < layer_of("normcourse.nn")
    assert layer_of("normcourse.nn") < layer_of("normcourse.models")
    assert layer_of("normcourse.recurrent") < layer_of("normcourse.train")
    assert layer_of("normcourse.train") < layer_of("normcourse.experiments.runner")
    assert layer_of("normcourse.experiments.runner") < layer_of("normcourse.experiments.ch04_x")
    assert layer_of("normcourse.experiments.ch04_x") < layer_of("normcourse.exercises.tasks.ch04")
    assert layer_of("normcourse.exercises") < layer_of("normcourse.__main__")


if __name__ == "__main__":
    print(format_graph(import_graph()))
