"""Determinism: the same seeded experiment of chapters 4-6 gives the same bits in any process."""

from __future__ import annotations

import contextlib
import io
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from normcourse.data import load_mnist
from normcourse.experiments import ch06_batch_renorm as brx
from normcourse.experiments import ch04_test_time_statistics as tt

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# Determinism: the same seeded experiment gives the same bits in any process
# ---------------------------------------------------------------------------------------------
# Short versions of the chapters' runs (batch norm and renorm at batch 4, non-i.i.d. batches, the
# layer-norm RNN) on the embedded subset; prints a SHA-256 of every trained parameter and every
# measured accuracy. Run here and in fresh interpreters with other hash seeds and two threads.
FINGERPRINT_CODE = """
import hashlib
import torch
from normcourse.data import load_mnist
from normcourse.experiments import ch06_batch_renorm as brx, ch05_layer_norm as lnx, ch04_test_time_statistics as tt

data = tt.mnist_tensors(load_mnist(source="embedded"), test_examples=500)
digest = hashlib.sha256()
def add(model, *numbers):
    for p in model.parameters():
        digest.update(p.detach().numpy().tobytes())
    digest.update(repr(numbers).encode())
for r in brx.compare_norms(data, ("batch", "renorm"), batch_size=4, steps=60, seed=3).values():
    add(r.model, r.eval_accuracy, r.batch_stats_accuracy)
r = brx.noniid_comparison(data, ("batch",), steps=20, seed=3)["batch"]
add(r.model, r.eval_accuracy, r.batch_stats_accuracy, tt.recalibration_gain(r, data, 256))
for history, accuracy in lnx.recurrent_comparison(data, steps=8, eval_every=4, seed=3,
                                                   train_examples=256, test_examples=64).values():
    digest.update(repr((history.train_loss, accuracy)).encode())
print(digest.hexdigest())
"""
REPO = Path(__file__).resolve().parent.parent


def _fingerprint_in_fresh_process(hash_seed: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(PYTHONHASHSEED=hash_seed, PYTHONPATH=str(REPO))
    # Two threads in the caller: the experiment functions must run single-threaded regardless.
    code = "import torch; torch.set_num_threads(2)\n" + FINGERPRINT_CODE
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=True)
    return done.stdout.strip().splitlines()[-1]


def test_seeded_experiments_repeat_exactly_across_processes():
    # This process: other random numbers drawn first, and other experiments run first.
    random.random(), np.random.rand(), torch.randn(3)
    brx.compare_norms(tt.mnist_tensors(load_mnist(source="embedded"), 100), ("layer",), batch_size=8,
                      steps=5, seed=7)
    namespace = {}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(FINGERPRINT_CODE, namespace)
    here = stdout.getvalue().strip()
    assert torch.get_num_threads() == 1  # the guard restored the caller's setting
    fresh = [_fingerprint_in_fresh_process(seed) for seed in ("1", "2")]
    assert fresh == [here, here]
