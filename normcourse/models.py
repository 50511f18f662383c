"""Model builders for the chapters' experiments: an MLP, a small ConvNet and its 1x1 variant
(``pointwise_convnet``, chapter 8) with any normalization, and a small transformer encoder
(``TransformerClassifier``, chapter 9) whose norm and its placement are a choice.

Both builders return an ``nn.Sequential`` whose layers have readable names, so that probes, hooks
and the text can address them: ``model.fc3`` (the third hidden linear layer), ``model.norm3``,
``model.act3`` (its nonlinearity), ``model.out`` (the output layer). For example, the input to the
last hidden sigmoid of the default MLP is ``model.act3``'s input.

``norm`` picks the normalization layer:

=================  ==============================================================================
``"none"``         no normalization
``"batch"``        ``normcourse.nn.BatchNorm1d`` / ``BatchNorm2d``
``"layer"``        ``normcourse.nn.LayerNorm`` (see ``convnet`` for what it normalizes over)
``"renorm"``       ``normcourse.nn.BatchRenorm1d`` / ``BatchRenorm2d`` (``renorm_kwargs`` go to it)
``"torch_batch"``  ``torch.nn.BatchNorm1d`` / ``BatchNorm2d`` (to compare against ours)
``"torch_layer"``  ``torch.nn.LayerNorm``
``"group"``        ``normcourse.nn.GroupNorm`` (``num_groups`` groups; convnet only, chapter 8)
``"instance"``     ``normcourse.nn.InstanceNorm2d(affine=True)`` (convnet only; chapter 8)
``"rms"``          ``normcourse.nn.RMSNorm`` over the same axes as ``"layer"`` (chapter 8)
=================  ==============================================================================

A linear or conv layer that feeds a batch norm or batch renorm has no bias: the norm subtracts the
per-feature mean, which removes any constant bias, and its beta takes the bias's place (BN paper,
Sec. 3.2). Layer norm subtracts a mean over *features*, which does not remove a per-feature bias,
so layers feeding it keep theirs. The output layer is never normalized.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from normcourse import nn as ncnn
from normcourse.validation import ShapeError, check_choice, check_floating, check_rank

__all__ = ["NORMS", "MLP_NORMS", "CONV_NORMS", "POINTWISE_NORMS", "ACTIVATIONS", "NORM_POSITIONS",
           "mlp", "convnet", "pointwise_convnet",
           "PLACEMENTS", "TRANSFORMER_NORMS", "SelfAttention", "TransformerBlock",
           "TransformerClassifier", "SequenceBatchNorm", "sinusoidal_positions"]

NORMS = ("none", "batch", "layer", "renorm", "torch_batch", "torch_layer")
# chapter 8's norms: RMSNorm in both builders; group and instance norm in the convnet only
# (instance norm needs feature maps)
MLP_NORMS = NORMS + ("rms",)
CONV_NORMS = NORMS + ("rms", "group", "instance")
# on 1x1 maps instance norm would normalize single values (every output = beta)
POINTWISE_NORMS = NORMS + ("rms", "group")
ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}
NORM_POSITIONS = ("before", "after")

# Norms that normalize each feature over the batch: a bias in front of them is redundant.
_BATCH_NORMS = ("batch", "renorm", "torch_batch")


def _norm_layer(norm: str, shape: tuple[int, ...], renorm_kwargs: dict | None,
                num_groups: int = 1) -> nn.Module:
    """The normalization layer for features of ``shape``: (C,) after a linear layer, (C, H, W)
    after a conv layer. Batch-type norms use C; layer norms normalize over the whole shape."""
    channels, spatial = shape[0], len(shape) > 1
    if norm == "batch":
        return (ncnn.BatchNorm2d if spatial else ncnn.BatchNorm1d)(channels)
    if norm == "torch_batch":
        return (nn.BatchNorm2d if spatial else nn.BatchNorm1d)(channels)
    if norm == "renorm":
        return (ncnn.BatchRenorm2d if spatial else ncnn.BatchRenorm1d)(channels, **(renorm_kwargs or {}))
    if norm == "layer":
        return ncnn.LayerNorm(shape)
    if norm == "torch_layer":
        return nn.LayerNorm(shape)
    if norm == "group":
        return ncnn.GroupNorm(num_groups, channels)
    if norm == "rms":
        return ncnn.RMSNorm(shape)
    if norm == "instance":
        return ncnn.InstanceNorm2d(channels, affine=True)
    raise AssertionError(f"unhandled norm {norm!r}")  # names are checked by the builders


def _check_common(norm: str, activation: str, renorm_kwargs: dict | None,
                  norms: tuple[str, ...] = NORMS) -> None:
    check_choice(norm, norms, "norm")
    check_choice(activation, tuple(ACTIVATIONS), "activation")
    if renorm_kwargs is not None and norm != "renorm":
        raise ValueError(f"renorm_kwargs are for norm='renorm', but norm={norm!r}")


def _checked_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(sizes)
    if len(sizes) < 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ValueError(f"sizes must be at least two positive integers (input, ..., output), got {sizes}")
    return sizes


def mlp(
    sizes: Sequence[int] = (784, 100, 100, 100, 10),
    norm: str = "none",
    activation: str = "sigmoid",
    norm_position: str = "before",
    init_scale: float | None = None,
    renorm_kwargs: dict | None = None,
) -> nn.Sequential:
    """A fully connected network: input (N, sizes[0]) (or images (N, 1, 28, 28)) -> logits (N, sizes[-1]).

    The default is the BN paper's MNIST network (Sec. 4.1): 3 hidden layers of 100 sigmoid units.
    Layers, for each hidden layer i = 1, 2, ...:

    - ``norm_position="before"`` (the paper: BN(W u) then the nonlinearity):
      ``fc{i}`` -> ``norm{i}`` -> ``act{i}``
    - ``norm_position="after"`` (nonlinearity first): ``fc{i}`` -> ``act{i}`` -> ``norm{i}``

    then ``out``, the output linear layer. ``norm="none"`` leaves the ``norm{i}`` layers out. The
    first layer, ``flatten``, lets the same network take flat vectors or images.

    Args:
        sizes: widths from the input to the output, at least two.
        norm: one of ``NORMS`` (see the module docstring).
        activation: ``"sigmoid"``, ``"relu"`` or ``"tanh"``.
        norm_position: ``"before"`` or ``"after"`` the nonlinearity.
        init_scale: None keeps PyTorch's default initialization; a float draws every linear
            weight from N(0, init_scale^2) and sets the biases to 0 (the "small random Gaussian"
            of the BN paper; CS231n's weight-scale sweep).
        renorm_kwargs: keyword arguments for ``BatchRenorm1d`` (``rmax``, ``warmup_steps``, ...),
            only with ``norm="renorm"``.
    """
    _check_common(norm, activation, renorm_kwargs, MLP_NORMS)
    check_choice(norm_position, NORM_POSITIONS, "norm_position")
    sizes = _checked_sizes(sizes)
    if init_scale is not None and not init_scale > 0:
        raise ValueError(f"init_scale must be a positive standard deviation or None, got {init_scale}")

    # A bias is redundant only when the linear layer's output goes straight into a batch norm.
    bias = not (norm in _BATCH_NORMS and norm_position == "before")
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    for i, (fan_in, width) in enumerate(zip(sizes[:-2], sizes[1:-1]), start=1):
        layers[f"fc{i}"] = nn.Linear(fan_in, width, bias=bias)
        norm_layer = None if norm == "none" else _norm_layer(norm, (width,), renorm_kwargs)
        block = [("norm", norm_layer), ("act", ACTIVATIONS[activation]())]
        if norm_position == "after":
            block.reverse()
        for prefix, module in block:
            if module is not None:
                layers[f"{prefix}{i}"] = module
    layers["out"] = nn.Linear(sizes[-2], sizes[-1])
    model = nn.Sequential(layers)
    if init_scale is not None:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=init_scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    return model


def convnet(
    norm: str = "none",
    channels: Sequence[int] = (16, 32),
    activation: str = "relu",
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    renorm_kwargs: dict | None = None,
    num_groups: int = 4,
    weight_standardization: bool = False,
) -> nn.Sequential:
    """A small ConvNet for MNIST: images (N, in_channels, image_size, image_size) -> logits (N, num_classes).

    For each entry c of ``channels`` (block i = 1, 2, ...): ``conv{i}`` (3x3, padding 1, c output
    channels) -> ``norm{i}`` -> ``act{i}`` -> ``pool{i}`` (2x2 max pooling, halves H and W); then
    ``flatten`` and ``out`` (linear). With the defaults: 28x28 -> 14x14 -> 7x7, 32*7*7 features.

    What the norms normalize over, per block with C channels of H x W maps:

    - batch / renorm: per channel, over the batch and all positions (N, H, W), as in the BN
      paper's Sec. 3.2; one gamma and beta per channel.
    - layer (our choice): per example, over all of (C, H, W), like ``torch.nn.LayerNorm((C, H,
      W))``, with one gain and bias per unit (C*H*W of each), as the LN paper gives every hidden
      unit its own. ``nn.GroupNorm(1, C)`` computes the same statistics but shares the gain and
      bias within a channel. The LN paper (Sec. 6.7) reports that on ConvNets BN works better.
    - group (chapter 8): per example, over each group of C / ``num_groups`` consecutive
      channels and all positions; one gamma and beta per channel (Wu & He 2018).
    - instance: per example and channel, over the H x W positions (affine, as in Wu & He's
      comparison); the conv layer before it has no bias (the channel mean removes it).

    ``weight_standardization=True`` makes every conv layer a ``normcourse.nn.WSConv2d`` (each
    filter standardized over its fan-in, Qiao et al. 2019), with or without a norm after it.
    """
    _check_common(norm, activation, renorm_kwargs, CONV_NORMS)
    channels = tuple(channels)
    if not channels or not all(isinstance(c, int) and c > 0 for c in channels):
        raise ValueError(f"channels must be one or more positive integers, got {channels}")
    if image_size < 2 ** len(channels):
        raise ValueError(f"image_size {image_size} is too small for {len(channels)} 2x2 poolings")

    bias = norm not in _BATCH_NORMS + ("instance",)
    conv = ncnn.WSConv2d if weight_standardization else nn.Conv2d
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    size, fan_in = image_size, in_channels
    for i, c in enumerate(channels, start=1):
        layers[f"conv{i}"] = conv(fan_in, c, kernel_size=3, padding=1, bias=bias)
        if norm != "none":
            layers[f"norm{i}"] = _norm_layer(norm, (c, size, size), renorm_kwargs, num_groups)
        layers[f"act{i}"] = ACTIVATIONS[activation]()
        layers[f"pool{i}"] = nn.MaxPool2d(2)
        size, fan_in = size // 2, c
    layers["flatten"] = nn.Flatten()
    layers["out"] = nn.Linear(fan_in * size * size, num_classes)
    return nn.Sequential(layers)


def pointwise_convnet(
    norm: str = "none",
    sizes: Sequence[int] = (784, 64, 64, 10),
    activation: str = "relu",
    num_groups: int = 4,
    weight_standardization: bool = False,
) -> nn.Sequential:
    """A ConvNet on 1x1 feature maps (a fully connected network built from conv layers):
    images (N, C, H, W) with C*H*W = sizes[0], or vectors (N, sizes[0]) -> logits
    (N, sizes[-1]).

    ``flatten_input`` and ``to_map`` turn the input into maps (N, sizes[0], 1, 1);
    for each hidden width (layer i = 1, 2, ...): ``conv{i}`` (1x1 convolution) ->
    ``norm{i}`` -> ``act{i}``; then ``flatten`` and ``out`` (linear). Chapter 8 uses it
    for Wu & He's batch-size experiment: with H = W = 1, batch norm's statistics come
    from the N values of the batch alone, while the layers are the ConvNet's
    (``BatchNorm2d``, ``GroupNorm`` over groups of channels, ``WSConv2d`` with
    ``weight_standardization=True``). ``norm`` is one of ``POINTWISE_NORMS``; the bias
    rule is ``convnet``'s.
    """
    _check_common(norm, activation, None, POINTWISE_NORMS)
    sizes = _checked_sizes(sizes)
    bias = norm not in _BATCH_NORMS
    conv = ncnn.WSConv2d if weight_standardization else nn.Conv2d
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        flatten_input=nn.Flatten(), to_map=nn.Unflatten(1, (sizes[0], 1, 1)))
    for i, (fan_in, width) in enumerate(zip(sizes[:-2], sizes[1:-1]), start=1):
        layers[f"conv{i}"] = conv(fan_in, width, kernel_size=1, bias=bias)
        if norm != "none":
            layers[f"norm{i}"] = _norm_layer(norm, (width, 1, 1), None, num_groups)
        layers[f"act{i}"] = ACTIVATIONS[activation]()
    layers["flatten"] = nn.Flatten()
    layers["out"] = nn.Linear(sizes[-2], sizes[-1])
    return nn.Sequential(layers)


# ---------------------------------------------------------------------------------------------
# A small transformer encoder (chapter 9)
# ---------------------------------------------------------------------------------------------
# Where the norm sits in each block, which norm it is, and what takes the place of the norm layer
# for "batch" (batch norm over the batch *and* the positions, chapter 5's argument at sequence
# scale) and for the torch.nn layers the tests compare ours with.
PLACEMENTS = ("post", "pre")
TRANSFORMER_NORMS = ("layer", "rms", "batch", "none", "torch_layer", "torch_rms")


class SequenceBatchNorm(nn.Module):
    """Batch norm for tokens x: (N, T, D): one mean and variance per feature over all N * T
    tokens of the batch (``normcourse.nn.BatchNorm1d`` on the (N, D, T) layout). Padded positions,
    if any, are counted like real tokens: that is the point of chapter 9's check."""

    def __init__(self, d_model: int):
        super().__init__()
        self.bn = ncnn.BatchNorm1d(d_model)

    def forward(self, x):
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


def _token_norm(norm: str, d_model: int) -> nn.Module:
    """The normalization layer over a token's d_model features (or over the batch, "batch")."""
    layers = {"layer": ncnn.LayerNorm, "rms": ncnn.RMSNorm, "batch": SequenceBatchNorm,
              "torch_layer": nn.LayerNorm, "torch_rms": nn.RMSNorm, "none": lambda d: nn.Identity()}
    return layers[norm](d_model)


class SelfAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017): x (N, T, D) -> (N, T, D).

    One linear layer makes the queries, keys and values of all heads; each head attends with
    softmax(Q K^T / sqrt(D / heads)); ``out`` mixes the heads. ``padding_mask`` (N, T), True at
    padded positions, keeps every query from attending to them.
    """

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x, padding_mask=None):
        n, t, d = x.shape
        heads = self.qkv(x).view(n, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = heads.permute(2, 0, 3, 1, 4)  # each (N, heads, T, D / heads)
        # softmax(q k^T / sqrt(D / heads)) v in one fused call; a padded key gets weight 0
        keep = None if padding_mask is None else ~padding_mask[:, None, None, :]
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (N, heads, T, D/heads)
        return self.out(mixed.transpose(1, 2).reshape(n, t, d))


class TransformerBlock(nn.Module):
    """One encoder block: self-attention and an MLP, each a residual branch, x (N, T, D).

    ``placement="post"`` (Vaswani et al. 2017): the norm follows each residual addition,
    ``x = norm1(x + attn(x))``, ``x = norm2(x + mlp(x))``.
    ``placement="pre"`` (Xiong et al. 2020): the norm opens each branch and the residual stream
    itself is never normalized, ``x = x + attn(norm1(x))``, ``x = x + mlp(norm2(x))``.
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, norm: str = "layer",
                 placement: str = "pre"):
        super().__init__()
        self.placement = placement
        self.attn = SelfAttention(d_model, num_heads)
        self.norm1 = _token_norm(norm, d_model)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(d_model, d_ff), act=nn.ReLU(),
                                             fc2=nn.Linear(d_ff, d_model)))
        self.norm2 = _token_norm(norm, d_model)

    def forward(self, x, padding_mask=None):
        if self.placement == "pre":
            x = x + self.attn(self.norm1(x), padding_mask)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, padding_mask))
        return self.norm2(x + self.mlp(x))


def sinusoidal_positions(length: int, d_model: int):
    """Vaswani et al.'s fixed position encoding, (length, d_model): sin and cos of the position
    at wavelengths from 2 pi to 10000 * 2 pi."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32)
                          * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


class TransformerClassifier(nn.Module):
    """A small transformer encoder that reads an image row by row and classifies it.

    x: (N, T, input_size) tokens, or MNIST images (N, 1, 28, 28) read as T = 28 tokens of 28
    pixels -> logits (N, num_classes). ``embed`` (linear) plus the sinusoidal positions, then
    ``num_layers`` ``TransformerBlock``s (``model.blocks[i]``), then ``final_norm`` (an
    ``nn.Identity`` when off), the mean over the (unpadded) tokens, and ``head`` (linear).

    Args:
        norm: one of ``TRANSFORMER_NORMS``: ``"layer"`` / ``"rms"`` are ``normcourse.nn``'s
            LayerNorm / RMSNorm, ``"torch_layer"`` / ``"torch_rms"`` torch.nn's, ``"batch"`` batch
            norm over all tokens of the batch (``SequenceBatchNorm``), ``"none"`` nothing.
        placement: ``"post"`` or ``"pre"`` (see ``TransformerBlock``).
        final_norm: a norm of the same kind before the head; None (default) means "pre" gets
            one (Xiong et al.: its residual stream is never normalized) and "post" does not (its
            last block ends with a norm).

    Every linear layer starts Xavier-uniform with zero bias (Xiong et al.'s analysis assumes
    it); norms start at gain 1, bias 0.
    """

    def __init__(self, *, num_layers: int = 6, d_model: int = 32, num_heads: int = 4,
                 d_ff: int = 64, norm: str = "layer", placement: str = "pre",
                 final_norm: bool | None = None, input_size: int = 28, max_length: int = 28,
                 num_classes: int = 10):
        super().__init__()
        check_choice(norm, TRANSFORMER_NORMS, "norm")
        check_choice(placement, PLACEMENTS, "placement")
        for value, what in ((num_layers, "num_layers"), (d_model, "d_model"),
                            (num_heads, "num_heads"), (d_ff, "d_ff"), (input_size, "input_size"),
                            (max_length, "max_length"), (num_classes, "num_classes")):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be a positive integer, got {value!r}")
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.norm, self.placement, self.input_size = norm, placement, input_size
        self.final_norm_on = placement == "pre" if final_norm is None else bool(final_norm)
        self.embed = nn.Linear(input_size, d_model)
        self.register_buffer("positions", sinusoidal_positions(max_length, d_model),
                             persistent=False)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, num_heads, d_ff, norm, placement)
                                    for _ in range(num_layers))
        self.final_norm = _token_norm(norm, d_model) if self.final_norm_on else nn.Identity()
        self.head = nn.Linear(d_model, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def tokens(self, x):
        """Images (N, 1, H, W) -> (N, H, W); tokens (N, T, input_size) pass; else ShapeError."""
        check_floating(x, "TransformerClassifier")
        if x.ndim == 4 and x.shape[1] == 1:
            x = x[:, 0]
        check_rank(x, (3,), "TransformerClassifier",
                   f"(N, T, {self.input_size}) tokens or (N, 1, H, {self.input_size}) images")
        if x.shape[2] != self.input_size or x.shape[1] > len(self.positions):
            raise ShapeError(f"TransformerClassifier(input_size={self.input_size}, max_length="
                             f"{len(self.positions)}) got tokens of shape {tuple(x.shape)}")
        return x

    def residual_stream(self, x, padding_mask=None):
        """The residual stream after the embedding and after each block: a list of
        num_layers + 1 tensors (N, T, D) (before the final norm)."""
        x = self.tokens(x)
        h = self.embed(x) + self.positions[: x.shape[1]]
        stream = [h]
        for block in self.blocks:
            h = block(h, padding_mask)
            stream.append(h)
        return stream

    def forward(self, x, padding_mask=None):
        """x: (N, T, input_size) or (N, 1, T, input_size); padding_mask: (N, T) bool, True
        at padded positions (left out of attention and of the mean) -> logits (N, classes)."""
        h = self.final_norm(self.residual_stream(x, padding_mask)[-1])
        if padding_mask is None:
            return self.head(h.mean(dim=1))
        keep = (~padding_mask).to(h.dtype)[:, :, None]
        return self.head((h * keep).sum(dim=1) / keep.sum(dim=1))

