"""normcourse.distributed: the torchrun-launchable DDP training script, run for a few steps with
2 gloo processes on 127.0.0.1 (torch.distributed.run, the module behind ``torchrun``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normcourse.distributed import train_data_parallel
from normcourse.launch import free_port

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
STEPS = 5


def test_torchrun_with_two_processes_and_sync_batch_norm_trains_like_one_process():
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "normcourse.distributed", "--norm", "sync", "--steps", str(STEPS),
        "--data", "embedded", "--timeout", "60",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun did not finish in 300 s; its output so far:\n{error.stdout}")
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout}\n{done.stderr}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["world_size"] == 2 and result["config"]["norm"] == "sync"
    # DDP keeps the workers' weights identical...
    assert result["checksums"][0] == result["checksums"][1]
    # ...and with synchronized statistics two workers compute what one process computes on the
    # whole batch (up to float32 rounding in the order of the sums)
    alone = train_data_parallel(0, 1, {"norm": "sync", "steps": STEPS, "data": "embedded"})
    assert abs(result["checksum"] - alone["checksum"]) < 1e-4 * (1 + abs(alone["checksum"]))
    assert abs(result["test_accuracy"] - alone["test_accuracy"]) <= 0.002


def test_without_torchrun_it_trains_in_one_process(capsys):
    from normcourse.distributed import main

    result = main(["--model", "mlp", "--steps", "3", "--data", "embedded"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["world_size"] == 1 == result["world_size"]
    assert len(result["losses"]) == 3 and all(map(lambda v: v == v, result["losses"]))
