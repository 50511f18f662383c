"""Chapter 3, training with batch norm: a Linear-BN-sigmoid block, train/eval mode, freezing BN,
and an experiment (a learning-rate sweep with and without batch norm).

These tasks take and return PyTorch modules. The compared "outputs" are what a training loop
cares about (the loss, the parameters and running statistics after a step, the modules' modes),
so the same machinery that compares arrays names the mistakes.
"""

from __future__ import annotations

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
def _leaf_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if not list(m.children())]


class BlockTask(Task):
    """Checks the structure of the block ``Linear(bias=False) -> BatchNorm1d -> Sigmoid``.

    Each rule is a (condition on the layers, message) pair, checked in order.
    """

    def diagnose(self, answer):
        try:
            block = answer(7, 5)
        except NotImplementedError:
            return "not_implemented", f"`{self.function}` is not implemented yet.", []
        except Exception as error:
            return "fail", f"`{self.function}(7, 5)` raised {type(error).__name__}: {error}.", []
        if not isinstance(block, nn.Module):
            return "fail", (f"`{self.function}(7, 5)` returned a {type(block).__name__}; return "
                            "a module, e.g. nn.Sequential(...)."), []
        layers = _leaf_modules(block)
        linears = [m for m in layers if isinstance(m, nn.Linear)]
        norms = [m for m in layers if isinstance(m, BATCH_NORMS)]
        sigmoids = [i for i, m in enumerate(layers) if isinstance(m, nn.Sigmoid)]
        norm_at = next((i for i, m in enumerate(layers) if isinstance(m, BATCH_NORMS)), None)
        linear_at = next((i for i, m in enumerate(layers) if isinstance(m, nn.Linear)), None)
        rules = (
            (len(linears) != 1, "no_linear", "The block needs exactly one nn.Linear layer."),
            (len(linears) == 1 and (linears[0].in_features, linears[0].out_features) != (7, 5),
             "linear_shape", "The Linear layer must map in_features to out_features."),
            (any(isinstance(m, (nn.LayerNorm, ncnn.LayerNorm)) for m in layers) and not norms,
             "layer_norm", "You used layer norm; this block uses batch norm (nn.BatchNorm1d)."),
            (len(norms) != 1, "no_batchnorm", "The block needs one nn.BatchNorm1d layer."),
            (len(norms) == 1 and norms[0].num_features != 5, "batchnorm_features",
             "BatchNorm1d normalizes the Linear layer's outputs: num_features = out_features."),
            (len(sigmoids) != 1, "no_sigmoid", "The block ends with one nn.Sigmoid."),
            (linears[0].bias is not None if linears else False, "redundant_bias",
             "The Linear layer before batch norm has a bias: batch norm subtracts the batch mean, "
             "which cancels any constant added before it, and beta plays its role. Use "
             "nn.Linear(in_features, out_features, bias=False)."),
            (bool(norms) and bool(sigmoids) and norm_at > sigmoids[0],
             "norm_after_activation", "Batch norm comes after the sigmoid here; the paper "
             "normalizes x = W u before the nonlinearity: Linear, BatchNorm1d, Sigmoid."),
            (bool(norms) and bool(linears) and norm_at < linear_at,
             "norm_before_linear", "Batch norm must normalize the Linear layer's output: "
             "Linear, BatchNorm1d, Sigmoid."),
        )
        for failed, name, message in rules:
            if failed:
                return "fail", message, [name]
        try:
            with torch.no_grad():
                out = block(torch.randn(4, 7))
        except Exception as error:
            return "fail", f"The block fails on a batch of shape (4, 7): {type(error).__name__}: {error}.", []
        if tuple(out.shape) != (4, 5):
            return "fail", f"The block maps a (4, 7) batch to shape {tuple(out.shape)}, expected (4, 5).", []
        return "pass", "Linear without bias, then BatchNorm1d, then Sigmoid.", []


LINEAR_BN_SIGMOID = BlockTask(
    id="03.linear_bn_sigmoid",
    title="a Linear-BatchNorm-Sigmoid block",
    function="linear_bn_sigmoid",
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
