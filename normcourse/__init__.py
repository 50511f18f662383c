"""normcourse: normalization layers from scratch, the companion package of the normcourse book.

Modules (import the one you need, e.g. ``from normcourse import reference``):

- ``validation``: the shared input checks; ``utils``: seeding, the one-thread guard,
  ``restoring_modes``
- ``reference``: NumPy forward and backward passes written by hand
- ``functional``: the same in PyTorch, as autograd Functions with closed-form backward
- ``nn``: drop-in modules (BatchNorm1d/2d, LayerNorm, BatchRenorm1d/2d)
- ``gradcheck``: numerical gradients and relative errors
- ``data``: MNIST (embedded subset, cache, download)
- ``models``, ``recurrent``: the networks the chapters train; ``benchmarking``: layer speed
- ``train``: the training loop and evaluation
- ``experiments.runner`` and ``experiments.chNN_topic``: the chapters' experiments, one module
  per chapter on one shared runner
- ``exercises``: checker and grader for the exercise notebooks

Lower modules never import higher ones (see CONTRIBUTING.md and tests/test_structure.py).
"""

__version__ = "0.1.0"
