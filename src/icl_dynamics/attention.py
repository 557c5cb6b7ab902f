"""Read real attention patterns from a forward pass, one layer at a time.

With transformers' default ``sdpa`` attention the probabilities are never formed, and
``output_attentions=True`` silently returns nothing useful, so every pass that reads patterns runs
the model's *eager* attention and hands each layer's pattern to a reducer as soon as the layer has
run. Nothing keeps the pattern afterwards: the pipeline never holds every layer's T x T pattern at
once, which is what lets a 2,048-token Pythia pass fit beside a 24-layer model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from icl_dynamics.architecture import architecture

Reducer = Callable[[int, torch.Tensor], None]
"""Called as ``reducer(layer, pattern)`` with ``pattern`` of shape [batch, heads, query, key]."""


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every layer, in layer order (any supported family:
    :func:`icl_dynamics.architecture.architecture`)."""
    return architecture(model).attention_modules()


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch ``model`` to eager attention for the duration (probabilities are then formed)."""
    before = model.config._attn_implementation
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            model.set_attn_implementation(before)


@contextmanager
def capture_attention(model: nn.Module, reducer: Reducer) -> Iterator[None]:
    """Within the block, every forward pass calls ``reducer(layer, pattern)`` once per layer.

    The pattern is the post-softmax attention probability of that layer's heads (causal and
    padding masks applied), as float32.
    """
    handles = []

    def make_hook(layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
            pattern = output[1]
            if pattern is None:  # pragma: no cover - guarded by eager_attention
                raise RuntimeError("attention weights were not formed; is the model in eager mode?")
            reducer(layer, pattern.float())

        return hook

    with eager_attention(model):
        for layer, module in enumerate(attention_modules(model)):
            handles.append(module.register_forward_hook(make_hook(layer)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def head_ov_weights(model: nn.Module, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head W_V [H, d_model, d_head], b_V [H, d_head] and W_O [H, d_head, d_model] of a layer, in the
    row-vector convention (x @ W_V @ W_O); b_V is zero when the layer has no bias. The norms around them are
    the architecture's (:meth:`~icl_dynamics.architecture.base.Architecture.input_norm`, ``post_norm``)."""
    weights = architecture(model).head_weights(layer)
    return weights.w_v, weights.b_v, weights.w_o
