"""A small recurrent network with optional layer normalization (chapter 5).

Layer norm in a recurrent cell (Ba, Kiros & Hinton 2016, Sec. 3.1): at every time step the summed
input of the hidden units, ``a_t = W_x x_t + W_h h_{t-1}``, is normalized with *its own* mean and
standard deviation over the hidden units, and one gain and one bias (shared by all time steps) are
applied before the nonlinearity::

    h_t = tanh(gain * (a_t - mean(a_t)) / sqrt(var(a_t) + eps) + bias)

Batch norm would need statistics per time step *and* per batch, stored separately for each step
(and sequences at test time may be longer than any seen in training); layer norm needs neither.
"""

from __future__ import annotations

import torch
from torch import nn

from normcourse.nn import LayerNorm
from normcourse.validation import (
    check_choice,
    check_floating,
    check_normalized_shape,
    check_rank,
)

__all__ = ["RNNCell", "RecurrentClassifier"]

NORMS = ("none", "layer")


class RNNCell(nn.Module):
    """Elman cell ``h_t = tanh(norm(W_x x_t + W_h h_{t-1}))``, with ``norm`` layer norm or nothing.

    x_t: (N, input_size), h: (N, hidden_size) -> h_next: (N, hidden_size).
    With ``norm="layer"`` the linear maps have no bias (the layer norm's bias replaces it) and the
    layer norm's gain (init 1) and bias (init 0) are the same at every time step, as in the paper.
    """

    def __init__(self, input_size: int, hidden_size: int, norm: str = "layer"):
        super().__init__()
        check_choice(norm, NORMS, "RNNCell norm")
        self.input_size, self.hidden_size, self.norm_kind = input_size, hidden_size, norm
        self.input_to_hidden = nn.Linear(input_size, hidden_size, bias=norm == "none")
        self.hidden_to_hidden = nn.Linear(hidden_size, hidden_size, bias=False)
        self.norm = LayerNorm(hidden_size) if norm == "layer" else nn.Identity()

    def summed_input(self, x_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """a_t = W_x x_t + W_h h_{t-1}: (N, hidden_size), before normalization."""
        return self.input_to_hidden(x_t) + self.hidden_to_hidden(h)

    def forward(self, x_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """x_t: (N, input_size), h: (N, hidden_size) -> (N, hidden_size)."""
        return torch.tanh(self.norm(self.summed_input(x_t, h)))


class RecurrentClassifier(nn.Module):
    """Reads a sequence x: (N, T, input_size) with one RNNCell and classifies the last state.

    ``hidden_states(x)`` returns every state (N, T, hidden_size); ``forward(x)`` the logits
    (N, num_classes) of a linear read-out of the final state. The initial state is zero.
    """

    def __init__(self, input_size: int, hidden_size: int, num_classes: int, norm: str = "layer"):
        super().__init__()
        self.cell = RNNCell(input_size, hidden_size, norm)
        self.readout = nn.Linear(hidden_size, num_classes)

    def _check(self, x: torch.Tensor) -> None:
        layer = type(self).__name__
        check_floating(x, layer)
        check_rank(x, (3,), layer, "(N, T, input_size)")
        check_normalized_shape(x, (self.cell.input_size,), layer)

    def hidden_states(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, T, input_size) -> states h_1..h_T: (N, T, hidden_size)."""
        self._check(x)
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        states = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            states.append(h)
        return torch.stack(states, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, T, input_size) -> logits (N, num_classes)."""
        return self.readout(self.hidden_states(x)[:, -1])
