"""normcourse.nn.SyncBatchNorm: k workers, each holding a slice of one batch, compute exactly
what torch.nn.BatchNorm computes on the whole batch in one process.

The workers are started by the tests themselves (``normcourse.launch.run_workers``: spawn, a group
on 127.0.0.1, a free port, a timeout on every collective and on the whole run). To keep the module
fast, one start of k workers runs every case (``_all_cases``) and the tests compare its results.
The same cases run on every setup of ``SETUPS``: gloo on CPUs (always), gloo over CUDA tensors on
one GPU, and nccl with one process per GPU (each skipped, with its reason, where the machine
lacks what it needs). Every setup computes in float64 (nccl and gloo move it, GPUs compute it)
against a float64 CPU reference, so one tolerance serves them all.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from functools import lru_cache

import pytest
import torch
import torch.distributed as dist
from torch import nn

import normcourse.nn as ncnn
from normcourse import models
from normcourse.launch import WorkerError, free_port, run_workers
from normcourse.validation import check_collective_device
from normcourse.sync_batch_norm import (
    STATISTICS,
    SyncBatchNorm,
    SyncBatchNormFunction,
    global_moments,
    merge_moments,
)

torch.set_num_threads(1)

STEPS = 3  # training steps per case: the running statistics accumulate over several batches
# name: (global batch shape, slice sizes per world size); "fc" has unequal slices, one of them
# a single example and one empty
CASES = {
    "conv": ((16, 3, 4, 4), {2: (8, 8), 4: (4, 4, 4, 4)}),
    "fc": ((13, 4), {2: (9, 4), 4: (1, 5, 0, 7)}),
    "seq": ((10, 3, 6), {2: (3, 7), 4: (2, 2, 3, 3)}),
}
# float64 rounding: a few units in the last place of numbers of order 1
TOL = {"rtol": 1e-12, "atol": 1e-12}

CUDA_DEVICES = torch.cuda.device_count() if torch.cuda.is_available() else 0
NCCL = dist.is_available() and dist.is_nccl_available()
NEEDS_CUDA = pytest.mark.skipif(CUDA_DEVICES < 1, reason="needs a CUDA device")


def _nccl_setup(world_size: int):
    reason = f"needs {world_size} CUDA devices and nccl"
    return pytest.param(
        "nccl", "cuda", world_size, id=f"nccl-cuda-k{world_size}",
        marks=pytest.mark.skipif(not NCCL or CUDA_DEVICES < world_size, reason=reason))


# (backend, device, world size): where the workers run. "cuda" is each worker's current device:
# cuda:rank under nccl (run_workers sets it), the one GPU cuda:0 for every gloo worker
SETUPS = [
    pytest.param("gloo", "cpu", 2, id="gloo-cpu-k2"),
    pytest.param("gloo", "cpu", 4, id="gloo-cpu-k4"),
    pytest.param("gloo", "cuda", 2, id="gloo-cuda-k2", marks=NEEDS_CUDA),
    _nccl_setup(2),
]


def _batch(name: str, step: int):
    """The global batch x and upstream gradient dy (float64) of one case and step."""
    shape = CASES[name][0]
    g = torch.Generator().manual_seed(1000 * step + len(name))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2
    dy = torch.randn(shape, generator=g, dtype=torch.float64)  # random: sum(BN(x)) is constant
    return x, dy


def _affine(layer, c: int) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))


def _run_case(layer, name: str, rows: slice, device="cpu") -> dict:
    """Train ``layer`` (on ``device``) for STEPS steps on rows ``rows`` of each batch; record
    everything (on ``device``)."""
    c = CASES[name][0][1]
    _affine(layer, c)
    record = {"out": [], "dx": [], "dweight": [], "dbias": []}
    for step in range(STEPS):
        x, dy = (t[rows].to(device) for t in _batch(name, step))
        x = x.clone().requires_grad_()
        layer.weight.grad = layer.bias.grad = None
        out = layer(x)
        (out * dy).sum().backward()
        for key, value in zip(record, (out, x.grad, layer.weight.grad, layer.bias.grad)):
            record[key].append(value.detach().clone())
    record["running"] = [b.clone() for b in (layer.running_mean, layer.running_var,
                                             layer.num_batches_tracked)]
    layer.eval()
    record["eval_out"] = layer(_batch(name, STEPS)[0][rows].to(device)).detach()
    return record


def _all_cases(rank: int, world_size: int, device: str = "cpu") -> dict:
    """Worker: every case with SyncBatchNorm on this worker's slice, both statistics modes.

    ``device``: "cpu", or "cuda" for this worker's current GPU. The results come back to the
    test process on the CPU (run_workers)."""
    device = torch.device(device, torch.cuda.current_device()) if device == "cuda" else device
    results = {}
    for name, (shape, splits) in CASES.items():
        sizes = splits[world_size]
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        for statistics in STATISTICS:
            layer = SyncBatchNorm(shape[1], dtype=torch.float64, statistics=statistics,
                                  device=device)
            results[name, statistics] = _run_case(layer, name, rows, device)
    results["device"] = str(device)
    return results


def _torch_batch_norm(shape) -> nn.Module:
    layer = nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d
    return layer(shape[1], dtype=torch.float64)


@lru_cache(maxsize=None)
def _reference(name: str) -> dict:
    """One process, torch.nn.BatchNorm on the whole batch."""
    shape = CASES[name][0]
    return _run_case(_torch_batch_norm(shape), name, slice(None))


@lru_cache(maxsize=None)
def _workers(backend: str, device: str, world_size: int) -> list:
    results = run_workers(_all_cases, world_size, device, timeout_s=240, collective_timeout_s=60,
                          backend=backend)
    # the setup really ran where it says: nccl's workers on distinct GPUs, cuda:rank
    expected = [f"cuda:{r}" if backend == "nccl" else "cuda:0" if device == "cuda" else "cpu"
                for r in range(world_size)]
    assert [r["device"] for r in results] == expected
    return results


def _max_error(a, b) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("backend, device, world_size", SETUPS)
@pytest.mark.parametrize("statistics", STATISTICS)
@pytest.mark.parametrize("name", list(CASES))
def test_k_workers_equal_one_process_on_the_whole_batch(backend, device, world_size, statistics,
                                                        name):
    ranks = [results[name, statistics] for results in _workers(backend, device, world_size)]
    ref = _reference(name)
    worst = 0.0
    for step in range(STEPS):
        for key in ("out", "dx"):  # the slices, put back together, are the whole batch's
            ours = torch.cat([r[key][step] for r in ranks])
            torch.testing.assert_close(ours, ref[key][step], **TOL)
            worst = max(worst, _max_error(ours, ref[key][step]))
        for key in ("dweight", "dbias"):  # local sums; DDP adds (averages) them across workers
            ours = torch.stack([r[key][step] for r in ranks]).sum(0)
            torch.testing.assert_close(ours, ref[key][step], **TOL)
            worst = max(worst, _max_error(ours, ref[key][step]))
    for r in ranks:  # every worker holds the same running statistics: the global ones
        for ours, theirs in zip(r["running"], ref["running"]):
            torch.testing.assert_close(ours, theirs, **TOL)
            worst = max(worst, _max_error(ours.double(), theirs.double()))
    torch.testing.assert_close(torch.cat([r["eval_out"] for r in ranks]), ref["eval_out"], **TOL)
    print(f"{name}, {backend} on {device}, k={world_size}, {statistics}: "
          f"max abs error {worst:.1e}")


def test_per_worker_statistics_would_differ():
    """The check above has teeth: plain batch norm on each slice gives other outputs."""
    name = "conv"
    ref = _reference(name)
    per_worker = [
        _run_case(_torch_batch_norm(CASES[name][0]), name, slice(8 * i, 8 * i + 8))["out"][0]
        for i in range(2)
    ]
    assert _max_error(torch.cat(per_worker), ref["out"][0]) > 1e-3


def _hang(rank: int, world_size: int):
    if rank == 1:
        time.sleep(600)
    return rank


def _crash(rank: int, world_size: int):
    if rank == 1:
        raise RuntimeError("deliberate failure in worker 1")
    return rank


def _die(rank: int, world_size: int):
    if rank == 1:
        os._exit(3)
    return rank


def test_unknown_backend_is_refused_before_any_worker_starts():
    with pytest.raises(ValueError, match="unknown backend 'mpi'; choose one of 'gloo', 'nccl'"):
        run_workers(_crash, 2, backend="mpi")


def test_nccl_without_enough_gpus_is_refused_before_any_worker_starts(monkeypatch):
    """nccl needs one GPU per process; the check runs in the caller, so no worker starts (the
    error is not a WorkerError) whatever GPUs this machine has: torch's answers are faked."""
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match=r"run_workers: backend 'nccl' needs one CUDA device "
                       r"per process, but 2 processes were asked for and 1 CUDA device\(s\) "
                       r"are visible; start at most 1 per machine, or use backend='gloo'"):
        run_workers(_crash, 2, backend="nccl")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(RuntimeError, match=r"0 CUDA device\(s\) are visible; use backend='gloo'"):
        run_workers(_crash, 2, backend="nccl")


def test_nccl_missing_from_torch_is_refused_before_any_worker_starts(monkeypatch):
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    with pytest.raises(RuntimeError, match="backend 'nccl' is not available in this torch build"):
        run_workers(_crash, 2, backend="nccl")


def test_an_nccl_group_gets_a_clear_error_for_a_cpu_input(monkeypatch):
    """As torch.nn.SyncBatchNorm, a ValueError; here before any collective. The group of two
    nccl processes is faked (no GPU here): only its world size and backend are asked for."""
    import normcourse.sync_batch_norm as sbn

    monkeypatch.setattr(sbn, "world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(ValueError, match="SyncBatchNorm: the process group uses nccl, which moves "
                       "CUDA tensors only, but the input is on cpu"):
        SyncBatchNorm(3)(torch.randn(4, 3))
    SyncBatchNorm(3).eval()(torch.randn(4, 3))  # eval mode: no collective, any device
    check_collective_device(torch.zeros(2, 3), "gloo", "SyncBatchNorm")  # gloo takes CPU tensors


def test_a_hanging_worker_fails_the_run_with_a_clear_message():
    start = time.monotonic()
    # worker 0 has finished, or is still starting up on a loaded machine: [1] or [0, 1]
    with pytest.raises(WorkerError, match=r"_hang: worker\(s\) \[(0, )?1\] of 2 still running after 5 s"):
        run_workers(_hang, 2, timeout_s=5)
    assert time.monotonic() - start < 60


def test_a_crashing_worker_fails_the_run_with_its_error():
    with pytest.raises(WorkerError, match="worker 1 of 2 raised:(.|\n)*deliberate failure in worker 1"):
        run_workers(_crash, 2, timeout_s=60, collective_timeout_s=30)


def test_a_dying_worker_fails_the_run_with_its_exit_code():
    with pytest.raises(WorkerError, match=r"worker 1 of 2 died \(exit code 3\)"):
        run_workers(_die, 2, timeout_s=60)


# ---------------------------------------------------------------------------------------------
# One process: no group, a group of one, eval mode
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_without_a_process_group_it_is_batch_norm(name):
    assert not dist.is_initialized()
    ours = _run_case(SyncBatchNorm(CASES[name][0][1], dtype=torch.float64), name, slice(None))
    ref = _reference(name)
    for key in ("out", "dx", "dweight", "dbias"):
        for a, b in zip(ours[key], ref[key]):
            torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(ours["running"], ref["running"]):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(ours["eval_out"], ref["eval_out"], **TOL)


@pytest.fixture
def group_of_one():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_with_a_group_of_one_it_is_batch_norm(group_of_one):
    name = "conv"
    ours = _run_case(SyncBatchNorm(3, dtype=torch.float64), name, slice(None))
    ref = _reference(name)
    for key in ("out", "dx", "dweight", "dbias"):
        for a, b in zip(ours[key], ref[key]):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sync_path_computes_in_float32(group_of_one, dtype, device):
    """The synchronized code path itself (a group of one gloo process, whose collectives take
    CUDA tensors too), mixed precision: what autocast feeds it on a GPU."""
    torch.manual_seed(0)
    x = (torch.randn(16, 3, 4) * 2 + 5).to(device, dtype).requires_grad_()
    dy = torch.randn(16, 3, 4).to(device, dtype)
    weight = (torch.rand(3) + 0.5).to(device).requires_grad_()
    bias = torch.randn(3).to(device).requires_grad_()
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    out = SyncBatchNormFunction.apply(x, rm, rv, weight, bias, 0.1, 1e-5, None, "chan")
    out.backward(dy)
    assert out.dtype == x.grad.dtype == dtype and weight.grad.dtype == torch.float32
    assert out.device == x.grad.device == weight.grad.device == rm.device == x.device
    # the reference: torch's batch norm in float32 on the CPU
    x32 = x.detach().float().cpu().requires_grad_()
    w32 = weight.detach().cpu().requires_grad_()
    b32 = bias.detach().cpu().requires_grad_()
    ref = nn.functional.batch_norm(x32, torch.zeros(3), torch.ones(3), w32, b32, True)
    ref.backward(dy.float().cpu())
    torch.testing.assert_close(out.float().cpu(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x.grad.float().cpu(), x32.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(weight.grad.cpu(), w32.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rm.cpu(), torch.zeros(3).lerp_(x32.detach().mean((0, 2)), 0.1))


def test_global_moments_of_half_precision_input_are_float32(group_of_one):
    """A float16 count is exact only up to 2048: 3 * 1025 = 3075 values per channel here
    (3076 in float16)."""
    x = (torch.randn(3, 3, 1025) + 3).half()
    count, mean, var = global_moments(x)
    assert count.dtype == mean.dtype == var.dtype == torch.float32 and count.item() == 3075
    torch.testing.assert_close(mean, x.float().mean((0, 2)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, x.float().var((0, 2), unbiased=False), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("statistics", STATISTICS)
def test_global_moments_of_a_group_of_one_are_the_batch_moments(group_of_one, statistics):
    x = torch.randn(6, 3, 5, dtype=torch.float64) + 4
    count, mean, var = global_moments(x, statistics=statistics)
    assert count.item() == 30
    torch.testing.assert_close(mean, x.mean((0, 2)), **TOL)
    torch.testing.assert_close(var, x.var((0, 2), unbiased=False), rtol=1e-10, atol=1e-12)


def test_merge_moments_is_chans_update():
    x = torch.randn(50, 4, dtype=torch.float64) * 2 + 100
    parts = [x[:0], x[:7], x[7:20], x[20:]]  # one empty part
    moments = [(torch.tensor([float(len(p))], dtype=torch.float64),
                p.mean(0) if len(p) else torch.zeros(4, dtype=torch.float64),
                ((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(4, dtype=torch.float64))
               for p in parts]
    merged = moments[0]
    for part in moments[1:]:
        merged = merge_moments(*merged, *part)
    count, mean, m2 = merged
    assert count.item() == 50
    torch.testing.assert_close(mean, x.mean(0), **TOL)
    torch.testing.assert_close(m2 / 50, x.var(0, unbiased=False), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The module: arguments, state_dict, input checks, conversion
# ---------------------------------------------------------------------------------------------
def test_same_parameters_buffers_and_state_dict_as_torch():
    ours, theirs = SyncBatchNorm(5, momentum=None), nn.SyncBatchNorm(5, momentum=None)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    ours.load_state_dict(theirs.state_dict())
    no_affine = SyncBatchNorm(5, affine=False, track_running_stats=False)
    assert no_affine.weight is None and no_affine.running_mean is None
    assert repr(ours).startswith("SyncBatchNorm(5, eps=1e-05, momentum=None")


def test_eval_mode_and_no_running_stats_match_torch():
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    for kwargs in ({}, {"track_running_stats": False}, {"momentum": None}):
        ours = SyncBatchNorm(3, dtype=torch.float64, **kwargs)
        theirs = nn.BatchNorm1d(3, dtype=torch.float64, **kwargs)
        for _ in range(2):
            torch.testing.assert_close(ours(x), theirs(x), **TOL)
        ours.eval(), theirs.eval()
        torch.testing.assert_close(ours(x + 1), theirs(x + 1), **TOL)


def test_bad_input_gets_a_clear_error():
    layer = SyncBatchNorm(3)
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(num_features=3\) got 4 channels"):
        layer(torch.randn(5, 4))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="expects input of shape"):
        layer(torch.randn(3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(torch.randn(1, 3))
    with pytest.raises(ValueError, match="unknown statistics 'mean'"):
        SyncBatchNorm(3, statistics="mean")
    with pytest.raises(TypeError, match="float64"):
        layer(torch.randn(5, 3, dtype=torch.float64))


def test_convert_sync_batchnorm_replaces_every_batch_norm_and_keeps_its_state():
    model = nn.Sequential(
        models.mlp(sizes=(784, 20, 10), norm="batch"),
        models.convnet(norm="torch_batch", channels=(4, 8)),
        nn.BatchNorm2d(8),
        ncnn.LayerNorm(8),
    )
    bns = [m for m in model.modules()
           if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, ncnn.BatchNorm1d, ncnn.BatchNorm2d))]
    assert len(bns) == 4
    with torch.no_grad():
        for i, bn in enumerate(bns):
            bn.weight.fill_(i + 2.0)
            bn.running_mean.fill_(i + 0.5)
            bn.num_batches_tracked.fill_(i + 7)
    bns[0].eval()
    weights = [bn.weight for bn in bns]
    group = object()  # stands for a process group; only stored
    converted = SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert converted is model
    syncs = [m for m in model.modules() if isinstance(m, SyncBatchNorm)]
    assert len(syncs) == 4
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, ncnn.BatchNorm1d,
                                  ncnn.BatchNorm2d)) for m in model.modules())
    for i, (sync, weight) in enumerate(zip(syncs, weights)):
        assert sync.weight is weight  # the same Parameter: an existing optimizer still sees it
        assert sync.running_mean.eq(i + 0.5).all() and sync.num_batches_tracked.item() == i + 7
        assert sync.process_group is group
    assert [s.training for s in syncs] == [False, True, True, True]
    assert isinstance(model[3], ncnn.LayerNorm)
    # a batch-norm layer on its own comes back converted
    single = SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(3, affine=False))
    assert isinstance(single, SyncBatchNorm) and single.weight is None


def test_converted_model_computes_what_the_original_did():
    torch.manual_seed(0)
    model = models.convnet(norm="batch", channels=(4, 8))
    x = torch.rand(6, 1, 28, 28)
    import copy
    reference = copy.deepcopy(model)
    SyncBatchNorm.convert_sync_batchnorm(model)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)
