"""Ren et al.'s relation index (RI): how much each head, when it attends to a relation's head token,
raises the relation's tail token among the tokens visible in context.

For a triplet (t_s, r, t_o) at positions s, o of a sequence and every query position j >= max(s, o):

1. *QK gate* (real attention of the forward pass): head h qualifies for (triplet, j) when s is the
   strict argmax of A[j, :j+1] (``gate="argmax"``, the training-dynamics variant) and, for
   ``gate="margin"``, also A[j, s] > tau * max_{k != s} A[j, k] (tau = 2.2 in the paper).
2. *OV score*: p = softmax(x W_OV^h W_U) restricted to the candidate ids C_j visible up to j;
   q_t = max(0, p_t - mean_C p); a = q_{t_o} / sum_C q (event skipped when the sum is 0). The
   full-vocabulary normaliser cancels, so only the logits of the sequence's own ids are formed.
3. RI = mean of a over the qualifying events of a relation, with the event count, the gate's pass
   rate, RI per opportunity (failed gates count 0) and three nulls, the same score with the tail
   replaced by: a *matched* control (a token of the tail's kind with no relation to the head, see
   :func:`icl_dynamics.relation_events.matched_controls`: RI minus it is the primary ``effect``; for
   ``contextual`` it is matched on its position relative to s as well), the "tenth token", and a
   seeded random candidate (``effect_tenth``, ``effect_random``). A control that is the triplet's own
   head or tail token is dropped for that event.

Variants of x (each labelled in the output): ``literal`` = raw embedding of the current token t_j
(the paper's formula), ``source`` = raw embedding of the attended token t_s (the paper's prose),
``contextual`` = the head's real value at s (the value projection's output as the attention reads it:
N_in(residual)_s W_V^h + b_V^h, clamped where OLMo-1's ``clip_qkv`` is set), times W_O^h W_U. Biases are
left out of ``literal``/``source`` (as in the formula); b_O is shared by all heads and is never included.
Where the family puts a norm between the attention output and the residual stream (OLMo-2's
post-attention RMSNorm) the head's write is what that norm makes of it: W_O^h diag(g_post) / r_j, with
g_post the norm's gain and r_j the root mean square of the layer's real attention output at the query
position j in this forward pass (the norm linearised where the model is). Any QK-norm enters through the
real attention pattern only, as every gate reads it (README, "Model families").

Decisions the paper leaves open, fixed here (and recorded as columns of every row):

* BOS (``bos``, default on): Pythia adds no BOS, so without one position 0 is the attention sink
  and a triplet whose head token opens the sequence passes the argmax gate almost everywhere.
  ``<|endoftext|>`` (the config's ``bos_token_id``; for OLMo, whose configs name none, its
  ``eos_token_id``, the document separator it was trained with) is prepended; it is never a candidate nor
  a head position (method notes §8).
* ``literal`` (x = the current token t_j) is biased where t_j is the tail itself: any head that copies
  its own input raises it. Those events are left out, and so is a control equal to t_j; ``source``
  has no such bias and is the analysis default (method notes §9.1).

* Candidate set with ``exclude_function_words``: an id is in C_j when it occurs at some position
  k <= j whose ``function_mask`` is false (an id seen only as a stop word / punctuation is not a
  candidate). Events whose tail is not in C_j are not opportunities (e.g. a tail that is a
  function word is never scored); the tail is never forced into C_j.
* Ties: the argmax gate needs a *strict* maximum (a head attending equally to two keys attends to
  neither), which the margin gate implies anyway.
* Tenth-token control: the target is the token at index ``control_position`` (0-based), or the
  last token of a shorter sequence; with the function-word exclusion, the first candidate token
  at or after that index. It counts for an event only once visible (j >= its position). A
  sequence with no such token contributes no tenth-token control.
* Random control: for each (sequence, j) one candidate drawn uniformly from C_j, shared by all
  heads and triplets at that position, with ``numpy.random.default_rng([seed, sequence_id])``
  drawing u_j ~ U[0, 1) for j = 0..n-1 and taking the floor(u_j * |C_j|)-th candidate in order of
  first (candidate) appearance. Batch size and sequence order therefore do not change it.
* SIH rule (a significance test, not a margin): per cell (head, relation, direction, gate, variant)
  the paired differences a - c of each event against each control give a mean, a two-way
  cluster-robust standard error and a one-sided t-test of "RI above that control"; the cell's p is
  the largest of the three. The two cluster dimensions are the source document (``document_id``:
  events of one abstract are not independent draws) and the token pair (t_s, t_o) (a relation whose
  pairs recur, like a fixed map from countries to capitals, gives every event of a pair the same
  random-init OV preference: clustering by document alone called that a relation at step 0). The
  standard error is CR2 with Bell-McCaffrey degrees of freedom, which stays calibrated when one
  document holds most of a cell's events (:mod:`icl_dynamics.sih_test`). Holm's method controls the
  family-wise error over every tested cell of the checkpoint for each (gate, variant), at ``alpha``.
  A cell with fewer than ``min_clusters`` documents or token pairs behind any comparison is
  ``insufficient``, not "not significant"; ``effective_clusters`` reports their Kish effective count,
  which the degrees of freedom follow.
* Negative controls: the cells of a family that no head can know under a variant
  (:data:`icl_dynamics.relations.NEGATIVE_CONTROLS`: ``kg-letters`` under ``literal`` and ``source``)
  are never SIHs (``sih_status`` "negative control"); they are tested as a Holm family of their own
  and ``negative_control_flagged`` says which passed. Any such flag means the test is broken on
  this checkpoint: a loud warning says so.
* ``ri_se`` is RI's two-way cluster-robust standard error (documents and token pairs).
* Sequences longer than ``max_len`` (default: the model's context) are cut there; triplets with
  max(s, o) beyond the cut are dropped with a warning.

How it is computed: each batch of sequences (sorted by length) runs the base model once (no LM
head) with eager attention; each layer's pattern is reduced at once to per-query (argmax, top,
runner-up) and dropped. Events are found from the query side: for each query with a strict argmax,
the triplets whose head position is that argmax (indexed per (sequence, position)) and that are
live at j. Score rows exist only for these (sequence, head, query) triples, over the sequence's own
ids: logits (x W_V^h)(W_O^h W_U[:, ids]) of shape [batch, heads, positions, ids], never heads x
positions x vocabulary. Scores are computed in float32 (float64 for a float64 model); a float16
model's gate sees float16 probabilities, whose ties fail the strict gate more often, so prefer
loading the model in float32 for this stage.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import nn
from tqdm import tqdm

from icl_dynamics.architecture import architecture
from icl_dynamics.attention import capture_attention
from icl_dynamics.relation_events import TRIPLET_FIELDS, IndexedSequence, prepare_sequences
from icl_dynamics.relations import NEGATIVE_CONTROLS
from icl_dynamics.sih_test import clustered_test, holm

GATES = ("argmax", "margin")
VARIANTS = ("literal", "source", "contextual")
DEFAULT_TAU = 2.2
DEFAULT_ALPHA = 0.05
DEFAULT_MIN_CLUSTERS = 10

CONTROLS = ("matched", "tenth", "random")
STREAMS = ("ri", *CONTROLS)  # per-event values summed per cluster: a, and a - c for each control
CLUSTER_DIMS = ("document", "pair")  # the two ways events are clustered for the SIH test


# ----------------------------------------------------------------------------- pure scoring


def gate_statistics(pattern: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query row of an attention pattern [..., q, k]: (argmax key, top weight, best weight of
    any other key). Masked keys hold 0, so a lone visible key gets a runner-up of 0."""
    values, indices = pattern.topk(2, dim=-1)
    return indices[..., 0], values[..., 0], values[..., 1]


def gate_passes(top: torch.Tensor, second: torch.Tensor, gate: str, tau: float) -> torch.Tensor:
    """Whether a query's attention passes the gate for its argmax key: a strict maximum, and for
    ``margin`` also top > tau * second (the ratio test without dividing by a possible 0)."""
    if gate == "argmax":
        return top > second
    if gate == "margin":
        return (top > second) & (top > tau * second)
    raise ValueError(f"unknown gate {gate!r}; choose from {GATES}")


def ov_scores(logits: torch.Tensor, candidates: torch.Tensor, rows: torch.Tensor | None = None,
              targets: torch.Tensor | None = None) -> torch.Tensor:
    """The event score a = q_t / sum_{C_j} q for rows of logits [..., R, U] over a sequence's ids,
    with C_j given as a bool mask [R, U]: for every id ([..., R, U], 0 off C_j), or only at
    ``targets`` [P, k] of rows ``rows`` [P] ([..., P, k]; a negative target gives NaN). NaN where
    sum q is 0 (p uniform on C_j) or C_j is empty.

    Any positive rescaling of p cancels in the ratio, so p is left as exp(logit - max) without the
    softmax normaliser (the full-vocabulary one would cancel too).
    """
    e = logits.masked_fill(~candidates, -math.inf)
    e.sub_(e.amax(-1, keepdim=True)).exp_()
    mean = e.sum(-1, keepdim=True) / candidates.sum(-1, keepdim=True)
    if targets is None:
        q = e.sub_(mean).clamp_min_(0)
        return q / q.sum(-1, keepdim=True)
    picked = (e[..., rows[:, None], targets] - mean[..., rows, :]).clamp_min_(0)
    total = e.sub_(mean).clamp_min_(0).sum(-1)
    return (picked / total[..., rows, None]).masked_fill_(targets < 0, math.nan)


RATIO_BINS = 400
RATIO_LOG10_MAX = 4.0  # ratios from 1 to 10^4 in steps of 10^0.01 (2.3 %); larger ones in the last bin


def ratio_bins(top: torch.Tensor, second: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Head index and histogram bin of the dominance ratio top / runner-up of each real query row
    [B, H, T] with a runner-up (the first position has none)."""
    ok = real & (second > 0)
    _, h, _ = ok.nonzero(as_tuple=True)
    log_ratio = torch.log10(top[ok].double() / second[ok].double())
    bins = (log_ratio * (RATIO_BINS / RATIO_LOG10_MAX)).long().clamp_(0, RATIO_BINS - 1)
    return h, bins


def ratio_quantile(hist: np.ndarray, q: float) -> np.ndarray:
    """The q-quantile of the ratio from histograms [..., RATIO_BINS] (upper bin edge; NaN if empty)."""
    cumulative = np.cumsum(hist, axis=-1)
    total = cumulative[..., -1:]
    with np.errstate(invalid="ignore"):
        index = np.argmax(cumulative >= q * total, axis=-1)
    edge = 10 ** ((index + 1) * RATIO_LOG10_MAX / RATIO_BINS)
    return np.where(total[..., 0] > 0, edge, np.nan)


# ----------------------------------------------------------------------------- per-batch scoring


class _Accumulator:
    """Sums over events per (gate, variant, group, head), on the scoring device, in float64."""

    FIELDS = ("n", "sum", *(f"{c}_{k}" for c in CONTROLS for k in ("n", "sum")), "triplets_q")

    def __init__(self, gates: Sequence[str], variants: Sequence[str], groups: int, layers: int, heads: int,
                 device: torch.device) -> None:
        shape = (len(gates), len(variants), layers, groups, heads)
        self.stats = {f: torch.zeros(shape, dtype=torch.float64, device=device) for f in self.FIELDS}
        self.passes = torch.zeros((len(gates), layers, groups, heads), dtype=torch.float64, device=device)
        # dominance ratio top / runner-up of every real query row (the margin gate's statistic)
        self.ratio_hist = torch.zeros((layers, heads, RATIO_BINS), dtype=torch.float64, device=device)
        self.opportunities = np.zeros(groups, dtype=np.int64)
        self.triplets = np.zeros(groups, dtype=np.int64)
        self.n_cells = int(np.prod(shape))
        self.n_clusters = dict.fromkeys(CLUSTER_DIMS, 1)  # documents and token pairs (set by the caller)
        # per stream and cluster dimension: (key = cell * n_clusters + cluster, sum, count) of each batch's
        # events, kept on the scoring device (copied to the host once, at the end: no sync per layer)
        self.parts: dict[str, dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]] = {
            k: {d: [] for d in CLUSTER_DIMS} for k in STREAMS}

    def add_clustered(self, stream: str, cell: torch.Tensor, clusters: Mapping[str, torch.Tensor],
                      values: torch.Tensor) -> None:
        """Sum ``values`` per (cell, cluster) in each cluster dimension and keep the sums for the test."""
        if not len(values):
            return
        for dim in CLUSTER_DIMS:
            keys, inverse = torch.unique(cell * self.n_clusters[dim] + clusters[dim], return_inverse=True)
            sums = torch.zeros(len(keys), dtype=torch.float64, device=values.device).index_add_(0, inverse, values)
            counts = torch.bincount(inverse, minlength=len(keys))
            self.parts[stream][dim].append((keys, sums, counts))

    def clustered(self, stream: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
        """The (keys, sums, counts, n_clusters) of ``stream`` per cluster dimension, for :func:`clustered_test`."""
        out = []
        for dim in CLUSTER_DIMS:
            parts = self.parts[stream][dim]
            keys, sums, counts = ((torch.cat(x).cpu().numpy() for x in zip(*parts)) if parts else
                                  (np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)))
            out.append((keys, sums, counts, self.n_clusters[dim]))
        return out


@dataclass
class _BatchIndex:
    """One batch's triplets, indexed by (sequence, head position) so that each query's argmax key
    finds its triplets directly; plus the per-position control targets."""

    lengths: torch.Tensor  # [B]
    document: torch.Tensor  # [B] source document of each sequence
    row: torch.Tensor  # [n_trip] batch row of each triplet
    pair: torch.Tensor  # [n_trip] token pair (t_s, t_o) of each triplet
    order: torch.Tensor  # triplets sorted by (b, s)
    slot_start: torch.Tensor  # [B * T] first index into ``order`` of the triplets with head at (b, s)
    slot_count: torch.Tensor  # [B * T]
    start: torch.Tensor  # [n_trip] first j of each triplet's opportunities
    group: torch.Tensor
    tail: torch.Tensor  # uniq index of the tail
    head: torch.Tensor  # uniq index of the head token (-1: not a candidate)
    matched: torch.Tensor  # uniq index of the matched control (-1: none)
    matched_position: torch.Tensor  # ... matched on position as well (the contextual variant's)
    tenth_pos: torch.Tensor  # [B] position of the tenth-token control (T when none)
    tenth: torch.Tensor  # [B] its uniq index
    random: torch.Tensor  # [B, T] uniq index of the random control at each j
    position_uniq: torch.Tensor  # [B, T] uniq index of the token at each position (-1: none)


def _batch_index(batch: Sequence[IndexedSequence], t_max: int, acc: _Accumulator, device: torch.device) -> _BatchIndex:
    """Index a batch's triplets and add their opportunities (independent of heads) to ``acc``."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("b", *TRIPLET_FIELDS)}
    lengths, tenth_pos, tenth, document = [], [], [], []
    random = np.zeros((len(batch), t_max), dtype=np.int64)
    position_uniq = np.full((len(batch), t_max), -1, dtype=np.int64)
    for b, seq in enumerate(batch):
        n = len(seq.tokens)
        fields = dict(zip(TRIPLET_FIELDS, seq.triplets.T))
        np.add.at(acc.opportunities, fields["group"], n - fields["start"])
        np.add.at(acc.triplets, fields["group"], 1)
        cols["b"].append(np.full(len(seq.triplets), b))
        for key in TRIPLET_FIELDS:
            cols[key].append(fields[key])
        position_uniq[b, :n] = seq.position_uniq
        lengths.append(n)
        document.append(seq.document)
        tenth_pos.append(seq.tenth[0] if seq.tenth else t_max)
        tenth.append(seq.tenth[1] if seq.tenth else 0)
        random[b, :n] = seq.random
    c = {k: np.concatenate(v).astype(np.int64) for k, v in cols.items()}
    slot = c["b"] * t_max + c["s"]
    order = np.argsort(slot, kind="stable")
    count = np.bincount(slot, minlength=len(batch) * t_max)
    as_t = lambda x: torch.as_tensor(np.asarray(x, dtype=np.int64), device=device)  # noqa: E731
    return _BatchIndex(
        lengths=as_t(lengths), document=as_t(document), row=as_t(c["b"]), pair=as_t(c["pair"]), order=as_t(order),
        slot_start=as_t(np.cumsum(count) - count), slot_count=as_t(count), start=as_t(c["start"]),
        group=as_t(c["group"]), tail=as_t(c["tail"]), head=as_t(c["head"]), matched=as_t(c["matched"]),
        matched_position=as_t(c["matched_position"]),
        tenth_pos=as_t(tenth_pos), tenth=as_t(tenth), random=as_t(random), position_uniq=as_t(position_uniq),
    )


class _BatchScorer:
    """Scores one padded batch layer by layer, as the forward pass hands over each attention pattern."""

    def __init__(self, model: nn.Module, batch: Sequence[IndexedSequence], acc: _Accumulator, *,
                 gates: Sequence[str], variants: Sequence[str], tau: float, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model, self.acc = model, acc
        self.gates, self.variants, self.tau, self.dtype = gates, variants, tau, dtype
        n_max = max(len(seq.tokens) for seq in batch)
        u_max = max(len(seq.uniq) for seq in batch)
        ids = torch.zeros((len(batch), n_max), dtype=torch.long)
        uniq = torch.zeros((len(batch), u_max), dtype=torch.long)
        first = torch.full((len(batch), u_max), n_max, dtype=torch.long)  # padding ids: never candidates
        for b, seq in enumerate(batch):
            ids[b, : len(seq.tokens)] = torch.from_numpy(seq.tokens)
            uniq[b, : len(seq.uniq)] = torch.from_numpy(seq.uniq)
            first[b, : len(seq.uniq)] = torch.from_numpy(seq.first)
        self.index = _batch_index(batch, n_max, acc, device)
        self.ids, self.first = ids.to(device), first.to(device)
        self.attention_mask = (torch.arange(n_max, device=device)[None, :] < self.index.lengths[:, None]).long()
        self.arch = architecture(model)
        w_u = self.arch.unembedding()  # [vocab, d_model]
        self.w_u_sub = w_u[uniq.to(device)].to(dtype).transpose(1, 2)  # W_U[:, ids of each sequence] [B, d_model, U]
        self.x = self.arch.embedding()[self.ids].to(dtype)  # raw embeddings [B, T, d_model]
        self.values: dict[int, torch.Tensor] = {}
        self.scales: dict[int, torch.Tensor] = {}

    def keep_values(self, layer: int, values: torch.Tensor) -> None:
        """Keep the layer's value vectors [B, H, T, d_head] (with b_V and any clamp) for ``contextual``."""
        self.values[layer] = values.to(self.dtype)

    def keep_scale(self, layer: int, scale: torch.Tensor) -> None:
        """Keep 1 / RMS of the layer's attention output [B, T] (families with a post-attention norm)."""
        self.scales[layer] = scale.to(self.dtype)

    def __call__(self, layer: int, pattern: torch.Tensor) -> None:
        idx, acc = self.index, self.acc
        argmax, top, second = gate_statistics(pattern)  # [B, H, T]
        del pattern
        value = self.values.pop(layer, None)
        batch, heads, t_max = argmax.shape
        real = torch.arange(t_max, device=argmax.device) < idx.lengths[:, None, None]
        rows_h, bins = ratio_bins(top, second, real)
        acc.ratio_hist[layer].view(-1).index_add_(0, rows_h * RATIO_BINS + bins,
                                                  torch.ones_like(bins, dtype=torch.float64))
        qb, qh, qj = (gate_passes(top, second, "argmax", self.tau) & real).nonzero(as_tuple=True)
        # pairs (query, triplet) whose head position is the query's (strict) argmax and that are live at j
        slot = qb * t_max + argmax[qb, qh, qj]
        count = idx.slot_count[slot]
        query = torch.repeat_interleave(torch.arange(len(qb), device=slot.device), count)
        within = torch.arange(len(query), device=slot.device) - torch.repeat_interleave(count.cumsum(0) - count, count)
        trip = idx.order[idx.slot_start[slot][query] + within]
        live = idx.start[trip] <= qj[query]
        query, trip = query[live], trip[live]
        if not len(query):
            return
        rows, inverse = torch.unique_consecutive(query, return_inverse=True)  # ``query`` is sorted
        rb, rh, rj = qb[rows], qh[rows], qj[rows]
        rs = argmax[rb, rh, rj]
        passed = {"argmax": torch.ones_like(inverse, dtype=torch.bool)}
        if "margin" in self.gates:
            passed["margin"] = (top[rb, rh, rj] > self.tau * second[rb, rh, rj])[inverse]
        flat = idx.group[trip] * heads + rh[inverse]
        for gi, gate in enumerate(self.gates):
            hits = flat[passed[gate]]
            acc.passes[gi, layer].view(-1).index_add_(0, hits, torch.ones_like(hits, dtype=torch.float64))
        weights = self.arch.head_weights(layer)
        w_v, w_o = weights.w_v.to(self.dtype), weights.w_o.to(self.dtype)
        post = self.arch.post_norm(layer)
        if post.weight is not None:  # OLMo-2: the post-attention norm's gain is on every head's write
            w_o = w_o * post.weight.to(self.dtype)
        w_ou = torch.einsum("hed,bdu->bheu", w_o, self.w_u_sub)  # W_O^h (G_post) W_U[:, ids] [B, H, d_head, U]
        scale = self.scales.pop(layer, None)  # and its 1 / RMS at the query position j
        cand = rj[:, None] >= self.first[rb]  # C_j of each row [R, U]
        pb, pj = rb[inverse], rj[inverse]  # each pair's sequence and query
        tenth = torch.where(pj >= idx.tenth_pos[pb], idx.tenth[pb], -1)
        current = idx.position_uniq[pb, pj]  # t_j, for the literal variant
        raw = None
        for vi, variant in enumerate(self.variants):
            matched = idx.matched_position if variant == "contextual" else idx.matched
            controls = torch.stack([matched[trip], tenth, idx.random[pb, pj]], 1)  # CONTROLS order
            # a control that is the triplet's own tail or head token is no control: dropped for that event
            own = (controls == idx.tail[trip, None]) | (controls == idx.head[trip, None])
            targets = torch.cat([idx.tail[trip, None], controls.masked_fill(own, -1)], 1)  # uniq indices [P, 4]
            if variant == "contextual":
                if value is None:
                    raise RuntimeError(f"layer {layer}: value vectors were not captured")
                logits = (value @ w_ou)[rb, rh, rs]  # the head's real value at s
            else:
                if raw is None:  # raw-embedding logits x_t W_OV^h W_U[:, ids] of every token [B, H, T, U]
                    raw = torch.einsum("btd,hde->bhte", self.x, w_v)
                    if weights.value_clip is not None:  # OLMo-1's clip_qkv clamps every value the head reads
                        raw = raw.clamp(-weights.value_clip, weights.value_clip)
                    raw = raw @ w_ou
                logits = raw[rb, rh, rj if variant == "literal" else rs]
            if scale is not None:  # the post-attention RMSNorm's scale where the head writes (query j)
                logits = logits * scale[rb, rj][:, None]
            scores = ov_scores(logits, cand, inverse, targets)  # [P, 4]
            if variant == "literal":  # x_j is the current token's: a self-copying head raises t_j
                scores[:, 0].masked_fill_(current == targets[:, 0], math.nan)
                scores[:, 1:].masked_fill_(current[:, None] == targets[:, 1:], math.nan)
            self._accumulate(layer, vi, passed, trip, rh[inverse], scores)

    def _accumulate(self, layer: int, vi: int, passed: Mapping[str, torch.Tensor], trip: torch.Tensor,
                    head: torch.Tensor, scores: torch.Tensor) -> None:
        """Add the events (query, triplet) that pass each gate; ``scores`` [P, 4] holds their scores
        for the tail and for each of :data:`CONTROLS` (NaN: no event, or no such control for it)."""
        acc = self.acc
        heads = acc.passes.shape[-1]
        tail, *controls = scores.double().unbind(1)
        defined = ~tail.isnan()
        flat_all = self.index.group[trip] * heads + head
        n_v, n_layers, n_groups = len(self.variants), *acc.stats["n"].shape[2:4]
        for gi, gate in enumerate(self.gates):
            keep = passed[gate] & defined
            flat, a = flat_all[keep], tail[keep]
            stats = {k: v[gi, vi, layer].view(-1) for k, v in acc.stats.items()}
            stats["n"].index_add_(0, flat, torch.ones_like(a))
            stats["sum"].index_add_(0, flat, a)
            # per (cell, document) and (cell, token pair) sums for the test of RI against each control
            cell = ((gi * n_v + vi) * n_layers + layer) * (n_groups * heads) + flat
            kept = trip[keep]
            clusters = {"document": self.index.document[self.index.row[kept]], "pair": self.index.pair[kept]}
            acc.add_clustered("ri", cell, clusters, a)
            for name, control in zip(CONTROLS, controls):
                c = control[keep]
                ok = ~c.isnan()
                stats[f"{name}_n"].index_add_(0, flat[ok], torch.ones_like(c[ok]))
                stats[f"{name}_sum"].index_add_(0, flat[ok], c[ok])
                acc.add_clustered(name, cell[ok], {d: v[ok] for d, v in clusters.items()}, (a - c)[ok])
            # triplets with at least one event: each (triplet, head) once, then counted per group
            marks = torch.unique(trip[keep] * heads + head[keep])
            stats["triplets_q"].index_add_(0, self.index.group[marks // heads] * heads + marks % heads,
                                           torch.ones_like(marks, dtype=torch.float64))


def _batches(seqs: list[IndexedSequence], batch_size: int) -> Iterator[list[IndexedSequence]]:
    """Batches of similar length (less padding), longest first so memory peaks early."""
    ordered = sorted(seqs, key=lambda q: (-len(q.tokens), q.sequence_id))
    for i in range(0, len(ordered), batch_size):
        yield ordered[i : i + batch_size]


# ----------------------------------------------------------------------------- public entry point


def score_relation_index(
    model: nn.Module,
    sequences: pa.Table | pd.DataFrame,
    triplets: pa.Table | pd.DataFrame,
    *,
    gates: Sequence[str] = GATES,
    variants: Sequence[str] = VARIANTS,
    tau: float = DEFAULT_TAU,
    exclude_function_words: bool = True,
    control_position: int = 10,
    seed: int = 0,
    alpha: float = DEFAULT_ALPHA,
    min_clusters: int = DEFAULT_MIN_CLUSTERS,
    batch_size: int = 8,
    max_len: int | None = None,
    bos: bool = True,
) -> list[dict[str, Any]]:
    """Relation index of every head of ``model`` (any supported family) for every (family, relation, direction)
    of ``triplets`` over ``sequences`` (the relations stage's tables), per gate and variant.

    Returns one row per (layer, head, family, relation, direction, gate, variant) with every column
    of :data:`icl_dynamics.schemas.RELATION_INDEX_SCHEMA` except ``model``, ``step`` and ``tokens`` (the caller's).
    """
    gates, variants = tuple(gates), tuple(variants)
    for name, got, allowed in (("gate", gates, GATES), ("variant", variants, VARIANTS)):
        if not got or set(got) - set(allowed) or len(set(got)) != len(got):
            raise ValueError(f"{name}s must be distinct values from {allowed}, got {got}")
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if batch_size < 1 or control_position < 0 or min_clusters < 2 or not 0 < alpha < 1:
        raise ValueError("batch_size must be >= 1, control_position >= 0, min_clusters >= 2 and 0 < alpha < 1")
    arch = architecture(model)  # raises for a family we do not support
    config = model.config
    max_len = int(max_len or config.max_position_embeddings)
    bos_id = arch.sequence_start_id() if bos else None
    if bos and bos_id is None:
        raise ValueError("the model config names no bos_token_id or eos_token_id; pass bos=False to score without one")
    seqs, keys, n_pairs = prepare_sequences(sequences, triplets, exclude_function_words=exclude_function_words,
                          control_position=control_position, seed=seed, max_len=max_len, bos_id=bos_id)
    param = next(model.parameters())
    device = param.device
    dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    acc = _Accumulator(gates, variants, len(keys), layers, heads, device)
    acc.n_clusters = {"document": max((seq.document for seq in seqs), default=0) + 1, "pair": max(n_pairs, 1)}

    for batch in tqdm(_batches(seqs, batch_size), desc="relation index", total=-(-len(seqs) // batch_size),
                      mininterval=5):
        scorer = _BatchScorer(model, batch, acc, gates=gates, variants=variants, tau=tau, dtype=dtype, device=device)
        with contextlib.ExitStack() as stack:
            if "contextual" in variants:
                stack.enter_context(arch.capture_values(scorer.keep_values))
            # registered before capture_attention's hook on the same module, so the scale is there first
            stack.enter_context(arch.capture_write_scale(scorer.keep_scale))
            stack.enter_context(torch.inference_mode())
            stack.enter_context(capture_attention(model, scorer))
            arch.base()(input_ids=scorer.ids, attention_mask=scorer.attention_mask, use_cache=False)

    params = dict(exclude_function_words=bool(exclude_function_words), control_position=int(control_position),
                  seed=int(seed), alpha=float(alpha), min_clusters=int(min_clusters), bos=bool(bos))
    return _rows(acc, keys, gates, variants, tau, params)


def _control_columns(stats: Mapping[str, np.ndarray], control: str, at: tuple) -> dict[str, Any]:
    n = int(stats[f"{control}_n"][at])
    return {"": float(stats[f"{control}_sum"][at]) / n if n else math.nan, "_events": n}


def _rows(acc: _Accumulator, keys: Sequence[tuple[str, str, str]], gates: Sequence[str],
          variants: Sequence[str], tau: float, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    stats = {k: v.cpu().numpy() for k, v in acc.stats.items()}
    passes = acc.passes.cpu().numpy()
    shape = stats["n"].shape
    hist = acc.ratio_hist.cpu().numpy()
    ratio = {"p50": ratio_quantile(hist, 0.5), "p95": ratio_quantile(hist, 0.95)}
    ratio_model_p95 = float(ratio_quantile(hist.sum((0, 1)), 0.95))
    _, _, layers, groups, heads = shape
    tests = {}
    for stream in STREAMS:
        tests[stream] = {k: v.reshape(shape) for k, v in clustered_test(acc.clustered(stream), acc.n_cells).items()}
    # the cell's test: RI above *each* control, so the largest p; the effect is over the matched control
    p_all = np.stack([tests[c]["p"] for c in CONTROLS])
    untested = np.isnan(p_all).any(0)
    p_cell = np.where(untested, np.nan, np.nanmax(np.where(np.isnan(p_all), 0.0, p_all), 0))
    clusters = np.min(np.stack([tests[c]["clusters"] for c in CONTROLS]), 0)
    effective = np.min(np.stack([tests[c]["effective_clusters"] for c in CONTROLS]), 0)
    sufficient = (clusters >= params["min_clusters"]) & ~np.isnan(p_cell)
    # negative controls (the letter family under literal/source) are tested as their own Holm family
    negative = np.zeros(shape, dtype=bool)
    for vi, variant in enumerate(variants):
        for g, (family, _, _) in enumerate(keys):
            negative[:, vi, :, g] = variant in NEGATIVE_CONTROLS.get(family, ())
    adjusted = np.full(shape, np.nan)
    for gi in range(len(gates)):  # one family per (gate, variant): every other cell of this checkpoint
        for vi in range(len(variants)):
            for members in (~negative[gi, vi], negative[gi, vi]):
                adjusted[gi, vi][members] = holm(np.where(sufficient[gi, vi] & members, p_cell[gi, vi], np.nan))[members]
    flagged_control = negative & sufficient & (adjusted < params["alpha"])
    if flagged_control.any():
        where = [f"{keys[g][0]} {keys[g][1]} {keys[g][2]} L{layer}H{head} ({gates[gi]}, {variants[vi]})"
                 for gi, vi, layer, g, head in zip(*np.nonzero(flagged_control))]
        warnings.warn(f"NEGATIVE CONTROL FLAGGED: {len(where)} cell(s) of a family no head can know under its "
                      f"variant passed the SIH test ({', '.join(where[:5])}{', ...' if len(where) > 5 else ''}); "
                      "the test is miscalibrated on this checkpoint, do not trust its SIH flags", stacklevel=3)
    rows = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for gi, gate in enumerate(gates):
            for vi, variant in enumerate(variants):
                for g, (family, relation, direction) in enumerate(keys):
                    opp = int(acc.opportunities[g])
                    for layer in range(layers):
                        for head in range(heads):
                            at = (gi, vi, layer, g, head)
                            n, total = int(stats["n"][at]), float(stats["sum"][at])
                            n_pass = int(passes[gi, layer, g, head])
                            status = ("insufficient" if not sufficient[at] else "negative control" if negative[at]
                                      else "sih" if adjusted[at] < params["alpha"] else "not significant")
                            rows.append(dict(
                                layer=layer, head=head, family=family, relation=relation, direction=direction,
                                gate=gate, variant=variant, tau=float(tau) if gate == "margin" else None,
                                ri=total / n if n else math.nan, ri_se=float(tests["ri"]["se"][at]),
                                events=n, passes=n_pass, opportunities=opp,
                                pass_rate=n_pass / opp if opp else math.nan,
                                ri_per_opportunity=total / opp if opp else math.nan,
                                triplets=int(acc.triplets[g]), triplets_qualified=int(stats["triplets_q"][at]),
                                **{f"control_{c}{suffix}": value for c in CONTROLS
                                   for suffix, value in _control_columns(stats, c, at).items()},
                                effect=float(tests["matched"]["mean"][at]), effect_se=float(tests["matched"]["se"][at]),
                                **{f"effect_{c}{suffix}": float(tests[c][key][at]) for c in CONTROLS[1:]
                                   for suffix, key in (("", "mean"), ("_se", "se"))},
                                clusters=int(clusters[at]), effective_clusters=float(effective[at]),
                                p_value=float(p_cell[at]), p_adjusted=float(adjusted[at]), sih_status=status,
                                sih=status == "sih", negative_control=bool(negative[at]),
                                negative_control_flagged=bool(flagged_control[at]),
                                ratio_p50=float(ratio["p50"][layer, head]), ratio_p95=float(ratio["p95"][layer, head]),
                                ratio_p95_model=ratio_model_p95, **params,
                            ))
    return rows
