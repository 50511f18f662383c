"""normcourse: normalization layers from scratch, the companion package of the normcourse book.

Modules (import the one you need, e.g. ``from normcourse import reference``):

- ``reference``: NumPy forward and backward passes written by hand
- ``functional``: the same in PyTorch, as autograd Functions with closed-form backward
- ``nn``: drop-in modules (BatchNorm1d/2d, LayerNorm, BatchRenorm1d/2d)
- ``gradcheck``: numerical gradients and relative errors
- ``data``: MNIST (embedded subset, cache, download)
- ``models``, ``train``, ``experiments``: what the chapters' experiments run
- ``exercises``: checker and grader for the exercise notebooks
"""

__version__ = "0.1.0"
