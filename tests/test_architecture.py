"""The architecture layer: no other module names a family's internals, and what it gives for GPT-NeoX, OLMo-1
and OLMo-2 equals the real modules' computation written out by hand in float64."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from families import FAMILIES, embeddings, norms_of, tiny_model, value_and_output

from icl_dynamics.architecture import UnsupportedFamily, architecture, family_of
from icl_dynamics.attention import capture_attention
from icl_dynamics.induction import ov_copying_scores

# attribute and key names of a family's modules in transformers (GPT-NeoX, OLMo, and the other common ones)
INTERNALS = {
    "gpt_neox", "query_key_value", "embed_in", "embed_out", "final_layer_norm", "dense_h_to_4h", "dense_4h_to_h",
    "q_proj", "k_proj", "v_proj", "o_proj", "self_attn", "q_norm", "k_norm", "input_layernorm",
    "post_attention_layernorm", "post_feedforward_layernorm", "embed_tokens", "lm_head", "transformer", "c_attn",
}


def _internal_names(path: Path) -> list[str]:
    """Attribute accesses and string constants (docstrings aside) that name a family's internals."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in INTERNALS:
            found.append(f"{path.name}:{node.lineno}: .{node.attr}")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and any(part in INTERNALS for part in node.value.replace(".", " ").split())):
            found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    return found


def test_no_module_outside_the_architecture_layer_names_a_familys_internals():
    src = REPO / "src" / "icl_dynamics"
    offenders = [hit for path in sorted(src.rglob("*.py")) if "architecture" not in path.relative_to(src).parts
                 for hit in _internal_names(path)]
    assert not offenders, offenders
    # the check itself finds them: the layer's own modules are full of such names
    assert len(_internal_names(src / "architecture" / "gpt_neox.py")) > 5
    assert len(_internal_names(src / "architecture" / "olmo.py")) > 5


@pytest.mark.parametrize("family", FAMILIES)
def test_head_weights_and_captured_values_rebuild_the_attention_output(family):
    """z^h = pattern^h @ values^h from the model's own pattern and the captured values, summed through each
    head's W_O (+ the projection's bias), is the attention module's real output; the captured values are the
    input norm of the residual stream times W_V + b_V (clamped where OLMo-1 clips), W_V and W_O as the real
    modules lay them out."""
    model = tiny_model(family, seed=1, initializer_range=0.2).double()
    if family == "gpt-neox":
        with torch.no_grad():
            for layer in model.gpt_neox.layers:
                layer.attention.query_key_value.bias.normal_(0, 0.3)
                layer.attention.dense.bias.normal_(0, 0.3)
    arch = architecture(model)
    tokens = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    patterns, values, outputs = {}, {}, {}
    hooks = [m.register_forward_hook(lambda _m, _a, o, i=i: outputs.__setitem__(i, o[0]))
             for i, m in enumerate(arch.attention_modules())]
    with torch.no_grad(), arch.capture_values(values.__setitem__), \
            capture_attention(model, lambda layer, p: patterns.__setitem__(layer, p.double())):
        hidden = model(tokens, output_hidden_states=True).hidden_states
    for hook in hooks:
        hook.remove()
    clipped = 0
    for layer in range(2):
        weights = arch.head_weights(layer)
        w_v, w_o = value_and_output(model, layer)
        torch.testing.assert_close(weights.w_v, w_v, rtol=0, atol=0)
        torch.testing.assert_close(weights.w_o, w_o, rtol=0, atol=0)
        x = arch.input_norm(layer)(hidden[layer])
        if family == "olmo":  # OlmoLayerNorm: no parameters, eps 1e-5
            torch.testing.assert_close(x, torch.nn.functional.layer_norm(hidden[layer], (32,), eps=1e-5))
        expected = torch.einsum("btd,hde->bhte", x, w_v) + weights.b_v[None, :, None]
        if weights.value_clip is not None:
            clipped += int((expected.abs() > weights.value_clip).sum())
            expected = expected.clamp(-weights.value_clip, weights.value_clip)
        # OLMo's norms compute in float32 whatever the model's dtype: 1e-6
        torch.testing.assert_close(values[layer], expected, rtol=1e-6, atol=1e-6)
        z = patterns[layer] @ values[layer]  # [B, H, T, dh]
        out = torch.einsum("bhte,hed->btd", z, w_o) + (arch.output_projections()[layer].bias
                                                        if arch.output_projections()[layer].bias is not None else 0)
        torch.testing.assert_close(out, outputs[layer], rtol=1e-6, atol=1e-6)
    if family == "olmo":
        assert clipped > 0  # clip_qkv bites: the clamp is exercised
    if family == "olmo2":
        assert arch.n_kv_heads == 2 and arch.n_heads == 4  # grouped-query attention is exercised


def copying_reference(model) -> np.ndarray:
    """Eigenvalues of the whole [V, V] OV circuit W_E N_in W_V W_O N_post N_f W_U^T, one head at a time, with
    the family's norm matrices written out by hand (:func:`families.norms_of`)."""
    w_e, w_u = (w.numpy() for w in embeddings(model))
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    out = np.zeros((layers, heads))
    for layer in range(layers):
        n_in, n_post, n_f = (m.numpy() for m in norms_of(model, layer))
        w_v, w_o = (w.numpy() for w in value_and_output(model, layer))
        for h in range(heads):
            eig = np.linalg.eigvals(w_e @ n_in @ w_v[h] @ w_o[h] @ n_post @ n_f @ w_u.T)
            out[layer, h] = eig.sum().real / np.abs(eig).sum()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_copying_score_equals_the_full_circuit_with_the_familys_norms(family):
    model = tiny_model(family, vocab_size=40, hidden=16, heads=2, seed=6)
    got = ov_copying_scores(model)
    np.testing.assert_allclose(got, copying_reference(model), atol=1e-9)
    assert np.abs(got).max() < 0.9  # random heads neither copy nor suppress


def _plant_copying(model, sign: float) -> None:
    """Every head's W_O chosen so that its circuit B A = sign * A^T A (PSD): W_U = W_E and
    W_O^h N_post N_f = sign * (N_in W_V^h)^T. GPT-NeoX and OLMo-1: P (centring) on both sides, gains 1;
    OLMo-2: N_in = I and N_post N_f = diag(g_post g_f), inverted."""
    arch = architecture(model)
    with torch.no_grad():
        model.get_output_embeddings().weight.copy_(model.get_input_embeddings().weight)
        for layer in range(arch.n_layers):
            n_in, n_post, n_f = norms_of(model, layer)
            w_v = arch.head_weights(layer).w_v.double()  # [H, d, dh]
            right = torch.linalg.pinv(n_post @ n_f) if family_name(model) == "olmo2" else torch.eye(n_in.shape[0])
            target = torch.cat([sign * (n_in @ w_v[h]).T @ right.double() for h in range(arch.n_heads)], 0)  # [H*dh, d]
            arch.output_projections()[layer].weight.copy_(target.T.to(torch.float32))


def family_name(model) -> str:
    return architecture(model).family


@pytest.mark.parametrize("family", FAMILIES)
def test_a_planted_copying_head_scores_one_and_its_negation_minus_one(family):
    for sign in (1.0, -1.0):
        model = tiny_model(family, vocab_size=50, seed=2, random_norms=family == "olmo2")
        _plant_copying(model, sign)
        np.testing.assert_allclose(ov_copying_scores(model), sign, atol=1e-5)


def test_the_write_scale_is_one_over_the_rms_of_the_real_attention_output():
    """OLMo-2's post-attention RMSNorm multiplies every head's write by g / RMS(attention output); the
    architecture hands over that 1 / RMS per position, and nothing for the families without such a norm."""
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    for family in FAMILIES:
        model = tiny_model(family, seed=3).double()
        arch = architecture(model)
        scales, normed = {}, {}
        handles = [layer.post_attention_layernorm.register_forward_hook(
            lambda m, a, o, i=i: normed.__setitem__(i, (a[0], o))) for i, layer in enumerate(arch.layers())] \
            if family == "olmo2" else []
        with torch.no_grad(), arch.capture_write_scale(scales.__setitem__):
            model(tokens)
        for handle in handles:
            handle.remove()
        if family != "olmo2":
            assert scales == {}
            continue
        for layer in range(2):
            attn_out, post = normed[layer]
            gain = arch.post_norm(layer).weight
            torch.testing.assert_close(attn_out * scales[layer][..., None].double() * gain, post, rtol=1e-6, atol=1e-7)


def test_a_model_of_another_family_is_refused_by_name():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32))
    with pytest.raises(UnsupportedFamily, match=r"LlamaForCausalLM \(model_type 'llama'\) is not a supported"):
        architecture(model)


@pytest.mark.parametrize("model_id, family", [
    ("EleutherAI/pythia-70m-deduped", "gpt-neox"), ("EleutherAI/pythia-160m-seed3", "gpt-neox"),
    ("allenai/OLMo-1B-hf", "olmo"), ("allenai/OLMo-7B-0424-hf", "olmo"), ("allenai/OLMo-2-0425-1B", "olmo2"),
    ("allenai/OLMo-2-1124-7B", "olmo2"), ("org/my-model", None),
])
def test_hub_ids_name_their_family(model_id, family):
    got = family_of(model_id)
    assert (got.name if got else None) == family


@pytest.mark.parametrize("model_id, message", [
    ("allenai/OLMo-1B", "hf_olmo"), ("meta-llama/Llama-3.2-1B", "Llama"), ("allenai/OLMoE-1B-7B-0924", "OLMoE"),
    ("allenai/Olmo-3-1025-7B", "OLMo-3"),
])
def test_unsupported_families_are_refused_by_name(model_id, message):
    with pytest.raises(UnsupportedFamily, match=message):
        family_of(model_id)
