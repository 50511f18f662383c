"""Chapter 3, training with batch norm: a Linear-BN-sigmoid block, train/eval mode, freezing BN,
and an experiment (a learning-rate sweep with and without batch norm).

These tasks take and return PyTorch modules. The compared "outputs" are what a training loop
cares about (the loss, the parameters and running statistics after a step, the modules' modes),
so the same machinery that compares arrays names the mistakes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from normcourse import nn as ncnn
from normcourse.exercises.diagnosis import AnswerProblem, Case, Mistake, OutputTask, Task
from normcourse.exercises.tasks._runs import as_array, small_mnist, trained
from normcourse.train import train

BATCH_NORMS = (nn.BatchNorm1d, ncnn.BatchNorm1d)


# ---- 03.linear_bn_sigmoid -------------------------------------------------------------------
# The task's answer is a module, which cannot leave the process that built it. So the check has
# two halves: ``describe`` builds the block and records what it is and does as plain data (its
# leaf layers, their weights and running statistics, its outputs on ``PROBE`` in eval and in
# training mode), and ``judge`` gives the verdict from that data alone. A notebook's check runs
# both in its own process; the grader runs ``describe`` in the submission's sandbox and ``judge``
# in its own process, where no submission code ran. ``judge`` recomputes the block's outputs
# from the recorded weights, so a description that claims the right layers without their
# behaviour fails.
IN_FEATURES, OUT_FEATURES = 7, 5
PROBE = 2.0 + 3.0 * torch.randn(8, IN_FEATURES, generator=torch.Generator().manual_seed(3))
LAYER_KINDS = (("linear", nn.Linear), ("batch_norm", BATCH_NORMS),
               ("layer_norm", (nn.LayerNorm, ncnn.LayerNorm)), ("sigmoid", nn.Sigmoid))
BLOCK_RTOL, BLOCK_ATOL = 1e-4, 1e-5  # float32 block against its float64 recomputation


def _leaf_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if not list(m.children())]


def _numbers(tensor) -> list[float] | None:
    return None if tensor is None else tensor.detach().double().ravel().tolist()


def _layer(module: nn.Module) -> dict:
    """One leaf layer as data: its kind, and for Linear and batch norm their numbers."""
    kind = next((k for k, types in LAYER_KINDS if isinstance(module, types)), "other")
    layer = {"kind": kind, "type": type(module).__name__}
    if kind == "linear":
        layer.update(in_features=int(module.in_features), out_features=int(module.out_features),
                     weight=_numbers(module.weight), bias=_numbers(module.bias))
    if kind == "batch_norm":
        layer.update(num_features=int(module.num_features), eps=float(module.eps),
                     weight=_numbers(module.weight), bias=_numbers(module.bias),
                     running_mean=_numbers(module.running_mean),
                     running_var=_numbers(module.running_var))
    return layer


def _forward(block: nn.Module, training: bool) -> dict:
    block.train(training)
    try:
        with torch.no_grad():
            out = block(PROBE.clone())
    except Exception as error:
        return {"raised": f"{type(error).__name__}: {error}"[:500]}
    if not isinstance(out, torch.Tensor):
        return {"raised": f"it returned a {type(out).__name__}, not a tensor"}
    return {"shape": list(out.shape), "data": _numbers(out) if out.numel() <= 10_000 else None}


def _expected(linear: dict, norm: dict, training: bool) -> np.ndarray:
    """sigmoid(batch_norm(x W^T)) on PROBE from the recorded numbers, in float64."""
    x = PROBE.double().numpy()
    weight = np.asarray(linear["weight"], dtype=np.float64).reshape(OUT_FEATURES, IN_FEATURES)
    z = x @ weight.T + np.asarray(linear["bias"] or 0.0, dtype=np.float64)
    if training or norm["running_mean"] is None:  # batch statistics (also without running ones)
        mean, var = z.mean(axis=0), z.var(axis=0)
    else:
        mean = np.asarray(norm["running_mean"], dtype=np.float64)
        var = np.asarray(norm["running_var"], dtype=np.float64)
    gamma = np.asarray(1.0 if norm["weight"] is None else norm["weight"], dtype=np.float64)
    beta = np.asarray(0.0 if norm["bias"] is None else norm["bias"], dtype=np.float64)
    y = (z - mean) / np.sqrt(var + float(norm["eps"])) * gamma + beta
    return 1.0 / (1.0 + np.exp(-y))


def _block(in_features, out_features):
    return nn.Sequential(nn.Linear(in_features, out_features, bias=False),
                         nn.BatchNorm1d(out_features), nn.Sigmoid())


@dataclass
class BlockTask(Task):
    """Checks the block ``Linear(bias=False) -> BatchNorm1d -> Sigmoid`` by its structure, in
    ``mistakes``' order (each mistake builds a block that breaks exactly its rule), then by its
    outputs in eval and training mode."""

    correct: Callable | None = None
    mistakes: tuple[Mistake, ...] = ()

    def describe(self, answer) -> dict:
        """What ``answer(7, 5)`` builds, as JSON data (runs where the answer runs)."""
        try:
            block = answer(IN_FEATURES, OUT_FEATURES)
        except NotImplementedError:
            return {"not_implemented": True}
        except Exception as error:
            return {"raised": f"{type(error).__name__}: {error}"[:500]}
        if not isinstance(block, nn.Module):
            return {"returned": type(block).__name__}
        layers = [_layer(m) for m in _leaf_modules(block)]  # before any forward pass
        return {"layers": layers, "eval": _forward(block, False), "train": _forward(block, True)}

    def judge(self, description: dict):
        """The verdict ``(status, message, mistake names)`` from ``describe``'s data alone."""
        call = f"`{self.function}({IN_FEATURES}, {OUT_FEATURES})`"
        if description.get("not_implemented"):
            return "not_implemented", f"`{self.function}` is not implemented yet.", []
        if "raised" in description:
            return "fail", f"{call} raised {description['raised']}.", []
        if "returned" in description:
            return "fail", (f"{call} returned a {str(description['returned'])[:40]}; return a "
                            "module, e.g. nn.Sequential(...)."), []
        layers = description["layers"]
        kinds = [layer["kind"] for layer in layers]
        linears = [layer for layer in layers if layer["kind"] == "linear"]
        norms = [layer for layer in layers if layer["kind"] == "batch_norm"]
        sigmoids = [i for i, kind in enumerate(kinds) if kind == "sigmoid"]
        norm_at = kinds.index("batch_norm") if norms else None
        linear_at = kinds.index("linear") if linears else None
        broken = {
            "no_linear": len(linears) != 1,
            "linear_shape": len(linears) == 1 and (linears[0]["in_features"],
                                                   linears[0]["out_features"]) != (IN_FEATURES, OUT_FEATURES),
            "layer_norm": "layer_norm" in kinds and not norms,
            "no_batchnorm": len(norms) != 1,
            "batchnorm_features": len(norms) == 1 and norms[0]["num_features"] != OUT_FEATURES,
            "no_sigmoid": len(sigmoids) != 1,
            "redundant_bias": len(linears) == 1 and linears[0]["bias"] is not None,
            "norm_after_activation": bool(norms) and bool(sigmoids) and norm_at > sigmoids[0],
            "norm_before_linear": bool(norms) and bool(linears) and norm_at < linear_at,
        }
        for mistake in self.mistakes:
            if broken.get(mistake.name):
                return "fail", mistake.message, [mistake.name]
        for mode, training in (("eval", False), ("train", True)):
            shown = "training" if training else "eval"
            out = description[mode]
            if "raised" in out:
                return "fail", (f"In {shown} mode the block fails on a batch of shape (8, 7): "
                                f"{out['raised']}."), []
            if tuple(out["shape"]) != (len(PROBE), OUT_FEATURES):
                return "fail", (f"In {shown} mode the block maps a (8, 7) batch to shape "
                                f"{tuple(out['shape'])}, expected (8, 5)."), []
            expected = _expected(linears[0], norms[0], training)
            got = np.asarray(out["data"], dtype=np.float64).reshape(expected.shape)
            if not np.allclose(got, expected, rtol=BLOCK_RTOL, atol=BLOCK_ATOL):
                extra = next(m for m in self.mistakes if m.name == "extra_layer")
                return "fail", f"In {shown} mode: {extra.message}", [extra.name]
        return "pass", "Linear without bias, then BatchNorm1d, then Sigmoid.", []


def _block_of(*layers):
    """A wrong answer: ``layers`` are functions of (in_features, out_features)."""
    return lambda i, o: nn.Sequential(*[layer(i, o) for layer in layers])


LINEAR = lambda i, o: nn.Linear(i, o, bias=False)  # noqa: E731
NORM = lambda i, o: nn.BatchNorm1d(o)  # noqa: E731
SIGMOID = lambda i, o: nn.Sigmoid()  # noqa: E731

LINEAR_BN_SIGMOID = BlockTask(
    id="03.linear_bn_sigmoid",
    title="a Linear-BatchNorm-Sigmoid block",
    function="linear_bn_sigmoid",
    correct=_block,
    mistakes=(
        Mistake("no_linear", "The block needs exactly one nn.Linear layer.",
                _block_of(lambda i, o: nn.BatchNorm1d(i), SIGMOID)),
        Mistake("linear_shape", "The Linear layer must map in_features to out_features.",
                _block_of(lambda i, o: nn.Linear(o, o, bias=False), NORM, SIGMOID)),
        Mistake("layer_norm", "You used layer norm; this block uses batch norm (nn.BatchNorm1d).",
                _block_of(LINEAR, lambda i, o: nn.LayerNorm(o), SIGMOID)),
        Mistake("no_batchnorm", "The block needs one nn.BatchNorm1d layer.",
                _block_of(LINEAR, SIGMOID)),
        Mistake("batchnorm_features", "BatchNorm1d normalizes the Linear layer's outputs: "
                "num_features = out_features.",
                _block_of(LINEAR, lambda i, o: nn.BatchNorm1d(i), SIGMOID)),
        Mistake("no_sigmoid", "The block ends with one nn.Sigmoid.",
                _block_of(LINEAR, NORM, lambda i, o: nn.ReLU())),
        Mistake("redundant_bias", "The Linear layer before batch norm has a bias: batch norm "
                "subtracts the batch mean, which cancels any constant added before it, and beta "
                "plays its role. Use nn.Linear(in_features, out_features, bias=False).",
                _block_of(lambda i, o: nn.Linear(i, o), NORM, SIGMOID)),
        Mistake("norm_after_activation", "Batch norm comes after the sigmoid here; the paper "
                "normalizes x = W u before the nonlinearity: Linear, BatchNorm1d, Sigmoid.",
                _block_of(LINEAR, SIGMOID, NORM)),
        Mistake("norm_before_linear", "Batch norm must normalize the Linear layer's output: "
                "Linear, BatchNorm1d, Sigmoid.", _block_of(NORM, LINEAR, SIGMOID)),
        Mistake("extra_layer", "the block's output differs from sigmoid(batch_norm(x W^T)) "
                "computed from its own weights and statistics: keep exactly the three layers "
                "Linear, BatchNorm1d, Sigmoid, with nothing in between (no dropout).",
                _block_of(LINEAR, NORM, lambda i, o: nn.Dropout(0.5), SIGMOID)),
    ),
)


# ---- shared by the training-loop tasks ------------------------------------------------------
def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)
    ).double()


def _batch(seed: int, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = 2.0 + 3.0 * torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def _running_stats(model: nn.Module) -> np.ndarray:
    values = [b.detach().numpy().ravel() for name, b in model.named_buffers() if "running" in name]
    return np.concatenate(values)


def _parameters(model: nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])


def _warmed_up(seed: int) -> nn.Module:
    """A model whose running statistics are far from any single batch's statistics."""
    model = _model(seed)
    model.train()
    with torch.no_grad():
        for step in range(3):
            model(_batch(seed + step)[0] * 0.3 - 1.0)
    return model


def _as_float(value, what: str) -> float:
    if isinstance(value, torch.Tensor):
        raise AnswerProblem(f"returned a tensor; return {what} as a Python float with .item()")
    if not isinstance(value, (float, int, np.floating, np.integer)) or isinstance(value, bool):
        raise AnswerProblem(f"returned a {type(value).__name__}, expected {what} as a float")
    return float(value)


# ---- 03.train_step --------------------------------------------------------------------------
def _train_case(description, seed):
    def make():
        model = _warmed_up(seed)
        model.eval()  # left in eval mode by an evaluation: train_step must switch back
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5)  # stale gradients from an earlier step
        x, y = _batch(seed + 10)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(0)  # every answer draws the same dropout mask
        return {"model": model, "x": x, "y": y, "optimizer": optimizer}

    return Case(description, make)


def _collect_step(kwargs, returned):
    model = kwargs["model"]
    loss = _as_float(returned, "the loss")
    return loss, _parameters(model), _running_stats(model), float(model.training)


def _step(model, x, y, optimizer, train=True, zero=True, step=True):
    if train:
        model.train()
    if zero:
        optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if step:
        optimizer.step()
    return loss.item()


TRAIN_STEP = OutputTask(
    id="03.train_step",
    title="one training step",
    function="train_step",
    points=2,
    correct=_step,
    outputs=("loss", "parameters after the step", "running statistics after the step",
             "model.training"),
    collect=_collect_step,
    cases=(_train_case("a model left in eval mode with stale gradients", 50),),
    mistakes=(
        Mistake("forgot_train_mode", "The model was in eval mode and your step left it there: "
                "batch norm normalized with the running statistics and did not update them. Call "
                "model.train() at the start of every training step.",
                lambda model, x, y, optimizer: _step(model, x, y, optimizer, train=False)),
        Mistake("forgot_zero_grad", "The step used stale gradients: backward() adds to .grad, so "
                "call optimizer.zero_grad() before loss.backward().",
                lambda model, x, y, optimizer: _step(model, x, y, optimizer, zero=False)),
        Mistake("no_update", "The parameters did not change: call optimizer.step() after "
                "loss.backward() (and zero the gradients before backward, not between backward "
                "and step).", lambda model, x, y, optimizer: _step(model, x, y, optimizer, step=False)),
    ),
)


# ---- 03.evaluate ----------------------------------------------------------------------------
def _evaluate_case(description, seed):
    def make():
        x, y = _batch(seed + 20, n=40)
        model = _warmed_up(seed)
        torch.manual_seed(0)  # every answer draws the same dropout mask
        return {"model": model, "x": x, "y": y}

    return Case(description, make)


def _collect_evaluate(kwargs, returned):
    return _as_float(returned, "the accuracy"), _running_stats(kwargs["model"])


def _accuracy(model, x, y, eval_mode=True, scale=1.0):
    if eval_mode:
        model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(dim=1) == y).double()
    return correct.mean().item() * scale


EVALUATE = OutputTask(
    id="03.evaluate",
    title="accuracy in eval mode",
    function="evaluate",
    correct=_accuracy,
    outputs=("accuracy", "running statistics after evaluation"),
    collect=_collect_evaluate,
    cases=(_evaluate_case("a model in training mode, 40 examples", 60),),
    mistakes=(
        Mistake("forgot_eval_mode", "The model stayed in training mode: batch norm used the "
                "statistics of the evaluation batch, updated its running statistics from it, and "
                "dropout was active. Call model.eval() first; torch.no_grad() alone does not "
                "switch batch norm to eval mode.",
                lambda model, x, y: _accuracy(model, x, y, eval_mode=False)),
        Mistake("percent", "Return the accuracy as a fraction in [0, 1], not a percentage.",
                lambda model, x, y: _accuracy(model, x, y, scale=100.0)),
        Mistake("count", "Return the fraction of correct predictions (the mean), not their count.",
                lambda model, x, y: _accuracy(model, x, y, scale=float(len(y)))),
    ),
)


# ---- 03.freeze_batchnorm --------------------------------------------------------------------
def _freeze_case(description, seed):
    return Case(description, lambda: {"model": _warmed_up(seed)})


def _collect_freeze(kwargs, returned):
    model = kwargs["model"]
    norms = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
    norm_params = {id(p) for m in norms for p in m.parameters()}
    torch.manual_seed(0)
    x, _ = _batch(70)
    model(x)  # one forward pass of fine-tuning, in whatever mode the model is now
    norm_trainable = [float(p.requires_grad) for p in model.parameters() if id(p) in norm_params]
    other_trainable = [float(p.requires_grad) for p in model.parameters() if id(p) not in norm_params]
    others_training = [float(m.training) for m in model.modules()
                       if not isinstance(m, BATCH_NORMS) and not list(m.children())]
    return _running_stats(model), norm_trainable, other_trainable, others_training


def _freeze(model, eval_norms=True, freeze_norms=True, whole_eval=False, freeze_all=False):
    if whole_eval:
        model.eval()
    for module in model.modules():
        if isinstance(module, BATCH_NORMS):
            if eval_norms:
                module.eval()
            for p in module.parameters():
                p.requires_grad_(not freeze_norms)
    if freeze_all:
        for p in model.parameters():
            p.requires_grad_(False)


FREEZE_BATCHNORM = OutputTask(
    id="03.freeze_batchnorm",
    title="freeze batch norm for fine-tuning",
    function="freeze_batchnorm",
    points=2,
    correct=_freeze,
    outputs=("running statistics after a forward pass", "batch-norm parameters' requires_grad",
             "other parameters' requires_grad", "other layers' training flags"),
    collect=_collect_freeze,
    cases=(_freeze_case("a Linear-BN-ReLU-Dropout-Linear model in training mode", 70),),
    mistakes=(
        Mistake("requires_grad_only", "requires_grad=False stops the optimizer from changing "
                "gamma and beta, but the running statistics still move with every batch in "
                "training mode: also call .eval() on each batch-norm layer.",
                lambda model: _freeze(model, eval_norms=False)),
        Mistake("whole_model_eval", "model.eval() also switched off dropout (and every other "
                "layer's training behaviour); call .eval() only on the batch-norm layers.",
                lambda model: _freeze(model, whole_eval=True)),
        Mistake("eval_only", "The running statistics are frozen, but gamma and beta still "
                "train: set requires_grad_(False) on the batch-norm layers' parameters.",
                lambda model: _freeze(model, freeze_norms=False)),
        Mistake("froze_everything", "You froze every parameter; only the batch-norm layers' "
                "gamma and beta should stop training.", lambda model: _freeze(model, freeze_all=True)),
    ),
)

# ---- 03.lr_sweep_accuracy (an experiment) ---------------------------------------------------
def _sweep(data, lrs, steps, seed, *, measure="test", norms=("none", "batch"), one_model=False):
    rows = []
    for norm in norms:
        row = []
        for lr in lrs:
            if one_model and row:  # keeps training the first learning rate's model
                model, _ = previous
                history = train(model, data, steps=steps, batch_size=60, lr=lr, optimizer="sgd",
                                seed=seed, eval_every=steps, progress=False)
            else:
                model, history = trained(data, norm=norm, activation="sigmoid", steps=steps,
                                         batch_size=60, lr=lr, optimizer="sgd", seed=seed)
            previous = (model, history)
            row.append(history.test_accuracy[-1] if measure == "test" else history.train_accuracy[-1])
        rows.append(row)
    return as_array(rows)


def _sweep_correct(data, lrs, steps, seed):
    return _sweep(data, lrs, steps, seed)


LR_SWEEP_ACCURACY = OutputTask(
    id="03.lr_sweep_accuracy",
    title="experiment: a learning-rate sweep with and without batch norm",
    function="lr_sweep_accuracy",
    points=2,
    correct=_sweep_correct,
    outputs=("accuracy",),
    cases=(Case("1,000 training and 500 test images, lrs (0.5, 16), 100 steps, seed 0",
                lambda: {"data": small_mnist(), "lrs": (0.5, 16.0), "steps": 100, "seed": 0}),),
    mistakes=(
        Mistake("train_accuracy", "You returned the accuracy on training images "
                "(history.train_accuracy); the sweep compares test accuracy "
                "(history.test_accuracy[-1], or bt.final_test_accuracy).",
                lambda data, lrs, steps, seed: _sweep(data, lrs, steps, seed, measure="train")),
        Mistake("rows_swapped", "Row 0 is the network without batch norm, row 1 the one with it.",
                lambda data, lrs, steps, seed: _sweep_correct(data, lrs, steps, seed)[::-1]),
        Mistake("one_model", "Every learning rate needs a fresh network (bt.train_mlp builds one "
                "from the seed); you kept training the same one.",
                lambda data, lrs, steps, seed: _sweep(data, lrs, steps, seed, one_model=True)),
    ),
)

TASKS = (LINEAR_BN_SIGMOID, TRAIN_STEP, EVALUATE, FREEZE_BATCHNORM, LR_SWEEP_ACCURACY)
