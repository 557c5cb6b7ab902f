"""What every measurement needs from a model, whatever its family (:class:`Architecture`).

Conventions: row vectors (x @ W), heads in the order the output projection reads them, every per-head
tensor indexed by query head (a key/value head shared by several query heads, grouped-query attention,
is repeated for each). A norm is described by :class:`Norm` so the OV-based scores can fold its linear
part (centring and gain) into a circuit and report what they leave out (the division by a vector's norm,
which depends on the residual stream, not on the head).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

ValueCallback = Callable[[int, torch.Tensor], None]
"""``callback(layer, values)`` with each head's value vectors [batch, heads, positions, d_head]."""
ScaleCallback = Callable[[int, torch.Tensor], None]
"""``callback(layer, scale)`` with the scale [batch, positions] a norm applies to the layer's attention output."""


@dataclass(frozen=True)
class Norm:
    """A normalisation on a head's path: ``kind`` is ``layernorm`` (centre, divide by the standard deviation),
    ``rmsnorm`` (divide by the root mean square) or ``identity``; ``weight``/``bias`` the gain and offset
    (None: none), ``eps`` as the module uses it."""

    kind: str
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    eps: float = 0.0

    def linear(self, d_model: int, *, dtype: torch.dtype = torch.float64,
               device: torch.device | None = None) -> torch.Tensor:
        """The norm's linear part [d_model, d_model], right-multiplied (x -> x @ M): centring for a layer norm,
        then the gain; the division by the vector's norm and the bias are left out."""
        eye = torch.eye(d_model, dtype=dtype, device=device)
        matrix = eye - 1.0 / d_model if self.kind == "layernorm" else eye
        if self.kind != "identity" and self.weight is not None:
            matrix = matrix * self.weight.to(dtype=dtype, device=device)[None, :]
        return matrix

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The norm applied to x [..., d_model], in x's dtype."""
        if self.kind == "identity":
            return x
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            x = x * self.weight.to(x.dtype)
        return x + self.bias.to(x.dtype) if self.bias is not None else x


@dataclass(frozen=True)
class HeadWeights:
    """One layer's per-head weights: W_Q, W_K, W_V [H, d_model, d_head], their biases [H, d_head] (zero
    when the layer has none), W_O [H, d_head, d_model]; ``value_clip``: the value projection's output is
    clamped to +-value_clip (OLMo-1's ``clip_qkv``; None: not clamped)."""

    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor
    b_q: torch.Tensor
    b_k: torch.Tensor
    b_v: torch.Tensor
    w_o: torch.Tensor
    value_clip: float | None = None


class Architecture(ABC):
    """A loaded causal LM of one supported family, seen the way the measurements need it.

    Families differ in where the norms sit on a head's path (:meth:`input_norm`, :meth:`post_norm`,
    :meth:`query_key_norms`, :meth:`final_norm`); every measurement reads them here and nowhere else.
    """

    family: str = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # --- shape

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def d_head(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.d_model // self.n_heads)

    # --- modules

    def base(self) -> nn.Module:
        """The model without its LM head (its last hidden state has passed the final norm)."""
        return self.model.base_model

    @abstractmethod
    def layers(self) -> list[nn.Module]:
        """The decoder blocks in order (each called with the residual stream and the base model's kwargs)."""

    @abstractmethod
    def attention_modules(self) -> list[nn.Module]:
        """Each layer's self-attention module; under eager attention it returns (output, pattern)."""

    @abstractmethod
    def output_projections(self) -> list[nn.Linear]:
        """Each layer's W_O module: its input [.., heads * d_head] is every head's output z, head h in columns
        h * d_head .. (h + 1) * d_head (what ablation replaces)."""

    @abstractmethod
    def final_norm_module(self) -> nn.Module:
        """The norm applied to the residual stream before the unembedding."""

    def embedding(self) -> torch.Tensor:
        """W_E [vocab, d_model]."""
        return self.model.get_input_embeddings().weight

    def unembedding(self) -> torch.Tensor:
        """W_U [vocab, d_model] (logits = h @ W_U.T; the same tensor as W_E when the family ties them)."""
        return self.model.get_output_embeddings().weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from a residual stream [.., d_model] that has not passed the final norm yet."""
        return self.model.get_output_embeddings()(self.final_norm_module()(hidden))

    # --- the norms on a head's path

    @abstractmethod
    def input_norm(self, layer: int) -> Norm:
        """The norm between the residual stream and the layer's Q, K and V projections."""

    def post_norm(self, layer: int) -> Norm:
        """The norm between the layer's attention output (every head's z W_O summed) and the residual stream."""
        return Norm("identity")

    def query_key_norms(self, layer: int) -> tuple[Norm, Norm]:
        """Norms on the full query and key projections (all heads together; OLMo-2's QK-norm)."""
        return Norm("identity"), Norm("identity")

    @abstractmethod
    def final_norm(self) -> Norm:
        """The final norm as a :class:`Norm`."""

    @abstractmethod
    def head_weights(self, layer: int) -> HeadWeights:
        """The layer's per-head projections (see :class:`HeadWeights`)."""

    # --- activations

    @abstractmethod
    def value_modules(self) -> list[nn.Module]:
        """Each layer's value projection module (its output holds every value head)."""

    @abstractmethod
    def _values(self, layer: int, output: torch.Tensor) -> torch.Tensor:
        """Per-query-head values [B, H, T, d_head] from a value module's output [B, T, ...] (bias and clamp
        as the model applies them)."""

    @contextmanager
    def capture_values(self, callback: ValueCallback) -> Iterator[None]:
        """Within the block, every forward pass hands each layer's value vectors (with bias and clamp, as the
        attention uses them) to ``callback(layer, values [B, H, T, d_head])``."""
        def make(layer: int):
            def hook(_module: nn.Module, _args: object, output: torch.Tensor) -> None:
                callback(layer, self._values(layer, output))
            return hook

        handles = [module.register_forward_hook(make(layer)) for layer, module in enumerate(self.value_modules())]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def capture_write_scale(self, callback: ScaleCallback) -> Iterator[None]:
        """Within the block, for a family whose :meth:`post_norm` is not the identity, every forward pass hands
        each layer's 1 / RMS of its attention output per position to ``callback(layer, scale [B, T])``: the
        factor the post-attention norm multiplies every head's write by (before its gain). Registered on the
        attention module's output, so it fires before a pattern hook registered after it. Nothing is called
        for the other families."""
        handles = []
        for layer, module in enumerate(self.attention_modules()):
            norm = self.post_norm(layer)
            if norm.kind == "identity":
                continue

            def hook(_module: nn.Module, _args: object, output: tuple, layer: int = layer, eps: float = norm.eps,
                     ) -> None:
                out = output[0].float()
                callback(layer, torch.rsqrt(out.pow(2).mean(-1) + eps))

            handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def monitored_modules(self) -> list[tuple[str, nn.Module]]:
        """Modules in execution order with a name for messages (the finite-values guard)."""
        modules: list[tuple[str, nn.Module]] = [("the embedding", self.model.get_input_embeddings())]
        for i, (layer, attention) in enumerate(zip(self.layers(), self.attention_modules())):
            modules += [(f"layer {i} attention", attention), (f"layer {i}", layer)]
        return modules + [("the final layer norm", self.final_norm_module()),
                          ("the logits", self.model.get_output_embeddings())]

    def sequence_start_id(self) -> int | None:
        """The token prepended as the attention sink (:func:`icl_dynamics.architecture.sequence_start_id`)."""
        from icl_dynamics.architecture import sequence_start_id

        return sequence_start_id(self.config)


def per_query_head(tensor: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[KV, ...] -> [H, ...]: each key/value head repeated for the query heads it serves (transformers'
    ``repeat_kv``: query head h reads key/value head h // (H / KV))."""
    kv = tensor.shape[0]
    return tensor if kv == n_heads else tensor.repeat_interleave(n_heads // kv, dim=0)
