"""Conformance: normcourse.nn behaves exactly like torch.nn, checked by one table.

Rows: layer spec x constructor options x input kind x dtype. Columns: operations. Every cell runs
the same operation, with the same random input and upstream gradient, on a normcourse module
and on its torch.nn namesake, and asserts identical behaviour: the same outputs, gradients
(first and second order), buffers, state_dict keys and dtypes, or, where torch raises, an
exception of torch's type (normcourse's errors subclass it, see ``normcourse.validation``).

The six items of issue 12 are operations of the table: ``empty_batch``, ``old_state_dict``,
``mixed_dtype``, ``double_backward``, ``torchscript``, ``export``. The differences kept on purpose
are listed in ``DELIBERATE`` with their reason, and each is asserted (ours must give the clearer
behaviour), never skipped.

To add a layer, append a ``LayerSpec`` to ``LAYERS`` (GroupNorm, InstanceNorm1d/2d, RMSNorm,
SyncBatchNorm...): a name, both factories, the constructor options to try, valid input shapes,
empty shapes and the bad inputs. An operation that does not apply to a layer returns ``None``
from its ``applies`` check; a new operation is a function ``op(module, row, gen) -> dict`` added
to ``OPERATIONS``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import itertools
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn

from normcourse import functional as nf
from normcourse import nn as ncnn
from normcourse.validation import DtypeError

torch.set_num_threads(1)

SEED = 1234
F64, F32 = torch.float64, torch.float32


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    name: str
    ours: Callable[..., nn.Module]
    theirs: Callable[..., nn.Module]
    args: tuple  # positional constructor arguments (num_features, normalized_shape...)
    options: tuple[dict, ...]  # keyword options to try, one row each
    shapes: tuple[tuple[int, ...], ...]  # valid inputs; the first is used by single-shape ops
    empty_shapes: tuple[tuple[int, ...], ...]
    bad_inputs: dict = field(default_factory=dict)  # name -> shape that the layer must reject
    kinds: tuple[str, ...] = ("contiguous", "strided")
    has_running_stats: bool = False


BATCH_NORM_OPTIONS = (
    {},
    {"affine": False},
    {"bias": False},
    {"momentum": None},
    {"track_running_stats": False},
    {"affine": False, "track_running_stats": False},
    {"eps": 1e-3, "momentum": 0.3},
)
LAYER_NORM_OPTIONS = ({}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-3})
INSTANCE_NORM_OPTIONS = (
    {},
    {"affine": True},
    {"track_running_stats": True},
    {"affine": True, "track_running_stats": True, "momentum": 0.3},
    {"track_running_stats": True, "momentum": None},
)

LAYERS = [
    LayerSpec(
        "BatchNorm1d", ncnn.BatchNorm1d, nn.BatchNorm1d, (4,), BATCH_NORM_OPTIONS,
        shapes=((6, 4), (3, 4, 5)), empty_shapes=((0, 4), (2, 4, 0), (0, 4, 3)),
        bad_inputs={"wrong_channels": (6, 5), "wrong_rank": (2, 4, 3, 3),
                    "one_value_per_channel": (1, 4)},
        has_running_stats=True,
    ),
    LayerSpec(
        "BatchNorm2d", ncnn.BatchNorm2d, nn.BatchNorm2d, (4,), BATCH_NORM_OPTIONS,
        shapes=((3, 4, 3, 2),), empty_shapes=((0, 4, 3, 3), (2, 4, 0, 3)),
        bad_inputs={"wrong_channels": (3, 5, 2, 2), "wrong_rank": (6, 4),
                    "one_value_per_channel": (1, 4, 1, 1)},
        kinds=("contiguous", "strided", "channels_last"), has_running_stats=True,
    ),
    LayerSpec(
        "LayerNorm", ncnn.LayerNorm, nn.LayerNorm, (4,), LAYER_NORM_OPTIONS,
        shapes=((6, 4), (2, 3, 4)), empty_shapes=((0, 4), (2, 0, 4)),
        bad_inputs={"wrong_channels": (6, 5), "wrong_rank": ()},
    ),
    LayerSpec(
        "LayerNorm2", ncnn.LayerNorm, nn.LayerNorm, ((3, 4),), LAYER_NORM_OPTIONS,
        shapes=((5, 3, 4),), empty_shapes=((0, 3, 4),),
        bad_inputs={"wrong_channels": (5, 4, 3), "wrong_rank": (4,)},
    ),
    # chapter 8: normalization without the batch
    LayerSpec(
        "GroupNorm", ncnn.GroupNorm, nn.GroupNorm, (2, 4),
        ({}, {"affine": False}, {"bias": False}, {"eps": 1e-3}),
        shapes=((3, 4, 3, 2), (2, 4, 5)), empty_shapes=((0, 4, 3, 3), (0, 4)),
        bad_inputs={"wrong_channels": (3, 6, 2, 2), "wrong_rank": (4,)},
    ),
    LayerSpec(
        "InstanceNorm1d", ncnn.InstanceNorm1d, nn.InstanceNorm1d, (4,), INSTANCE_NORM_OPTIONS,
        shapes=((3, 4, 5), (4, 6)), empty_shapes=((0, 4, 3),),
        bad_inputs={"wrong_channels": (3, 5, 4), "wrong_rank": (2, 4, 3, 3),
                    "one_value_per_channel": (3, 4, 1)},
    ),
    LayerSpec(
        "InstanceNorm2d", ncnn.InstanceNorm2d, nn.InstanceNorm2d, (4,), INSTANCE_NORM_OPTIONS,
        shapes=((3, 4, 3, 2), (4, 2, 3)), empty_shapes=((0, 4, 3, 3),),
        bad_inputs={"wrong_channels": (3, 5, 2, 2), "wrong_rank": (6, 4),
                    "one_value_per_channel": (3, 4, 1, 1)},
    ),
    LayerSpec(
        "RMSNorm", ncnn.RMSNorm, nn.RMSNorm, ((3, 4),),
        ({}, {"elementwise_affine": False}, {"eps": 1e-3}),
        shapes=((5, 3, 4), (3, 4)), empty_shapes=((0, 3, 4),),
        bad_inputs={"wrong_channels": (5, 4, 3), "wrong_rank": (4,)},
    ),
    # chapter 10: without a process group both are batch norm on any input of 2 to 5 axes (the
    # synchronized path itself needs workers: tests/test_sync_batch_norm.py); with one, torch's
    # refuses CPU tensors in training (the "process_group" operation, a deliberate difference)
    LayerSpec(
        "SyncBatchNorm", ncnn.SyncBatchNorm, nn.SyncBatchNorm, (4,), BATCH_NORM_OPTIONS,
        shapes=((3, 4, 3, 2), (6, 4), (3, 4, 5), (2, 4, 2, 3, 2)),
        empty_shapes=((0, 4, 3, 3), (0, 4), (2, 4, 0)),
        bad_inputs={"wrong_channels": (3, 5, 2, 2), "wrong_rank": (4,),
                    "one_value_per_channel": (1, 4)},
        has_running_stats=True,
    ),
]


@dataclass(frozen=True)
class Row:
    spec: LayerSpec
    options: dict
    kind: str
    dtype: torch.dtype

    @property
    def id(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items()) or "defaults"
        return f"{self.spec.name}[{opts}]-{self.kind}-{str(self.dtype)[6:]}"

    def build(self, ours: bool) -> nn.Module:
        """A module with random parameters and running statistics, the same for both sides."""
        factory = self.spec.ours if ours else self.spec.theirs
        module = factory(*self.spec.args, **self.options, dtype=self.dtype)
        gen = torch.Generator().manual_seed(SEED + 1)
        with torch.no_grad():
            for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
                if name == "num_batches_tracked":
                    continue
                values = torch.randn(t.shape, generator=gen, dtype=F64)
                t.copy_(values.abs() + 0.5 if name in ("running_var", "weight") else values)
        return module

    def input(self, gen, shape=None, dtype=None) -> torch.Tensor:
        """x of the row's kind: contiguous, a strided view, or channels_last."""
        shape = self.spec.shapes[0] if shape is None else shape
        dtype = self.dtype if dtype is None else dtype
        if self.kind == "strided":
            wide = 3.0 + 2.0 * torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=F64)
            return wide[..., ::2].to(dtype) if dtype != F64 else wide[..., ::2]
        x = (3.0 + 2.0 * torch.randn(shape, generator=gen, dtype=F64)).to(dtype)
        if self.kind == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        return x


ROWS = [
    Row(spec, options, kind, dtype)
    for spec in LAYERS
    for options in spec.options
    for kind in spec.kinds
    for dtype in (F64, F32)
]


# ---------------------------------------------------------------------------------------------
# Operations: op(module, row, gen) -> dict of what must be identical
# ---------------------------------------------------------------------------------------------
def _state(module, prefix="") -> dict:
    return {f"{prefix}{k}": v.detach().clone() for k, v in module.state_dict().items()}


def _forward_backward(module, x, gen, prefix="") -> dict:
    """y = module(x), then a random upstream gradient; outputs, grads and buffers."""
    x = x.detach().requires_grad_()
    for p in module.parameters():
        p.grad = None
    y = module(x)
    dy = torch.randn(y.shape, generator=gen, dtype=F64).to(y.dtype)
    y.backward(dy)
    record = {f"{prefix}y": y.detach(), f"{prefix}dx": x.grad}
    if x.ndim == 4:
        for name, t in (("y", y), ("dx", x.grad)):
            record[f"{prefix}{name} channels_last"] = t.is_contiguous(memory_format=torch.channels_last)
    record.update({f"{prefix}grad {n}": p.grad for n, p in module.named_parameters()})
    record.update(_state(module, prefix))
    return record


def op_train_eval(module, row, gen):
    """Three training steps on every valid shape, then eval, then no_grad in training mode."""
    record = {}
    for shape in row.spec.shapes:
        module.train()
        for step in range(3):
            record.update(_forward_backward(module, row.input(gen, shape), gen, f"{shape} train{step} "))
        module.eval()
        record.update(_forward_backward(module, row.input(gen, shape), gen, f"{shape} eval "))
        module.train()
        with torch.no_grad():  # grad mode does not decide train/eval
            record[f"{shape} no_grad y"] = module(row.input(gen, shape))
        record.update(_state(module, f"{shape} after no_grad "))
    return record


def op_state_dict(module, row, gen):
    """Keys, order, parameter/buffer split and dtypes, before and after a training step."""
    module.train()
    _forward_backward(module, row.input(gen), gen)
    sd = module.state_dict()
    return {
        "keys": list(sd),
        "dtypes": [str(v.dtype) for v in sd.values()],
        "parameters": [n for n, _ in module.named_parameters()],
        "buffers": [n for n, _ in module.named_buffers()],
        "version": sd._metadata[""].get("version"),
        **_state(module),
    }


def op_empty_batch(module, row, gen):
    """Issue 12, items 1 and 2: empty output, statistics untouched, the batch still counted."""
    record = {}
    for shape in row.spec.empty_shapes:
        for mode in ("train", "eval"):
            module.train(mode == "train")
            record.update(_forward_backward(module, row.input(gen, shape), gen, f"{shape} {mode} "))
    return record


def op_old_state_dict(module, row, gen):
    """Issue 12, item 3: a state_dict from before num_batches_tracked (version 1, or none)."""
    module.train()
    _forward_backward(module, row.input(gen), gen)
    record = {}
    for variant in ("version 1", "plain dict", "version 2, strict", "version 2, not strict"):
        sd = module.state_dict()
        sd.pop("num_batches_tracked", None)
        if variant == "version 1":
            sd._metadata[""]["version"] = 1
        elif variant == "plain dict":
            sd = dict(sd)
        target = copy.deepcopy(module)
        if getattr(target, "num_batches_tracked", None) is not None:
            target.num_batches_tracked.fill_(7)
        try:
            result = target.load_state_dict(sd, strict=variant != "version 2, not strict")
            record[f"{variant} missing"] = list(result.missing_keys)
            record[f"{variant} unexpected"] = list(result.unexpected_keys)
        except Exception as e:  # compared by type: the layers must fail alike
            record[f"{variant} raises"] = type(e).__name__
        record.update(_state(target, f"{variant} "))
    return record


def op_mixed_dtype(module, row, gen):
    """Issue 12, item 4: torch's CPU rule: the same dtype, or half input with float32 module."""
    record = {}
    others = {F32: (F64, torch.float16, torch.bfloat16), F64: (F32,)}[row.dtype]
    for mode, other in itertools.product(("train", "eval"), others):
        m = copy.deepcopy(module).train(mode == "train")
        try:
            record.update(_forward_backward(m, row.input(gen, dtype=other), gen, f"{mode} {other} "))
        except Exception as e:
            record[f"{mode} {other} raises"] = e
    return record


def op_double_backward(module, row, gen):
    """Issue 12, item 5: second derivatives (what a gradient penalty or an HVP computes)."""
    record = {}
    for mode in ("train", "eval"):
        module.train(mode == "train")
        x = row.input(gen).detach().requires_grad_()
        params = list(module.parameters())
        y = module(x)
        dy = torch.randn(y.shape, generator=gen, dtype=F64).to(y.dtype).requires_grad_()
        inputs = [x, *params, dy]
        first = torch.autograd.grad(y, inputs[:-1], dy, create_graph=True, materialize_grads=True)
        vs = [torch.randn(g.shape, generator=gen, dtype=F64).to(g.dtype) for g in first]
        s = sum((g * v).sum() for g, v in zip(first, vs))
        second = torch.autograd.grad(s, inputs, materialize_grads=True)
        record.update({f"{mode} d{i}": g.detach() for i, g in enumerate(first)})
        record.update({f"{mode} dd{i}": g for i, g in enumerate(second)})
    return record


def op_torchscript(module, row, gen):
    """Issue 12, item 6: torch.jit.script of a model holding the layer."""
    scripted = torch.jit.script(nn.Sequential(nn.Identity(), module).eval())
    return {"y": scripted(row.input(gen))}


def op_export(module, row, gen):
    """Issue 12, item 6: torch.export.export of a model with the layer, in eval and training."""
    record = {}
    for mode in ("eval", "train"):
        model = nn.Sequential(nn.Identity(), copy.deepcopy(module)).train(mode == "train")
        program = torch.export.export(model, (row.input(gen),))
        exported = program.module()
        x = row.input(gen)
        record[f"{mode} y"] = exported(x)
        record[f"{mode} eager y"] = model(x)
        record.update(_state(exported, f"{mode} exported "))
    return record


def op_serialize(module, row, gen):
    """torch.save / torch.load of the whole module, then a step in each mode."""
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    record = {"repr": repr(loaded)[repr(loaded).index("("):]}
    for mode in ("train", "eval"):
        loaded.train(mode == "train")
        record.update(_forward_backward(loaded, row.input(gen), gen, f"{mode} "))
    return record


def _bad_input_op(name: str, mode: str):
    def op(module, row, gen):
        shape = row.spec.bad_inputs[name]
        module.train(mode == "train")
        return _forward_backward(module, row.input(gen, shape) if shape else torch.tensor(1.0), gen)
    op.__doc__ = f"the bad input {name!r} in {mode} mode: rejected like torch (type of error)"
    return op


def op_integer_input(module, row, gen):
    module.train()
    return {"y": module(torch.ones(row.spec.shapes[0], dtype=torch.long))}


def op_process_group(module, row, gen, group=True):
    """Training with an initialized process group of one gloo worker, on CPU tensors."""
    record = {}
    with _group_of_one() if group else contextlib.nullcontext():
        module.train()
        record.update(_forward_backward(module, row.input(gen), gen, "group "))
    return record


@contextlib.contextmanager
def _group_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class Operation:
    name: str
    fn: Callable
    dtypes: tuple = (F64, F32)
    kinds: tuple | None = None  # None: every kind of the layer
    applies: Callable = lambda row: True


OPERATIONS = [
    Operation("train_eval", op_train_eval),
    Operation("state_dict", op_state_dict, dtypes=(F32,), kinds=("contiguous",)),
    Operation("empty_batch", op_empty_batch, kinds=("contiguous",)),
    Operation("old_state_dict", op_old_state_dict, dtypes=(F32,), kinds=("contiguous",),
              applies=lambda row: row.spec.has_running_stats),
    Operation("mixed_dtype", op_mixed_dtype, kinds=("contiguous",)),
    Operation("double_backward", op_double_backward),
    Operation("torchscript", op_torchscript, dtypes=(F32,), kinds=("contiguous",)),
    Operation("export", op_export, dtypes=(F32,), kinds=("contiguous",)),
    Operation("serialize", op_serialize, dtypes=(F32,), kinds=("contiguous",)),
    Operation("integer_input", op_integer_input, dtypes=(F32,), kinds=("contiguous",)),
    Operation("process_group", op_process_group, kinds=("contiguous",),
              applies=lambda row: row.spec.name == "SyncBatchNorm"),
] + [
    Operation(f"{bad}_{mode}", _bad_input_op(bad, mode), dtypes=(F32,), kinds=("contiguous",),
              applies=lambda row, bad=bad: bad in row.spec.bad_inputs)
    for bad in ("wrong_channels", "wrong_rank", "one_value_per_channel")
    for mode in ("train", "eval")
]

CASES = [
    pytest.param(row, op, id=f"{op.name}-{row.id}")
    for row in ROWS
    for op in OPERATIONS
    if row.dtype in op.dtypes and (op.kinds is None or row.kind in op.kinds) and op.applies(row)
]


# ---------------------------------------------------------------------------------------------
# Differences kept on purpose: (operation, row) -> reason; each is asserted below
# ---------------------------------------------------------------------------------------------
def _no_per_channel_tensor(row) -> bool:
    return row.options.get("affine") is False and row.options.get("track_running_stats") is False


DELIBERATE = {
    "torchscript": (
        lambda row: True,
        "TorchScript cannot compile an autograd.Function and is deprecated upstream; ours "
        "raises a RuntimeError that points to torch.compile and torch.export (tested: export); "
        "torch's own SyncBatchNorm cannot be scripted either (a TorchScript RuntimeError)",
    ),
    "wrong_channels_train": (
        lambda row: (row.spec.has_running_stats and _no_per_channel_tensor(row))
        or (row.spec.name == "GroupNorm" and row.options.get("affine") is False),
        "with neither gamma/beta nor running statistics torch has nothing to compare the "
        "channel count with and normalizes any C (any C divisible by G for GroupNorm); ours "
        "still enforces num_features / num_channels",
    ),
    "wrong_channels_eval": (
        lambda row: (row.spec.has_running_stats and _no_per_channel_tensor(row))
        or (row.spec.name == "GroupNorm" and row.options.get("affine") is False),
        "as wrong_channels_train",
    ),
    "mixed_dtype": (
        lambda row: (row.spec.name == "RMSNorm" and row.options.get("elementwise_affine", True))
        or (row.spec.name.startswith("InstanceNorm") and row.options.get("track_running_stats")),
        "torch's RMSNorm (a composite on CPU) and InstanceNorm (running statistics updated "
        "through a copy) silently compute with mixed dtypes; ours raises DtypeError, as our "
        "batch norm and layer norm do",
    ),
    "process_group": (
        lambda row: True,
        "torch's SyncBatchNorm refuses CPU tensors in training as soon as a process group is "
        "initialized (ValueError: it expects a GPU), even for a group of one; ours works with "
        "gloo on CPU, and for a group of one is exactly batch norm (asserted against torch's "
        "batch norm, i.e. torch's SyncBatchNorm without a group)",
    ),
    "empty_batch": (
        lambda row: row.spec.name.startswith("InstanceNorm")
        and (row.options.get("affine") or row.options.get("track_running_stats")),
        "torch's InstanceNorm raises an IndexError (select() on an empty tensor) for an empty "
        "batch with affine=True, and sets its running statistics to NaN (an average over zero "
        "instances) without; ours returns the empty output and leaves the statistics alone, "
        "as batch norm does",
    ),
}


def _assert_deliberate(op_name, our_exc, our_result=None, their_exc=None, row=None):
    if op_name == "process_group":
        assert isinstance(their_exc, ValueError) and "GPU" in str(their_exc), their_exc
        assert our_exc is None, f"ours raised {our_exc!r}"
        gen = torch.Generator().manual_seed(SEED)
        without_group = op_process_group(row.build(ours=False), row, gen, group=False)
        _assert_same(our_result, without_group)
        return
    if op_name == "mixed_dtype":
        assert our_exc is None and their_exc is None
        raised = [v for k, v in our_result.items() if k.endswith(" raises")]
        assert raised and all(isinstance(e, DtypeError) for e in raised), our_result
        return
    if op_name == "empty_batch":
        assert their_exc is None or isinstance(their_exc, IndexError), f"torch changed: {their_exc!r}"
        assert our_exc is None and all(v.numel() == 0 for k, v in our_result.items()
                                       if k.endswith(" y") or k.endswith(" dx")), our_result
        assert all(torch.isfinite(v).all() for k, v in our_result.items() if "running" in k)
        return
    scripts = op_name != "torchscript" or row is None or row.spec.name != "SyncBatchNorm"
    assert their_exc is None if scripts else isinstance(their_exc, RuntimeError), \
        f"torch changed: {their_exc!r}"
    assert our_exc is not None, f"{op_name}: ours was expected to reject this"
    if op_name == "torchscript":
        assert isinstance(our_exc, RuntimeError)
        assert "torch.compile" in str(our_exc) and "torch.export" in str(our_exc)
    else:
        assert isinstance(our_exc, ValueError) and "num_features=4" in str(our_exc), our_exc


def _outcome(op, row, ours: bool):
    module = row.build(ours)
    gen = torch.Generator().manual_seed(SEED)
    try:
        return op.fn(module, row, gen), None
    except Exception as e:  # the exception itself is part of the behaviour compared
        return None, e


def _tolerance(key: str, a, b) -> dict:
    """float64: 1e-9. Results of a half-precision input (the key names its dtype): four units in
    the last place of that dtype, at the tensor's scale (the two libraries round intermediate
    values at different steps). Otherwise torch's defaults for the dtype."""
    for low in (torch.bfloat16, torch.float16):
        if str(low) in key:
            ulp = torch.finfo(low).eps
            scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
            return {"rtol": 4 * ulp, "atol": 4 * ulp * scale}
    return {"rtol": 1e-9, "atol": 1e-9} if a.dtype == F64 else {}


def _assert_same(ours, theirs):
    assert ours.keys() == theirs.keys()
    for key, a in ours.items():
        b = theirs[key]
        if isinstance(a, BaseException) or isinstance(b, BaseException):
            assert isinstance(a, type(b)), f"{key}: torch raised {b!r}, ours {a!r}"
        elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), key
            assert a.shape == b.shape and a.dtype == b.dtype, (key, a.shape, b.shape, a.dtype, b.dtype)
            torch.testing.assert_close(a, b, **_tolerance(key, a, b), msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert a == b, (key, a, b)


@pytest.mark.parametrize("row,op", CASES)
def test_conformance(row, op):
    our_result, our_exc = _outcome(op, row, ours=True)
    their_result, their_exc = _outcome(op, row, ours=False)
    deliberate = DELIBERATE.get(op.name)
    if deliberate and deliberate[0](row):
        _assert_deliberate(op.name, our_exc, our_result, their_exc, row)
        return
    if their_exc is not None:
        assert our_exc is not None, f"torch raised {their_exc!r}; ours did not"
        assert isinstance(our_exc, type(their_exc)), f"torch raised {their_exc!r}, ours {our_exc!r}"
        return
    assert our_exc is None, f"torch succeeded; ours raised {our_exc!r}"
    _assert_same(our_result, their_result)


def test_the_table_covers_every_issue_item_and_every_layer():
    ops = {case.values[1].name for case in CASES}
    assert {"empty_batch", "old_state_dict", "mixed_dtype", "double_backward", "torchscript",
            "export"} <= ops
    assert {case.values[0].spec.name for case in CASES} == {spec.name for spec in LAYERS}
    assert len(CASES) > 300


# ---------------------------------------------------------------------------------------------
# SyncBatchNorm beyond the table: constructor and convert_sync_batchnorm
# ---------------------------------------------------------------------------------------------
def test_sync_batch_norm_takes_torchs_arguments_with_torchs_defaults():
    """torch's parameters, in torch's order, with torch's defaults; ours adds only the
    keyword-only ``statistics`` (how the workers' statistics are combined)."""
    ours = inspect.signature(ncnn.SyncBatchNorm.__init__).parameters
    theirs = inspect.signature(nn.SyncBatchNorm.__init__).parameters
    assert list(ours)[: len(theirs)] == list(theirs) and list(ours)[len(theirs):] == ["statistics"]
    for name, parameter in theirs.items():
        assert (ours[name].kind, ours[name].default) == (parameter.kind, parameter.default), name
    assert ours["statistics"].kind is inspect.Parameter.KEYWORD_ONLY
    args = (4, 1e-3, 0.3, True, False, None)
    for a, b in ((ncnn.SyncBatchNorm(*args), nn.SyncBatchNorm(*args)),
                 (ncnn.SyncBatchNorm(4), nn.SyncBatchNorm(4))):
        for attribute in ("num_features", "eps", "momentum", "affine", "track_running_stats",
                          "process_group", "training"):
            assert getattr(a, attribute) == getattr(b, attribute), attribute
        assert repr(a) == repr(b)
    assert inspect.signature(ncnn.SyncBatchNorm.convert_sync_batchnorm).parameters.keys() == \
        inspect.signature(nn.SyncBatchNorm.convert_sync_batchnorm).parameters.keys()


def _model_with_batch_norms() -> nn.Module:
    torch.manual_seed(SEED)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3, affine=False, momentum=None)),
        nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.BatchNorm1d(5, eps=1e-3),
        nn.BatchNorm1d(5, track_running_stats=False),
    ).double()
    with torch.no_grad():  # running statistics and a counter that are not the defaults
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(3)
    model[1].eval()
    return model


def test_convert_sync_batchnorm_does_what_torchs_does():
    """Both converters replace the same layers, keep the same Parameter and buffer objects, the
    same train/eval modes, state_dict and outputs (train and eval, without a process group);
    ours also converts normcourse.nn's batch norms, which torch's does not know."""
    original = _model_with_batch_norms()
    ours = ncnn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(original))
    theirs = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(original))
    kinds = lambda model: [type(m).__name__ for m in model.modules()]  # noqa: E731
    assert kinds(ours) == kinds(theirs) and kinds(ours).count("SyncBatchNorm") == 4
    assert [m.training for m in ours.modules()] == [m.training for m in theirs.modules()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    model = _model_with_batch_norms()
    tensors = [*model.parameters(), *model.buffers()]
    converted = ncnn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert all(any(t is c for c in [*converted.parameters(), *converted.buffers()])
               for t in tensors)  # the same objects: an optimizer built before still sees them
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(SEED), dtype=F64)
    for mode in ("eval", "train"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-9, atol=1e-9)
    mixed = nn.Sequential(ncnn.BatchNorm1d(3), nn.BatchNorm1d(3))
    assert [type(m) for m in nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(mixed))] \
        == [ncnn.BatchNorm1d, nn.SyncBatchNorm]
    assert all(isinstance(m, ncnn.SyncBatchNorm)
               for m in ncnn.SyncBatchNorm.convert_sync_batchnorm(mixed))


# ---------------------------------------------------------------------------------------------
# Twice differentiable: gradgradcheck in float64 (batch renorm has no torch.nn counterpart)
# ---------------------------------------------------------------------------------------------
def _gen_inputs(shape, channels_shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (3.0 + 2.0 * torch.randn(shape, generator=gen, dtype=F64)).requires_grad_()
    w = (0.5 + torch.rand(channels_shape, generator=gen, dtype=F64)).requires_grad_()
    b = torch.randn(channels_shape, generator=gen, dtype=F64).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 2, 2)])
def test_batch_norm_gradgradcheck(training, shape):
    x, w, b = _gen_inputs(shape, (3,))
    rm, rv = torch.randn(3, dtype=F64), 0.5 + torch.rand(3, dtype=F64)
    # fresh copies of the running statistics: each call would update them in place
    fn = lambda x, w, b: nf.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("normalized_shape,shape", [((4,), (3, 4)), ((2, 3), (2, 2, 3))])
def test_layer_norm_gradgradcheck(normalized_shape, shape):
    x, w, b = _gen_inputs(shape, normalized_shape)
    fn = lambda x, w, b: nf.layer_norm(x, normalized_shape, w, b, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("clipped", [True, False])
def test_batch_renorm_gradgradcheck(training, clipped):
    """r and d are constants for the gradient (the paper's stop_gradient), so the numerical
    derivative agrees only where they are truly constant: clipped at their limits, or in
    warm-up (rmax=1, dmax=0). Both regimes, and eval."""
    x, w, b = _gen_inputs((6, 3), (3,))
    # running averages far from the batch's: r and d sit at their clips (1/rmax, -dmax)
    rm, rs = torch.full((3,), 100.0, dtype=F64), torch.full((3,), 10.0, dtype=F64)
    rmax, dmax = (3.0, 5.0) if clipped else (1.0, 0.0)

    def fn(x, w, b):
        return nf.batch_renorm(x, rm.clone(), rs.clone(), w, b, training, rmax, dmax, 0.01, 1e-5)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("cls", [ncnn.BatchRenorm1d, ncnn.BatchRenorm2d])
def test_batch_renorm_module_exports_in_eval_mode(cls):
    """Training-mode export is out of reach: the rmax/dmax schedule reads num_batches_tracked
    as a Python number at every step (data-dependent for torch.export)."""
    layer = cls(3)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_std.uniform_(0.5, 2)
    model = nn.Sequential(nn.Identity(), layer).eval()
    shape = (4, 3) if cls is ncnn.BatchRenorm1d else (4, 3, 2, 2)
    x = torch.randn(shape)
    program = torch.export.export(model, (torch.randn(shape),))
    torch.testing.assert_close(program.module()(x), model(x))
