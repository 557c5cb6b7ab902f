"""The causal check's screen (issue 29): every head's mean-ablation effect on every evaluation set's metrics,
estimated from a few forward and backward passes instead of one forward pass per head.

*The estimate.* Mean ablation (:mod:`icl_dynamics.ablation`) replaces head h's output z^h (its slice of the
input of W_O) at every ablated position t (all but position 0 under ``keep_first``) by its reference mean
m^h. To first order an objective M then changes by

    sum_t (m^h - z^h_t) . dM/dz^h_t  =  m^h . G^h - S^h,   G^h = sum_t dM/dz^h_t,   S^h = sum_t z^h_t . dM/dz^h_t

(attribution patching: Nanda 2023; Syed et al. 2023). G, S and the means m come from the same batches: one
forward pass with gradients kept (it is also the clean pass: clean scores and the reference means), and one
backward pass per objective, the gradient taken with respect to every layer's W_O input at once (activation
gradients only: the weights are frozen for the pass). Sequences never interact, so one backward pass over a
batch serves every sequence; it runs once per *read rank* (the j-th read of each sequence: the ICL score's
early and late token), so that every read gets its own estimate and the metric's non-linearity can be
applied per read; a relation sequence's events (up to ~30) share one pass and move by their mean change.

*What is linearised* (:mod:`icl_dynamics.evaluation_sets`): for relation recall and the ICL score, the
target's log-odds (logit minus the log-sum-exp of the others), and the estimate of the log-probability is
log sigmoid(log-odds + change): a read the model already predicts at p = 0.99 has almost no log-probability
gradient left, but its log-odds still move. For the tasks, whose metrics are 0/1, the margin whose sign is
the metric (best legal label over best other token; gold over the best other legal label), and the estimate
of a prompt's metric is the sign of its margin plus the change: the same 0/1 metric, so its rows stand
beside the exact ones.

*Path points* (``steps``, default 2 in the stage). A norm or a softmax that saturates hides a head at the clean
model: the final LayerNorm is scale-free along the direction one dominant head writes, and a later head's
sharp attention ignores a small change of its key. The gradient is therefore averaged over ``steps`` points
alpha = 0, 1/steps, ... of the path that moves every head alpha of the way to its mean (an integrated-gradients
left sum, each point one more forward and backward pass; the change is (m - z) . gradient with z each point's
own head output). On both toy zoos (``tests/test_attribution.py``) two points find the exact top 2 heads
among the screen's top 4 at 86-100 % of the checkpoints where heads matter, one point at 70-79 %.

*AtP\* (Kramár et al. 2024), and what applies here.* AtP*'s QK fix recomputes the softmax of the patched
node's *own* attention when the node is a query or key. Our nodes are head outputs, after their own softmax:
ablating one leaves its own pattern as it was, so there is nothing of the node's to recompute; the
saturation that hurts here is downstream (a later head's softmax, the final norm), which AtP* leaves linear
too, and which the path points address instead. Its second correction, GradDrop, guards a magnitude-pruned
circuit against heads whose direct and indirect effects cancel, at L extra backward passes; here nothing is
pruned on the estimate alone: each set's top heads by the screen, the groups and their controls are ablated
exactly (:func:`icl_dynamics.ablation.ablation_table`), and the screen's misses are measured instead
(:func:`agreement`; README "The causal check").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn
from transformers import PreTrainedModel

from icl_dynamics.architecture import architecture
from icl_dynamics.evaluation_sets import Cell, Evaluation, _batches, _logits, reference_count, reference_positions
from icl_dynamics.models import check_context


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Within the block no parameter requires a gradient (restored after): the backward pass computes
    activation gradients only, and nothing accumulates in ``.grad``."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def gradient_sites(model: PreTrainedModel) -> list[nn.Module]:
    """The modules whose input is every head's output, one per layer (each layer's W_O): where mean ablation
    replaces a head, so where the screen takes its gradient."""
    return architecture(model).output_projections()


def screen(model: PreTrainedModel, evaluation: Evaluation, *, batch_size: int, keep_first: bool, steps: int = 1,
           cost: object | None = None) -> tuple[np.ndarray, torch.Tensor, list[Cell]]:
    """The clean per-read scores [P, k], every head's reference mean ([layers, n_heads * d_head], float64:
    what exact ablation puts in its place) and the set's cells with one estimated column per head (every
    head, layer-major: column 1 + layer * n_heads + head), as :meth:`Evaluation.estimated_cells` makes them
    from :func:`objective_changes`. ``cost`` (an :class:`icl_dynamics.ablation.Cost`): the passes are added
    to it, a backward pass counted as one forward (activation gradients only: each matrix product's input
    gradient is its forward's size)."""
    clean, objectives, deltas, means, work = objective_changes(model, evaluation, batch_size=batch_size,
                                                              keep_first=keep_first, steps=steps)
    if cost is not None:
        tokens = sum(len(s) for s in evaluation.sequences)
        cost.tokens += tokens
        cost.token_layers += work
        cost.unshared_token_layers += architecture(model).n_layers * tokens  # the clean pass exact ablation needs
    return clean, means, evaluation.estimated_cells(clean, objectives, deltas)


def objective_changes(model: PreTrainedModel, evaluation: Evaluation, *, batch_size: int = 8, keep_first: bool = True,
                      steps: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor, int]:
    """Every read's objectives and their estimated change under each head's mean ablation: clean scores
    [P, k], clean objectives [P, k'], changes [P, heads, k'] (layer-major), the reference means
    [layers, n_heads * d_head] and the work done (token x layer applications). ``steps`` > 1: the gradient
    averaged over that many points of the path from the clean model towards every head at its mean
    (alpha = i / steps; the module docstring)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    arch = architecture(model)
    n_layers, n_heads, d_head = arch.n_layers, arch.n_heads, arch.d_head
    device = next(model.parameters()).device
    check_context(model, max(len(s) for s in evaluation.sequences), "the ablation's evaluation sequences")
    state: dict = {"sums": torch.zeros((n_layers, n_heads * d_head), dtype=torch.float64, device=device),
                   "grad_sums": None, "dots": None,  # per read and objective: G [.., layers, width], S [.., heads]
                   "clean": None, "objectives": None, "slots": evaluation.slots(),
                   "weights": evaluation.read_weights(), "work": 0}
    means = None
    with _frozen(model), torch.enable_grad():
        for step in range(steps):
            for batch in _batches(evaluation, batch_size, device):
                _accumulate(model, evaluation, batch, state, keep_first, step / steps, means)
            if step == 0:
                means = state["sums"] / reference_count(evaluation, keep_first)  # [layers, width]
    grad_sums, dots = state["grad_sums"] / steps, state["dots"] / steps
    deltas = (grad_sums.unflatten(-1, (n_heads, d_head)) * means.unflatten(-1, (n_heads, d_head))).sum(-1) - dots
    deltas = deltas.flatten(2).permute(0, 2, 1).cpu().numpy()  # [reads, heads, k]
    return state["clean"], state["objectives"], deltas, means, n_layers * state["work"]


def _accumulate(model: PreTrainedModel, evaluation: Evaluation, batch: tuple, state: dict, keep_first: bool,
                alpha: float, means: torch.Tensor | None) -> None:
    """One batch at one point of the path: forward with every head's output moved ``alpha`` of the way to
    its mean (alpha 0: the clean pass, which also keeps the clean scores, objectives and the means' sums),
    then one backward per read rank and objective; adds each read's G and S to ``state``."""
    arch = architecture(model)
    n_layers, n_heads, d_head = arch.n_layers, arch.n_heads, arch.d_head
    ids, mask, reads, rows, positions = batch
    where = reference_positions(mask, keep_first)[..., None].double()  # where an ablation replaces, the means' set
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(layer: int):
        def hook(_module: nn.Module, args: tuple) -> tuple:
            natural = args[0]
            z = natural
            if alpha:
                z = natural + alpha * where.to(natural.dtype) * (means[layer].to(natural.dtype) - natural)
            if not z.requires_grad:  # the first layer's: nothing before it needs a gradient
                z = z.detach().requires_grad_(True)
            seen[layer] = (natural, z)
            return (z, *args[1:])
        return hook

    handles = [site.register_forward_pre_hook(keep(layer)) for layer, site in enumerate(gradient_sites(model))]
    try:
        hidden = arch.base()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    logits = _logits(model, hidden, rows, positions, False)
    index = reads.cpu().numpy()
    objective = evaluation.objectives(logits, reads)
    k = objective.shape[1]
    tokens = int(mask.sum())
    if state["grad_sums"] is None:
        n = len(evaluation.reads)
        state["grad_sums"] = torch.zeros((n, k, n_layers, n_heads * d_head), dtype=torch.float64, device=ids.device)
        state["dots"] = torch.zeros((n, k, n_layers, n_heads), dtype=torch.float64, device=ids.device)
        state["objectives"] = np.full((n, k), np.nan)
    if not alpha:
        scores = evaluation.score(logits.detach(), reads).cpu().numpy()
        if state["clean"] is None:
            state["clean"] = np.full((len(evaluation.reads), scores.shape[1]), np.nan)
        state["clean"][index] = scores
        state["objectives"][index] = objective.detach().cpu().numpy()
        for layer in range(n_layers):
            state["sums"][layer] += (seen[layer][0].detach().double() * where).sum((0, 1))
    state["work"] += tokens  # the forward pass
    zs = [seen[layer][1] for layer in range(n_layers)]
    naturals = [seen[layer][0].detach().double() for layer in range(n_layers)]
    slots = state["slots"][index]
    jobs = [(slot, c) for slot in np.unique(slots) for c in range(k)]
    for i, (slot, c) in enumerate(jobs):  # a sequence's reads of one rank are in different sequences
        mine = np.flatnonzero(slots == slot)
        weights = state["weights"][index[mine]]  # [reads, 1] (every objective) or [reads, k]
        weights = torch.as_tensor(weights[:, c if weights.shape[1] > 1 else 0], device=ids.device)
        grads = torch.autograd.grad((objective[mine, c] * weights).sum(), zs, retain_graph=i < len(jobs) - 1,
                                    allow_unused=True)
        state["work"] += tokens  # a backward pass
        at = torch.as_tensor(index[mine], device=ids.device)
        their = rows[torch.as_tensor(mine, device=ids.device)]
        for layer, g in enumerate(grads):
            if g is None:  # no read depends on this layer (cannot happen past the embedding)
                continue
            g = (g.double() * where)[their]
            state["grad_sums"][at, c, layer] += g.sum(1)
            state["dots"][at, c, layer] += (g * naturals[layer][their]).unflatten(-1, (n_heads, d_head)).sum((1, 3))


def agreement(table: pd.DataFrame, *, top: int = 5, within: int = 10, negligible: float = 0.1) -> pd.DataFrame:
    """How well the screen ranks heads, per cell of an ablation table that holds both methods for every head
    (``exact_heads`` None): the Spearman correlation between estimate and exact effect over the heads whose
    exact effect is not negligible (``|effect| >= negligible`` x the cell's largest; null with fewer than 3),
    and whether every head of the exact top ``top`` (by absolute effect) is in the screen's top ``within``."""
    heads = table[table["ablation"] == "head"]
    keys = ["level", "task", "shots", "metric"]
    out = []
    for cell, rows in heads.groupby(keys, dropna=False, sort=True):
        both = rows.pivot_table(index=["layer", "head"], columns="method", values="value")
        if not {"exact", "attribution"} <= set(both.columns) or both["exact"].isna().any():
            raise ValueError(f"agreement needs the exact effect of every head beside its estimate; cell {cell} "
                             "lacks some (ablate with exact_heads=None)")
        exact, estimate = both["exact"].to_numpy(float), both["attribution"].to_numpy(float)
        largest = np.abs(exact).max()
        kept = np.abs(exact) >= negligible * largest if largest > 0 else np.zeros(len(exact), bool)
        rho = np.nan
        if kept.sum() >= 3 and np.ptp(exact[kept]) > 0 and np.ptp(estimate[kept]) > 0:
            rho = float(stats.spearmanr(exact[kept], estimate[kept]).statistic)
        first = set(np.argsort(-np.abs(exact), kind="stable")[:top])
        screened = set(np.argsort(-np.abs(estimate), kind="stable")[:within])
        out.append({**dict(zip(keys, cell)), "heads": len(exact), "largest": float(largest),
                    "not_negligible": int(kept.sum()), "rho": rho, "top_found": len(first & screened) / len(first)})
    return pd.DataFrame(out)


def ranked_heads(cells: Sequence[Cell], n_heads: int) -> list[tuple[int, int]]:
    """Every head ordered by how much the screen says it matters to this set: by its best rank over the
    set's cells (rank by the absolute mean estimated effect), ties by the largest absolute effect relative
    to each cell's largest; so the first k hold each cell's top heads in turn."""
    if not cells:
        return []
    size = np.stack([np.abs((c.units[:, 1:] - c.units[:, :1]).mean(0)) for c in cells])  # [cells, heads]
    ranks = np.argsort(np.argsort(-size, 1, kind="stable"), 1, kind="stable")
    scale = np.where(size.max(1, keepdims=True) > 0, size.max(1, keepdims=True), 1.0)
    order = np.lexsort((-(size / scale).max(0), ranks.min(0)))
    return [(int(i) // n_heads, int(i) % n_heads) for i in order]
