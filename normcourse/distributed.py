"""Data-parallel training of a chapter model with DistributedDataParallel (chapter 10).

Launch it with torchrun, one process per worker (gloo on CPUs, nccl with one process per GPU)::

    torchrun --nnodes 1 --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29500 \\
        -m normcourse.distributed --model convnet --norm sync --steps 200 --batch-size 64

The device follows the backend: with ``--backend gloo`` every worker trains on the CPU; with
``--backend nccl`` (the default where CUDA is available) worker ``LOCAL_RANK`` trains on
``cuda:LOCAL_RANK`` (torchrun sets LOCAL_RANK; ``--nproc-per-node`` at most the GPUs of a
machine), and its model and data live there.

``--batch-size`` is the *global* batch: each of the k workers takes its 1/k slice of every batch,
computes the loss on it, and DDP averages the gradients, so every worker holds the same weights.
``--norm batch`` normalizes with each worker's statistics, ``--norm sync`` converts the model's
batch norm layers to ``normcourse.nn.SyncBatchNorm`` (statistics of the whole global batch).
Without torchrun's environment (RANK, WORLD_SIZE, ...) it trains in this one process, on the
CPU. Rank 0 prints one line of JSON with the result. The notebook cells call
``train_data_parallel`` through ``normcourse.launch.run_workers`` instead of torchrun; it is the
same loop (``run_workers(..., backend="nccl")`` puts worker ``rank`` on ``cuda:rank``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from normcourse import models
from normcourse.data import iid_batches, load_mnist, to_tensors
from normcourse.sync_batch_norm import SyncBatchNorm, world_size
from normcourse.train import evaluate
from normcourse.utils import seed_everything
from normcourse.validation import BACKENDS, check_backend, check_choice

__all__ = ["DEFAULTS", "train_data_parallel", "main"]

DEFAULTS = {"model": "convnet", "norm": "batch", "steps": 100, "batch_size": 64, "lr": 0.1,
            "seed": 0, "data": "auto", "channels": (8, 16), "dtype": "float32"}


def _build_model(config: dict, device: torch.device) -> torch.nn.Module:
    check_choice(config["model"], ("mlp", "convnet"), "model")
    check_choice(config["norm"], ("batch", "sync"), "norm")
    seed_everything(config["seed"])  # the same initial weights on every worker
    if config["model"] == "mlp":
        model = models.mlp(norm="batch", activation="relu")
    else:
        model = models.convnet(norm="batch", channels=tuple(config["channels"]))
    if config["norm"] == "sync":
        model = SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device, getattr(torch, config["dtype"]))


def _device() -> torch.device:
    """This worker's device: its GPU under nccl (made current before the group was joined, by
    ``main`` from LOCAL_RANK or by ``launch.run_workers`` from the rank), else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def train_data_parallel(rank: int, num_workers: int, config: dict | None = None) -> dict:
    """Train with DDP in this worker; the process group (if any) is already initialized.

    Every worker draws the same global batches (same seed) and takes its contiguous slice.
    ``config``: keys of ``DEFAULTS`` (``dtype`` "float64" makes runs comparable to rounding).
    Returns {"test_accuracy", "losses" (this worker's), "seconds_per_step", "checksum" (sum of
    all weights: equal on every worker), "weights" (all of them, flattened, on the CPU),
    "device" (where this worker trained, e.g. "cuda:1"), "world_size", "config"}.
    """
    config = {**DEFAULTS, **(config or {})}
    device = _device()
    model = _build_model(config, device)
    if world_size() > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    data = load_mnist(config["data"])
    dtype = getattr(torch, config["dtype"])
    x_train, y_train = to_tensors(data.train_images, data.train_labels, device, flatten=False)
    x_train = x_train.to(dtype)
    losses = []
    start = time.perf_counter()
    model.train()
    for indices in iid_batches(len(x_train), config["batch_size"], config["seed"],
                               config["steps"]):
        mine = torch.as_tensor(np.array_split(indices, num_workers)[rank], device=device)
        loss = F.cross_entropy(model(x_train[mine]), y_train[mine])
        optimizer.zero_grad()
        loss.backward()  # DDP averages the gradients over the workers here
        optimizer.step()
        losses.append(loss.item())
    seconds_per_step = (time.perf_counter() - start) / max(1, config["steps"])
    plain = model.module if isinstance(model, DistributedDataParallel) else model
    x_test, y_test = to_tensors(data.test_images, data.test_labels, device, flatten=False)
    x_test = x_test.to(dtype)
    return {
        "test_accuracy": evaluate(plain, x_test, y_test, batch_size=1000),
        "losses": losses,
        "seconds_per_step": seconds_per_step,
        "checksum": float(sum(p.detach().double().sum() for p in plain.parameters())),
        "weights": torch.cat([p.detach().flatten().cpu() for p in plain.parameters()]),
        "device": str(device),
        "world_size": num_workers,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
    }


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "convnet"), default=DEFAULTS["model"])
    parser.add_argument("--norm", choices=("batch", "sync"), default=DEFAULTS["norm"])
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                        help="global batch, split over the workers")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--data", choices=("auto", "full", "embedded"), default="auto")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=DEFAULTS["dtype"],
                        help="float64 makes runs comparable to rounding (tests)")
    parser.add_argument("--backend", choices=BACKENDS,
                        default="nccl" if torch.cuda.is_available() else "gloo",
                        help="gloo: CPU workers; nccl: one process per GPU (default with CUDA)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds any collective may wait for the other workers")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = _parse(argv)
    torch.set_num_threads(1)
    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        # torchrun's processes on this machine: nccl needs a GPU for each
        check_backend(args.backend, int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                      "normcourse.distributed")
        if args.backend == "nccl":
            # before joining: the group's collectives, DDP and _device() use the current GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(args.backend, timeout=timedelta(seconds=args.timeout))
    rank, k = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    config = {"model": args.model, "norm": args.norm, "steps": args.steps,
              "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "data": args.data,
              "dtype": args.dtype}
    try:
        result = train_data_parallel(rank, k, config)
        if distributed:  # every worker's checksum (DDP keeps them identical) and device
            workers = [None] * k
            dist.all_gather_object(workers, (result["checksum"], result["device"]))
            result["checksums"], result["devices"] = map(list, zip(*workers))
    finally:
        if distributed:
            dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({key: value for key, value in result.items() if key not in ("losses", "weights")}
                         | {"final_loss": result["losses"][-1]}), flush=True)
    return result


if __name__ == "__main__":
    main()
