"""Measurements of the optimization landscape that chapter 7 takes during training.

- ``gradient_change``: Santurkar et al.'s (2018) internal-covariate-shift measure: how much one
  layer's gradient changes when the layers below it take their step (``||G - G'||`` and the
  cosine of G and G'), on the same batch;
- ``loss_along_gradient``: the loss and the gradient at points along the gradient direction,
  and from them the loss variation, the gradient predictiveness and the effective
  beta-smoothness (Santurkar et al., Sec. 3);
- ``effective_learning_rate`` and ``angle_update``: for a layer followed by batch norm, whose
  output unit i does not change when its weight row w_i is scaled, the step in the direction of
  w_i is what matters: ``lr / ||w_i||^2`` (van Laarhoven 2017; Hoffer et al. 2018) and the angle
  between w_i before and after a step.

Every function works on a copy of the model (``copy.deepcopy``), so that the probe neither moves
the weights nor the running statistics of the model being trained. ``loss_fn(model) -> scalar``
is a closure over one batch: the same batch before and after a step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "GradientChange",
    "gradient_change",
    "LossAlongGradient",
    "loss_along_gradient",
    "effective_learning_rate",
    "angle_update",
]

LossFn = Callable[[nn.Module], torch.Tensor]


def _parameter(model: nn.Module, name: str) -> nn.Parameter:
    parameters = dict(model.named_parameters())
    if name not in parameters:
        raise ValueError(f"the model has no parameter {name!r}; choose one of "
                         + ", ".join(repr(n) for n in parameters))
    return parameters[name]


def _gradients(model: nn.Module, loss_fn: LossFn):
    """The loss and the gradient of every parameter (zeros where it does not reach)."""
    params = list(model.parameters())
    loss = loss_fn(model)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return loss.detach(), grads


@dataclass
class GradientChange:
    """G: a layer's gradient; G': the same after the layers below took their step."""

    distance: float  # ||G - G'||_2
    cosine: float  # <G, G'> / (||G|| ||G'||)
    relative: float  # ||G - G'|| / ||G||


def gradient_change(model: nn.Module, loss_fn: LossFn, parameter: str,
                    lr: float) -> GradientChange:
    """Santurkar et al.'s ICS of the layer holding ``parameter`` (``"fc3.weight"``).

    G is the gradient of ``loss_fn`` with respect to ``parameter``. Every parameter
    registered *before* it (the layers below, in a sequential model) then takes one SGD
    step of size ``lr`` with its own gradient, and G' is the gradient of the same
    parameter on the same batch: how much the layer's optimization problem moved
    because its input distribution moved.
    """
    probe = copy.deepcopy(model)
    target = _parameter(probe, parameter)
    params = list(probe.parameters())
    index = next(i for i, p in enumerate(params) if p is target)
    _, grads = _gradients(probe, loss_fn)
    before = grads[index].flatten()
    with torch.no_grad():
        for p, g in zip(params[:index], grads[:index]):
            p.sub_(lr * g)
    _, grads_after = _gradients(probe, loss_fn)
    after = grads_after[index].flatten()
    distance = torch.linalg.vector_norm(before - after)
    norms = torch.linalg.vector_norm(before) * torch.linalg.vector_norm(after)
    return GradientChange(float(distance), float(before @ after / norms),
                          float(distance / torch.linalg.vector_norm(before)))


@dataclass
class LossAlongGradient:
    """The loss and gradient at w - eta * g for each eta of ``etas`` (g: grad at w)."""

    etas: tuple[float, ...]
    losses: tuple[float, ...]  # L(w - eta g)
    gradient_distances: tuple[float, ...]  # ||grad L(w - eta g) - g||
    gradient_norm: float  # ||g||

    @property
    def loss_variation(self) -> float:
        """max - min of the loss over the steps along the direction."""
        return max(self.losses) - min(self.losses)

    @property
    def gradient_predictiveness(self) -> float:
        """The largest change of the gradient along the direction (small: good)."""
        return max(self.gradient_distances)

    @property
    def effective_beta(self) -> float:
        """max over the steps of ||grad(w - eta g) - g|| / ||eta g||: a Lipschitz
        constant of the gradient along the optimizer's path (effective beta)."""
        return max(d / (eta * self.gradient_norm)
                   for d, eta in zip(self.gradient_distances, self.etas))


def loss_along_gradient(model: nn.Module, loss_fn: LossFn,
                        etas: Sequence[float]) -> LossAlongGradient:
    """Step from the model's weights w along its gradient g by each eta of ``etas``
    (> 0); record the loss and how far the gradient there is from g (all parameters
    move; the same batch)."""
    etas = tuple(float(e) for e in etas)
    if not etas or min(etas) <= 0:
        raise ValueError(f"etas must be positive step sizes, got {etas}")
    probe = copy.deepcopy(model)
    params = list(probe.parameters())
    start = [p.detach().clone() for p in params]
    _, g = _gradients(probe, loss_fn)
    flat_g = torch.cat([v.flatten() for v in g])
    losses, distances = [], []
    for eta in etas:
        with torch.no_grad():
            for p, p0, gp in zip(params, start, g):
                p.copy_(p0 - eta * gp)
        loss, g_eta = _gradients(probe, loss_fn)
        losses.append(float(loss))
        flat = torch.cat([v.flatten() for v in g_eta])
        distances.append(float(torch.linalg.vector_norm(flat - flat_g)))
    return LossAlongGradient(etas, tuple(losses), tuple(distances),
                             float(torch.linalg.vector_norm(flat_g)))


def effective_learning_rate(weight: torch.Tensor, lr: float) -> torch.Tensor:
    """lr / ||w_i||^2 for each output unit i: weight (C_out, ...) -> (C_out,).

    With batch norm after the layer, unit i's output depends on w_i / ||w_i|| only,
    and an SGD step of size lr moves that direction as a step of size lr / ||w_i||^2
    would move a unit vector (the gradient is orthogonal to w_i, scales as 1 / ||w_i||).
    """
    return lr / weight.detach().flatten(1).pow(2).sum(dim=1)


def angle_update(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The angle (radians) between each output unit's weights before and after a step:
    (C_out, ...) twice -> (C_out,). What a scale-invariant unit actually changes."""
    a, b = before.detach().flatten(1), after.detach().flatten(1)
    cosine = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1))
    return torch.arccos(cosine.clamp(-1.0, 1.0))
