"""Induction-head scores against hand-computed values and a float64 reference built from eager attention."""

import numpy as np
import pytest
import torch
from conftest import tiny_neox

from icl_dynamics.attention import head_ov_weights
from icl_dynamics.induction import (
    Probe,
    candidate_ids,
    controls,
    induction_rows,
    ov_copying_scores,
    prefix_targets,
    repeated_tokens,
    score_heads,
)


def test_prefix_targets_by_hand():
    # BOS a b | a b | a b  -> positions 0 | 1 2 | 3 4 | 5 6
    mask = prefix_targets(Probe(n_tokens=2, repeats=3))
    expected = {(3, 2), (4, 3), (5, 2), (5, 4), (6, 3), (6, 5)}
    assert {tuple(ij) for ij in mask.nonzero().tolist()} == expected


def test_controls_by_hand():
    c = controls(Probe(n_tokens=2, repeats=2))
    # queries 3 and 4 each have one earlier occurrence; uniform attention over q + 1 keys
    assert c["prefix_matching"] == pytest.approx((1 / 4 + 1 / 5) / 2)
    assert c["previous_token"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4)
    assert c["copying"] == 0.0


def copying_reference(model) -> np.ndarray:
    """Slow float64 reference: eigenvalues of the whole [V, V] OV circuit, layer norms folded in
    explicitly (centring matrix and gains), one head at a time."""
    model = model.double()
    config = model.config
    d, heads = config.hidden_size, config.num_attention_heads
    dh = d // heads
    w_e = model.gpt_neox.embed_in.weight.detach().numpy()
    w_u = model.get_output_embeddings().weight.detach().numpy().T
    center = np.eye(d) - np.ones((d, d)) / d
    g_f = np.diag(model.gpt_neox.final_layer_norm.weight.detach().numpy())
    out = np.zeros((config.num_hidden_layers, heads))
    for layer, block in enumerate(model.gpt_neox.layers):
        g_l = np.diag(block.input_layernorm.weight.detach().numpy())
        qkv = block.attention.query_key_value.weight.detach().numpy()  # [heads * 3 * dh, d]
        dense = block.attention.dense.weight.detach().numpy()  # [d, heads * dh]
        for h in range(heads):
            w_v = qkv[(3 * h + 2) * dh:(3 * h + 3) * dh].T  # [d, dh]
            w_o = dense[:, h * dh:(h + 1) * dh].T  # [dh, d]
            eig = np.linalg.eigvals(w_e @ center @ g_l @ w_v @ w_o @ center @ g_f @ w_u)
            out[layer, h] = eig.sum().real / np.abs(eig).sum()
    return out


def test_copying_score_matches_the_full_vocabulary_eigenvalues():
    model = tiny_neox(vocab_size=40, hidden=16, layers=2, heads=2, seed=6)
    with torch.no_grad():  # layer-norm gains away from 1, so dropping one would show
        for norm in [model.gpt_neox.final_layer_norm] + [b.input_layernorm for b in model.gpt_neox.layers]:
            norm.weight.uniform_(0.2, 2.0)
    np.testing.assert_allclose(ov_copying_scores(model), copying_reference(model), atol=1e-9)


def _with_ov(model, sign: float):
    """Every head's W_O = sign * W_V^T and W_U = W_E^T: each OV circuit is sign * (a PSD matrix)."""
    with torch.no_grad():
        model.get_output_embeddings().weight.copy_(model.gpt_neox.embed_in.weight)
        for layer in range(model.config.num_hidden_layers):
            w_v, _, _ = head_ov_weights(model, layer)  # [H, d, dh]
            dense = model.gpt_neox.layers[layer].attention.dense.weight  # [d, H * dh]
            dense.copy_(sign * torch.cat(list(w_v), dim=1))
    return model


def test_copying_score_is_plus_one_for_a_copying_circuit_and_minus_one_negated():
    assert np.allclose(ov_copying_scores(_with_ov(tiny_neox(vocab_size=50, seed=2), 1.0)), 1.0)
    assert np.allclose(ov_copying_scores(_with_ov(tiny_neox(vocab_size=50, seed=2), -1.0)), -1.0)
    assert np.abs(ov_copying_scores(tiny_neox(vocab_size=50, seed=2))).max() < 0.6  # random heads


def test_copying_score_does_not_depend_on_the_vocabulary_size():
    """The same head in |V| = 64 and |V| = 50,304: embeddings with the same W_U W_E (orthonormal
    columns, W_U = W_E^T) score the same, where a share of vocabulary-wide logits shrinks ~1/|V|."""
    scores = []
    shared = {k: v for k, v in tiny_neox(vocab_size=64, hidden=32, seed=4).state_dict().items()
              if "embed_in" not in k and "lm_head" not in k}
    for vocab in (64, 50_304):
        model = tiny_neox(vocab_size=vocab, hidden=32, seed=4)
        model.load_state_dict(shared, strict=False)  # the same heads and layer norms
        q, _ = torch.linalg.qr(torch.randn(vocab, 32, generator=torch.Generator().manual_seed(vocab)))
        with torch.no_grad():
            model.gpt_neox.embed_in.weight.copy_(q)
            model.get_output_embeddings().weight.copy_(q)
        scores.append(ov_copying_scores(model))
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-6)  # float32 orthonormality
    assert np.abs(scores[0]).max() > 0.05  # not trivially zero


def test_repeated_tokens_layout(neox_tokenizer):
    probe = Probe(n_tokens=25, repeats=4, n_samples=3)
    ids = candidate_ids(neox_tokenizer, 0.05)
    tokens = repeated_tokens(ids, 0, probe)
    assert tokens.shape == (3, 101) and (tokens[:, 0] == 0).all()
    body = tokens[:, 1:].view(3, 4, 25)
    assert (body == body[:, :1]).all()  # four identical repeats
    assert all(len(set(row.tolist())) == 25 for row in body[:, 0])  # no token twice within a repeat
    special = set(neox_tokenizer.all_special_ids)
    assert not special & set(ids.tolist())
    # the most and least frequent 5% (BPE rank) are never drawn
    ordinary = [i for i in range(len(neox_tokenizer)) if i not in special]
    cut = int(len(ordinary) * 0.05)
    assert ids.min().item() == ordinary[cut] and ids.max().item() == ordinary[-cut - 1]


def reference_scores(model, tokens, probe):
    """Slow float64 reference: transformers' own eager attentions and explicit loops."""
    model = model.double()
    n_heads = model.config.num_attention_heads
    out = model(tokens, output_attentions=True)
    n, r = probe.n_tokens, probe.repeats
    result = {k: np.zeros((model.config.num_hidden_layers, n_heads, tokens.shape[0]))
              for k in ("prefix_matching", "previous_token")}
    for layer, pattern in enumerate(out.attentions):
        for b in range(tokens.shape[0]):
            for h in range(n_heads):
                pm, prev = [], []
                for q in range(1, tokens.shape[1]):
                    prev.append(pattern[b, h, q, q - 1].item())
                for rep in range(1, r):
                    for i in range(n):
                        q = 1 + rep * n + i
                        pm.append(sum(pattern[b, h, q, 1 + e * n + i + 1].item() for e in range(rep)))
                result["prefix_matching"][layer, h, b] = np.mean(pm)
                result["previous_token"][layer, h, b] = np.mean(prev)
    return result


def test_scores_match_float64_reference_on_a_random_model():
    probe = Probe(n_tokens=6, repeats=3, n_samples=2, seed=3)
    model = tiny_neox(vocab_size=40, hidden=32, layers=2, heads=4, seed=1)
    # sharpen attention so the scores are far from their controls; random biases (transformers
    # initialises them to zero, which would hide a dropped value bias)
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            layer.attention.query_key_value.weight.mul_(4)
            layer.attention.query_key_value.bias.normal_(0, 0.5)
    tokens = repeated_tokens(torch.arange(3, 40), 0, probe)
    fast = score_heads(model.double(), tokens, probe)
    slow = reference_scores(model, tokens, probe)
    for name in fast:
        np.testing.assert_allclose(fast[name], slow[name], rtol=1e-6, atol=1e-6, err_msg=name)
    assert set(fast) == set(slow)


def test_rows_carry_mean_se_and_control(neox_tokenizer):
    probe = Probe(n_tokens=10, repeats=3, n_samples=4)
    model = tiny_neox(vocab_size=len(neox_tokenizer), hidden=32, layers=2, heads=2)
    rows = induction_rows(model, neox_tokenizer, probe)
    assert [(r["layer"], r["head"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    per_sample = score_heads(model, repeated_tokens(candidate_ids(neox_tokenizer, 0.05), 0, probe), probe)
    values = per_sample["prefix_matching"][1, 0]
    assert rows[2]["prefix_matching"] == pytest.approx(values.mean())
    assert rows[2]["prefix_matching_se"] == pytest.approx(values.std(ddof=1) / 2)
    assert rows[2]["prefix_matching_control"] == pytest.approx(controls(probe)["prefix_matching"])
    # an untrained model attends almost uniformly: scores sit on their controls
    assert abs(rows[0]["prefix_matching"] - rows[0]["prefix_matching_control"]) < 0.02
