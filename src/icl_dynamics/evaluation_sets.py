"""The fixed evaluation sets of the causal check (:mod:`icl_dynamics.ablation`, :mod:`icl_dynamics.attribution`):
token sequences, the positions whose next-token distribution is read, and how the reads make each metric.

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

Each set turns per-read scores into per-unit metrics (:meth:`Evaluation.cells`: documents for relation
recall, averaging a document's events first so every document weighs the same; documents for the ICL
score; prompts for the tasks). For the gradient screen each set also names what it linearises per read
and how the estimated change becomes the metric (:meth:`Evaluation.objectives`,
:meth:`Evaluation.estimated_cells`): the target's log-odds for recall and the ICL score (the log-probability
is log sigmoid of it, applied exactly), and for the tasks the two margins whose sign *is* the metric (the best
legal label's logit over the best other token's; the gold label's over the best other legal label's).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from icl_dynamics.architecture import architecture, sequence_start_id
from icl_dynamics.icl_tasks import TASKS, Task, label_separator, label_token_ids, make_prompts
from icl_dynamics.relation_events import SEQUENCE_COLUMNS, TRIPLET_COLUMNS, as_frame, prepare_sequences


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

    def objectives(self, logits: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        """Per read [p, k]: what the screen linearises (its first-order change is estimated and the metric
        then computed from it exactly, :meth:`estimated_cells`): here the target's log-odds, logit minus the
        log-sum-exp of every other token's, the quantity before the softmax saturates (a read already at
        p = 0.99 has almost no log-probability gradient left, but its log-odds still move freely)."""
        logits = logits.double()
        targets = torch.as_tensor(self.targets, device=logits.device)[reads]
        target = logits.gather(1, targets[:, None])
        others = torch.logsumexp(logits.scatter(1, targets[:, None], -torch.inf), 1, keepdim=True)
        return target - others

    def read_weights(self) -> np.ndarray:
        """[P, 1] (the same for every objective) or [P, k]: each read's weight in the sum of its slot the screen
        differentiates (here 1: a read alone)."""
        return np.ones((len(self.reads), 1))

    def slots(self) -> np.ndarray:
        """[P]: each read's rank among its sequence's reads (the screen runs one backward pass per rank and
        objective, so every read gets its own estimate; a read's change is then its slot's sum in its row)."""
        order = np.lexsort((np.arange(len(self.reads)), self.reads[:, 0]))
        ranks = np.empty(len(order), np.int64)
        sequences = self.reads[order, 0]
        starts = np.r_[0, np.flatnonzero(np.diff(sequences)) + 1]
        ranks[order] = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        return ranks

    def estimated_cells(self, clean: np.ndarray, objectives: np.ndarray, deltas: np.ndarray) -> list[Cell]:
        """The cells of :meth:`cells` with each ablation's column estimated: ``clean`` [P, k] the clean
        scores, ``objectives`` [P, k'] the clean objectives, ``deltas`` [P, ablations, k'] their estimated
        changes. Here: the log-probability at the moved log-odds, log sigmoid(o + delta)."""
        estimated = torch.nn.functional.logsigmoid(torch.as_tensor(objectives[:, None] + deltas)).numpy()
        return self.cells(np.concatenate([clean[None], estimated.transpose(1, 0, 2)], 0))


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

    # The screen's one approximation here: a sequence holds up to ~30 events (AGENDA, 6 on average), and a
    # backward pass per event rank would cost that many passes; one pass per sequence differentiates the mean
    # of its events' log-odds, and every event of the sequence is moved by that mean change (exact where a
    # head moves the sequence's events alike, as a head that recalls the relation's tails does).
    def read_weights(self) -> np.ndarray:
        sequences = self.reads[:, 0]
        return (1.0 / np.bincount(sequences)[sequences])[:, None]

    def slots(self) -> np.ndarray:
        return np.zeros(len(self.reads), np.int64)


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

    def objectives(self, logits: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        """Per read [p, 2]: the margins whose signs are the two metrics: the best legal label's logit minus
        the best other token's (> 0: format compliant), the gold label's minus the best other legal
        label's (> 0: correct)."""
        logits = logits.double()
        legal = torch.as_tensor(self.legal, device=logits.device)[reads]
        gold = torch.as_tensor(self.targets, device=logits.device)[reads]
        is_legal = (torch.arange(logits.shape[1], device=logits.device) == legal[:, :, None]).any(1)  # -1: none
        best_legal = logits.masked_fill(~is_legal, -torch.inf).amax(1)
        best_other = logits.masked_fill(is_legal, -torch.inf).amax(1)
        rival = is_legal.scatter(1, gold[:, None], False)
        gold_margin = logits.gather(1, gold[:, None])[:, 0] - logits.masked_fill(~rival, -torch.inf).amax(1)
        return torch.stack([best_legal - best_other, gold_margin], 1)

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

    def estimated_cells(self, clean: np.ndarray, objectives: np.ndarray, deltas: np.ndarray) -> list[Cell]:
        """Each prompt's metric under an ablation: the sign of its margin plus the margin's estimated change."""
        predicted = (objectives[:, None, :] + deltas > 0).astype(float)  # [P, ablations, 2]
        return self.cells(np.concatenate([clean[None], predicted.transpose(1, 0, 2)], 0))


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


def toy_zoo_sets(zoo: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
                 planted: bool) -> list[Evaluation]:
    """The ablation stage's sets for a toy zoo at the toy configs' sizes (config/toy.yaml, toy-relations.yaml):
    the ICL score on 32 documents of the zoo's text (loss at token 60 minus token 4), the synthetic tasks at
    5 shots, 20 prompts each, and with ``planted`` relation recall on the zoo's planted relations (64
    sequences), first. For the benchmarks and tests that ablate every checkpoint of a zoo."""
    from icl_dynamics.icl import TextSource, iter_texts, select_documents
    from icl_dynamics.relations import build_planted_relations, read_texts

    zoo = Path(zoo)
    texts = iter_texts(TextSource("jsonl", path=str(zoo / "text.jsonl")))
    docs = np.asarray([d["token_ids"] for d in select_documents(texts, tokenizer, context=64, n_docs=32, seed=0)])
    sets: list[Evaluation] = [icl_score_set(docs, early=4, late=60), icl_task_set(tokenizer, shots=5, n_prompts=20)]
    if planted:
        tables = build_planted_relations(zoo / "planted.json", read_texts(zoo / "relations.jsonl"), tokenizer)
        sets.insert(0, relation_recall_set(model.config, tables.sequences, tables.triplets, n_sequences=64))
    return sets


def reference_positions(mask: torch.Tensor, keep_first: bool) -> torch.Tensor:
    """[batch, positions]: where mean ablation replaces a head's output, and so the positions its mean is taken
    over: every real position, but position 0 under ``keep_first``."""
    reference = mask.clone()
    reference[:, 0] *= not keep_first
    return reference


def reference_count(evaluation: Evaluation, keep_first: bool) -> int:
    """How many positions of ``evaluation`` :func:`reference_positions` holds (the means' denominator)."""
    return sum(len(s) for s in evaluation.sequences) - keep_first * len(evaluation.sequences)


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
