"""Tiny random models of every supported family, and float64 references written against their real modules.

Transformers initialises every norm gain to 1 and every bias to 0, which would hide a dropped gain or
bias: :func:`tiny_model` draws them at random. OLMo-1 gets ``clip_qkv`` low enough to bite and OLMo-2
grouped-query attention (2 key/value heads for 4 query heads), so those paths are exercised too.
"""

from __future__ import annotations

import torch

FAMILIES = ("gpt-neox", "olmo", "olmo2")


def tiny_model(family: str, *, vocab_size: int = 64, hidden: int = 32, layers: int = 2, heads: int = 4,
               seed: int = 0, initializer_range: float = 0.02, clip_qkv: float | None = 0.05,
               kv_heads: int | None = None, random_norms: bool = True):
    """A randomly initialised causal LM of ``family`` in eval mode, eager attention, float32."""
    from conftest import tiny_neox
    from transformers import Olmo2Config, Olmo2ForCausalLM, OlmoConfig, OlmoForCausalLM

    torch.manual_seed(seed)
    if family == "gpt-neox":
        model = tiny_neox(vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads, seed=seed,
                          initializer_range=initializer_range)
    else:
        common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=2 * hidden, max_position_embeddings=128, initializer_range=initializer_range,
                      pad_token_id=1, bos_token_id=None, eos_token_id=vocab_size - 1)
        if family == "olmo":
            config = OlmoConfig(**common, clip_qkv=clip_qkv, tie_word_embeddings=True, rope_theta=100.0)
            model = OlmoForCausalLM(config)
        elif family == "olmo2":
            config = Olmo2Config(**common, num_key_value_heads=kv_heads or heads // 2, rms_norm_eps=1e-6,
                                 rope_theta=500.0)
            model = Olmo2ForCausalLM(config)
        else:
            raise ValueError(family)
        model.config._attn_implementation = "eager"
        model.eval()
    if random_norms:
        gen = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    param.copy_(torch.empty_like(param).uniform_(0.5, 1.5, generator=gen))
                elif "norm" in name and name.endswith("bias"):
                    param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def norms_of(model, layer: int | None = None):
    """The family's norm matrices written out by hand from the real modules, float64 [d, d] (row vectors,
    x -> x @ M): (before the value projection, on the attention output, final) at ``layer``."""
    d = model.config.hidden_size
    eye = torch.eye(d, dtype=torch.float64)
    centre = eye - 1.0 / d
    gain = lambda module: torch.diag(module.weight.detach().double())  # noqa: E731
    kind = model.config.model_type
    if kind == "gpt_neox":
        block = model.gpt_neox.layers[layer] if layer is not None else None
        return (centre @ gain(block.input_layernorm) if block is not None else None, eye,
                centre @ gain(model.gpt_neox.final_layer_norm))
    if kind == "olmo":  # LayerNorm without parameters everywhere
        return centre, eye, centre
    block = model.model.layers[layer] if layer is not None else None
    return eye, gain(block.post_attention_layernorm) if block is not None else None, gain(model.model.norm)


def value_and_output(model, layer: int):
    """(W_V [H, d, dh], W_O [H, dh, d]) read by hand from the real module's weight layout."""
    cfg = model.config
    h, d = cfg.num_attention_heads, cfg.hidden_size
    dh = d // h
    if cfg.model_type == "gpt_neox":
        att = model.gpt_neox.layers[layer].attention
        qkv = att.query_key_value.weight.detach().double()  # [h * 3 * dh, d]
        w_v = torch.stack([qkv[(3 * i + 2) * dh:(3 * i + 3) * dh].T for i in range(h)])
        dense = att.dense.weight.detach().double()
    else:
        att = model.model.layers[layer].self_attn
        v = att.v_proj.weight.detach().double()  # [kv * dh, d]
        rep = h // (v.shape[0] // dh)
        w_v = torch.stack([v[(i // rep) * dh:(i // rep + 1) * dh].T for i in range(h)])
        dense = att.o_proj.weight.detach().double()
    w_o = torch.stack([dense[:, i * dh:(i + 1) * dh].T for i in range(h)])
    return w_v, w_o


def embeddings(model):
    """(W_E [V, d], W_U [V, d]) as float64."""
    return model.get_input_embeddings().weight.detach().double(), model.get_output_embeddings().weight.detach().double()


def head_logits(model, tokens: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """What each head writes, as logits over the whole vocabulary, explicitly from the real modules in float64:
    ``raw`` [heads, n, V] for the raw embedding of every position (values clamped like OLMo-1's clip_qkv),
    ``contextual`` [heads, n, V] for the real value input at every position, and ``scale`` [n], the factor the
    post-attention norm applies at every query position (1 where the family has none). A head's logits at
    query j reading x are ``logits[h, pos] * scale[j]``."""
    cfg = model.config
    h, d = cfg.num_attention_heads, cfg.hidden_size
    dh = d // h
    w_e, w_u = embeddings(model)
    w_v, w_o = value_and_output(model, layer)
    n_in, n_post, _ = norms_of(model, layer)
    clip = getattr(cfg, "clip_qkv", None) if cfg.model_type == "olmo" else None
    with torch.no_grad():
        out = model(tokens[None], output_hidden_states=True)
        hidden = out.hidden_states[layer][0].double()
        if cfg.model_type == "gpt_neox":
            block = model.gpt_neox.layers[layer]
            x_ctx = torch.nn.functional.layer_norm(hidden, (d,), block.input_layernorm.weight.double(),
                                                   block.input_layernorm.bias.double(), block.input_layernorm.eps)
            b_v = block.attention.query_key_value.bias.detach().double().view(h, 3, dh)[:, 2]
        elif cfg.model_type == "olmo":
            x_ctx = torch.nn.functional.layer_norm(hidden, (d,), None, None, 1e-5)
            b_v = torch.zeros(h, dh, dtype=torch.float64)
        else:
            x_ctx = hidden
            b_v = torch.zeros(h, dh, dtype=torch.float64)
        scale = torch.ones(len(tokens), dtype=torch.float64)
        if cfg.model_type == "olmo2":  # 1 / RMS of the real attention output at each position
            attn_out = {}
            block = model.model.layers[layer]
            handle = block.self_attn.register_forward_hook(lambda _m, _a, o: attn_out.__setitem__("o", o[0]))
            model(tokens[None])
            handle.remove()
            o = attn_out["o"][0].double()
            scale = 1.0 / torch.sqrt(o.pow(2).mean(-1) + block.post_attention_layernorm.variance_epsilon)
        result = {}
        for name, x, bias in (("raw", w_e[tokens], False), ("contextual", x_ctx, True)):
            values = torch.einsum("nd,hde->hne", x, w_v) + (b_v[:, None] if bias else 0)
            if clip is not None:
                values = values.clamp(-clip, clip)
            result[name] = torch.einsum("hne,hed->hnd", values, w_o) @ n_post @ w_u.T
        result["scale"] = scale
    return result


def output_projection(model, layer: int):
    """The real W_O module of ``layer`` (GPT-NeoX ``attention.dense``, OLMo ``self_attn.o_proj``)."""
    if model.config.model_type == "gpt_neox":
        return model.gpt_neox.layers[layer].attention.dense
    return model.model.layers[layer].self_attn.o_proj
