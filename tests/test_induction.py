"""Induction-head scores against hand-computed values and a float64 reference built from eager attention."""

import numpy as np
import pytest
import torch
from conftest import tiny_neox

from icl_dynamics.induction import (
    Probe,
    candidate_ids,
    controls,
    induction_rows,
    prefix_targets,
    repeated_tokens,
    score_heads,
    signed_share,
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


def test_signed_share_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.0, 0.0]])  # centred: [2, 0, -1, -1]
    assert signed_share(logits, torch.tensor([0])).item() == pytest.approx(1.0)
    assert signed_share(logits, torch.tensor([2])).item() == pytest.approx(-0.5)
    assert signed_share(logits, torch.tensor([1])).item() == pytest.approx(0.0)


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
    d_head = model.config.hidden_size // n_heads
    out = model(tokens, output_attentions=True, output_hidden_states=True)
    w_u = model.get_output_embeddings().weight
    n, r = probe.n_tokens, probe.repeats
    result = {k: np.zeros((model.config.num_hidden_layers, n_heads, tokens.shape[0]))
              for k in ("prefix_matching", "previous_token", "copying")}
    for layer, pattern in enumerate(out.attentions):
        block = model.gpt_neox.layers[layer]
        ln = block.input_layernorm(out.hidden_states[layer])
        qkv = block.attention.query_key_value(ln).view(*ln.shape[:2], n_heads, 3 * d_head)
        values = qkv[..., 2 * d_head:]
        for b in range(tokens.shape[0]):
            for h in range(n_heads):
                pm, prev, cp = [], [], []
                for q in range(1, tokens.shape[1]):
                    prev.append(pattern[b, h, q, q - 1].item())
                for rep in range(1, r):
                    for i in range(n):
                        q = 1 + rep * n + i
                        pm.append(sum(pattern[b, h, q, 1 + e * n + i + 1].item() for e in range(rep)))
                        head_out = sum(pattern[b, h, q, k] * values[b, k, h] for k in range(q + 1))
                        w_o = block.attention.dense.weight[:, h * d_head:(h + 1) * d_head]
                        logits = (w_o @ head_out) @ w_u.T
                        target = tokens[b, pattern[b, h, q, : q + 1].argmax()].item()
                        c = logits - logits.mean()
                        if c[target] >= 0:
                            cp.append((c[target] / c.clamp(min=0).sum()).item())
                        else:
                            cp.append((c[target] / (-c).clamp(min=0).sum()).item())
                result["prefix_matching"][layer, h, b] = np.mean(pm)
                result["previous_token"][layer, h, b] = np.mean(prev)
                result["copying"][layer, h, b] = np.mean(cp)
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
    assert np.abs(slow["copying"]).max() > 0.01


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
