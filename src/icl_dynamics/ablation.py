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

*Evaluation sets* (built once per model, the same at every checkpoint):

* relation recall (:func:`relation_recall_set`): the relation index's own events (its ``prepare_sequences``:
  BOS prepended, ``max_len`` cut, function-word candidates), forward triplets only. For a triplet
  (head at s, tail at o) and every query j the relation index scores (j >= max(s, o), the tail a
  visible candidate) whose next token *is* the tail, the tail's log-probability is read at j, the
  position that predicts it. A tail position counts once per family however many triplets name it.
  (The tail's first mention is never such an event: the relation index needs the tail visible.)
* the ICL score (:func:`icl_score_set`): token documents as :mod:`icl_dynamics.icl` selects them; per
  document the loss at token ``late`` minus the loss at token ``early`` (:func:`icl.loss_reduction`'s
  score), read at positions ``late - 1`` and ``early - 1``; documents are run up to the late token only
  (nothing after it can change those two losses), and that is also the reference set's extent.
* the ICL tasks (:func:`icl_task_set`): :func:`icl_tasks.make_prompts` at one shot count (the largest
  the caller runs), format compliance (top-1 over the vocabulary is a legal label) and constrained
  accuracy (argmax over the legal labels is the gold one), as :func:`icl_tasks.evaluate_tasks` scores them.

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
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from icl_dynamics.architecture import architecture, sequence_start_id
from icl_dynamics.icl import bootstrap_mean
from icl_dynamics.icl_tasks import TASKS, Task, label_separator, label_token_ids, make_prompts
from icl_dynamics.models import check_context
from icl_dynamics.relation_events import SEQUENCE_COLUMNS, TRIPLET_COLUMNS, as_frame, prepare_sequences
from icl_dynamics.schemas import ABLATION_SCHEMA, CHECKPOINT_FIELDS

Head = tuple[int, int]
"""(layer, head)."""

COLUMNS = tuple(name for name in ABLATION_SCHEMA.names if name not in {f.name for f in CHECKPOINT_FIELDS})
_NULLABLE_INTS = ("layer", "head", "draw", "shots")
KEEP_FIRST = True  # position 0, the attention sink, keeps each head's own output (the module docstring)


class Cell(NamedTuple):
    """One (level, task, shots, metric) of an evaluation set: per unit, the clean value and each ablation's."""

    level: str
    task: str
    shots: int | None
    metric: str
    units: np.ndarray  # [units, 1 + ablations]: column 0 clean
    events: int  # reads behind the units


@dataclass(frozen=True)
class Evaluation(ABC):
    """A fixed evaluation set: token sequences, and the positions whose next-token distribution is read
    (``reads`` [P, 2]: sequence index, position) with the token scored there (``targets`` [P])."""

    sequences: tuple[np.ndarray, ...]
    reads: np.ndarray
    targets: np.ndarray

    def score(self, logits: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        """Per read [p, 1]: the log-probability of its target, from its logits [p, vocab] (float64)."""
        targets = torch.as_tensor(self.targets, device=logits.device)[reads]
        return torch.log_softmax(logits.double(), -1).gather(1, targets[:, None])

    @abstractmethod
    def cells(self, values: np.ndarray) -> list[Cell]:
        """The set's metrics per unit from the per-read scores ``values`` [1 + ablations, P, k]."""


@dataclass(frozen=True)
class RelationRecall(Evaluation):
    """Relation events: the tail's log-probability where it comes next (see the module docstring)."""

    documents: np.ndarray  # [P] source document
    families: tuple[str, ...]  # [P] relation family

    def cells(self, values: np.ndarray) -> list[Cell]:
        families = np.asarray(self.families)
        out = []
        for family in sorted(set(self.families)):
            keep = families == family
            docs, inverse = np.unique(self.documents[keep], return_inverse=True)
            sums = np.zeros((len(docs), values.shape[0]))
            np.add.at(sums, inverse, values[:, keep, 0].T)
            out.append(Cell("relation_recall", family, None, "tail_logprob",
                            sums / np.bincount(inverse)[:, None], int(keep.sum())))
        return out


@dataclass(frozen=True)
class ICLScore(Evaluation):
    """Text documents: loss at token ``late`` minus loss at token ``early`` (reads: every early, then every late)."""

    task: str

    def cells(self, values: np.ndarray) -> list[Cell]:
        n = values.shape[1] // 2
        score = values[:, :n, 0] - values[:, n:, 0]  # -log p(late) + log p(early)
        return [Cell("loss_reduction", self.task, None, "icl_score", score.T, n)]


@dataclass(frozen=True)
class ICLTasks(Evaluation):
    """Few-shot prompts: format compliance and constrained accuracy per task (``targets``: the gold label
    token; ``legal`` [P, max classes]: each prompt's label tokens, -1 padded)."""

    legal: np.ndarray
    tasks: tuple[str, ...]  # [P] task name
    shots: int

    def score(self, logits: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        """Per read [p, 2]: top-1 over the vocabulary is a legal label; argmax over the legal labels is gold."""
        legal = torch.as_tensor(self.legal, device=logits.device)[reads]
        gold = torch.as_tensor(self.targets, device=logits.device)[reads]
        compliant = (logits.argmax(1, keepdim=True) == legal).any(1)
        restricted = logits.gather(1, legal.clamp_min(0)).masked_fill(legal < 0, -torch.inf)
        correct = legal.gather(1, restricted.argmax(1, keepdim=True))[:, 0] == gold
        return torch.stack([compliant, correct], 1).double()

    def cells(self, values: np.ndarray) -> list[Cell]:
        tasks = np.asarray(self.tasks)
        out = []
        for task in dict.fromkeys(self.tasks):
            keep = tasks == task
            out.append(Cell("format_compliance", task, self.shots, "format_compliance", values[:, keep, 0].T,
                            int(keep.sum())))
            out.append(Cell("pattern_discovery", task, self.shots, "accuracy_constrained", values[:, keep, 1].T,
                            int(keep.sum())))
        return out


def relation_recall_set(config: PretrainedConfig, sequences: pa.Table | pd.DataFrame,
                        triplets: pa.Table | pd.DataFrame, *, bos: bool = True, exclude_function_words: bool = True,
                        max_len: int | None = None, n_sequences: int | None = None) -> RelationRecall:
    """The relation events of the relations stage's tables, laid out exactly as the relation index
    scores them (same BOS, cut and candidate rule), so recall and RI speak of the same events;
    ``n_sequences``: only the first that many sequences with an event of each family (tables' order)."""
    bos_id = sequence_start_id(config) if bos else None
    if bos and bos_id is None:
        raise ValueError("the model config names no bos_token_id or eos_token_id; pass bos=False to read without one")
    seq_table, trip_table = as_frame(sequences, SEQUENCE_COLUMNS, "sequences"), as_frame(triplets, TRIPLET_COLUMNS,
                                                                                          "triplets")
    forward = trip_table[trip_table["direction"] == "forward"]
    candidates = seq_table[seq_table["sequence_id"].isin(set(forward["sequence_id"]))]
    wanted = set(forward["family"])
    # indexing is per sequence, so a chunk at a time gives the same events; stop once every family is full
    chunk = len(candidates) if n_sequences is None else 4 * n_sequences
    kept, reads, targets, documents, families = [], [], [], [], []
    taken: dict[str, int] = {}
    for start in range(0, len(candidates), max(chunk, 1)):
        part = candidates.iloc[start:start + chunk]
        seqs, keys, _ = prepare_sequences(part, trip_table[trip_table["sequence_id"].isin(set(part["sequence_id"]))],
                                 exclude_function_words=exclude_function_words, control_position=0, seed=0,
                                 max_len=int(max_len or config.max_position_embeddings), bos_id=bos_id)
        for seq in seqs:
            events: dict[tuple[int, str], int] = {}  # (position read, family) -> tail id
            for _s, begin, group, tail, *_ in seq.triplets.tolist():
                family, _relation, direction = keys[group]
                if direction != "forward":
                    continue
                tail_id = int(seq.uniq[tail])
                for j in np.flatnonzero(seq.tokens[begin + 1:] == tail_id) + begin:
                    events[(int(j), family)] = tail_id
            if not events:
                continue
            family = next(iter(events))[1]  # a sequence's triplets share its family
            if n_sequences is not None and taken.get(family, 0) == n_sequences:
                continue
            taken[family] = taken.get(family, 0) + 1
            for (j, family), tail_id in sorted(events.items()):
                reads.append((len(kept), j))
                targets.append(tail_id)
                documents.append(seq.document)
                families.append(family)
            kept.append(seq.tokens)
        if n_sequences is not None and all(taken.get(f, 0) == n_sequences for f in wanted):
            break
    if not kept:
        raise ValueError("no relation event: no forward triplet's tail recurs after both its head and tail")
    return RelationRecall(tuple(kept), np.asarray(reads, np.int64), np.asarray(targets, np.int64),
                          np.asarray(documents, np.int64), tuple(families))


def icl_score_set(docs: torch.Tensor | np.ndarray, *, early: int, late: int, task: str = "text") -> ICLScore:
    """The ICL score's documents ([n_docs, context] token ids, e.g. the tokenize-text table), cut after
    token ``late``; ``task`` names them in the output (the text source's label)."""
    docs = np.asarray(docs, dtype=np.int64)
    if docs.ndim != 2 or not 1 <= early < late < docs.shape[1]:
        raise ValueError(f"ICL score needs [n_docs, context] documents and 1 <= early < late < context; got shape "
                         f"{docs.shape}, early={early}, late={late}")
    n = len(docs)
    rows = np.tile(np.arange(n), 2)
    positions = np.repeat([early - 1, late - 1], n)
    return ICLScore(tuple(docs[:, :late]), np.stack([rows, positions], 1), docs[rows, positions + 1], task)


def icl_task_set(tokenizer: PreTrainedTokenizerBase, *, shots: int, n_prompts: int = 50, seed: int = 0,
                 tasks: Sequence[Task] = TASKS) -> ICLTasks:
    """The synthetic-task prompts at ``shots`` demonstrations, as :func:`icl_tasks.evaluate_tasks` builds them."""
    sequences, targets, legal, names = [], [], [], []
    width = max(task.n_classes for task in tasks)
    for task in tasks:
        prompts = make_prompts(task, shots, n_prompts, seed)
        labels = label_token_ids(tokenizer, task.n_classes, prompts[0].text)
        for prompt in prompts:
            text = prompt.text + label_separator(tokenizer, prompt.text)
            sequences.append(np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int64))
            targets.append(labels[prompt.label])
            legal.append(labels + [-1] * (width - len(labels)))
            names.append(task.name)
    reads = np.stack([np.arange(len(sequences)), [len(s) - 1 for s in sequences]], 1)
    return ICLTasks(tuple(sequences), reads, np.asarray(targets, np.int64), np.asarray(legal, np.int64),
                    tuple(names), shots)


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


def _batches(evaluation: Evaluation, batch_size: int, device: torch.device) -> Iterator[tuple]:
    """Right-padded batches (longest first): ids, mask, and the reads of its sequences (read index, row, position)."""
    order = sorted(range(len(evaluation.sequences)), key=lambda i: -len(evaluation.sequences[i]))
    rows_of = np.full(len(evaluation.sequences), -1)
    for start in range(0, len(order), batch_size):
        members = order[start:start + batch_size]
        width = len(evaluation.sequences[members[0]])
        ids = torch.zeros((len(members), width), dtype=torch.long)
        mask = torch.zeros((len(members), width), dtype=torch.long)
        for row, i in enumerate(members):
            ids[row, :len(evaluation.sequences[i])] = torch.as_tensor(evaluation.sequences[i])
            mask[row, :len(evaluation.sequences[i])] = 1
        rows_of[:] = -1
        rows_of[members] = np.arange(len(members))
        reads = np.flatnonzero(rows_of[evaluation.reads[:, 0]] >= 0)
        yield (ids.to(device), mask.to(device), *(torch.as_tensor(x, device=device) for x in (
            reads, rows_of[evaluation.reads[reads, 0]], evaluation.reads[reads, 1])))


def _logits(model: PreTrainedModel, hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
            final_norm: bool) -> torch.Tensor:
    """Next-token logits at (row, position) of a batch's residual stream (``final_norm``: apply the final norm)."""
    picked = hidden[rows, positions]
    arch = architecture(model)
    return arch.logits(picked) if final_norm else model.get_output_embeddings()(picked)


@torch.inference_mode()
def _run(model: PreTrainedModel, evaluation: Evaluation, ablations: Sequence[Sequence[Head]], batch_size: int,
         cost: Cost, keep_first: bool) -> np.ndarray:
    """Per-read scores [1 + ablations, P, k]: clean, then with each ablation's heads mean-ablated (``keep_first``:
    position 0 keeps its output, and the means are taken over the other positions)."""
    arch = architecture(model)
    base, layers = arch.base(), arch.layers()
    n_layers = len(layers)
    device = next(model.parameters()).device
    check_context(model, max(len(s) for s in evaluation.sequences), "the ablation's evaluation sequences")
    tokens = sum(len(s) for s in evaluation.sequences)
    reference = tokens - keep_first * len(evaluation.sequences)  # positions the means are taken over
    starts = [min(layer for layer, _ in heads) for heads in ablations]
    cost.tokens += tokens
    cost.unshared_token_layers += (1 + len(ablations)) * n_layers * tokens
    cost.token_layers += n_layers * tokens  # the clean pass

    # clean pass: the clean scores and every head's mean output over the real positions (the reference set)
    sums = torch.zeros((n_layers, arch.n_heads * arch.d_head), dtype=torch.float64, device=device)
    clean = []
    current: dict[str, torch.Tensor] = {}

    def accumulate(layer: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            sums[layer] += (args[0].double() * current["reference"][..., None]).sum((0, 1))
        return hook

    handles = [arch.output_projections()[layer].register_forward_pre_hook(accumulate(layer))
               for layer in range(n_layers)]
    try:
        for ids, mask, reads, rows, positions in _batches(evaluation, batch_size, device):
            current["reference"] = mask.clone()
            current["reference"][:, 0] *= not keep_first
            hidden = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            clean.append((reads, evaluation.score(_logits(model, hidden, rows, positions, False), reads)))
    finally:
        for handle in handles:
            handle.remove()
    means = (sums / reference).to(next(model.parameters()).dtype)
    values = np.full((1 + len(ablations), len(evaluation.reads), clean[0][1].shape[1]), np.nan)
    for reads, scores in clean:
        values[0, reads.cpu().numpy()] = scores.cpu().numpy()

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


def _effects(model: PreTrainedModel, evaluations: Sequence[Evaluation], ablations: Sequence[Sequence[Head]],
             labels: Sequence[Mapping[str, Any]], *, batch_size: int, n_boot: int, seed: int,
             keep_first: bool) -> pd.DataFrame:
    """The rows of :data:`ABLATION_SCHEMA` (without model, step, tokens) of ``ablations``, labelled by ``labels``."""
    if batch_size < 1 or n_boot < 1:
        raise ValueError(f"batch_size and n_boot must be >= 1, got {batch_size} and {n_boot}")
    for heads in ablations:
        _check_heads(model, heads)
    cost = Cost(model.config.num_hidden_layers)
    start = time.perf_counter()
    rows = []
    for evaluation in evaluations if ablations else ():
        for cell in evaluation.cells(_run(model, evaluation, ablations, batch_size, cost, keep_first)):
            clean = cell.units[:, 0]
            kinds, value, low, high = cell_effects(cell.units, labels, n_boot=n_boot, seed=seed)
            for a, label in enumerate(kinds):
                rows.append({**label, "level": cell.level, "task": cell.task, "shots": cell.shots,
                             "metric": cell.metric, "value": float(value[a]), "ci_low": float(low[a]),
                             "ci_high": float(high[a]), "baseline": float(clean.mean()), "n": len(clean),
                             "events": cell.events})
    cost.seconds = time.perf_counter() - start
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    for name in _NULLABLE_INTS:
        frame[name] = frame[name].astype("Int32")
    frame.attrs["cost"] = cost
    return frame


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
    return _effects(model, evaluations, ablations, labels, batch_size=batch_size, n_boot=n_boot, seed=seed,
                    keep_first=keep_first)


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
    return _effects(model, evaluations, ablations, labels, batch_size=batch_size, n_boot=n_boot, seed=seed,
                    keep_first=keep_first)


def ablation_table(model: PreTrainedModel, evaluations: Sequence[Evaluation], groups: Mapping[str, Sequence[Head]],
                   *, draws: int = 5, seed: int = 0, batch_size: int = 8, n_boot: int = 1000,
                   keep_first: bool = KEEP_FIRST) -> pd.DataFrame:
    """The ablation stage's rows: every head alone, then each group and its controls, as
    :func:`head_ablation_effects` and :func:`group_ablation_effects` give them but on one clean pass per
    evaluation set (the same means, baselines and bootstrap resamples). ``attrs["cost"]``: a :class:`Cost`."""
    heads, head_labels = _single_heads(model, None)
    group_ablations, group_labels = _groups(model, groups, draws, seed)
    return _effects(model, evaluations, heads + group_ablations, head_labels + group_labels, batch_size=batch_size,
                    n_boot=n_boot, seed=seed, keep_first=keep_first)


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
