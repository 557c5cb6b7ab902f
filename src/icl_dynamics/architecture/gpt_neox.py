"""GPT-NeoX (Pythia, PolyPythia, the toy zoos): ``GPTNeoXForCausalLM`` in transformers 5.

Per layer: ``input_layernorm`` (LayerNorm with gain and bias) -> ``attention.query_key_value`` (one fused
projection, output features laid out [heads, (q, k, v), d_head]: transformers views them as [..., heads,
3 * d_head] and chunks in three) -> rotary on a share of each head's dimensions -> ``attention.dense``
(W_O, with bias), added to the residual stream in parallel with the MLP; ``final_layer_norm`` before the
untied unembedding ``embed_out``. Pythia's files keep the old attention buffers (:func:`published_state_dict`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from icl_dynamics.architecture.base import Architecture, HeadWeights, Norm


class GPTNeoX(Architecture):
    family = "gpt-neox"

    def _base(self) -> nn.Module:
        return self.model.gpt_neox

    def layers(self) -> list[nn.Module]:
        return list(self._base().layers)

    def attention_modules(self) -> list[nn.Module]:
        return [layer.attention for layer in self._base().layers]

    def output_projections(self) -> list[nn.Linear]:
        return [layer.attention.dense for layer in self._base().layers]

    def value_modules(self) -> list[nn.Module]:
        return [layer.attention.query_key_value for layer in self._base().layers]

    def final_norm_module(self) -> nn.Module:
        return self._base().final_layer_norm

    def input_norm(self, layer: int) -> Norm:
        ln = self._base().layers[layer].input_layernorm
        return Norm("layernorm", ln.weight, ln.bias, ln.eps)

    def final_norm(self) -> Norm:
        ln = self._base().final_layer_norm
        return Norm("layernorm", ln.weight, ln.bias, ln.eps)

    def head_weights(self, layer: int) -> HeadWeights:
        attn = self._base().layers[layer].attention
        h, dh, d = self.n_heads, self.d_head, self.d_model
        w = attn.query_key_value.weight.view(h, 3, dh, d).transpose(2, 3)  # [H, 3, d, dh]
        bias = attn.query_key_value.bias
        b = bias.view(h, 3, dh) if bias is not None else torch.zeros(h, 3, dh, dtype=w.dtype, device=w.device)
        w_o = attn.dense.weight.t().reshape(h, dh, d)
        return HeadWeights(w[:, 0], w[:, 1], w[:, 2], b[:, 0], b[:, 1], b[:, 2], w_o)

    def _values(self, layer: int, output: torch.Tensor) -> torch.Tensor:
        b, t, _ = output.shape
        return output.view(b, t, self.n_heads, 3, -1)[:, :, :, 2].transpose(1, 2)


def published_state_dict(model: nn.Module, n_ctx: int, rotary_dims: int, rotary_base: float,
                         scale: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """``model``'s weights as Pythia's step branches store them: float16 under Pythia's key names (the
    unembedding as ``embed_out.weight``) plus the old per-layer attention buffers ``attention.bias``,
    ``attention.masked_bias`` and ``attention.rotary_emb.inv_freq``, which transformers 5 ignores on load.
    ``scale`` multiplies the tensors whose name contains a key (e.g. to force a float16 overflow)."""
    inv_freq = 1.0 / (rotary_base ** (torch.arange(0, rotary_dims, 2).float() / rotary_dims))
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            name = "embed_out.weight"
        factor = next((f for key, f in (scale or {}).items() if key in name), 1.0)
        state[name] = (tensor.float() * factor).half().contiguous()
    for layer in range(model.config.num_hidden_layers):
        prefix = f"gpt_neox.layers.{layer}.attention."
        state[prefix + "bias"] = torch.tril(torch.ones(n_ctx, n_ctx, dtype=torch.bool)).view(1, 1, n_ctx, n_ctx)
        state[prefix + "masked_bias"] = torch.tensor(-1e9)
        state[prefix + "rotary_emb.inv_freq"] = inv_freq.half()
    return state
