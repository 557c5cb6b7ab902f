"""OLMo-1 (``OlmoForCausalLM``) and OLMo-2 (``Olmo2ForCausalLM``) in transformers 5.

Both: separate ``self_attn.q_proj``/``k_proj``/``v_proj`` (grouped-query when ``num_key_value_heads`` is
smaller), rotary on every head dimension, ``self_attn.o_proj`` (W_O), SwiGLU MLP, ``model.norm`` before
``lm_head``; no biases unless ``attention_bias``.

* OLMo-1: ``input_layernorm`` is a LayerNorm without parameters (eps 1e-5, fixed in the module) before
  attention, ``post_attention_layernorm`` (the same) before the MLP, the final ``norm`` too; ``clip_qkv``
  clamps the query, key and value projections' outputs; the 1B model ties ``lm_head`` to ``embed_tokens``.
* OLMo-2: no norm before attention (Q, K and V read the raw residual stream); RMSNorm over the *full*
  query and key projections (``self_attn.q_norm``/``k_norm``, QK-norm: every head's query is scaled by the
  norm of all heads' queries together); ``post_attention_layernorm`` is an RMSNorm applied to the attention
  output (every head's z W_O summed) *before* it joins the residual stream, ``post_feedforward_layernorm``
  likewise for the MLP; final RMSNorm; untied embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from icl_dynamics.architecture.base import Architecture, HeadWeights, Norm, per_query_head

OLMO_LAYER_NORM_EPS = 1e-5  # OlmoLayerNorm's eps, fixed in transformers' module (not a config field)


class _OlmoBase(Architecture):
    def _base(self) -> nn.Module:
        return self.model.model

    def layers(self) -> list[nn.Module]:
        return list(self._base().layers)

    def attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self._base().layers]

    def output_projections(self) -> list[nn.Linear]:
        return [layer.self_attn.o_proj for layer in self._base().layers]

    def value_modules(self) -> list[nn.Module]:
        return [layer.self_attn.v_proj for layer in self._base().layers]

    def final_norm_module(self) -> nn.Module:
        return self._base().norm

    def _clip(self) -> float | None:
        return None

    def head_weights(self, layer: int) -> HeadWeights:
        attn = self._base().layers[layer].self_attn
        h, dh, d = self.n_heads, self.d_head, self.d_model

        def split(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
            heads = linear.weight.shape[0] // dh
            w = per_query_head(linear.weight.view(heads, dh, d), h).transpose(1, 2)  # [H, d, dh]
            b = (per_query_head(linear.bias.view(heads, dh), h) if linear.bias is not None
                 else torch.zeros(h, dh, dtype=w.dtype, device=w.device))
            return w, b

        (w_q, b_q), (w_k, b_k), (w_v, b_v) = split(attn.q_proj), split(attn.k_proj), split(attn.v_proj)
        w_o = attn.o_proj.weight.t().reshape(h, dh, d)
        return HeadWeights(w_q, w_k, w_v, b_q, b_k, b_v, w_o, value_clip=self._clip())

    def _values(self, layer: int, output: torch.Tensor) -> torch.Tensor:
        b, t, _ = output.shape
        values = output.view(b, t, -1, self.d_head)
        clip = self._clip()
        if clip is not None:  # the module clamps in place after this hook: clamp a copy the same way
            values = values.clamp(-clip, clip)
        return per_query_head(values.permute(2, 0, 1, 3), self.n_heads).permute(1, 0, 2, 3)


class Olmo(_OlmoBase):
    """OLMo-1: parameter-free LayerNorm before attention, values clamped by ``clip_qkv`` when set."""

    family = "olmo"

    def _clip(self) -> float | None:
        clip = getattr(self.config, "clip_qkv", None)
        return None if clip is None else float(clip)

    def input_norm(self, layer: int) -> Norm:
        return Norm("layernorm", eps=OLMO_LAYER_NORM_EPS)

    def final_norm(self) -> Norm:
        return Norm("layernorm", eps=OLMO_LAYER_NORM_EPS)


class Olmo2(_OlmoBase):
    """OLMo-2: no norm before attention, QK-norm, RMSNorm on the attention output before the residual."""

    family = "olmo2"

    def input_norm(self, layer: int) -> Norm:
        return Norm("identity")

    def post_norm(self, layer: int) -> Norm:
        ln = self._base().layers[layer].post_attention_layernorm
        return Norm("rmsnorm", ln.weight, None, ln.variance_epsilon)

    def query_key_norms(self, layer: int) -> tuple[Norm, Norm]:
        attn = self._base().layers[layer].self_attn
        return (Norm("rmsnorm", attn.q_norm.weight, None, attn.q_norm.variance_epsilon),
                Norm("rmsnorm", attn.k_norm.weight, None, attn.k_norm.variance_epsilon))

    def final_norm(self) -> Norm:
        ln = self._base().norm
        return Norm("rmsnorm", ln.weight, None, ln.variance_epsilon)


def published_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``model``'s weights as the OLMo ``-hf`` repositories store them (``save_pretrained``): the model's own
    key names (``model.embed_tokens.weight``, ``model.layers.<i>.self_attn.q_proj.weight`` ...), float32,
    ``lm_head.weight`` only when the embeddings are not tied (OLMo-1B ties them, OLMo-2 does not)."""
    state = {name: tensor.to(dtype).contiguous() for name, tensor in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state
