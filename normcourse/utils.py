"""Small helpers every layer may use: seeding, the one-thread guard, restoring train/eval modes."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) so that a run can be repeated exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)




@contextmanager
def one_thread():
    """Run the block (or, as ``@one_thread()``, the function) with one PyTorch thread.

    Seeds alone do not fix a run's numbers: with two threads PyTorch's CPU kernels split some
    sums differently, the last bits of the gradients change, and a few hundred training steps
    turn that into a different model (a different third decimal of the test accuracy). Every
    experiment function that trains or evaluates runs under this guard, so its result depends
    only on its arguments, not on the caller's thread setting. The caller's setting is restored.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def restoring_modes(model: nn.Module) -> Iterator[None]:
    """Put every module's train/eval flag back as it was when the block ends, even on error.

    ``model.train()`` and ``model.eval()`` set the flag of every submodule, so restoring only
    the top-level one would unfreeze a layer that was put in eval mode on its own (a frozen
    batch norm). Use it around code that switches modes temporarily::

        with restoring_modes(model):
            model.eval()
            ...
    """
    saved = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training
