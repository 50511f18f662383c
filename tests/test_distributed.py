"""normcourse.distributed: the torchrun-launchable DDP training script, run for a few steps with
2 processes on 127.0.0.1 (torch.distributed.run, the module behind ``torchrun``): gloo on CPUs
always, nccl with one process per GPU where there are 2 GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from normcourse.distributed import main, train_data_parallel
from normcourse.launch import free_port

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
STEPS = 5
CUDA_DEVICES = torch.cuda.device_count() if torch.cuda.is_available() else 0
NCCL = dist.is_available() and dist.is_nccl_available()
BACKENDS = [
    "gloo",
    pytest.param("nccl", marks=pytest.mark.skipif(
        not NCCL or CUDA_DEVICES < 2, reason="needs 2 CUDA devices and nccl")),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_torchrun_with_two_processes_and_sync_batch_norm_trains_like_one_process(backend):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "normcourse.distributed", "--norm", "sync", "--steps", str(STEPS),
        "--data", "embedded", "--timeout", "60", "--backend", backend, "--dtype", "float64",
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
    # one process per device: gloo's on the CPU, nccl's on cuda:LOCAL_RANK
    assert result["devices"] == (["cuda:0", "cuda:1"] if backend == "nccl" else ["cpu", "cpu"])
    # DDP keeps the workers' weights identical...
    assert result["checksums"][0] == result["checksums"][1]
    # ...and with synchronized statistics two workers compute what one process (here, on the
    # CPU) computes on the whole batch, up to float64 rounding in the order of the sums
    alone = train_data_parallel(0, 1, {"norm": "sync", "steps": STEPS, "data": "embedded",
                                       "dtype": "float64"})
    assert abs(result["checksum"] - alone["checksum"]) < 1e-10 * (1 + abs(alone["checksum"]))
    assert result["test_accuracy"] == alone["test_accuracy"]


def test_without_torchrun_it_trains_in_one_process(capsys):
    result = main(["--model", "mlp", "--steps", "3", "--data", "embedded"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["world_size"] == 1 == result["world_size"]
    assert len(result["losses"]) == 3 and all(map(lambda v: v == v, result["losses"]))


def test_nccl_without_a_gpu_per_process_is_refused_before_joining(monkeypatch):
    """Under torchrun with 2 processes on this machine and 1 GPU (faked, whatever this machine
    has), --backend nccl stops with the reason before any rendezvous."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                        "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match=r"normcourse.distributed: backend 'nccl' needs one "
                       r"CUDA device per process, but 2 processes were asked for and 1"):
        main(["--backend", "nccl", "--steps", "1", "--data", "embedded"])
    assert not dist.is_initialized()
