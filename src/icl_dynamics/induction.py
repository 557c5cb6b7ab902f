"""Classic induction-head scores of every head (Olsson et al. 2022), on repeated random tokens.

The probe is ``n_samples`` sequences of a BOS token followed by ``n_tokens`` random tokens repeated
``repeats`` times. Per head:

* prefix matching: attention from each token of a later repeat to the tokens that followed its
  earlier occurrences (summed over those occurrences), averaged over queries and samples;
* previous token: attention from each token to the one before it;
* copying: the head's direct output at each later-repeat token, pushed through the unembedding,
  mean-subtracted over the vocabulary; the positive part's share on the attended token (if the
  head raises it) or minus the negative part's share (if it lowers it), so -1..1 with 0 for a
  head that neither copies nor suppresses.

Each score comes with its standard error over samples and a control: what the score is for a
head without the mechanism (uniform causal attention for the two attention scores, 0 for copying).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from icl_dynamics.attention import capture_attention, head_ov_weights

SCORES = ("prefix_matching", "previous_token", "copying")

INDUCTION_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("tokens", pa.int64(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("head", pa.int32(), nullable=False),
        *(
            pa.field(f"{score}{suffix}", pa.float64(), nullable=False)
            for score in SCORES
            for suffix in ("", "_se", "_control")
        ),
        pa.field("n_samples", pa.int32(), nullable=False),
    ]
)


@dataclass(frozen=True)
class Probe:
    """Repeated-random-token probe settings (Olsson et al.'s: 25 tokens, 4 repeats, 10 samples)."""

    n_tokens: int = 25
    repeats: int = 4
    n_samples: int = 10
    exclude_frac: float = 0.05
    seed: int = 0

    @property
    def length(self) -> int:
        return 1 + self.n_tokens * self.repeats


def candidate_ids(tokenizer: PreTrainedTokenizerBase, exclude_frac: float) -> torch.Tensor:
    """Token ids to sample from: the tokenizer's non-special ids minus the most and least frequent.

    BPE assigns ids in merge order, a proxy for frequency, so the lowest and highest
    ``exclude_frac`` of the ordinary ids are dropped (rows of an embedding padded beyond the
    tokenizer's vocabulary are never sampled).
    """
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    k = int(len(ids) * exclude_frac)
    kept = ids[k:len(ids) - k]
    if len(kept) < 2:
        raise ValueError(f"only {len(kept)} candidate tokens remain after excluding {exclude_frac:.0%} at each end")
    return torch.tensor(kept)


def repeated_tokens(candidates: torch.Tensor, bos_id: int, probe: Probe) -> torch.Tensor:
    """[n_samples, 1 + n_tokens * repeats]: BOS, then a random sequence (no repeats within it) tiled."""
    gen = torch.Generator().manual_seed(probe.seed)
    if probe.n_tokens > len(candidates):
        raise ValueError(f"probe needs {probe.n_tokens} distinct tokens, only {len(candidates)} candidates")
    rows = [candidates[torch.randperm(len(candidates), generator=gen)[: probe.n_tokens]] for _ in range(probe.n_samples)]
    body = torch.stack(rows).repeat(1, probe.repeats)
    return torch.cat([torch.full((probe.n_samples, 1), bos_id, dtype=body.dtype), body], dim=1)


def prefix_targets(probe: Probe) -> torch.Tensor:
    """[T, T] 0/1 mask: for each later-repeat query, the positions after its earlier occurrences."""
    n, length = probe.n_tokens, probe.length
    mask = torch.zeros(length, length)
    for r in range(1, probe.repeats):
        for i in range(n):
            q = 1 + r * n + i
            for earlier in range(r):
                mask[q, 1 + earlier * n + i + 1] = 1.0
    return mask


def later_queries(probe: Probe) -> torch.Tensor:
    """Positions of the tokens in the second and later repeats."""
    return torch.arange(1 + probe.n_tokens, probe.length)


def controls(probe: Probe) -> dict[str, float]:
    """The scores of a head attending uniformly to all visible positions (and not copying)."""
    queries = later_queries(probe).double()
    occurrences = ((queries - 1) // probe.n_tokens).double()  # earlier repeats of the query's token
    prev = 1.0 / (torch.arange(1, probe.length).double() + 1)
    return {
        "prefix_matching": float((occurrences / (queries + 1)).mean()),
        "previous_token": float(prev.mean()),
        "copying": 0.0,
    }


def signed_share(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Copying score of logit vectors [..., V] for target ids [...], in -1..1 (see module doc)."""
    centred = logits - logits.mean(dim=-1, keepdim=True)
    pos, neg = centred.clamp(min=0), (-centred).clamp(min=0)
    at = centred.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    pos_share = pos.gather(-1, target.unsqueeze(-1)).squeeze(-1) / pos.sum(-1).clamp(min=1e-30)
    neg_share = neg.gather(-1, target.unsqueeze(-1)).squeeze(-1) / neg.sum(-1).clamp(min=1e-30)
    return torch.where(at >= 0, pos_share, -neg_share)


@torch.no_grad()
def score_heads(model: PreTrainedModel, tokens: torch.Tensor, probe: Probe) -> dict[str, np.ndarray]:
    """Per-sample scores [layers, heads, samples] for each of :data:`SCORES`, one layer at a time."""
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    targets = prefix_targets(probe).to(device)
    queries = later_queries(probe).to(device)
    w_u = model.get_output_embeddings().weight.float()  # [V, d_model]
    out = {name: np.zeros((n_layers, n_heads, tokens.shape[0])) for name in SCORES}

    def reduce(layer: int, pattern: torch.Tensor, inputs: torch.Tensor) -> None:
        out["prefix_matching"][layer] = (pattern * targets)[:, :, queries].sum(-1).mean(-1).T.double().cpu().numpy()
        out["previous_token"][layer] = pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1).T.double().cpu().numpy()
        w_v, b_v, w_o = (w.float() for w in head_ov_weights(model, layer))
        values = torch.einsum("btd,hde->bhte", inputs.float(), w_v) + b_v[None, :, None, :]
        attended = tokens.gather(1, pattern[:, :, queries].argmax(-1).flatten(1)).view(tokens.shape[0], n_heads, -1)
        for h in range(n_heads):  # one head at a time: never [heads, positions, vocab] at once
            head_out = pattern[:, h, queries] @ values[:, h]  # [B, Q, d_head]
            logits = (head_out @ w_o[h]) @ w_u.T  # [B, Q, V]
            out["copying"][layer][h] = signed_share(logits, attended[:, h]).mean(-1).double().cpu().numpy()

    with capture_attention(model, reduce, with_inputs=True):
        model(tokens)
    return out


def induction_rows(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, probe: Probe = Probe()) -> list[dict]:
    """One row per (layer, head) with each score's mean, standard error and control."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start the probe with")
    tokens = repeated_tokens(candidate_ids(tokenizer, probe.exclude_frac), bos, probe)
    per_sample = score_heads(model, tokens, probe)
    ctrl = controls(probe)
    n_layers, n_heads, n = per_sample["prefix_matching"].shape
    rows = []
    for layer in range(n_layers):
        for head in range(n_heads):
            row = {"layer": layer, "head": head, "n_samples": n}
            for name in SCORES:
                values = per_sample[name][layer, head]
                row[name] = float(values.mean())
                row[f"{name}_se"] = float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
                row[f"{name}_control"] = ctrl[name]
            rows.append(row)
    return rows
