"""Small helpers every notebook and test needs: seeding and device choice."""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) so that a run can be repeated exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    """CUDA when a GPU is present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
