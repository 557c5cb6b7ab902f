"""The causal check of issue 15: do the heads we flag carry relation recall and ICL? Mean-ablate each
head (or a group of heads) of one loaded checkpoint and measure what relation recall and ICL lose.

*Mean ablation.* A head's output (its slice of the input of the output projection W_O, i.e. z^h before
W_O^h, :meth:`~icl_dynamics.architecture.base.Architecture.output_projections`; W_O is linear, so this is the
same as replacing z^h W_O^h, and whatever follows, OLMo-2's post-attention norm included, is the model's
own) is replaced at every position but the
first by its mean over the **reference set**: every real (non-padding) position but the first of the
same evaluation set's sequences, taken from one clean pass before any ablation. Each evaluation set is
its own reference (the relation sequences with at least one event for relation recall, the text
documents as far as they are run for the ICL score, the prompts for the ICL tasks).

*Position 0 keeps its output* (``keep_first``, the default). Every later head reads the first position
when it has nothing better to attend to (the attention sink: the BOS the relation sequences start with,
or a document's first token), so replacing a head's output there perturbs every later head's default
rather than measuring what the head does with the text. Measured on both toy zoos at every checkpoint
(``benchmarks/ablation_first_position.py``: every head ablated alone both ways), the choice changes which
head costs the ICL score most at 4 of 17 checkpoints of the copy zoo (an effect up to 0.48 nats apart)
and 9 of 16 of the relations zoo, and the top head of planted recall at 1 of 16; the rank correlation
across heads stayed >= 0.81 and >= 0.95 there. ``keep_first=False`` ablates every position (what a
weight-edited copy of the model computes).

*Evaluation sets* (built once per model, the same at every checkpoint; :mod:`icl_dynamics.evaluation_sets`):
relation recall at the relation index's own events, the ICL score (loss at token ``late`` minus loss at token
``early``) and the ICL tasks' format compliance and constrained accuracy.

*Screen, then exact* (:func:`ablation_table`, issue 29). Every head's effect is first estimated from gradients
(:mod:`icl_dynamics.attribution`: one forward pass per path point, which is also the clean pass, and one
backward pass per read rank and objective), rows with ``method`` ``attribution``; then, per evaluation set,
the screen's top ``exact_heads`` heads and every group and control are ablated exactly (``method``
``exact``), on the screen's clean pass (its means and clean scores). Per-head exact ablation of every head
(``exact_heads=None``) costs about heads x (L + 1) / (2L) forward passes; the screen costs a few whatever
the number of heads.

*Effect* = ablated minus clean, per unit (document for relation recall, averaging that document's
events first, so every document weighs the same; document for the ICL score; prompt for the tasks),
then averaged over units: ``value`` is the mean paired difference, ``baseline`` the clean mean, and
``ci_low``/``ci_high`` a percentile bootstrap over units of the paired difference
(:func:`icl.bootstrap_mean`, the same resamples for every head of a table). Negative for recall (log
p of the tail falls), positive for the ICL score (less loss reduction), negative for the task metrics.

*Batching.* Every head of layer L shares the clean pass through layers < L: per batch of sequences one
clean pass keeps the residual stream entering each layer that starts an ablation (and the arguments the
model hands its layers: attention mask, rotary position embeddings), then each ablation runs only
layers >= its lowest layer, with its heads replaced. Per-head ablations of an N-layer model thus cost
about (N + 1) / 2 instead of N layers each; :class:`Cost` (``DataFrame.attrs["cost"]``) reports the work.
"""

from __future__ import annotations

import math
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedModel

from icl_dynamics import attribution
from icl_dynamics.architecture import architecture
from icl_dynamics.evaluation_sets import (  # noqa: F401  the sets' builders, importable from here as before
    Cell,
    Evaluation,
    ICLScore,
    ICLTasks,
    RelationRecall,
    _batches,
    _logits,
    icl_score_set,
    icl_task_set,
    reference_count,
    reference_positions,
    relation_recall_set,
)
from icl_dynamics.icl import bootstrap_mean
from icl_dynamics.models import check_context
from icl_dynamics.schemas import ABLATION_SCHEMA, CHECKPOINT_FIELDS

Head = tuple[int, int]
"""(layer, head)."""

COLUMNS = tuple(name for name in ABLATION_SCHEMA.names if name not in {f.name for f in CHECKPOINT_FIELDS})
_NULLABLE_INTS = ("layer", "head", "draw", "shots")
SCREEN_STEPS = 2  # points on the path the screen's gradient is averaged over (icl_dynamics.attribution)
KEEP_FIRST = True  # position 0, the attention sink, keeps each head's own output (the module docstring)


@dataclass
class Cost:
    """The work an ablation table took: wall seconds, and token x layer applications done (``token_layers``)
    against what the same ablations cost as separate full forward passes (``unshared_token_layers``: one clean
    pass and one per ablation); ``tokens`` are the evaluation sets' real tokens, ``layers`` the model's."""

    layers: int
    tokens: int = 0
    token_layers: int = 0
    unshared_token_layers: int = 0
    seconds: float = 0.0

    @property
    def passes(self) -> float:
        """Work done, in full forward passes over the evaluation sets."""
        return self.token_layers / (self.layers * self.tokens) if self.tokens else 0.0

    @property
    def unshared_passes(self) -> float:
        """The same ablations one full forward pass each (plus the clean one), in the same unit."""
        return self.unshared_token_layers / (self.layers * self.tokens) if self.tokens else 0.0


def _check_heads(model: nn.Module, heads: Sequence[Head]) -> None:
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    bad = [h for h in heads if not (0 <= h[0] < n_layers and 0 <= h[1] < n_heads)]
    if bad:
        raise ValueError(f"heads {bad} are not in a model of {n_layers} layers x {n_heads} heads")


@contextmanager
def _mean_ablated(model: nn.Module, heads: Sequence[Head], means: torch.Tensor, keep_first: bool) -> Iterator[None]:
    """Within the block, each head of ``heads`` outputs its mean (``means`` [layers, d_model]: the mean input
    of every layer's W_O, head h in columns h * d_head .. (h + 1) * d_head); ``keep_first``: except at
    position 0, which keeps its own output."""
    arch = architecture(model)
    d_head = arch.d_head
    handles = []
    for layer in sorted({h[0] for h in heads}):
        columns = torch.zeros(means.shape[-1], dtype=torch.bool, device=means.device)
        for _, head in (h for h in heads if h[0] == layer):
            columns[head * d_head:(head + 1) * d_head] = True

        def replace(_module: nn.Module, args: tuple, columns: torch.Tensor = columns,
                    mean: torch.Tensor = means[layer]) -> tuple:
            where = columns
            if keep_first:  # [positions, d_model]: every column of the heads but at position 0
                where = columns & (torch.arange(args[0].shape[-2], device=columns.device) > 0)[:, None]
            return (torch.where(where, mean, args[0]),)

        handles.append(arch.output_projections()[layer].register_forward_pre_hook(replace))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Captured(Exception):
    """Stops the prefix pass once the residual entering the last starting layer is kept."""



@torch.inference_mode()
def _clean_pass(model: PreTrainedModel, evaluation: Evaluation, batch_size: int,
                keep_first: bool) -> tuple[np.ndarray, torch.Tensor]:
    """One clean pass: per-read scores [P, k] and every head's mean output over the reference set
    ([layers, n_heads * d_head], float64)."""
    arch = architecture(model)
    base, n_layers = arch.base(), arch.n_layers
    device = next(model.parameters()).device
    sums = torch.zeros((n_layers, arch.n_heads * arch.d_head), dtype=torch.float64, device=device)
    scores: np.ndarray | None = None
    current: dict[str, torch.Tensor] = {}

    def accumulate(layer: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            sums[layer] += (args[0].double() * current["reference"][..., None]).sum((0, 1))
        return hook

    handles = [arch.output_projections()[layer].register_forward_pre_hook(accumulate(layer))
               for layer in range(n_layers)]
    try:
        for ids, mask, reads, rows, positions in _batches(evaluation, batch_size, device):
            current["reference"] = reference_positions(mask, keep_first)
            hidden = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            got = evaluation.score(_logits(model, hidden, rows, positions, False), reads).cpu().numpy()
            if scores is None:
                scores = np.full((len(evaluation.reads), got.shape[1]), np.nan)
            scores[reads.cpu().numpy()] = got
    finally:
        for handle in handles:
            handle.remove()
    return scores, sums / reference_count(evaluation, keep_first)


@torch.inference_mode()
def _run(model: PreTrainedModel, evaluation: Evaluation, ablations: Sequence[Sequence[Head]], batch_size: int,
         cost: Cost, keep_first: bool, clean: tuple[np.ndarray, torch.Tensor] | None = None) -> np.ndarray:
    """Per-read scores [1 + ablations, P, k]: clean, then with each ablation's heads mean-ablated (``keep_first``:
    position 0 keeps its output, and the means are taken over the other positions). ``clean``: the clean
    per-read scores and the reference means of a pass already made (the screen's), else one is made here."""
    arch = architecture(model)
    base, layers = arch.base(), arch.layers()
    n_layers = len(layers)
    device = next(model.parameters()).device
    check_context(model, max(len(s) for s in evaluation.sequences), "the ablation's evaluation sequences")
    tokens = sum(len(s) for s in evaluation.sequences)
    starts = [min(layer for layer, _ in heads) for heads in ablations]
    cost.unshared_token_layers += len(ablations) * n_layers * tokens
    if clean is None:
        cost.tokens += tokens
        cost.unshared_token_layers += n_layers * tokens
        cost.token_layers += n_layers * tokens  # the clean pass
        clean = _clean_pass(model, evaluation, batch_size, keep_first)
    scores, means = clean
    values = np.full((1 + len(ablations), *scores.shape), np.nan)
    values[0] = scores
    means = means.to(device=device, dtype=next(model.parameters()).dtype)
    if not ablations:
        return values

    # per batch: one clean pass up to the last layer an ablation starts at, then each ablation from its own
    needed = sorted(set(starts))
    for ids, mask, reads, rows, positions in _batches(evaluation, batch_size, device):
        batch_tokens = int(mask.sum())
        entering: dict[int, torch.Tensor] = {}
        layer_kwargs: dict[str, Any] = {}

        def keep(layer: int):
            def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                entering[layer] = args[0] if args else kwargs["hidden_states"]
                layer_kwargs.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
                if layer == needed[-1]:
                    raise _Captured
            return hook

        handles = [layers[layer].register_forward_pre_hook(keep(layer), with_kwargs=True) for layer in needed]
        try:
            base(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Captured:
            pass
        finally:
            for handle in handles:
                handle.remove()
        cost.token_layers += needed[-1] * batch_tokens
        index = reads.cpu().numpy()
        for a, (heads, start) in enumerate(zip(ablations, starts), 1):
            hidden = entering[start]
            with _mean_ablated(model, heads, means, keep_first):
                for layer in layers[start:]:
                    hidden = layer(hidden, **layer_kwargs)
                    if isinstance(hidden, tuple):  # transformers 5.0's layers return (hidden_states, ...)
                        hidden = hidden[0]
            cost.token_layers += (n_layers - start) * batch_tokens
            values[a, index] = evaluation.score(_logits(model, hidden, rows, positions, True), reads).cpu().numpy()
    return values


Plan = Callable[[list[Cell] | None], tuple[list[list[Head]], list[dict]]]
"""For one evaluation set, from the screen's estimated cells (None without a screen): the exact ablations and
their row labels."""


def _effects(model: PreTrainedModel, evaluations: Sequence[Evaluation], plan: Plan, *, batch_size: int, n_boot: int,
             seed: int, keep_first: bool, screen: int) -> pd.DataFrame:
    """The rows of :data:`ABLATION_SCHEMA` (without model, step, tokens): per evaluation set, with ``screen``
    (its path steps; 0: none) every head's estimated effect (``method`` attribution, :func:`icl_dynamics.attribution.screen`, whose
    forward pass is also the exact ablations' clean pass), then the exact effects of ``plan``'s ablations."""
    if batch_size < 1 or n_boot < 1:
        raise ValueError(f"batch_size and n_boot must be >= 1, got {batch_size} and {n_boot}")
    cost = Cost(model.config.num_hidden_layers)
    start = time.perf_counter()
    rows: list[dict] = []
    everyone = _single_heads(model, None)[1]
    for evaluation in evaluations:
        clean, estimated = None, None
        if screen:
            scores, means, estimated = attribution.screen(model, evaluation, batch_size=batch_size,
                                                          keep_first=keep_first, steps=screen, cost=cost)
            clean = (scores, means)
            for cell in estimated:
                rows += _rows(cell, everyone, "attribution", n_boot=n_boot, seed=seed)
        ablations, labels = plan(estimated)
        for heads in ablations:
            _check_heads(model, heads)
        if not ablations:
            continue
        for cell in evaluation.cells(_run(model, evaluation, ablations, batch_size, cost, keep_first, clean)):
            rows += _rows(cell, labels, "exact", n_boot=n_boot, seed=seed)
    cost.seconds = time.perf_counter() - start
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    for name in _NULLABLE_INTS:
        frame[name] = frame[name].astype("Int32")
    frame.attrs["cost"] = cost
    return frame


def _rows(cell: Cell, labels: Sequence[Mapping[str, Any]], method: str, *, n_boot: int, seed: int) -> list[dict]:
    """One cell's rows: each ablation's effect, then each group's importance (:func:`cell_effects`)."""
    clean = cell.units[:, 0]
    kinds, value, low, high = cell_effects(cell.units, labels, n_boot=n_boot, seed=seed)
    return [{**label, "method": method, "level": cell.level, "task": cell.task, "shots": cell.shots,
             "metric": cell.metric, "value": float(value[a]), "ci_low": float(low[a]), "ci_high": float(high[a]),
             "baseline": float(clean.mean()), "n": len(clean), "events": cell.events}
            for a, label in enumerate(kinds)]


def cell_effects(units: np.ndarray, labels: Sequence[Mapping[str, Any]], *, n_boot: int,
                 seed: int) -> tuple[list[dict], np.ndarray, np.ndarray, np.ndarray]:
    """Row labels, effects and their percentile bootstrap intervals for one evaluation cell: ``units``
    [units, 1 + ablations] holds each unit's clean value (column 0) and its value under each ablation of
    ``labels``. Rows: every ablation's mean paired difference (ablated minus clean), then each group's
    importance over its controls (:func:`importance_weights`), all from the same resamples of units, with
    the expanded percentile interval (:func:`icl.bootstrap_mean`: the evaluation sets hold 20-64 units,
    where the plain percentile interval covers ~0.91)."""
    effects = units[:, 1:] - units[:, :1]
    importance, weights = importance_weights(labels)
    value, low, high = bootstrap_mean(np.concatenate([effects, effects @ weights], 1), n_boot=n_boot, seed=seed,
                                      expanded=True)
    return [*map(dict, labels), *importance], value, low, high


def importance_weights(labels: Sequence[Mapping[str, Any]]) -> tuple[list[dict], np.ndarray]:
    """Row labels and weights [ablations, groups] of each group's importance over its controls: per unit,
    the group's effect minus the mean of its controls' effects (a group without a control has none).

    Bootstrapping these per-unit differences resamples the group and its controls together, so the
    interval carries their covariance: the same units make every ablation's effect, and a unit where the
    model leans hard on its early layers moves a group and its layer-matched controls alike. Treating
    them as independent (adding their variances) overstates the error and delays an onset.
    """
    groups = [i for i, label in enumerate(labels) if label["ablation"] == "group"]
    out, weights = [], np.zeros((len(labels), len(groups)))
    for column, i in enumerate(groups):
        controls = [j for j, label in enumerate(labels)
                    if label["ablation"] == "control" and label["group"] == labels[i]["group"]]
        if not controls:
            continue
        weights[i, column] = 1.0
        weights[controls, column] = -1.0 / len(controls)
        out.append({**labels[i], "ablation": "importance"})
    return out, weights[:, [c for c, i in enumerate(groups) if weights[i, c]]]


def _names(heads: Sequence[Head]) -> list[str]:
    return [f"L{layer}H{head}" for layer, head in heads]


def _single_heads(model: PreTrainedModel, heads: Sequence[Head] | None) -> tuple[list[list[Head]], list[dict]]:
    """Ablations and row labels of each head alone (default: every head)."""
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    heads = [(int(a), int(b)) for a, b in heads] if heads is not None else [
        (layer, head) for layer in range(n_layers) for head in range(n_heads)]
    labels = [dict(ablation="head", layer=layer, head=head, group=None, draw=None, heads=_names([(layer, head)]))
              for layer, head in heads]
    return [[h] for h in heads], labels


def head_ablation_effects(model: PreTrainedModel, evaluations: Sequence[Evaluation], *,
                          heads: Sequence[Head] | None = None, batch_size: int = 8, n_boot: int = 1000,
                          seed: int = 0, keep_first: bool = KEEP_FIRST) -> pd.DataFrame:
    """Effect of mean-ablating each head alone (default: every head) on each evaluation set's metrics:
    which heads relation recall and ICL depend on at this checkpoint. ``attrs["cost"]``: a :class:`Cost`."""
    ablations, labels = _single_heads(model, heads)
    for one in ablations:
        _check_heads(model, one)
    return _effects(model, evaluations, lambda _: (ablations, labels), batch_size=batch_size, n_boot=n_boot,
                    seed=seed, keep_first=keep_first, screen=0)


def layer_matched_heads(group: Sequence[Head], n_heads: int, rng: np.random.Generator) -> list[Head]:
    """Random heads with the group's count in each of its layers, none of them the group's own: the null a
    group's effect is compared with. Raises when a layer has too few other heads."""
    out = []
    for layer in sorted({h[0] for h in group}):
        own = {h[1] for h in group if h[0] == layer}
        others = [h for h in range(n_heads) if h not in own]
        if len(others) < len(own):
            raise ValueError(f"layer {layer} has {len(others)} heads outside the group, a matched control needs "
                             f"{len(own)}")
        out += [(layer, int(h)) for h in sorted(rng.choice(others, size=len(own), replace=False))]
    return out


def _groups(model: PreTrainedModel, groups: Mapping[str, Sequence[Head]], draws: int,
            seed: int) -> tuple[list[list[Head]], list[dict]]:
    """Ablations and row labels of each named group and its ``draws`` distinct layer-matched controls (fewer
    where the layers allow fewer); warns and leaves out an empty group, and the controls of a group that
    fills more than half of a layer."""
    n_heads = model.config.num_attention_heads
    ablations, labels = [], []
    for name, group in groups.items():
        group = sorted({(int(a), int(b)) for a, b in group})
        if not group:
            warnings.warn(f"group {name!r} has no heads; left out", stacklevel=3)
            continue
        ablations.append(group)
        labels.append(dict(ablation="group", layer=None, head=None, group=name, draw=None, heads=_names(group)))
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # a group's draws: its name and seed
        per_layer = Counter(layer for layer, _ in group).values()
        possible = math.prod(math.comb(n_heads - k, k) for k in per_layer)  # distinct controls there are
        controls: list[list[Head]] = []
        while len(controls) < min(draws, max(possible, 1)):  # none possible: the first try warns why
            try:
                control = layer_matched_heads(group, n_heads, rng)
            except ValueError as exc:
                warnings.warn(f"group {name!r}: no layer-matched control ({exc})", stacklevel=3)
                break
            if control not in controls:  # each draw a different set (a small layer has few)
                controls.append(control)
        for draw, control in enumerate(controls):
            ablations.append(control)
            labels.append(dict(ablation="control", layer=None, head=None, group=name, draw=draw,
                               heads=_names(control)))
    return ablations, labels


def group_ablation_effects(model: PreTrainedModel, evaluations: Sequence[Evaluation],
                           groups: Mapping[str, Sequence[Head]], *, draws: int = 5, seed: int = 0,
                           batch_size: int = 8, n_boot: int = 1000, keep_first: bool = KEEP_FIRST) -> pd.DataFrame:
    """Effect of mean-ablating each named group of heads together (e.g. ``{"sih": flagged_sih_heads(...),
    "induction": top_induction_heads(...)}``) and of ``draws`` seeded layer-matched random controls per group
    (:func:`layer_matched_heads`, each draw a different set; fewer where the layers hold fewer): whether the
    flagged heads matter more than as many random heads of the same layers. An empty group, and the controls
    of a group that fills more than half of a layer, are left out with a warning. ``attrs["cost"]``: a
    :class:`Cost`."""
    ablations, labels = _groups(model, groups, draws, seed)
    for one in ablations:
        _check_heads(model, one)
    return _effects(model, evaluations, lambda _: (ablations, labels), batch_size=batch_size, n_boot=n_boot,
                    seed=seed, keep_first=keep_first, screen=0)


def ablation_table(model: PreTrainedModel, evaluations: Sequence[Evaluation], groups: Mapping[str, Sequence[Head]],
                   *, exact_heads: int | None = None, screen_steps: int = SCREEN_STEPS, draws: int = 5, seed: int = 0, batch_size: int = 8,
                   n_boot: int = 1000, keep_first: bool = KEEP_FIRST) -> pd.DataFrame:
    """The ablation stage's rows, per evaluation set: every head's effect estimated by the gradient screen
    (``method`` attribution, :func:`icl_dynamics.attribution.screen`), then exactly (``method`` exact) the
    set's top ``exact_heads`` heads by the screen (:func:`icl_dynamics.attribution.ranked_heads`; None: every
    head), each group and its controls, as :func:`head_ablation_effects` and :func:`group_ablation_effects`
    give them but on the screen's clean pass (the same means, baselines and bootstrap resamples).
    ``screen_steps``: the screen's path points; 0 with ``exact_heads`` None: no screen (exact rows only).
    ``attrs["cost"]``: a :class:`Cost`."""
    if exact_heads is not None and exact_heads < 0:
        raise ValueError(f"exact_heads must be >= 0 or None (every head), got {exact_heads}")
    if screen_steps < 0 or (screen_steps == 0 and exact_heads is not None):
        raise ValueError(f"screen_steps must be >= 1, or 0 (no screen) with exact_heads None; got {screen_steps} "
                         f"with exact_heads {exact_heads}")
    group_ablations, group_labels = _groups(model, groups, draws, seed)
    for one in group_ablations:
        _check_heads(model, one)
    n_heads = model.config.num_attention_heads

    def plan(estimated: list[Cell] | None) -> tuple[list[list[Head]], list[dict]]:
        top = None if exact_heads is None else sorted(attribution.ranked_heads(estimated or [], n_heads)[:exact_heads])
        heads, labels = _single_heads(model, top)
        return heads + group_ablations, labels + group_labels

    return _effects(model, evaluations, plan, batch_size=batch_size, n_boot=n_boot, seed=seed,
                    keep_first=keep_first, screen=screen_steps)


def flagged_sih_heads(relation_index: pd.DataFrame, *, gate: str = "argmax", variant: str = "source") -> list[Head]:
    """The heads flagged as semantic induction heads for any relation and direction in a relation-index
    table (one checkpoint), for ``gate`` and ``variant`` (an error when the table scored neither)."""
    scored = relation_index[(relation_index["gate"] == gate) & (relation_index["variant"] == variant)]
    if scored.empty and len(relation_index):
        combos = sorted(set(zip(relation_index["gate"], relation_index["variant"])))
        raise ValueError(f"the relation-index table has no rows with gate={gate!r} variant={variant!r} (it has "
                         f"{combos}); score that gate and variant, or flag with one it has")
    rows = scored[scored["sih"]]
    return sorted({(int(a), int(b)) for a, b in zip(rows["layer"], rows["head"])})


def top_induction_heads(heads: pd.DataFrame, k: int) -> list[Head]:
    """The ``k`` heads with the highest prefix-matching score in a heads table (one checkpoint)."""
    best = heads.sort_values(["prefix_matching", "layer", "head"], ascending=[False, True, True]).head(k)
    return sorted((int(a), int(b)) for a, b in zip(best["layer"], best["head"]))
