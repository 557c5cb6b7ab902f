"""Attention capture: real, non-empty patterns, one layer at a time, and the model left as it was."""

import torch
from conftest import tiny_neox

from icl_dynamics.attention import capture_attention


def test_captured_patterns_are_causal_distributions_matching_eager_attention():
    model = tiny_neox(layers=3, heads=4, seed=7)
    model.set_attn_implementation("sdpa")  # the default, under which output_attentions gives nothing useful
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    seen: list[tuple[int, torch.Tensor]] = []
    with capture_attention(model, lambda layer, pattern: seen.append((layer, pattern.clone()))):
        with torch.no_grad():
            model(tokens)
    assert model.config._attn_implementation == "sdpa"  # restored afterwards
    assert [layer for layer, _ in seen] == [0, 1, 2]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        reference = model(tokens, output_attentions=True).attentions
    for layer, pattern in seen:
        assert pattern.shape == (2, 4, 12, 12) and pattern.numel() > 0
        torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 12))
        assert torch.all(pattern.triu(diagonal=1) == 0)  # causal
        torch.testing.assert_close(pattern, reference[layer].float(), atol=1e-6, rtol=1e-5)

