"""Start k worker processes on this machine, joined in a torch.distributed process group.

What the tests and chapter 10's notebook cells use to run data-parallel code without a cluster:
``run_workers(fn, k, *args)`` spawns k processes (``torch.multiprocessing``, start method
"spawn", so it also works from a Jupyter kernel), each joins a group on 127.0.0.1 with a
timeout on every collective, calls ``fn(rank, k, *args)`` and hands back what it returns. A
worker that raises, dies or hangs never hangs the caller: ``run_workers`` raises
``WorkerError`` naming the worker and what happened, and stops the others.

``backend="gloo"`` (default) runs on CPUs, and on CUDA tensors too (one GPU may serve every
worker). ``backend="nccl"`` runs one process per GPU: worker ``rank`` makes ``cuda:rank`` its
current device before it joins, so ``fn`` puts its tensors on ``torch.device("cuda")`` (or
``torch.cuda.current_device()``). It needs a torch built with nccl and at least k GPUs; asked
for without them, ``run_workers`` raises at once instead of starting workers that would fail.

``fn`` must be importable by the new processes (defined in a module, not in a notebook cell).
``torchrun`` does the same job from a shell; see ``normcourse.distributed``.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from normcourse.validation import check_backend

__all__ = ["WorkerError", "free_port", "init_process_group", "run_workers"]


class WorkerError(RuntimeError):
    """A worker raised, exited, or did not finish in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int, port: int, timeout_s: float = 60.0,
                       backend: str = "gloo") -> None:
    """Join the group of ``world_size`` processes that rendezvous at 127.0.0.1:``port``.

    ``timeout_s`` bounds the rendezvous and every collective: a collective still waiting for a
    missing worker after that long raises instead of blocking forever (nccl enforces it with its
    watchdog, which torch enables by default, and aborts the process).
    With nccl, call ``torch.cuda.set_device`` first (``run_workers`` does): the group's
    collectives run on the current device.
    """
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def _worker(rank, fn, world_size, port, out_dir, args, collective_timeout_s, backend):
    torch.set_num_threads(1)  # k workers share the machine's cores
    if backend == "nccl":
        # one process per GPU: nccl refuses two ranks on one device, and its collectives (and
        # all_gather_object's staging tensors) use the current device
        torch.cuda.set_device(rank)
    init_process_group(rank, world_size, port, collective_timeout_s, backend)
    try:
        result = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    # a file, not a queue: a big result in a pipe would block the worker until the parent reads
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def _stop(processes) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()


def run_workers(fn, world_size: int, *args, timeout_s: float = 120.0,
                collective_timeout_s: float = 60.0, backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return their results.

    Results come back as a list indexed by rank (tensors, numbers, dicts and lists of them;
    tensors on the CPU, wherever the worker held them). ``backend``: "gloo" or "nccl" (one
    process per GPU, worker ``rank`` on ``cuda:rank``); an unknown name raises ValueError, nccl
    without a torch built with it or without ``world_size`` GPUs a RuntimeError, before any
    worker starts. Raises ``WorkerError`` if a worker raises (with its traceback), exits
    abnormally, or the whole run takes longer than ``timeout_s`` seconds (the workers are then
    terminated).
    """
    check_backend(backend, world_size, "run_workers")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="normcourse-workers-") as out_dir:
        context = mp.start_processes(
            _worker, args=(fn, world_size, port, out_dir, args, collective_timeout_s, backend),
            nprocs=world_size, join=False, start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=0.1):
                if time.monotonic() > deadline:
                    running = [r for r, p in enumerate(context.processes) if p.is_alive()]
                    raise WorkerError(
                        f"{fn.__name__}: worker(s) {running} of {world_size} still running after "
                        f"{timeout_s:g} s (hung, or waiting for a worker that hung); terminated"
                    )
        except mp.ProcessRaisedException as error:
            raise WorkerError(
                f"{fn.__name__}: worker {error.error_index} of {world_size} raised:\n{error}"
            ) from None
        except mp.ProcessExitedException as error:
            raise WorkerError(
                f"{fn.__name__}: worker {error.error_index} of {world_size} died "
                f"(exit code {error.exit_code}) before finishing"
            ) from None
        finally:
            _stop(context.processes)
        # map_location: CUDA tensors of the workers come back on the CPU (the caller may have no
        # CUDA context, and its device numbering is not the workers')
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), map_location="cpu")
                for r in range(world_size)]
