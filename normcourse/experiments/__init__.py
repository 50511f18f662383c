"""The chapters' experiments, one module per chapter, ``chNN_topic`` (e.g.
``ch01_input_normalization`` for chapter 1).

Each module holds the functions a chapter runs: they build models with ``normcourse.models``,
train them with ``normcourse.train`` and return arrays or ``History`` objects. The chapter plots
what they return, and the claims tests call the same functions over several seeds, so the book's
figures and its tested claims come from one piece of code. Import a module by name, e.g.
``from normcourse.experiments import ch01_input_normalization``.
"""
