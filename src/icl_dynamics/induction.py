"""Classic induction-head scores of every head (Olsson et al. 2022), on repeated random tokens.

The probe is ``n_samples`` sequences of a BOS token followed by ``n_tokens`` random tokens repeated
``repeats`` times. Per head:

* prefix matching: attention from each token of a later repeat to the tokens that followed its
  earlier occurrences (summed over those occurrences), averaged over queries and samples;
* previous token: attention from each token to the one before it;
* copying (Olsson et al.'s eigenvalue score, from the weights alone): the eigenvalues lambda of the
  head's full OV circuit token -> logits, sum(lambda) / sum(|lambda|) in -1..1; +1 for a head whose
  output raises the logit of whatever token it attends to, -1 for one that suppresses it, about 0
  for a random map. See :func:`ov_copying_scores` for the layer norms folded in.

The attention scores come with their standard error over samples and a control: their value for a
head attending uniformly to every visible position. Copying has no sampling error (``_se`` = 0) and
the control 0, the score of a head that neither copies nor suppresses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from icl_dynamics.architecture import architecture
from icl_dynamics.attention import capture_attention
from icl_dynamics.models import check_context
from icl_dynamics.schemas import ATTENTION_SCORES


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


@torch.no_grad()
def score_heads(model: PreTrainedModel, tokens: torch.Tensor, probe: Probe) -> dict[str, np.ndarray]:
    """Per-sample attention scores [layers, heads, samples]: prefix matching and previous token."""
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    targets = prefix_targets(probe).to(device)
    queries = later_queries(probe).to(device)
    out = {name: np.zeros((n_layers, n_heads, tokens.shape[0])) for name in ATTENTION_SCORES}

    def reduce(layer: int, pattern: torch.Tensor) -> None:
        out["prefix_matching"][layer] = (pattern * targets)[:, :, queries].sum(-1).mean(-1).T.double().cpu().numpy()
        out["previous_token"][layer] = pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1).T.double().cpu().numpy()

    with capture_attention(model, reduce):
        model(tokens)
    return out


@torch.no_grad()
def ov_copying_scores(model: PreTrainedModel) -> np.ndarray:
    """Olsson et al.'s copying score of every head [layers, heads], in float64 (method notes §7).

    The full OV circuit maps a token to logits: ``W_E N_in W_V^h W_O^h N_post N_f W_U`` ([V, V]), with the
    linear part of every norm on the head's path folded in (:meth:`~icl_dynamics.architecture.base.Norm.linear`):
    N_in the norm before the layer's value projection, N_post the norm on the attention output before the
    residual stream, N_f the final norm. Per family (README, "Model families"): GPT-NeoX N_in = P G_l (P centres,
    G_l the input layer norm's gain), N_post = I, N_f = P G_f; OLMo-1 N_in = N_f = P (layer norms without
    gains), N_post = I; OLMo-2 N_in = I (attention reads the raw residual stream), N_post = G_post (the
    post-attention RMSNorm's gain), N_f = G_f. Left out, as in the usual folded-circuit analyses: each norm's
    division by its input's norm (it depends on the residual stream, not on the head; the score is a ratio of
    eigenvalues, so one common factor would not change it anyway), biases (constant offsets, no token-to-token
    map) and OLMo-1's value clamp. The [V, V] matrix is A B with A = W_E N_in W_V^h and
    B = W_O^h N_post N_f W_U, and B A ([d_head, d_head]) has the same nonzero eigenvalues, so only
    ``W_U W_E`` ([d_model, d_model]) ever touches the vocabulary: the score does not depend on |V|, unlike a
    share of vocabulary-wide logits.
    """
    arch = architecture(model)
    device = next(model.parameters()).device
    w_e = arch.embedding().double()  # [V, d_model]
    w_u = arch.unembedding().double()  # [V, d_model]: logits = h @ w_u.T
    d_model = w_e.shape[1]
    linear = dict(d_model=d_model, device=device)
    right = arch.final_norm().linear(**linear) @ (w_u.T @ w_e)  # N_f W_U W_E
    scores = np.zeros((arch.n_layers, arch.n_heads))
    for layer in range(arch.n_layers):
        weights = arch.head_weights(layer)
        w_v, w_o = weights.w_v.double(), weights.w_o.double()  # [H, d, dh], [H, dh, d]
        inner = arch.post_norm(layer).linear(**linear) @ right @ arch.input_norm(layer).linear(**linear)
        small = w_o @ inner @ w_v  # B A per head [H, dh, dh]
        eig = torch.linalg.eigvals(small)
        scores[layer] = (eig.sum(-1).real / eig.abs().sum(-1).clamp_min(1e-300)).cpu().numpy()
    return scores


def induction_rows(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, probe: Probe = Probe()) -> list[dict]:
    """One row per (layer, head) with each score's mean, standard error and control."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start the probe with")
    check_context(model, probe.length, "the induction probe (1 + induction.n_tokens x induction.repeats)")
    tokens = repeated_tokens(candidate_ids(tokenizer, probe.exclude_frac), bos, probe)
    per_sample = score_heads(model, tokens, probe)
    copying = ov_copying_scores(model)
    ctrl = controls(probe)
    n_layers, n_heads, n = per_sample["prefix_matching"].shape
    rows = []
    for layer in range(n_layers):
        for head in range(n_heads):
            row = {"layer": layer, "head": head, "n_samples": n}
            for name in ATTENTION_SCORES:
                values = per_sample[name][layer, head]
                row[name] = float(values.mean())
                row[f"{name}_se"] = float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
                row[f"{name}_control"] = ctrl[name]
            row.update(copying=float(copying[layer, head]), copying_se=0.0, copying_control=ctrl["copying"])
            rows.append(row)
    return rows
